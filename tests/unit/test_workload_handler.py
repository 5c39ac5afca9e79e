"""Workload API bundles, served by the real handler over a Unix socket: what a caller gets
follows its matching entries' `federates_with`, as SPIRE's agent does (the own trust
domain's bundle plus those), never every bundle the agent holds. A caller matching no
entry is refused on the bundle streams unless `allow_unauthenticated_verifiers` lets it
have the own bundle only; ValidateJWTSVID validates against the caller's bundles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from pki_helpers import make_ca, make_leaf

import workload_api.cache as cache_module
from attestors.workload.base import Caller
from meshid.bundle import Bundle
from meshid.entry import Entry
from meshid.errors import AttestationError, ConfigError
from meshid.jwtsvid import MAX_AUDIENCE_LENGTH, MAX_AUDIENCES
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api import workload_handler
from workload_api._gen import workload_grpc, workload_pb2
from workload_api.cache import SvidCache, X509Svid
from workload_api.config import agent_config_from_dict, load_agent_config
from workload_api.grpc_server import serve_unix
from workload_api.keys import pkcs8_der
from workload_api.manager import JwtSvid
from workload_api.rotation import RenewalSchedule
from workload_api.workload_handler import MAX_HINT, Identity, WorkloadApiHandler, unique_hints

HEADER = {"workload.spiffe.io": "true"}
TD = TrustDomain("example.org")
A, B, C, D = (TrustDomain(n) for n in ("a.org", "b.org", "c.org", "d.org"))
AGENT = SpiffeId(TD, "/meshid/agent/test")
WEB = Selector("unix", "uid:1")
DB = Selector("unix", "uid:2")
NOBODY = frozenset({Selector("unix", "uid:65534")})
AUD = "spiffe://example.org/verifier"


@dataclass
class Authority:
    bundle: Bundle
    jwt_key: ec.EllipticCurvePrivateKey

    def token(self, path: str = "/w", audience: str = AUD, **extra: Any) -> str:
        now = int(time.time())
        sub = str(SpiffeId(self.bundle.trust_domain, path))
        return jwt.encode(
            {"sub": sub, "aud": [audience], "exp": now + 300, "iat": now, **extra},
            self.jwt_key,
            algorithm="ES256",
            headers={"kid": self.kid, "typ": "JWT"},
        )

    @property
    def kid(self) -> str:
        return next(iter(self.bundle.jwt_authorities))


def authority(td: TrustDomain, kid: str = "k1") -> Authority:
    root, _ = make_ca(f"{td.name} root")
    key = ec.generate_private_key(ec.SECP256R1())
    return Authority(Bundle(td, (root,), {f"{td.name}-{kid}": key.public_key()}), key)


OWN = authority(TD)
FED = {td: authority(td) for td in (A, B, C)}  # the agent holds a, b, c; nobody federates with c


def entry(eid: str, sel: Selector, federates_with: Iterable[TrustDomain] = (), revision: int = 1) -> Entry:
    return Entry(
        eid,
        SpiffeId(TD, f"/{eid}"),
        AGENT,
        (sel,),
        federates_with=tuple(federates_with),
        revision_number=revision,
    )


# web federates with a.org; db with b.org and d.org (whose bundle the agent does not hold).
ENTRIES = [entry("web", WEB, [A]), entry("db", DB, [B, D])]


def hold_federated(cache: SvidCache, bundles: dict[TrustDomain, Bundle]) -> None:
    """Federated bundles arrive as a server sync would deliver them."""
    digests = {str(td.id): f"d{b.sequence}-{id(b)}" for td, b in bundles.items()}
    cache.apply_federated(digests, {str(td.id): b.to_spiffe_json() for td, b in bundles.items()})


class FakeAttestation:
    """Every caller gets the selectors the test sets (one test process plays every workload)."""

    def __init__(self) -> None:
        self.selectors: frozenset[Selector] = NOBODY
        self.error: AttestationError | None = None

    async def attest(self, caller: Caller) -> frozenset[Selector]:
        if self.error is not None:
            raise self.error
        return self.selectors


class FakeManager:
    def note_workload_failure(self, reason: str, uid: int) -> None:
        pass

    def jwt_cached(self, entry: Entry, audience: list[str]) -> JwtSvid:
        """Every JWT-SVID is already cached: FetchJWTSVID never needs a server here."""
        now = time.time()
        return JwtSvid(f"jwt-of-{entry.id}", entry.spiffe_id, now + 300, RenewalSchedule(now + 60, "uniform"))


@dataclass
class Api:
    cache: SvidCache
    attestation: FakeAttestation
    stub: workload_grpc.SpiffeWorkloadAPIStub

    def caller(self, *selectors: Selector) -> None:
        self.attestation.selectors = frozenset(selectors) if selectors else NOBODY


@asynccontextmanager
async def serving(tmp: Path, allow_unauthenticated_verifiers: bool = False,
                  allowed_foreign_jwt_claims: Iterable[str] = ()) -> AsyncIterator[Api]:
    cache = SvidCache(TD)
    cache.set_bundle(OWN.bundle)
    hold_federated(cache, {td: a.bundle for td, a in FED.items()})
    cache.set_entries(ENTRIES, [AGENT])
    cache.ready.set()
    attestation = FakeAttestation()
    identity = Identity(cache, FakeManager(), attestation)  # type: ignore[arg-type]
    handler = WorkloadApiHandler(identity, allow_unauthenticated_verifiers, allowed_foreign_jwt_claims)
    sock = tmp / "api.sock"
    server = await serve_unix([handler], sock, 0o777)
    ch = Channel(path=str(sock))
    try:
        yield Api(cache, attestation, workload_grpc.SpiffeWorkloadAPIStub(ch))
    finally:
        ch.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def api(short_tmp: Path) -> AsyncIterator[Api]:
    async with serving(short_tmp) as a:
        yield a


@pytest.fixture
async def open_api(short_tmp: Path) -> AsyncIterator[Api]:
    async with serving(short_tmp, allow_unauthenticated_verifiers=True) as a:
        yield a


async def first(api: Api, method: str) -> Any:
    request = (
        workload_pb2.X509BundlesRequest()
        if method == "FetchX509Bundles"
        else workload_pb2.JWTBundlesRequest()
    )
    async with getattr(api.stub, method).open(metadata=HEADER, timeout=10) as st:
        await st.send_message(request, end=True)
        msg = await st.recv_message()
        await st.cancel()
    return msg


def x509_map(*tds: TrustDomain) -> dict[str, bytes]:
    by_td = {TD: OWN.bundle, **{td: a.bundle for td, a in FED.items()}}
    return {str(td.id): by_td[td].x509_der() for td in tds}


def jwt_map(*tds: TrustDomain) -> dict[str, bytes]:
    by_td = {TD: OWN.bundle, **{td: a.bundle for td, a in FED.items()}}
    return {str(td.id): by_td[td].jwks_bytes() for td in tds}


BOTH = ("FetchX509Bundles", "FetchJWTBundles")


# ---------------------------------------------------------------------------- filtering


async def test_bundle_streams_carry_own_bundle_and_only_the_callers_federations(api: Api) -> None:
    api.caller(WEB)
    assert dict((await first(api, "FetchX509Bundles")).bundles) == x509_map(TD, A)
    assert dict((await first(api, "FetchJWTBundles")).bundles) == jwt_map(TD, A)
    # Two entries: the union; d.org is not held, c.org held but federated with by nobody.
    api.caller(WEB, DB)
    assert dict((await first(api, "FetchX509Bundles")).bundles) == x509_map(TD, A, B)
    assert dict((await first(api, "FetchJWTBundles")).bundles) == jwt_map(TD, A, B)


async def test_entry_without_federation_gets_the_own_bundle_only(api: Api) -> None:
    api.cache.set_entries([*ENTRIES, entry("plain", Selector("unix", "uid:3"))], [AGENT])
    api.caller(Selector("unix", "uid:3"))
    assert dict((await first(api, "FetchX509Bundles")).bundles) == x509_map(TD)
    assert dict((await first(api, "FetchJWTBundles")).bundles) == jwt_map(TD)


@pytest.mark.parametrize("method", BOTH)
async def test_caller_matching_no_entry_is_refused(api: Api, method: str) -> None:
    api.caller()
    with pytest.raises(GRPCError) as exc:
        await first(api, method)
    assert exc.value.status == Status.PERMISSION_DENIED
    assert exc.value.message == "no identity issued"


@pytest.mark.parametrize("method", BOTH)
async def test_allow_unauthenticated_verifiers_releases_the_own_bundle_only(
    open_api: Api, method: str
) -> None:
    expected = x509_map if method == "FetchX509Bundles" else jwt_map
    open_api.caller()
    assert dict((await first(open_api, method)).bundles) == expected(TD)
    # Registered callers are unaffected by the option.
    open_api.caller(WEB)
    assert dict((await first(open_api, method)).bundles) == expected(TD, A)


async def test_security_header_is_still_required(api: Api) -> None:
    api.caller(WEB)
    with pytest.raises(GRPCError) as exc:
        async with api.stub.FetchX509Bundles.open(timeout=10) as st:
            await st.send_message(workload_pb2.X509BundlesRequest(), end=True)
            await st.recv_message()
    assert exc.value.status == Status.INVALID_ARGUMENT


# ---------------------------------------------------------------------------- stream updates


async def next_message(st: Any) -> Any:
    return await asyncio.wait_for(st.recv_message(), 5)


@pytest.mark.parametrize("method", BOTH)
async def test_stream_follows_entry_and_bundle_changes_then_ends_when_entries_go(
    api: Api, method: str
) -> None:
    expected = x509_map if method == "FetchX509Bundles" else jwt_map
    request = (
        workload_pb2.X509BundlesRequest()
        if method == "FetchX509Bundles"
        else workload_pb2.JWTBundlesRequest()
    )
    api.caller(WEB)
    async with getattr(api.stub, method).open(metadata=HEADER, timeout=30) as st:
        await st.send_message(request, end=True)
        assert dict((await next_message(st)).bundles) == expected(TD, A)
        # The caller's entry starts federating with c.org: pushed at once.
        api.cache.set_entries([entry("web", WEB, [A, C], revision=2), ENTRIES[1]], [AGENT])
        assert dict((await next_message(st)).bundles) == expected(TD, A, C)
        # Another workload's entry changing is invisible to this caller (no new message).
        api.cache.set_entries([entry("web", WEB, [A, C], revision=2), entry("db", DB, [B, C], 2)], [AGENT])
        # a.org rotates its roots: pushed.
        new_a = authority(A, kid="k2")
        hold_federated(api.cache, {A: new_a.bundle, B: FED[B].bundle, C: FED[C].bundle})
        msg = await next_message(st)
        assert dict(msg.bundles)[str(A.id)] == (
            new_a.bundle.x509_der() if method == "FetchX509Bundles" else new_a.bundle.jwks_bytes()
        )
        assert set(msg.bundles) == {str(td.id) for td in (TD, A, C)}
        # The caller's entry is deleted: the stream ends as SPIRE's does.
        api.cache.set_entries([ENTRIES[1]], [AGENT])
        with pytest.raises(GRPCError) as exc:
            assert await next_message(st) is None  # end of stream; the status is in the trailers
            await st.recv_trailing_metadata()
        assert exc.value.status == Status.PERMISSION_DENIED
        assert exc.value.message == "no identity issued"


async def test_unregistered_verifier_stream_gains_federations_when_an_entry_appears(open_api: Api) -> None:
    open_api.caller(Selector("unix", "uid:7"))
    async with open_api.stub.FetchX509Bundles.open(metadata=HEADER, timeout=30) as st:
        await st.send_message(workload_pb2.X509BundlesRequest(), end=True)
        assert dict((await next_message(st)).bundles) == x509_map(TD)
        open_api.cache.set_entries([*ENTRIES, entry("late", Selector("unix", "uid:7"), [B])], [AGENT])
        assert dict((await next_message(st)).bundles) == x509_map(TD, B)
        open_api.cache.set_entries(ENTRIES, [AGENT])  # gone again: back to the own bundle
        assert dict((await next_message(st)).bundles) == x509_map(TD)
        await st.cancel()


async def test_svid_rotation_does_not_resend_an_unchanged_bundle_map(api: Api) -> None:
    ca, ca_key = make_ca("example.org ca")
    leaf, key = make_leaf(ca, ca_key, uri=str(SpiffeId(TD, "/web")))
    der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
    svid = X509Svid(
        "web",
        SpiffeId(TD, "/web"),
        (leaf,),
        key,
        RenewalSchedule(time.time() + 60, "uniform"),
        1,
        chain_der=der(leaf),
    )
    api.caller(WEB)
    async with api.stub.FetchX509Bundles.open(metadata=HEADER, timeout=30) as st:
        await st.send_message(workload_pb2.X509BundlesRequest(), end=True)
        assert dict((await next_message(st)).bundles) == x509_map(TD, A)
        api.cache.put_svids([svid])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(st.recv_message(), 0.5)
        await st.cancel()


# ---------------------------------------------------------------------------- FetchX509SVID


async def test_x509_svid_federated_bundles_follow_the_issued_entries(api: Api) -> None:
    ca, ca_key = make_ca("example.org ca")
    svids = []
    for eid in ("web", "db"):
        leaf, key = make_leaf(ca, ca_key, uri=str(SpiffeId(TD, f"/{eid}")))
        svids.append(
            X509Svid(
                eid,
                SpiffeId(TD, f"/{eid}"),
                (leaf,),
                key,
                RenewalSchedule(time.time() + 60, "uniform"),
                1,
                chain_der=leaf.public_bytes(serialization.Encoding.DER),
            )
        )
    api.cache.put_svids(svids)
    api.caller(WEB)
    async with api.stub.FetchX509SVID.open(metadata=HEADER, timeout=10) as st:
        await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
        msg = await next_message(st)
        await st.cancel()
    assert [s.spiffe_id for s in msg.svids] == ["spiffe://example.org/web"]
    assert dict(msg.federated_bundles) == x509_map(A)


# ---------------------------------------------------------------------------- ValidateJWTSVID


async def validate(api: Api, token: str, audience: str = AUD) -> workload_pb2.ValidateJWTSVIDResponse:
    return await api.stub.ValidateJWTSVID(
        workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token), metadata=HEADER, timeout=10
    )


async def refused(api: Api, token: str) -> str:
    with pytest.raises(GRPCError) as exc:
        await validate(api, token)
    assert exc.value.status == Status.INVALID_ARGUMENT
    return exc.value.message or ""


async def test_an_oversized_request_is_refused_and_the_agent_keeps_serving(api: Api) -> None:
    # Any local user may connect: an announced 4 GiB request must not be read into memory.
    import struct

    api.caller(WEB)
    with pytest.raises(GRPCError) as exc:
        async with api.stub.ValidateJWTSVID.open(metadata=HEADER, timeout=10) as st:
            await st.send_request()
            await st._stream.send_data(b"\x00" + struct.pack(">I", 0xFFFFFFFF))
            await st.recv_message()
    assert exc.value.status == Status.RESOURCE_EXHAUSTED
    assert (await validate(api, OWN.token("/svc"))).spiffe_id == "spiffe://example.org/svc"


@pytest.mark.parametrize("method", ["FetchJWTSVID", "ValidateJWTSVID"])
async def test_a_call_ended_without_its_request_is_invalid_argument(
    api: Api, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO)
    api.caller(WEB)
    with pytest.raises(GRPCError) as exc:
        async with getattr(api.stub, method).open(metadata=HEADER, timeout=10) as st:
            await st.send_request()
            await st._stream.end()  # grpclib's client would not let us end a unary call unsent
            await st.recv_message()
    assert exc.value.status == Status.INVALID_ARGUMENT
    assert exc.value.message == "missing request message"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_audience_bounds_are_checked_before_anything_else(api: Api) -> None:
    """A 4 MB audience went on to the server (FetchJWTSVID) or into PyJWT (Validate)."""
    api.caller(WEB)
    long = "a" * (MAX_AUDIENCE_LENGTH + 1)
    for call in (
        api.stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[AUD, long]), metadata=HEADER, timeout=10),
        api.stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=[AUD] * (MAX_AUDIENCES + 1)), metadata=HEADER, timeout=10
        ),
        validate(api, OWN.token("/svc"), audience=long),
    ):
        with pytest.raises(GRPCError) as exc:
            await call
        assert exc.value.status == Status.INVALID_ARGUMENT
        assert "at most" in (exc.value.message or "")
    # At the limit, the audience is simply one the token does not carry.
    message = await refused_with(api, OWN.token("/svc"), "a" * MAX_AUDIENCE_LENGTH)
    assert "token audience does not include" in message


async def refused_with(api: Api, token: str, audience: str) -> str:
    with pytest.raises(GRPCError) as exc:
        await validate(api, token, audience)
    assert exc.value.status == Status.INVALID_ARGUMENT
    return exc.value.message or ""


async def test_validate_uses_the_callers_bundles(api: Api) -> None:
    api.caller(WEB)
    assert (await validate(api, OWN.token("/svc"))).spiffe_id == "spiffe://example.org/svc"
    assert (await validate(api, FED[A].token("/svc"))).spiffe_id == "spiffe://a.org/svc"
    # b.org and c.org bundles are held by the agent, but this caller does not federate with them.
    assert "no bundle for trust domain b.org" in await refused(api, FED[B].token())
    assert "no bundle for trust domain c.org" in await refused(api, FED[C].token())
    api.caller(DB)
    assert (await validate(api, FED[B].token("/svc"))).spiffe_id == "spiffe://b.org/svc"
    assert "no bundle for trust domain a.org" in await refused(api, FED[A].token())


@pytest.mark.parametrize("allow", [False, True])
async def test_validate_serves_unregistered_callers_against_the_own_bundle(
    short_tmp: Path, allow: bool
) -> None:
    # As SPIRE: ValidateJWTSVID does not refuse a caller matching no entry, whatever
    # allow_unauthenticated_verifiers says; it just has no federated bundles.
    async with serving(short_tmp, allow) as api:
        api.caller()
        resp = await validate(api, OWN.token("/svc"))
        assert resp.spiffe_id == "spiffe://example.org/svc"
        assert resp.claims["sub"] == "spiffe://example.org/svc"
        assert "no bundle for trust domain a.org" in await refused(api, FED[A].token())


async def test_a_token_whose_claims_no_struct_can_hold_is_invalid_argument(api: Api) -> None:
    # 10**400 is valid JSON but no double: ParseDict raised OverflowError, the call ended UNKNOWN.
    api.caller(WEB)
    assert "claims" in await refused(api, OWN.token("/svc", big=10**400))
    assert (await validate(api, OWN.token("/svc"))).spiffe_id == "spiffe://example.org/svc"


@pytest.mark.parametrize("allowed", [(), ("role",)])
async def test_foreign_tokens_return_only_sub_exp_aud_and_the_allowed_claims(
    short_tmp: Path, allowed: tuple[str, ...]
) -> None:
    # As SPIRE's allowed_foreign_jwt_claims: a federated issuer's other claims are dropped.
    async with serving(short_tmp, allowed_foreign_jwt_claims=allowed) as api:
        api.caller(WEB)
        own = await validate(api, OWN.token("/svc", role="admin", tenant="t1"))
        assert set(own.claims.keys()) == {"sub", "aud", "exp", "iat", "role", "tenant"}
        foreign = await validate(api, FED[A].token("/svc", role="admin", tenant="t1"))
        assert foreign.spiffe_id == "spiffe://a.org/svc"
        assert set(foreign.claims.keys()) == {"sub", "aud", "exp", *allowed}
        if allowed:
            assert foreign.claims["role"] == "admin"


# ---------------------------------------------------------------------------- SPEC §1 status codes

ALL_METHODS: dict[str, Any] = {
    "FetchX509SVID": workload_pb2.X509SVIDRequest(),
    "FetchX509Bundles": workload_pb2.X509BundlesRequest(),
    "FetchJWTSVID": workload_pb2.JWTSVIDRequest(audience=[AUD]),
    "FetchJWTBundles": workload_pb2.JWTBundlesRequest(),
    "ValidateJWTSVID": workload_pb2.ValidateJWTSVIDRequest(audience=AUD, svid=OWN.token()),
}
DENIED = (Status.PERMISSION_DENIED, "no identity issued")


async def status_of(api: Api, method: str, request: Any, metadata: Any = HEADER) -> tuple[Status, str]:
    """(status, message) a call ends with; OK once its first response arrives."""
    try:
        async with getattr(api.stub, method).open(metadata=metadata, timeout=10) as st:
            await st.send_message(request, end=True)
            await st.recv_message()
            await st.cancel()
    except GRPCError as exc:
        return exc.status, exc.message or ""
    return Status.OK, ""


@pytest.mark.parametrize("method", list(ALL_METHODS))
async def test_every_method_wants_exactly_one_true_security_header(api: Api, method: str) -> None:
    api.caller(WEB)
    for metadata in (None, {"workload.spiffe.io": "false"}, [("workload.spiffe.io", "true")] * 2):
        assert await status_of(api, method, ALL_METHODS[method], metadata) == (
            Status.INVALID_ARGUMENT,
            "security header missing from request",
        ), metadata


async def test_no_identity_and_bad_arguments_get_the_spec_status(api: Api) -> None:
    api.caller()
    assert await status_of(api, "FetchX509SVID", workload_pb2.X509SVIDRequest()) == DENIED
    assert await status_of(api, "FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=[AUD])) == DENIED
    api.caller(WEB)
    other = workload_pb2.JWTSVIDRequest(audience=[AUD], spiffe_id="spiffe://example.org/db")
    assert await status_of(api, "FetchJWTSVID", other) == DENIED  # another workload's ID
    for jwt_request in (workload_pb2.JWTSVIDRequest(), workload_pb2.JWTSVIDRequest(audience=[""])):
        assert (await status_of(api, "FetchJWTSVID", jwt_request))[0] == Status.INVALID_ARGUMENT
    for validate_request in (
        workload_pb2.ValidateJWTSVIDRequest(audience=AUD),
        workload_pb2.ValidateJWTSVIDRequest(svid=OWN.token()),
        workload_pb2.ValidateJWTSVIDRequest(audience=AUD, svid="not-a-jwt"),
    ):
        assert (await status_of(api, "ValidateJWTSVID", validate_request))[0] == Status.INVALID_ARGUMENT


async def test_failed_attestation_and_an_agent_not_ready_are_unavailable(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.caller(WEB)
    api.attestation.error = AttestationError("peer process 7 exited before it could be identified")
    for method, request in ALL_METHODS.items():
        status, message = await status_of(api, method, request)
        assert status == Status.UNAVAILABLE and "workload attestation failed" in message, method
    api.attestation.error = None
    monkeypatch.setattr(workload_handler, "READY_TIMEOUT", 0.05)
    api.cache.ready.clear()
    for method, request in ALL_METHODS.items():
        assert await status_of(api, method, request) == (
            Status.UNAVAILABLE,
            "agent is not ready (no SVIDs or bundle yet)",
        ), method


async def test_an_unknown_method_is_unimplemented(api: Api, short_tmp: Path) -> None:
    import grpc

    def call() -> grpc.StatusCode:
        with grpc.insecure_channel(f"unix://{short_tmp / 'api.sock'}") as channel:
            rpc = channel.unary_unary("/SpiffeWorkloadAPI/FetchX509CRL")
            try:
                rpc(b"", metadata=[("workload.spiffe.io", "true")], timeout=10)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    assert await asyncio.to_thread(call) == grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------------------- SPEC §1 hints and stream state


def svid_for(e: Entry, ca: Any, ca_key: Any) -> X509Svid:
    leaf, key = make_leaf(ca, ca_key, uri=str(e.spiffe_id))
    return X509Svid(
        e.id, e.spiffe_id, (leaf,), key, RenewalSchedule(time.time() + 60, "uniform"), e.revision_number,
        e.hint, leaf.public_bytes(serialization.Encoding.DER), pkcs8_der(key),
    )


async def test_x509_svid_stream_sends_the_whole_state_on_every_change(api: Api) -> None:
    ca, ca_key = make_ca("example.org ca")
    web, twin = ENTRIES[0].replace(hint="internal"), entry("twin", WEB).replace(hint="internal")
    plain = entry("plain", WEB)
    api.cache.set_entries([web, twin, plain, ENTRIES[1]], [AGENT])
    api.cache.put_svids([svid_for(e, ca, ca_key) for e in (web, twin, plain)])
    api.caller(WEB)
    ids = lambda msg: sorted(s.spiffe_id for s in msg.svids)  # noqa: E731
    async with api.stub.FetchX509SVID.open(metadata=HEADER, timeout=30) as st:
        await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
        msg = await next_message(st)
        assert ids(msg) == sorted(str(e.spiffe_id) for e in (web, twin, plain))
        assert sorted(s.hint for s in msg.svids) == ["", "", "internal"]  # unique within the response
        for s in msg.svids:
            assert s.bundle == OWN.bundle.x509_der()  # the SVID's own trust domain roots
            assert s.x509_svid_key[3:7] == bytes.fromhex("02010030")  # PKCS#8: version 0, AlgorithmIdentifier
            serialization.load_der_private_key(s.x509_svid_key, password=None)  # unencrypted
        assert dict(msg.federated_bundles) == x509_map(A)  # keyed by trust domain ID
        # Own roots rotate: everything again, with the new roots.
        rotated_own = authority(TD, kid="k2")
        api.cache.set_bundle(rotated_own.bundle)
        msg = await next_message(st)
        assert len(msg.svids) == 3 and {s.bundle for s in msg.svids} == {rotated_own.bundle.x509_der()}
        # An entry goes: its SVID is missing from the next message, which is how removal is said.
        api.cache.set_entries([web, plain, ENTRIES[1]], [AGENT])
        msg = await next_message(st)
        assert ids(msg) == sorted(str(e.spiffe_id) for e in (web, plain))
        # An SVID rotates: pushed at once.
        renewed = svid_for(plain, ca, ca_key)
        api.cache.put_svids([renewed])
        assert renewed.chain_der in [s.x509_svid for s in (await next_message(st)).svids]
        await st.cancel()


async def test_x509_svid_stream_never_sends_a_response_without_svids(api: Api) -> None:
    # Clients reject a response with zero SVIDs: a matching entry whose SVID is not minted
    # yet gets nothing until it is, then at once.
    ca, ca_key = make_ca("example.org ca")
    api.caller(WEB)
    async with api.stub.FetchX509SVID.open(metadata=HEADER, timeout=30) as st:
        await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
        first_message = asyncio.ensure_future(st.recv_message())
        await asyncio.sleep(0.3)
        assert not first_message.done()
        api.cache.put_svids([svid_for(ENTRIES[0], ca, ca_key)])
        msg = await asyncio.wait_for(first_message, 5)
        assert msg is not None
        assert [s.spiffe_id for s in msg.svids] == [str(ENTRIES[0].spiffe_id)]
        await st.cancel()


async def test_an_svid_is_not_handed_out_once_its_entry_names_another_id(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Entry web is repurposed: another SPIFFE ID and the db workload's selector. Its old SVID
    # stays in the cache until the new one is signed (for good if the server refuses): it and
    # its key went to db, on the Workload API, SDS and to a delegate.
    from workload_api.delegated import x509_svids_response
    from workload_api.sds import CallerView

    monkeypatch.setattr(cache_module, "FIRST_MESSAGE_WAIT", 0.2)  # then db's alone goes out
    ca, ca_key = make_ca("example.org ca")
    web, db = ENTRIES
    api.cache.put_svids([svid_for(web, ca, ca_key), svid_for(db, ca, ca_key)])
    guest = web.replace(spiffe_id=SpiffeId(TD, "/guest"), selectors=(DB,), revision_number=2)
    api.cache.set_entries([guest, db], [AGENT])
    assert [s.spiffe_id for s in CallerView.from_cache(api.cache, frozenset({DB})).svids] == [db.spiffe_id]
    delegated = x509_svids_response(api.cache, [guest, db])
    assert [s.x509_svid.id.path for s in delegated.x509_svids] == ["/db"]
    api.caller(DB)
    async with api.stub.FetchX509SVID.open(metadata=HEADER, timeout=30) as st:
        await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
        assert [s.spiffe_id for s in (await next_message(st)).svids] == [str(db.spiffe_id)]
        api.cache.put_svids([svid_for(guest, ca, ca_key)])  # the new SVID: served at once
        msg = await next_message(st)
        assert sorted(s.spiffe_id for s in msg.svids) == [str(db.spiffe_id), str(guest.spiffe_id)]
        await st.cancel()


async def test_the_first_message_waits_for_every_svid_of_the_caller(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SPIRE's agent holds a new subscriber until all its SVIDs are cached: a first
    message without one says that identity is gone (Cilium drops it). After
    FIRST_MESSAGE_WAIT it goes out with those there are; later changes go out at once."""
    ca, ca_key = make_ca("example.org ca")
    web, twin = ENTRIES[0], entry("twin", WEB)
    api.cache.set_entries([web, twin, ENTRIES[1]], [AGENT])
    api.cache.put_svids([svid_for(web, ca, ca_key)])
    api.caller(WEB)
    ids = lambda msg: sorted(s.spiffe_id for s in msg.svids)  # noqa: E731
    async with api.stub.FetchX509SVID.open(metadata=HEADER, timeout=30) as st:
        await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
        first_message = asyncio.ensure_future(st.recv_message())
        await asyncio.sleep(0.3)
        assert not first_message.done()
        api.cache.put_svids([svid_for(twin, ca, ca_key)])
        msg = await asyncio.wait_for(first_message, 5)
        assert msg is not None and ids(msg) == sorted([str(web.spiffe_id), str(twin.spiffe_id)])
        await st.cancel()

    monkeypatch.setattr(cache_module, "FIRST_MESSAGE_WAIT", 0.3)
    late = entry("late", WEB)
    api.cache.set_entries([web, twin, late, ENTRIES[1]], [AGENT])
    async with api.stub.FetchX509SVID.open(metadata=HEADER, timeout=30) as st:
        await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
        t0 = asyncio.get_running_loop().time()
        msg = await asyncio.wait_for(st.recv_message(), 5)
        assert msg is not None and asyncio.get_running_loop().time() - t0 >= 0.25
        assert ids(msg) == sorted([str(web.spiffe_id), str(twin.spiffe_id)])  # the wait is up
        api.cache.put_svids([svid_for(late, ca, ca_key)])  # and then at once, as every change
        assert len((await next_message(st)).svids) == 3
        await st.cancel()


async def test_jwt_svid_hints_are_unique_within_a_response(api: Api) -> None:
    web, twin = ENTRIES[0].replace(hint="internal"), entry("twin", WEB).replace(hint="internal")
    api.cache.set_entries([web, twin, ENTRIES[1]], [AGENT])
    api.caller(WEB)
    request = workload_pb2.JWTSVIDRequest(audience=[AUD])
    resp = await api.stub.FetchJWTSVID(request, metadata=HEADER, timeout=10)
    assert sorted(s.spiffe_id for s in resp.svids) == [str(twin.spiffe_id), str(web.spiffe_id)]
    assert sorted(s.hint for s in resp.svids) == ["", "internal"]


def test_hints_are_cut_to_1024_bytes_and_unique_after_cutting() -> None:
    accented = "é" * 600  # 1200 bytes
    out = unique_hints([accented, accented + "x", "a" * MAX_HINT + "b", "a" * MAX_HINT, "", "", "web"])
    assert all(len(h.encode()) <= MAX_HINT for h in out)
    assert out == ["é" * (MAX_HINT // 2), "", "a" * MAX_HINT, "", "", "", "web"]


# ---------------------------------------------------------------------------- config

AGENT_TOML = """\
trust_domain = "example.org"
data_dir = "/var/lib/meshid-agent"
server_address = ["127.0.0.1:8443"]
trust_bundle_path = "/etc/meshid/root.pem"
"""


def test_allow_unauthenticated_verifiers_defaults_off_and_loads_strictly(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML)
    assert load_agent_config(path, env={}).allow_unauthenticated_verifiers is False
    path.write_text(AGENT_TOML + "allow_unauthenticated_verifiers = true\n")
    assert load_agent_config(path, env={}).allow_unauthenticated_verifiers is True
    path.write_text(AGENT_TOML + 'allow_unauthenticated_verifiers = "yes"\n')
    with pytest.raises(ConfigError, match="allow_unauthenticated_verifiers: expected true or false"):
        load_agent_config(path, env={})


def test_allowed_foreign_jwt_claims_loads_as_a_list_of_names(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML)
    assert load_agent_config(path, env={}).allowed_foreign_jwt_claims == []
    path.write_text(AGENT_TOML + 'allowed_foreign_jwt_claims = ["role", "tenant"]\n')
    assert load_agent_config(path, env={}).allowed_foreign_jwt_claims == ["role", "tenant"]
    path.write_text(AGENT_TOML + 'allowed_foreign_jwt_claims = "role"\n')
    with pytest.raises(ConfigError, match="allowed_foreign_jwt_claims"):
        load_agent_config(path, env={})


def test_allow_unauthenticated_verifiers_env_override(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML)
    cfg = load_agent_config(path, env={"MESHID_ALLOW_UNAUTHENTICATED_VERIFIERS": "true"})
    assert cfg.allow_unauthenticated_verifiers is True
    cfg = agent_config_from_dict(
        {
            "trust_domain": "example.org",
            "data_dir": "/x",
            "server_address": ["h:1"],
            "trust_bundle_path": "/r.pem",
            "allow_unauthenticated_verifiers": True,
        }
    )
    assert cfg.allow_unauthenticated_verifiers is True
