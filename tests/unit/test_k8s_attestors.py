"""k8s_psat node attestor and k8s workload attestor against real HTTPS servers.

The servers answer the documented Kubernetes shapes (TokenReview authentication.k8s.io/v1,
Pod and Node v1, the kubelet's /pods PodList) and check bearer tokens. Every Kubernetes
object they send or receive is validated with kubernetes-validate (strict).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import ipaddress
import json
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestors.k8s_client import ApiClient, ConfigSection, K8sApiError, read_token_file
from attestors.node.base import AttestationRequest
from attestors.node.k8s_psat import (
    InMemoryTokenReplayCache,
    K8sPsatAgentPlugin,
    K8sPsatAttestor,
)
from attestors.workload.base import Caller
from attestors.workload.k8s import K8sWorkloadAttestor, find_container, pod_selectors
from meshid.errors import AttestationError, ConfigError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain

K8S_VERSION = "1.33"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "k8s"
TD = TrustDomain("example.org")

AGENT_POD = "meshid-agent-7x2kq"
AGENT_POD_UID = "3f1c2b7e-8d4a-4c61-9e0f-5a6b7c8d9e01"
NODE_UID = "9a8b7c6d-5e4f-4321-8fed-cba987654321"
WEB_POD_UID = "0d6a3c12-5c1e-4e57-9a5e-2a7d5f1c9b11"
WEB_CID = "4f3e2d1c0b9a88776655443322110ffeeddccbbaa99887766554433221100aab"


def load(name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return obj


def assert_valid(obj: dict[str, Any]) -> None:
    """Strict kubernetes-validate; the message is shortened (the library's is a whole schema)."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj.get('kind')} is not a valid Kubernetes {K8S_VERSION} object: {exc.message}")


@pytest.mark.parametrize("name", ["agent-pod.json", "node.json", "kubelet-pods.json"])
def test_fixtures_are_valid_kubernetes_objects(name: str) -> None:
    assert_valid(load(name))


def test_validation_is_strict() -> None:
    bad = load("agent-pod.json")
    bad["spec"]["notAField"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# --- TLS and server plumbing -------------------------------------------------------------------


@dataclass
class Tls:
    ca_file: Path
    server_ctx: ssl.SSLContext


def make_tls(directory: Path, name: str = "test") -> Tls:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / f"{name}-ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file = directory / f"{name}-server.pem"
    key_file = directory / f"{name}-server-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return Tls(ca_file=ca_file, server_ctx=ctx)


async def serve_https(app: web.Application, tls: Tls) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"https://127.0.0.1:{port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def status_response(code: int, reason: str, message: str) -> web.Response:
    # metav1.Status, the API server's error envelope.
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body.update({"message": message, "reason": reason, "code": code})
    return web.json_response(body, status=code)


def make_jwt(claims: dict[str, Any]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "RS256", "kid": "k8s-sa-key"}
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(secrets.token_bytes(64))]
    )


# --- a fake API server -------------------------------------------------------------------------


@dataclass
class TokenInfo:
    namespace: str
    service_account: str
    audiences: list[str]
    pod_name: str = AGENT_POD
    pod_uid: str = AGENT_POD_UID


@dataclass
class FakeApiServer:
    bearer: str = field(default_factory=lambda: "api-client-" + secrets.token_hex(16))
    tokens: dict[str, TokenInfo] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    reviews: list[dict[str, Any]] = field(default_factory=list)
    # Misbehaviour switches: "malformed-review", "malformed-pod", "lying-audience", "huge-pod".
    mode: str | None = None

    def issue_token(self, info: TokenInfo, ttl: float = 3600, with_exp: bool = True) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": info.audiences,
            "iat": now,
            "nbf": now,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": f"system:serviceaccount:{info.namespace}:{info.service_account}",
            "kubernetes.io": {
                "namespace": info.namespace,
                "pod": {"name": info.pod_name, "uid": info.pod_uid},
                "serviceaccount": {
                    "name": info.service_account,
                    "uid": "5e6f7a8b-0000-4000-8000-000000000001",
                },
            },
            "jti": secrets.token_hex(8),
        }
        if with_exp:
            claims["exp"] = now + int(ttl)
        token = make_jwt(claims)
        self.tokens[token] = info
        return token

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self.token_review)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self.get_pod)
        app.router.add_get("/api/v1/nodes/{name}", self.get_node)
        return app

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.bearer}"

    async def token_review(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return status_response(401, "Unauthorized", "Unauthorized")
        review = await request.json()
        assert_valid(review)  # what the attestor sends is a valid TokenReview too
        self.reviews.append(review)
        if self.mode == "malformed-review":
            return web.Response(
                text='{"kind": "TokenReview", "status": {"authenticated": tr', content_type="application/json"
            )
        spec = review["spec"]
        wanted = spec.get("audiences") or ["https://kubernetes.default.svc.cluster.local"]
        info = self.tokens.get(spec["token"])
        status: dict[str, Any]
        if info is None:
            status = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        elif not set(info.audiences) & set(wanted):
            status = {
                "user": {},
                "error": f"token audiences {info.audiences} is invalid for the target audiences {wanted}",
            }
        else:
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{info.namespace}:{info.service_account}",
                    "uid": "5e6f7a8b-0000-4000-8000-000000000001",
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{info.namespace}",
                        "system:authenticated",
                    ],
                    "extra": {
                        "authentication.kubernetes.io/credential-id": ["JTI=0123"],
                        "authentication.kubernetes.io/node-name": ["node-1"],
                        "authentication.kubernetes.io/node-uid": [NODE_UID],
                        "authentication.kubernetes.io/pod-name": [info.pod_name],
                        "authentication.kubernetes.io/pod-uid": [info.pod_uid],
                    },
                },
                "audiences": sorted(set(info.audiences) & set(wanted)),
            }
            if self.mode == "lying-audience":
                status["audiences"] = ["https://kubernetes.default.svc.cluster.local"]
        response = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {},
            "spec": spec,
            "status": status,
        }
        assert_valid(response)
        return web.json_response(response, status=201)

    async def get_pod(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return status_response(401, "Unauthorized", "Unauthorized")
        if self.mode == "malformed-pod":
            return web.Response(text="<html>gateway error</html>", content_type="text/html")
        if self.mode == "huge-pod":
            return web.json_response({"kind": "Pod", "apiVersion": "v1", "pad": "x" * (2 * 1024 * 1024)})
        ns, name = request.match_info["ns"], request.match_info["name"]
        pod = self.pods.get((ns, name))
        if pod is None:
            return status_response(404, "NotFound", f'pods "{name}" not found')
        assert_valid(pod)
        return web.json_response(pod)

    async def get_node(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return status_response(401, "Unauthorized", "Unauthorized")
        node = self.nodes.get(request.match_info["name"])
        if node is None:
            return status_response(404, "NotFound", "node not found")
        assert_valid(node)
        return web.json_response(node)


@dataclass
class PsatEnv:
    api: FakeApiServer
    url: str
    tls: Tls
    tmp: Path
    token_file: Path
    make: Callable[..., K8sPsatAttestor]

    def good_token(self, **kw: Any) -> str:
        return self.api.issue_token(TokenInfo("meshid", "meshid-agent", ["meshid-server"]), **kw)


@pytest.fixture
async def psat(tmp_path: Path) -> AsyncIterator[PsatEnv]:
    tls = make_tls(tmp_path / "tls")
    api = FakeApiServer()
    api.pods[("meshid", AGENT_POD)] = load("agent-pod.json")
    api.nodes["node-1"] = load("node.json")
    runner, url = await serve_https(api.app(), tls)
    token_file = tmp_path / "server-sa-token"
    token_file.write_text(api.bearer + "\n")
    made: list[K8sPsatAttestor] = []

    def make(**overrides: Any) -> K8sPsatAttestor:
        cluster: dict[str, Any] = {
            "service_account_allow_list": ["meshid:meshid-agent"],
            "allowed_node_label_keys": ["topology.kubernetes.io/zone"],
            "allowed_pod_label_keys": ["app.kubernetes.io/name"],
            "api_server": url,
            "token_file": str(token_file),
            "ca_file": str(tls.ca_file),
            "timeout": 5,
        }
        cluster.update(overrides)
        # Two cluster names on one API server: a token must not attest under both.
        attestor = K8sPsatAttestor.from_config({"clusters": {"prod": cluster, "prod-alias": dict(cluster)}})
        made.append(attestor)
        return attestor

    yield PsatEnv(api, url, tls, tmp_path, token_file, make)
    for attestor in made:
        await attestor.close()
    await runner.cleanup()


def request(token: str, cluster: str = "prod") -> AttestationRequest:
    return AttestationRequest(
        attestor="k8s_psat", payload={"cluster": cluster, "token": token}, source="10.0.0.11"
    )


async def refused(attestor: K8sPsatAttestor, req: AttestationRequest, match: str) -> AttestationError:
    with pytest.raises(AttestationError, match=match) as info:
        await attestor.attest(req, TD, None)
    token = req.payload.get("token")
    if isinstance(token, str) and token:
        assert token not in str(info.value)
        signature = token.split(".")[-1]
        assert len(signature) < 16 or signature not in str(info.value)
    return info.value


# --- k8s_psat: success ------------------------------------------------------------------------


async def test_psat_attests_with_spire_selectors(psat: PsatEnv) -> None:
    attestor = psat.make()
    assert await attestor.challenge(request("x")) is None
    result = await attestor.attest(request(psat.good_token()), TD, None)
    assert result.agent_id == SpiffeId.parse(f"spiffe://example.org/meshid/agent/k8s_psat/prod/{NODE_UID}")
    assert result.can_reattest
    assert {str(s) for s in result.selectors} == {
        "k8s_psat:cluster:prod",
        "k8s_psat:agent_ns:meshid",
        "k8s_psat:agent_sa:meshid-agent",
        f"k8s_psat:agent_pod_name:{AGENT_POD}",
        f"k8s_psat:agent_pod_uid:{AGENT_POD_UID}",
        "k8s_psat:agent_node_name:node-1",
        f"k8s_psat:agent_node_uid:{NODE_UID}",
        "k8s_psat:agent_node_ip:10.0.0.11",
        "k8s_psat:agent_node_ip:fd00::11",
        # Only the allow-listed label keys.
        "k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-west-1a",
        "k8s_psat:agent_pod_label:app.kubernetes.io/name:meshid-agent",
    }
    (review,) = psat.api.reviews
    assert review["spec"]["audiences"] == ["meshid-server"]


async def test_psat_same_agent_may_reattest_with_same_token(psat: PsatEnv) -> None:
    attestor = psat.make()
    token = psat.good_token()
    first = await attestor.attest(request(token), TD, None)
    again = await attestor.attest(request(token), TD, None)
    assert first.agent_id == again.agent_id


async def test_psat_custom_audience(psat: PsatEnv) -> None:
    attestor = psat.make(audience=["spire-server", "meshid-prod"])
    token = psat.api.issue_token(TokenInfo("meshid", "meshid-agent", ["meshid-prod"]))
    result = await attestor.attest(request(token), TD, None)
    assert Selector("k8s_psat", "cluster:prod") in result.selectors
    assert psat.api.reviews[-1]["spec"]["audiences"] == ["spire-server", "meshid-prod"]


# --- k8s_psat: fail closed ---------------------------------------------------------------------


async def test_psat_refuses_unauthenticated_token(psat: PsatEnv) -> None:
    attestor = psat.make()
    forged = make_jwt({"aud": ["meshid-server"], "exp": int(time.time()) + 600, "sub": "x"})
    await refused(attestor, request(forged), "not authenticated")


async def test_psat_refuses_wrong_audience(psat: PsatEnv) -> None:
    attestor = psat.make()
    token = psat.api.issue_token(TokenInfo("meshid", "meshid-agent", ["https://kubernetes.default.svc"]))
    await refused(attestor, request(token), "not authenticated")


async def test_psat_refuses_audience_the_api_server_reports_wrongly(psat: PsatEnv) -> None:
    attestor = psat.make()
    psat.api.mode = "lying-audience"
    await refused(attestor, request(psat.good_token()), "audience")


async def test_psat_refuses_service_account_not_allowed(psat: PsatEnv) -> None:
    attestor = psat.make()
    token = psat.api.issue_token(TokenInfo("meshid", "default", ["meshid-server"]))
    await refused(attestor, request(token), "meshid:default is not allowed")


async def test_psat_refuses_namespace_not_allowed(psat: PsatEnv) -> None:
    attestor = psat.make()
    token = psat.api.issue_token(TokenInfo("attacker", "meshid-agent", ["meshid-server"]))
    await refused(attestor, request(token), "attacker:meshid-agent is not allowed")


async def test_psat_refuses_when_api_unreachable(psat: PsatEnv) -> None:
    attestor = psat.make(api_server=f"https://127.0.0.1:{free_port()}")
    await refused(attestor, request(psat.good_token()), "unreachable")


async def test_psat_refuses_when_tls_not_trusted(psat: PsatEnv) -> None:
    other = make_tls(psat.tmp / "other", "other")
    attestor = psat.make(ca_file=str(other.ca_file))
    await refused(attestor, request(psat.good_token()), "TLS verification failed")


async def test_psat_refuses_when_server_credentials_rejected(psat: PsatEnv) -> None:
    psat.token_file.write_text("not-the-right-token")
    attestor = psat.make()
    await refused(attestor, request(psat.good_token()), "HTTP 401")


async def test_psat_refuses_malformed_token_review(psat: PsatEnv) -> None:
    attestor = psat.make()
    psat.api.mode = "malformed-review"
    await refused(attestor, request(psat.good_token()), "not valid JSON")


async def test_psat_refuses_malformed_pod(psat: PsatEnv) -> None:
    attestor = psat.make()
    psat.api.mode = "malformed-pod"
    await refused(attestor, request(psat.good_token()), "not valid JSON")


async def test_psat_refuses_oversized_response(psat: PsatEnv) -> None:
    attestor = psat.make()
    psat.api.mode = "huge-pod"
    await refused(attestor, request(psat.good_token()), "larger than")


async def test_psat_refuses_pod_gone(psat: PsatEnv) -> None:
    attestor = psat.make()
    token = psat.good_token()
    del psat.api.pods[("meshid", AGENT_POD)]
    await refused(attestor, request(token), "pod not found")


async def test_psat_refuses_pod_replaced_under_same_name(psat: PsatEnv) -> None:
    attestor = psat.make()
    psat.api.pods[("meshid", AGENT_POD)]["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000"
    await refused(attestor, request(psat.good_token()), "UID does not match")


async def test_psat_refuses_node_gone(psat: PsatEnv) -> None:
    attestor = psat.make()
    psat.api.nodes.clear()
    await refused(attestor, request(psat.good_token()), "node not found")


async def test_psat_refuses_replay_to_a_second_agent(psat: PsatEnv) -> None:
    attestor = psat.make()
    token = psat.good_token()
    await attestor.attest(request(token, "prod"), TD, None)
    # Same token, other cluster name: it would mint a different agent ID.
    await refused(attestor, request(token, "prod-alias"), "already used")
    # And after the node is recreated (new UID) the old token cannot attest it either.
    psat.api.nodes["node-1"]["metadata"]["uid"] = "11111111-2222-4333-8444-555555555555"
    await refused(attestor, request(token, "prod"), "already used")
    # A fresh token is fine.
    result = await attestor.attest(request(psat.good_token(), "prod-alias"), TD, None)
    assert result.agent_id.path.startswith("/meshid/agent/k8s_psat/prod-alias/")


async def test_psat_refuses_before_calling_the_api(psat: PsatEnv) -> None:
    attestor = psat.make()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cluster": "prod"}, "'token'"),
        ({"token": "a.b.c"}, "'cluster'"),
        ({"cluster": "prod", "token": 7}, "'token'"),
        ({"cluster": "staging", "token": psat.good_token()}, "not configured"),
        ({"cluster": "prod", "token": "not-a-jwt"}, "not a JWT"),
        ({"cluster": "prod", "token": "a.%%%.c"}, "not a JWT"),
        ({"cluster": "prod", "token": "x" * 20000}, "too long"),
        ({"cluster": "prod", "token": psat.good_token(with_exp=False)}, "no expiry"),
        ({"cluster": "prod", "token": psat.good_token(ttl=-10)}, "expired"),
        ({"cluster": "prod", "token": make_jwt({"exp": float("nan")})}, "no expiry"),
        # An exp too large for a float was an OverflowError: a 500 and a traceback per request.
        ({"cluster": "prod", "token": make_jwt({"exp": 10**400})}, "out of range"),
    ]
    for payload, match in cases:
        await refused(attestor, AttestationRequest("k8s_psat", payload), match)
    assert psat.api.reviews == []


async def test_replay_cache_expiry_and_bound() -> None:
    now = [1000.0]
    cache = InMemoryTokenReplayCache(clock=lambda: now[0], max_entries=2)
    assert await cache.claim("h1", "agent-a", 1100)
    assert await cache.claim("h1", "agent-a", 1100)
    assert not await cache.claim("h1", "agent-b", 1100)
    assert await cache.claim("h2", "agent-b", 1050)
    # Full of live bindings: refuse rather than forget one.
    assert not await cache.claim("h3", "agent-c", 1100)
    now[0] = 1060  # h2 expired
    assert await cache.claim("h3", "agent-c", 1100)
    now[0] = 1200  # h1 expired: the hash may be bound again (the token itself is dead by now)
    assert await cache.claim("h1", "agent-b", 1300)


async def test_psat_uses_injected_replay_cache(psat: PsatEnv) -> None:
    class Recording:
        def __init__(self) -> None:
            self.claims: list[tuple[str, str, float]] = []

        async def claim(self, token_sha256: str, agent_id: str, expires_at: float) -> bool:
            self.claims.append((token_sha256, agent_id, expires_at))
            return False

    cache = Recording()
    base = psat.make()
    attestor = K8sPsatAttestor(base._clusters, replay_cache=cache, clients=base._clients)
    token = psat.good_token()
    await refused(attestor, request(token), "already used")
    ((digest, aid, exp),) = cache.claims
    assert len(digest) == 64 and token not in digest
    assert aid.endswith(NODE_UID) and exp > time.time()


# --- k8s_psat: configuration and agent side ----------------------------------------------------


@pytest.mark.parametrize(
    ("cluster", "match"),
    [
        ({}, "service_account_allow_list: required"),
        ({"service_account_allow_list": []}, "must not be empty"),
        ({"service_account_allow_list": ["meshid"]}, "not '<namespace>:<name>'"),
        ({"service_account_allow_list": ["a:b"], "audience": []}, "audience: must not be empty"),
        ({"service_account_allow_list": ["a:b"], "audiences": ["x"]}, "unknown key"),
        ({"service_account_allow_list": ["a:b"], "api_server": "http://10.0.0.1"}, "https://"),
        ({"service_account_allow_list": ["a:b"], "timeout": "5s"}, "timeout: must be a number"),
        ("not a table", "must be a table"),
    ],
)
def test_psat_config_errors(cluster: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        K8sPsatAttestor.from_config({"clusters": {"prod": cluster}})


def test_psat_config_errors_outside_clusters() -> None:
    with pytest.raises(ConfigError, match="clusters: required"):
        K8sPsatAttestor.from_config({})
    with pytest.raises(ConfigError, match="at least one cluster"):
        K8sPsatAttestor.from_config({"clusters": {}})
    with pytest.raises(ConfigError, match="cluster name"):
        K8sPsatAttestor.from_config({"clusters": {"bad/name": {"service_account_allow_list": ["a:b"]}}})
    with pytest.raises(ConfigError, match="unknown key"):
        K8sPsatAttestor.from_config({"clusters": {}, "cluster": "x"})


def test_psat_config_in_cluster_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    ca = make_tls(tmp_path).ca_file
    cfg = {"service_account_allow_list": ["a:b"], "ca_file": str(ca)}
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        K8sPsatAttestor.from_config({"clusters": {"c": cfg}})
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    attestor = K8sPsatAttestor.from_config({"clusters": {"c": cfg}})
    assert attestor._clients["c"].base_url == "https://10.96.0.1:443"


def test_agent_plugin_reads_token_each_time(tmp_path: Path) -> None:
    token_path = tmp_path / "meshid-agent"
    token_path.write_text("aaa.bbb.ccc\n")
    plugin = K8sPsatAgentPlugin.from_config({"cluster": "prod", "token_path": str(token_path)})
    assert plugin.name == "k8s_psat"
    assert plugin.payload() == {"cluster": "prod", "token": "aaa.bbb.ccc"}
    token_path.write_text("ddd.eee.fff")  # kubelet rotated it
    assert (plugin.payload())["token"] == "ddd.eee.fff"
    token_path.unlink()
    with pytest.raises(AttestationError, match="cannot read token file"):
        plugin.payload()
    assert (
        K8sPsatAgentPlugin.from_config({"cluster": "c"}).token_path == "/var/run/secrets/tokens/meshid-agent"
    )
    with pytest.raises(ConfigError, match="cluster: required"):
        K8sPsatAgentPlugin.from_config({})
    with pytest.raises(ConfigError, match="unknown key"):
        K8sPsatAgentPlugin.from_config({"cluster": "c", "token": "inline"})


async def test_end_to_end_agent_payload_to_server(psat: PsatEnv) -> None:
    token_path = psat.tmp / "projected"
    token_path.write_text(psat.good_token())
    plugin = K8sPsatAgentPlugin("prod", str(token_path))
    result = await psat.make().attest(AttestationRequest("k8s_psat", plugin.payload()), TD, None)
    assert str(result.agent_id).endswith(f"/prod/{NODE_UID}")


# --- k8s workload attestor ---------------------------------------------------------------------


@dataclass
class FakeKubelet:
    bearer: str = field(default_factory=lambda: "agent-sa-" + secrets.token_hex(16))
    pod_list: dict[str, Any] = field(default_factory=lambda: load("kubelet-pods.json"))
    # The web pod is left out of the first `hide_for` answers, like a pod that just started.
    hide_for: int = 0
    malformed: bool = False
    calls: int = 0
    delay: float = 0.0  # seconds each answer takes

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/pods", self.pods)
        return app

    async def pods(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.bearer}":
            return web.Response(status=401, text="Unauthorized")
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.malformed:
            return web.Response(text='{"kind": "PodList", "items": [', content_type="application/json")
        body = copy.deepcopy(self.pod_list)
        if self.calls <= self.hide_for:
            body["items"] = [p for p in body["items"] if p["metadata"]["uid"] != WEB_POD_UID]
        assert_valid(body)
        return web.json_response(body)


def write_proc(root: Path, pid: int, cgroup: str, start_time: int = 5555) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup").write_text(cgroup)
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + [str(start_time), "0"]
    (d / "stat").write_text(f"{pid} (web) " + " ".join(fields) + "\n")


WEB_CGROUP = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{WEB_POD_UID.replace('-', '_')}.slice/cri-containerd-{WEB_CID}.scope\n"
)


@dataclass
class KubeletEnv:
    kubelet: FakeKubelet
    port: int
    tls: Tls
    proc: Path
    token_file: Path
    sleeps: list[float]
    make: Callable[..., K8sWorkloadAttestor]
    clock: list[float]  # the attestors' monotonic clock, moved by hand


@pytest.fixture
async def kubelet_env(tmp_path: Path) -> AsyncIterator[KubeletEnv]:
    tls = make_tls(tmp_path / "tls", "kubelet")
    kubelet = FakeKubelet()
    runner, url = await serve_https(kubelet.app(), tls)
    port = int(url.rsplit(":", 1)[1])
    token_file = tmp_path / "agent-sa-token"
    token_file.write_text(kubelet.bearer)
    proc = tmp_path / "proc"
    write_proc(proc, 100, WEB_CGROUP)
    write_proc(proc, 200, "0::/system.slice/sshd.service\n")
    write_proc(proc, 300, f"0::/system.slice/docker-{'e' * 64}.scope\n")
    sleeps: list[float] = []
    made: list[K8sWorkloadAttestor] = []
    clock = [1000.0]

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)
        clock[0] += delay

    def make(**overrides: Any) -> K8sWorkloadAttestor:
        config: dict[str, Any] = {
            "kubelet_host": "127.0.0.1",
            "kubelet_secure_port": port,
            "token_path": str(token_file),
            "kubelet_ca_path": str(tls.ca_file),
            "max_poll_attempts": 5,
            "poll_retry_interval": 0.25,
            "proc_root": str(proc),
        }
        config.update(overrides)
        attestor = K8sWorkloadAttestor.from_config(config, sleep=fake_sleep, clock=lambda: clock[0])
        made.append(attestor)
        return attestor

    yield KubeletEnv(kubelet, port, tls, proc, token_file, sleeps, make, clock)
    for attestor in made:
        await attestor.close()
    await runner.cleanup()


WEB_SELECTORS = {
    "k8s:ns:shop",
    "k8s:sa:web",
    f"k8s:pod-uid:{WEB_POD_UID}",
    "k8s:pod-name:web-5d7c9f8b6-4jz9p",
    "k8s:node-name:node-1",
    "k8s:pod-label:app:web",
    "k8s:pod-label:pod-template-hash:5d7c9f8b6",
    "k8s:pod-owner:ReplicaSet:web-5d7c9f8b6",
    "k8s:pod-owner-uid:ReplicaSet:71c0a1e2-93b4-4c5d-8e6f-a0b1c2d3e4f5",
    "k8s:container-name:web",
    "k8s:container-image:registry.example.com/shop/web:2.3.1",
    "k8s:container-image:registry.example.com/shop/web@sha256:" + "2" * 64,
    "k8s:pod-image:registry.example.com/shop/web:2.3.1",
    "k8s:pod-image:registry.example.com/shop/web@sha256:" + "2" * 64,
    "k8s:pod-image:docker.io/envoyproxy/envoy:v1.34.1",
    "k8s:pod-image:docker.io/envoyproxy/envoy@sha256:" + "3" * 64,
    "k8s:pod-init-image:registry.example.com/shop/migrate:1.4.0",
    "k8s:pod-init-image:registry.example.com/shop/migrate@sha256:" + "1" * 64,
    "k8s:pod-image-count:2",  # as SPIRE: the pod's containers and init containers, by status
    "k8s:pod-init-image-count:1",
}


async def test_k8s_workload_selectors(kubelet_env: KubeletEnv) -> None:
    attestor = kubelet_env.make()
    selectors = await attestor.attest(Caller(pid=100, uid=1000, gid=1000, start_time=5555))
    assert {str(s) for s in selectors} == WEB_SELECTORS
    assert kubelet_env.sleeps == []


async def test_k8s_process_outside_any_pod_gets_nothing(kubelet_env: KubeletEnv) -> None:
    attestor = kubelet_env.make()
    assert await attestor.attest(Caller(pid=200, uid=0, gid=0)) == []
    # In a plain Docker container on the node: still not in a pod.
    assert await attestor.attest(Caller(pid=300, uid=0, gid=0)) == []
    assert kubelet_env.kubelet.calls == 0


async def test_k8s_retries_until_new_pod_is_listed(kubelet_env: KubeletEnv) -> None:
    kubelet_env.kubelet.hide_for = 3
    attestor = kubelet_env.make()
    selectors = await attestor.attest(Caller(pid=100, uid=1000, gid=1000))
    assert {str(s) for s in selectors} == WEB_SELECTORS
    assert kubelet_env.kubelet.calls == 4
    assert kubelet_env.sleeps == [0.25, 0.25, 0.25]


async def test_k8s_attestations_share_the_pod_list(kubelet_env: KubeletEnv) -> None:
    """Callers attested together wait on one fetch; a caller within half the retry interval
    after it is answered from it; later ones fetch again (SPIRE caches it the same way)."""
    kubelet_env.kubelet.delay = 0.05
    attestor = kubelet_env.make()
    web = Caller(pid=100, uid=1000, gid=1000)
    results = await asyncio.gather(*(attestor.attest(web) for _ in range(20)))
    assert all({str(s) for s in r} == WEB_SELECTORS for r in results)
    assert kubelet_env.kubelet.calls == 1
    kubelet_env.clock[0] += 0.1  # within 0.25 / 2
    assert {str(s) for s in await attestor.attest(web)} == WEB_SELECTORS
    assert kubelet_env.kubelet.calls == 1
    kubelet_env.clock[0] += 0.1
    await attestor.attest(web)
    assert kubelet_env.kubelet.calls == 2


async def test_k8s_a_caller_going_away_leaves_the_shared_fetch_to_the_others(kubelet_env: KubeletEnv) -> None:
    kubelet_env.kubelet.delay = 0.1
    attestor = kubelet_env.make()
    web = Caller(pid=100, uid=1000, gid=1000)
    gone = asyncio.create_task(attestor.attest(web))
    stays = asyncio.create_task(attestor.attest(web))
    await asyncio.sleep(0.03)
    gone.cancel()
    assert {str(s) for s in await stays} == WEB_SELECTORS
    assert gone.cancelled() and kubelet_env.kubelet.calls == 1


async def test_k8s_a_failed_fetch_fails_its_waiters_and_is_not_kept(kubelet_env: KubeletEnv) -> None:
    kubelet_env.kubelet.malformed = True
    kubelet_env.kubelet.delay = 0.05
    attestor = kubelet_env.make()
    web = Caller(pid=100, uid=1000, gid=1000)
    results = await asyncio.gather(*(attestor.attest(web) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, AttestationError) and "not valid JSON" in str(r) for r in results)
    assert kubelet_env.kubelet.calls == 1
    kubelet_env.kubelet.malformed = False
    assert {str(s) for s in await attestor.attest(web)} == WEB_SELECTORS
    assert kubelet_env.kubelet.calls == 2


async def test_k8s_close_ends_superseded_fetches_too(kubelet_env: KubeletEnv) -> None:
    """A caller that needs a newer list than the one being fetched starts its own fetch; the
    older one still runs for its waiters, and close() ends it as well, not only the newest."""
    kubelet_env.kubelet.delay = 0.5
    attestor = kubelet_env.make()
    web = Caller(pid=100, uid=1000, gid=1000)
    callers = [asyncio.create_task(attestor.attest(web))]
    await asyncio.sleep(0.05)
    kubelet_env.clock[0] += 1.0  # past half the retry interval: the running fetch is too old
    callers.append(asyncio.create_task(attestor.attest(web)))
    await asyncio.sleep(0.05)
    assert kubelet_env.kubelet.calls == 2
    for caller in callers:  # the Workload API's servers stop first
        caller.cancel()
    await asyncio.wait(callers)
    await attestor.close()
    running = {getattr(t.get_coro(), "__qualname__", None) for t in asyncio.all_tasks()}
    assert "K8sWorkloadAttestor._fetch" not in running


async def test_k8s_staggered_retries_share_fetches(kubelet_env: KubeletEnv) -> None:
    """Workloads of a starting pod arrive a few ms apart and all retry while the kubelet
    does not list it yet: their retries share fetches too (a retry that insisted on a list
    begun after itself fetched once per caller). Real clock and sleeps here."""
    kubelet_env.kubelet.hide_for = 1
    kubelet_env.kubelet.delay = 0.02
    attestor = K8sWorkloadAttestor.from_config({
        "kubelet_host": "127.0.0.1", "kubelet_secure_port": kubelet_env.port,
        "token_path": str(kubelet_env.token_file), "kubelet_ca_path": str(kubelet_env.tls.ca_file),
        "max_poll_attempts": 3, "poll_retry_interval": 1.0, "proc_root": str(kubelet_env.proc),
    })
    try:
        web = Caller(pid=100, uid=1000, gid=1000)
        callers = []
        for _ in range(10):
            callers.append(asyncio.create_task(attestor.attest(web)))
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*callers)
        assert all({str(s) for s in r} == WEB_SELECTORS for r in results)
        assert kubelet_env.kubelet.calls == 2  # one hiding the pod, one listing it
    finally:
        await attestor.close()


async def test_k8s_refuses_when_pod_never_listed(kubelet_env: KubeletEnv) -> None:
    kubelet_env.kubelet.hide_for = 10**6
    attestor = kubelet_env.make()
    with pytest.raises(AttestationError, match="not listed by the kubelet after 5 attempts"):
        await attestor.attest(Caller(pid=100, uid=1000, gid=1000))
    assert kubelet_env.kubelet.calls == 5
    assert len(kubelet_env.sleeps) == 4


async def test_k8s_retries_while_container_has_no_id_yet(kubelet_env: KubeletEnv) -> None:
    status = kubelet_env.kubelet.pod_list["items"][0]["status"]["containerStatuses"][0]
    del status["containerID"]
    status["state"] = {"waiting": {"reason": "ContainerCreating"}}
    attestor = kubelet_env.make(max_poll_attempts=2)
    with pytest.raises(AttestationError, match="after 2 attempts"):
        await attestor.attest(Caller(pid=100, uid=1000, gid=1000))


async def test_k8s_refuses_bad_kubelet_credentials(kubelet_env: KubeletEnv) -> None:
    kubelet_env.token_file.write_text("wrong")
    attestor = kubelet_env.make()
    with pytest.raises(AttestationError, match="HTTP 401") as info:
        await attestor.attest(Caller(pid=100, uid=1000, gid=1000))
    assert kubelet_env.kubelet.bearer not in str(info.value)


async def test_k8s_refuses_malformed_pod_list(kubelet_env: KubeletEnv) -> None:
    kubelet_env.kubelet.malformed = True
    attestor = kubelet_env.make()
    with pytest.raises(AttestationError, match="not valid JSON"):
        await attestor.attest(Caller(pid=100, uid=1000, gid=1000))


async def test_k8s_refuses_unreachable_kubelet(kubelet_env: KubeletEnv) -> None:
    attestor = kubelet_env.make(kubelet_secure_port=free_port())
    with pytest.raises(AttestationError, match="unreachable"):
        await attestor.attest(Caller(pid=100, uid=1000, gid=1000))


async def test_k8s_kubelet_verification(kubelet_env: KubeletEnv, tmp_path: Path) -> None:
    other = make_tls(tmp_path / "other", "other")
    attestor = kubelet_env.make(kubelet_ca_path=str(other.ca_file))
    with pytest.raises(AttestationError, match="TLS verification failed"):
        await attestor.attest(Caller(pid=100, uid=1000, gid=1000))
    # The operator's explicit choice for kubelets with self-signed serving certificates.
    attestor = kubelet_env.make(skip_kubelet_verification=True, kubelet_ca_path=str(other.ca_file))
    assert {str(s) for s in await attestor.attest(Caller(pid=100, uid=1000, gid=1000))} == WEB_SELECTORS


async def test_k8s_refuses_recycled_pid(kubelet_env: KubeletEnv) -> None:
    attestor = kubelet_env.make()
    with pytest.raises(AttestationError, match="reused"):
        await attestor.attest(Caller(pid=100, uid=1000, gid=1000, start_time=1))


async def test_k8s_refuses_process_in_pod_but_not_in_container(kubelet_env: KubeletEnv) -> None:
    write_proc(
        kubelet_env.proc, 400, f"0::/kubepods.slice/kubepods-pod{WEB_POD_UID.replace('-', '_')}.slice\n"
    )
    attestor = kubelet_env.make()
    with pytest.raises(AttestationError, match="not in a container"):
        await attestor.attest(Caller(pid=400, uid=0, gid=0))


def test_find_container_refuses_pod_mismatch() -> None:
    from attestors.workload.cgroups import ContainerInfo

    pods = load("kubelet-pods.json")
    info = ContainerInfo(container_id=WEB_CID, pod_uid="c4d5e6f7-0811-4223-9445-566778899aab")
    with pytest.raises(AttestationError, match="different pod"):
        find_container(pods, info)
    assert find_container(pods, ContainerInfo(container_id="f" * 64, pod_uid=WEB_POD_UID)) is None
    # Init containers are found too.
    found = find_container(pods, ContainerInfo(container_id="aaaa" + "0" * 59 + "1", pod_uid=WEB_POD_UID))
    assert found is not None and found[1]["name"] == "migrate"


def test_find_container_refuses_a_container_id_claimed_by_two_pods() -> None:
    """Two pods listing one container ID: refused whatever the order (before, the cgroup's
    pod listed first won and the other went unseen; listed second, it was refused)."""
    from attestors.workload.cgroups import ContainerInfo

    pods = load("kubelet-pods.json")
    web = next(p for p in pods["items"] if p["metadata"]["uid"] == WEB_POD_UID)
    other = copy.deepcopy(web)
    other["metadata"]["uid"] = "c4d5e6f7-0811-4223-9445-566778899aab"
    other["metadata"]["name"] = "impostor"
    info = ContainerInfo(container_id=WEB_CID, pod_uid=WEB_POD_UID)
    for items in ([web, other], [other, web]):
        with pytest.raises(AttestationError, match="different pod"):
            find_container({"items": items}, info)


def test_pod_selectors_skip_unusable_labels() -> None:
    pods = load("kubelet-pods.json")
    pod = pods["items"][0]
    pod["metadata"]["labels"]["huge"] = "v" * 2000
    pod["metadata"]["labels"]["ctl"] = "a\nb"
    values = {s.value for s in pod_selectors(pod, pod["status"]["containerStatuses"][0])}
    assert "pod-label:app:web" in values
    assert not any(v.startswith(("pod-label:huge", "pod-label:ctl")) for v in values)


def test_pod_selectors_count_images_as_spire_does() -> None:
    pods = load("kubelet-pods.json")
    pod = pods["items"][0]
    del pod["status"]["initContainerStatuses"]
    values = {s.value for s in pod_selectors(pod, pod["status"]["containerStatuses"][0])}
    assert {"pod-image-count:2", "pod-init-image-count:0"} <= values


def test_pod_selectors_leave_out_keys_and_kinds_with_a_colon() -> None:
    """`pod-label:a:b:c` reads as a=b:c or a:b=c; the API server refuses such keys, and a
    kubelet answer carrying one no longer yields a selector that reads like another."""
    pods = load("kubelet-pods.json")
    pod = pods["items"][0]
    pod["metadata"]["labels"] = {"app:web": "x"}
    pod["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet:web", "name": "x", "uid": "u"}]
    values = {s.value for s in pod_selectors(pod, pod["status"]["containerStatuses"][0])}
    assert not any(v.startswith(("pod-label:", "pod-owner")) for v in values)


def test_k8s_config(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MY_NODE_IP": "10.0.0.11"}
    attestor = K8sWorkloadAttestor.from_config(
        {"kubelet_host_env": "MY_NODE_IP", "skip_kubelet_verification": True}, environ=env
    )
    assert attestor._kubelet.base_url == "https://10.0.0.11:10250"
    attestor = K8sWorkloadAttestor.from_config({"kubelet_host": "fd00::1", "skip_kubelet_verification": True})
    assert attestor._kubelet.base_url == "https://[fd00::1]:10250"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"kubelet_host_env": "NOPE", "skip_kubelet_verification": True}, "NOPE is not set"),
        ({"kubelet_host": "a", "kubelet_host_env": "B"}, "not both"),
        ({"kubelet_host": "evil/path", "skip_kubelet_verification": True}, "host name"),
        ({"max_poll_attempts": 0, "skip_kubelet_verification": True}, "max_poll_attempts"),
        ({"skip_kubelet_verification": "yes"}, "true or false"),
        ({"kubelet_secure_port": 70000, "skip_kubelet_verification": True}, "65535"),
        ({"kubelet_read_only_port": 10255}, "unknown key"),
        ({"kubelet_ca_path": "/nonexistent/ca.crt"}, "cannot load CA"),
    ]
    for config, match in bad:
        with pytest.raises(ConfigError, match=match):
            K8sWorkloadAttestor.from_config(config, environ=env)


# --- shared client ------------------------------------------------------------------------------


def test_api_client_refuses_plaintext_tcp() -> None:
    with pytest.raises(ConfigError, match="plain HTTP"):
        ApiClient("http://10.0.0.1:8080")
    with pytest.raises(ConfigError, match="not both"):
        ApiClient("https://x", token="a", token_file="/b")


def test_token_file_checks(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_text("two words")
    with pytest.raises(AttestationError, match="single token") as info:
        read_token_file(p)
    assert "words" not in str(info.value)
    p.write_text("x" * 70000)
    with pytest.raises(AttestationError, match="too large"):
        read_token_file(p)


async def test_api_client_not_an_object(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.json_response([1, 2, 3])

    app.router.add_get("/list", handler)
    runner, url = await serve_https(app, tls)
    try:
        async with ApiClient(url, ca_file=tls.ca_file) as client:
            with pytest.raises(K8sApiError, match="not a JSON object"):
                await client.get_json("/list")
            with pytest.raises(K8sApiError, match="not found"):
                await client.get_json("/missing")
    finally:
        await runner.cleanup()


def test_config_section_reports_key() -> None:
    section = ConfigSection("workload_attestors.k8s", {"max_poll_attempts": True})
    with pytest.raises(ConfigError, match=r"workload_attestors\.k8s\.max_poll_attempts: must be an integer"):
        section.integer("max_poll_attempts", 1)
