"""k8s_psat: node attestation with a projected service-account token (SPIRE-compatible).

The agent sends `{"cluster": <name>, "token": <projected SA token>}`. The server:

1. asks the cluster's TokenReview API (authentication.k8s.io/v1) whether the token is
   valid for one of the configured audiences (default `meshid-server`), and checks the
   audiences the API server reports back;
2. checks the service account (`system:serviceaccount:<ns>:<sa>`) against the cluster's
   allow-list;
3. fetches the pod the token is bound to (checking its UID) and the pod's node;
4. derives the agent ID `spiffe://<td>/meshid/agent/k8s_psat/<cluster>/<node-uid>` and
   the SPIRE-spelled selectors (`k8s_psat:cluster:…`, `k8s_psat:agent_ns:…`, …);
5. binds the token (by SHA-256) to that agent ID until the token expires, so the same
   token cannot attest a second agent.

Every failure is an AttestationError whose message never contains the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import string
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from attestors.k8s_client import (
    IN_CLUSTER_CA_FILE,
    IN_CLUSTER_TOKEN_FILE,
    ApiClient,
    ConfigSection,
    K8sApiError,
    K8sNotFoundError,
    expect_kind,
    get_dict,
    get_list,
    get_str,
    in_cluster_api_server,
    read_token_file,
)
from attestors.node.base import AttestationRequest, AttestationResult, Challenge, agent_id
from meshid.errors import AttestationError, ConfigError, InvalidSelectorError, InvalidSpiffeIdError
from meshid.selector import Selector
from meshid.spiffe_id import TrustDomain

NAME = "k8s_psat"
DEFAULT_AUDIENCE = "meshid-server"
DEFAULT_AGENT_TOKEN_PATH = "/var/run/secrets/tokens/meshid-agent"
# Kubernetes JWTs are ~1 KiB; far larger payloads are refused before any API call.
MAX_TOKEN_LENGTH = 16 * 1024
MAX_CLUSTER_NAME_LENGTH = 253
_CLUSTER_NAME_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
_SA_PREFIX = "system:serviceaccount:"
_EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
_EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"


# --- replay protection -----------------------------------------------------------------------


class TokenReplayCache(Protocol):
    """Where used tokens are remembered; the server may back it by its datastore."""

    async def claim(self, token_sha256: str, agent_id: str, expires_at: float) -> bool:
        """Bind the token to `agent_id` until `expires_at` (unix seconds).

        True if the token was unused or already bound to the same agent ID (an agent that
        restarts before kubelet rotates its token presents the same token again); False if
        it is bound to a different agent ID. Must be atomic per token.
        """
        ...


class InMemoryTokenReplayCache:
    """Process-local TokenReplayCache; entries are dropped once their token has expired.

    `max_entries` bounds memory: when full of unexpired tokens, new tokens are refused
    (fail closed) rather than forgetting a binding that could then be replayed.
    """

    def __init__(self, clock: Callable[[], float] = time.time, max_entries: int = 100_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._used: dict[str, tuple[str, float]] = {}

    def __len__(self) -> int:
        return len(self._used)

    def _purge(self, now: float) -> None:
        expired = [h for h, (_, exp) in self._used.items() if exp <= now]
        for h in expired:
            del self._used[h]

    async def claim(self, token_sha256: str, agent_id: str, expires_at: float) -> bool:
        # No await in here: the check-and-set is atomic with respect to other coroutines.
        now = self._clock()
        found = self._used.get(token_sha256)
        if found is not None and found[1] > now:
            return found[0] == agent_id
        if len(self._used) >= self._max:
            self._purge(now)
            if len(self._used) >= self._max:
                return False
        self._used[token_sha256] = (agent_id, expires_at)
        return True


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster's settings, keyed by the cluster name agents put in their payload."""

    name: str
    # (namespace, service account) pairs allowed to attest as agents.
    service_account_allow_list: frozenset[tuple[str, str]]
    audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,)
    allowed_node_label_keys: frozenset[str] = frozenset()
    allowed_pod_label_keys: frozenset[str] = frozenset()
    # None: the in-cluster API server from KUBERNETES_SERVICE_HOST/PORT.
    api_server: str | None = None
    token_file: str = IN_CLUSTER_TOKEN_FILE
    ca_file: str = IN_CLUSTER_CA_FILE
    timeout: float = 10.0


def _parse_cluster(name: str, data: Any) -> ClusterConfig:
    section = ConfigSection(f"node_attestors.k8s_psat.clusters.{name}", data)
    if (
        not name
        or len(name) > MAX_CLUSTER_NAME_LENGTH
        or not set(name) <= _CLUSTER_NAME_CHARS
        or name in (".", "..")
    ):
        # The name becomes a path segment of every agent ID from this cluster.
        raise ConfigError(f"{section.name}: cluster name must be letters, digits, '.', '-', '_'")
    allow: set[tuple[str, str]] = set()
    for item in section.string_list("service_account_allow_list"):
        ns, sep, sa = item.partition(":")
        if not sep or not ns or not sa or ":" in sa:
            raise section.error("service_account_allow_list", f"{item!r} is not '<namespace>:<name>'")
        allow.add((ns, sa))
    if not allow:
        raise section.error("service_account_allow_list", "must not be empty")
    audiences = section.string_list("audience", [DEFAULT_AUDIENCE])
    if not audiences:
        raise section.error("audience", "must not be empty")
    cfg = ClusterConfig(
        name=name,
        service_account_allow_list=frozenset(allow),
        audiences=tuple(audiences),
        allowed_node_label_keys=frozenset(section.string_list("allowed_node_label_keys", [])),
        allowed_pod_label_keys=frozenset(section.string_list("allowed_pod_label_keys", [])),
        api_server=section.string("api_server", None),
        token_file=section.string("token_file", IN_CLUSTER_TOKEN_FILE),
        ca_file=section.string("ca_file", IN_CLUSTER_CA_FILE),
        timeout=section.number("timeout", 10.0, minimum=0.1),
    )
    if cfg.api_server is not None and not cfg.api_server.startswith("https://"):
        raise section.error("api_server", "must be an https:// URL")
    section.done()
    return cfg


# --- the attestor ----------------------------------------------------------------------------


def _token_expiry(token: str) -> float:
    """`exp` from the (unverified) JWT payload; only used to know how long to remember it.

    TokenReview has already vouched for the token by the time the expiry matters; parsing
    it first just refuses obvious junk without an API call.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise AttestationError("token is not a JWT")
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise AttestationError("token is not a JWT") from exc
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        # Legacy secret-based tokens never expire; only projected tokens are accepted.
        raise AttestationError("token has no expiry; a projected service account token is required")
    try:
        expires_at = float(exp)
    except OverflowError:
        # A JSON integer too large for a float (the token is not verified yet): an
        # unhandled OverflowError here was a 500 and a traceback per request.
        raise AttestationError("token expiry is out of range") from None
    if not math.isfinite(expires_at):
        raise AttestationError("token has no expiry; a projected service account token is required")
    return expires_at


def _selector(value: str) -> Selector | None:
    try:
        return Selector(NAME, value)
    except InvalidSelectorError:
        # A label too long or with control characters: leave it out rather than fail.
        return None


class K8sPsatAttestor:
    """Server-side k8s_psat node attestor. Owns one API client per cluster; call close()."""

    name = NAME

    def __init__(
        self,
        clusters: Mapping[str, ClusterConfig],
        *,
        replay_cache: TokenReplayCache | None = None,
        clock: Callable[[], float] = time.time,
        clients: Mapping[str, ApiClient] | None = None,
    ) -> None:
        if not clusters:
            raise ConfigError("node_attestors.k8s_psat.clusters: at least one cluster is required")
        self._clusters = dict(clusters)
        self._clock = clock
        self._replay = replay_cache if replay_cache is not None else InMemoryTokenReplayCache(clock)
        if clients is None:
            clients = {
                name: ApiClient(
                    c.api_server or in_cluster_api_server(),
                    token_file=c.token_file,
                    ca_file=c.ca_file,
                    timeout=c.timeout,
                    max_body_bytes=1024 * 1024,
                )
                for name, c in self._clusters.items()
            }
        self._clients = dict(clients)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        replay_cache: TokenReplayCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> K8sPsatAttestor:
        """Build from the `[node_attestors.k8s_psat]` section: `clusters = {name = {...}}`.

        Per cluster: `service_account_allow_list` (["ns:sa"], required), `audience`
        (default ["meshid-server"]), `allowed_node_label_keys`, `allowed_pod_label_keys`,
        `api_server` (default in-cluster), `token_file`, `ca_file` (default the pod's
        service-account files), `timeout` (seconds).
        """
        section = ConfigSection("node_attestors.k8s_psat", dict(config))
        clusters_raw = section.table("clusters")
        section.done()
        clusters = {name: _parse_cluster(name, data) for name, data in clusters_raw.items()}
        return cls(clusters, replay_cache=replay_cache, clock=clock)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def challenge(self, request: AttestationRequest) -> Challenge | None:
        return None

    async def attest(
        self, request: AttestationRequest, trust_domain: TrustDomain, challenge: Challenge | None
    ) -> AttestationResult:
        payload = request.payload
        cluster_name = payload.get("cluster") if isinstance(payload, dict) else None
        token = payload.get("token") if isinstance(payload, dict) else None
        if not isinstance(cluster_name, str) or not cluster_name:
            raise AttestationError("payload: 'cluster' must be a non-empty string")
        if not isinstance(token, str) or not token:
            raise AttestationError("payload: 'token' must be a non-empty string")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AttestationError("payload: token is too long")
        cluster = self._clusters.get(cluster_name)
        if cluster is None:
            raise AttestationError(f"cluster {cluster_name[:64]!r} is not configured")
        client = self._clients[cluster.name]
        expires_at = _token_expiry(token)
        if expires_at <= self._clock():
            raise AttestationError("token has expired")

        namespace, sa_name, pod_name, pod_uid = await self._review(client, cluster, token)
        pod = await self._get(client, f"/api/v1/namespaces/{namespace}/pods/{pod_name}", "Pod", "pod")
        if get_str(pod, "metadata", "uid") != pod_uid:
            # The token's pod was deleted and a new one took its name: the token is stale.
            raise AttestationError("pod UID does not match the token's pod")
        if get_str(pod, "metadata", "namespace") not in (None, namespace):
            raise AttestationError("pod namespace does not match the token")
        if get_str(pod, "spec", "serviceAccountName") not in (None, sa_name):
            raise AttestationError("pod service account does not match the token")
        node_name = get_str(pod, "spec", "nodeName")
        if node_name is None or not _is_dns_name(node_name):
            raise AttestationError("agent pod is not scheduled to a node")
        node = await self._get(client, f"/api/v1/nodes/{node_name}", "Node", "node")
        node_uid = get_str(node, "metadata", "uid")
        if node_uid is None or get_str(node, "metadata", "name") not in (None, node_name):
            raise AttestationError("node object has no UID or a different name")

        try:
            aid = agent_id(trust_domain, NAME, cluster.name, node_uid)
        except InvalidSpiffeIdError as exc:
            raise AttestationError("node UID cannot form an agent ID") from exc
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        if not await self._replay.claim(token_hash, str(aid), expires_at):
            raise AttestationError("token was already used to attest a different agent")

        values = [
            f"cluster:{cluster.name}",
            f"agent_ns:{namespace}",
            f"agent_sa:{sa_name}",
            f"agent_pod_name:{pod_name}",
            f"agent_pod_uid:{pod_uid}",
            f"agent_node_name:{node_name}",
            f"agent_node_uid:{node_uid}",
        ]
        host_ips = {get_str(pod, "status", "hostIP")}
        host_ips.update(get_str(item, "ip") for item in get_list(pod, "status", "hostIPs"))
        values.extend(f"agent_node_ip:{ip}" for ip in host_ips if ip)
        for key, value in get_dict(node, "metadata", "labels").items():
            if key in cluster.allowed_node_label_keys and isinstance(value, str):
                values.append(f"agent_node_label:{key}:{value}")
        for key, value in get_dict(pod, "metadata", "labels").items():
            if key in cluster.allowed_pod_label_keys and isinstance(value, str):
                values.append(f"agent_pod_label:{key}:{value}")
        selectors = tuple(sorted({s for v in values if (s := _selector(v)) is not None}))
        return AttestationResult(
            agent_id=aid,
            selectors=selectors,
            can_reattest=True,
            extra={"cluster": cluster.name, "node_name": node_name, "pod_uid": pod_uid},
        )

    async def _review(
        self, client: ApiClient, cluster: ClusterConfig, token: str
    ) -> tuple[str, str, str, str]:
        """TokenReview; returns (namespace, service account, pod name, pod UID)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(cluster.audiences)},
        }
        what = "TokenReview"
        try:
            review = await client.post_json("/apis/authentication.k8s.io/v1/tokenreviews", body)
        except K8sApiError as exc:
            raise AttestationError(f"cluster {cluster.name}: {exc}") from exc
        expect_kind(review, "TokenReview", "authentication.k8s.io/v1", what)
        status = get_dict(review, "status")
        if status.get("authenticated") is not True:
            # status.error is not passed on: it is the API server's text about the token.
            raise AttestationError(f"cluster {cluster.name}: token not authenticated by TokenReview")
        audiences = {a for a in get_list(status, "audiences") if isinstance(a, str)}
        if not audiences & set(cluster.audiences):
            raise AttestationError(
                f"cluster {cluster.name}: token audience is not one of the configured ones"
            )
        username = get_str(status, "user", "username") or ""
        if not username.startswith(_SA_PREFIX):
            raise AttestationError(f"cluster {cluster.name}: token does not belong to a service account")
        ns, sep, sa = username[len(_SA_PREFIX) :].partition(":")
        if not sep or not ns or not sa:
            raise AttestationError(f"cluster {cluster.name}: malformed service account user name")
        if (ns, sa) not in cluster.service_account_allow_list:
            raise AttestationError(f"cluster {cluster.name}: service account {ns}:{sa} is not allowed")
        extra = get_dict(status, "user", "extra")
        pod_names = get_list(extra, _EXTRA_POD_NAME)
        pod_uids = get_list(extra, _EXTRA_POD_UID)
        if len(pod_names) != 1 or len(pod_uids) != 1:
            raise AttestationError(f"cluster {cluster.name}: token is not bound to a pod")
        pod_name, pod_uid = pod_names[0], pod_uids[0]
        if not _is_dns_name(ns) or not isinstance(pod_name, str) or not _is_dns_name(pod_name):
            raise AttestationError(f"cluster {cluster.name}: malformed pod reference in TokenReview")
        if not isinstance(pod_uid, str) or not pod_uid:
            raise AttestationError(f"cluster {cluster.name}: malformed pod UID in TokenReview")
        return ns, sa, pod_name, pod_uid

    async def _get(self, client: ApiClient, path: str, kind: str, what: str) -> dict[str, Any]:
        try:
            obj = await client.get_json(path)
        except K8sNotFoundError as exc:
            raise AttestationError(f"agent {what} not found") from exc
        except K8sApiError as exc:
            raise AttestationError(str(exc)) from exc
        expect_kind(obj, kind, "v1", what)
        return obj


def _is_dns_name(text: str) -> bool:
    # Names go into URL paths; refuse anything that could change the path.
    return 0 < len(text) <= 253 and set(text) <= frozenset(string.ascii_lowercase + string.digits + ".-")


# --- agent side ------------------------------------------------------------------------------


class K8sPsatAgentPlugin:
    """Agent side: reads the projected token (re-read each time; kubelet rotates it)."""

    name = NAME

    def __init__(self, cluster: str, token_path: str = DEFAULT_AGENT_TOKEN_PATH) -> None:
        if not cluster:
            raise ConfigError("node_attestor.k8s_psat.cluster: required")
        self.cluster = cluster
        self.token_path = token_path

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> K8sPsatAgentPlugin:
        """Build from `[node_attestor.k8s_psat]`: `cluster` (required), `token_path`."""
        section = ConfigSection("node_attestor.k8s_psat", dict(config))
        plugin = cls(section.string("cluster"), section.string("token_path", DEFAULT_AGENT_TOKEN_PATH))
        section.done()
        return plugin

    def payload(self) -> dict[str, Any]:
        # Synchronous on purpose: one small file read, called once per (re-)attestation.
        return {"cluster": self.cluster, "token": read_token_file(self.token_path)}
