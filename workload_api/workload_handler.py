"""The SPIFFE Workload API (`SpiffeWorkloadAPI`, no proto package) served from the cache.

Status codes per the spec: missing/invalid security header → INVALID_ARGUMENT; no
matching entry → PERMISSION_DENIED ("no identity issued"); attestation failed or agent
not ready → UNAVAILABLE. Streams send the complete state at once and on every change.

Bundles, as SPIRE's agent hands them out: a caller sees its own trust domain's bundle
plus the federated bundles of the trust domains its matching entries federate with,
never every bundle the agent holds. FetchX509Bundles/FetchJWTBundles refuse a caller
matching no entry, unless `allow_unauthenticated_verifiers` lets it have the own bundle
only; ValidateJWTSVID never refuses one, and checks tokens against that same set; of a token
from another trust domain it returns only sub, exp, aud and the claims listed in
`allowed_foreign_jwt_claims`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf import json_format
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from meshid.bundle import Bundle
from meshid.errors import AttestationError
from meshid.grpc_base import recv_request
from meshid.jwtsvid import InvalidJwtSvidError, check_audience_bounds, validate_jwt_svid
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api._gen import workload_grpc, workload_pb2
from workload_api.attestation import WorkloadAttestation
from workload_api.cache import SvidCache, Watcher, X509Svid
from workload_api.caller_limits import CallerLimits
from workload_api.grpc_server import caller_of, flush_writes
from workload_api.manager import SvidManager

log = logging.getLogger("meshid.agent.workload_api")

HEADER = "workload.spiffe.io"
READY_TIMEOUT = 10.0
MAX_HINT = 1024
MAX_CACHED_RESPONSES = 4096
# Returned from every foreign JWT-SVID; `allowed_foreign_jwt_claims` adds to them.
FOREIGN_JWT_CLAIMS = frozenset({"sub", "exp", "aud"})


def check_header(stream: Stream[Any, Any]) -> None:
    values = stream.metadata.getall(HEADER, []) if stream.metadata is not None else []
    if len(values) != 1 or values[0] != "true":
        raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")


class Identity:
    """Resolves a stream's caller to selectors, counting failures for the server's SOC events."""

    def __init__(self, cache: SvidCache, manager: SvidManager, attestation: WorkloadAttestation) -> None:
        self.cache = cache
        self.manager = manager
        self.attestation = attestation

    async def selectors(self, stream: Stream[Any, Any]) -> frozenset[Selector]:
        caller = caller_of(stream)
        try:
            return await self.attestation.attest(caller)
        except AttestationError as exc:
            self.manager.note_workload_failure(str(exc), caller.uid)
            raise GRPCError(Status.UNAVAILABLE, f"workload attestation failed: {exc}") from None

    async def wait_ready(self) -> None:
        if self.cache.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.cache.ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            raise GRPCError(Status.UNAVAILABLE, "agent is not ready (no SVIDs or bundle yet)") from None


def unique_hints(hints: Iterable[str]) -> list[str]:
    """The hints of one response's SVIDs, in order: each cut to MAX_HINT bytes and blanked
    where an earlier SVID already has it, since the spec wants them unique within a response.
    Compared after cutting (two long hints could cut to the same prefix) and cut by bytes
    (the limit is 1024 bytes, not characters)."""
    seen: set[str] = set()
    out = []
    for hint in hints:
        hint = hint.encode()[:MAX_HINT].decode(errors="ignore")
        if hint in seen:
            hint = ""
        seen.add(hint)
        out.append(hint)
    return out


class WorkloadApiHandler(workload_grpc.SpiffeWorkloadAPIBase):
    def __init__(
        self,
        identity: Identity,
        allow_unauthenticated_verifiers: bool = False,
        allowed_foreign_jwt_claims: Iterable[str] = (),
        limits: CallerLimits | None = None,
    ) -> None:
        self.id = identity
        self.limits = limits
        self.cache = identity.cache
        self.allow_unauthenticated_verifiers = allow_unauthenticated_verifiers
        self.foreign_claims = FOREIGN_JWT_CLAIMS | frozenset(allowed_foreign_jwt_claims)
        self._responses: dict[tuple[int, int, tuple[bytes, ...]], bytes] = {}

    def x509_response(self, svids: list[X509Svid]) -> workload_pb2.X509SVIDResponse:
        assert self.cache.bundle is not None
        own = self.cache.bundle.x509_der()
        entries = [e for s in svids if (e := self.cache.entries.get(s.entry_id)) is not None]
        federated = {str(td.id): b.x509_der() for td, b in self.cache.federated_for(entries).items()}
        return workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=str(s.spiffe_id),
                    x509_svid=s.chain_der,
                    x509_svid_key=s.key_der,
                    bundle=own,
                    hint=h,
                )
                for s, h in zip(svids, unique_hints(s.hint for s in svids), strict=True)
            ],
            federated_bundles=federated,
        )

    def x509_response_bytes(self, svids: list[X509Svid]) -> bytes:
        """Streams of one identity share one encoded response per cache state: a rotation or
        bundle change is encoded once, not once per stream."""
        key = (self.cache.bundle_version, self.cache.entries_version, tuple(s.chain_der for s in svids))
        raw = self._responses.get(key)
        if raw is None:
            if len(self._responses) >= MAX_CACHED_RESPONSES:
                self._responses.clear()
            raw = self._responses[key] = self.x509_response(svids).SerializeToString(deterministic=True)
        return raw

    async def _push_on_change(
        self, stream: Stream[Any, Any], build: Callable[[frozenset[Selector], Watcher], Any | None]
    ) -> None:
        """The shape of every Workload API stream: the complete state at once, then again
        whenever the cache wakes this watcher and the state differs from what was sent."""
        check_header(stream)
        await stream.recv_message()
        selectors = await self.id.selectors(stream)
        await self.id.wait_ready()
        watcher = self.cache.watch(selectors)
        watcher.hold_first_message()
        try:
            last: Any = None
            while True:
                watcher.event.clear()
                msg = build(selectors, watcher)
                if msg is not None and msg != last:
                    await stream.send_message(msg)
                    flush_writes(stream)
                    watcher.first_message_sent()
                    last = msg
                await watcher.event.wait()
        finally:
            self.cache.unwatch(watcher)

    def _x509_svids(self, selectors: frozenset[Selector], watcher: Watcher) -> bytes | None:
        entries = self.cache.matching_entries(selectors)
        if not entries:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        watcher.entry_ids = {e.id for e in entries}
        svids = [s for e in entries if (s := self.cache.svid_of(e)) is not None]
        if len(svids) < len(entries) and watcher.holding_partial:
            return None
        # Pre-encoded: the server's codec passes bytes through (GuardedProtoCodec, meshid/grpc_base.py).
        return self.x509_response_bytes(svids) if svids else None

    async def FetchX509SVID(
        self, stream: Stream[workload_pb2.X509SVIDRequest, workload_pb2.X509SVIDResponse]
    ) -> None:
        await self._push_on_change(stream, self._x509_svids)

    def _caller_bundles(self, selectors: frozenset[Selector]) -> dict[TrustDomain, Bundle]:
        """What the bundle streams send: the own bundle and the federated bundles of the
        caller's entries; a caller with none is refused unless verifiers may be anonymous.

        No watcher.entry_ids needed: entry-set and bundle changes wake every watcher, and
        the answer depends on nothing else (an SVID rotation leaves it unchanged)."""
        entries = self.cache.matching_entries(selectors)
        if not entries and not self.allow_unauthenticated_verifiers:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        return self.cache.bundles_for(entries)

    def _x509_bundles(
        self, selectors: frozenset[Selector], _watcher: Watcher
    ) -> workload_pb2.X509BundlesResponse:
        bundles = self._caller_bundles(selectors)
        return workload_pb2.X509BundlesResponse(
            bundles={str(td.id): b.x509_der() for td, b in bundles.items()}
        )

    async def FetchX509Bundles(
        self, stream: Stream[workload_pb2.X509BundlesRequest, workload_pb2.X509BundlesResponse]
    ) -> None:
        await self._push_on_change(stream, self._x509_bundles)

    async def FetchJWTSVID(
        self, stream: Stream[workload_pb2.JWTSVIDRequest, workload_pb2.JWTSVIDResponse]
    ) -> None:
        check_header(stream)
        req = await recv_request(stream)
        audience = [a for a in req.audience if a]
        if not audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        try:
            check_audience_bounds(audience)
        except ValueError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        wanted: SpiffeId | None = None
        if req.spiffe_id:
            try:
                wanted = SpiffeId.parse(req.spiffe_id)
            except ValueError as exc:
                raise GRPCError(Status.INVALID_ARGUMENT, f"invalid SPIFFE ID: {exc}") from None
        selectors = await self.id.selectors(stream)
        await self.id.wait_ready()
        entries = self.cache.matching_entries(selectors)
        if wanted is not None:
            entries = [e for e in entries if e.spiffe_id == wanted]
        if not entries:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        cached = {e.id: j for e in entries if (j := self.id.manager.jwt_cached(e, audience)) is not None}
        if len(cached) < len(entries) and self.limits is not None:
            refusal = self.limits.jwt_refusal(caller_of(stream).uid, len(entries) - len(cached))
            if refusal is not None:
                raise GRPCError(Status.RESOURCE_EXHAUSTED, refusal)
        svids = []
        # Hints unique within this response too: two entries sharing one got it twice.
        hints = unique_hints(e.hint for e in entries)
        try:
            for e, hint in zip(entries, hints, strict=True):
                j = cached.get(e.id) or await self.id.manager.jwt_svid(e, audience)
                svids.append(workload_pb2.JWTSVID(spiffe_id=str(j.spiffe_id), svid=j.token, hint=hint))
        except GRPCError:
            raise
        except Exception as exc:
            log.warning("JWT-SVID signing failed: %s", exc)
            raise GRPCError(Status.UNAVAILABLE, "could not obtain a JWT-SVID from the server") from None
        await stream.send_message(workload_pb2.JWTSVIDResponse(svids=svids))

    def _jwt_bundles(
        self, selectors: frozenset[Selector], _watcher: Watcher
    ) -> workload_pb2.JWTBundlesResponse:
        bundles = self._caller_bundles(selectors)
        return workload_pb2.JWTBundlesResponse(
            bundles={str(td.id): b.jwks_bytes() for td, b in bundles.items()}
        )

    async def FetchJWTBundles(
        self, stream: Stream[workload_pb2.JWTBundlesRequest, workload_pb2.JWTBundlesResponse]
    ) -> None:
        await self._push_on_change(stream, self._jwt_bundles)

    async def ValidateJWTSVID(
        self, stream: Stream[workload_pb2.ValidateJWTSVIDRequest, workload_pb2.ValidateJWTSVIDResponse]
    ) -> None:
        check_header(stream)
        req = await recv_request(stream)
        if not req.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        try:
            check_audience_bounds([req.audience])
        except ValueError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        if not req.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, "svid must be specified")
        # As SPIRE: the caller's own bundles decide, and a caller matching no entry is not
        # refused but can only validate tokens of our own trust domain.
        selectors = await self.id.selectors(stream)
        await self.id.wait_ready()
        bundles = self.cache.bundles_for(self.cache.matching_entries(selectors))
        try:
            spiffe_id, claims = validate_jwt_svid(req.svid, req.audience, bundles)
        except InvalidJwtSvidError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        if spiffe_id.trust_domain != self.cache.td:
            # Another trust domain's issuer says what it likes in its tokens: as SPIRE, pass
            # on only what identifies the token and what the operator chose to trust.
            claims = {k: v for k, v in claims.items() if k in self.foreign_claims}
        resp = workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(spiffe_id))
        try:
            json_format.ParseDict(claims, resp.claims)
        except (OverflowError, json_format.ParseError) as exc:
            # A claim no Struct holds (an integer beyond a double): a bad token, refused as
            # the spec says, rather than the call failing with UNKNOWN.
            raise GRPCError(Status.INVALID_ARGUMENT, f"token claims cannot be returned: {exc}") from None
        await stream.send_message(resp)
