"""SPIRE's Delegated Identity API (``spire.api.agent.delegatedidentity.v1``) on the agent's
admin socket: a trusted delegate (Cilium's agent) obtains the SVIDs and bundles of *other*
workloads, named by selectors or by pid.

Authorization (SPEC-PROTOCOLS §3, as SPIRE does it): the caller is attested like any
workload; no matching entry → PERMISSION_DENIED "no identity issued"; none of its SPIFFE
IDs in ``authorized_delegates`` → PERMISSION_DENIED. It is checked again before every
update, so removing the delegate's entry cuts its streams. No security header: Cilium
sends none. Target entries match like workloads do (the entry's selectors are a subset
of the given ones); admin and downstream entries are never handed out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import Encoding
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from attestors.workload.base import Caller
from attestors.workload.unix import parse_status
from meshid._gen.spire.api.types import jwtsvid_pb2, selector_pb2, spiffeid_pb2, x509svid_pb2
from meshid.entry import Entry
from meshid.errors import AttestationError, InvalidSelectorError
from meshid.grpc_base import recv_request
from meshid.jwtsvid import check_audience_bounds
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api._gen.spire.api.agent.delegatedidentity.v1 import delegatedidentity_grpc
from workload_api._gen.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from workload_api.cache import SvidCache, Watcher
from workload_api.peercred import process_start_time
from workload_api.workload_handler import Identity

log = logging.getLogger("meshid.agent.delegated_identity")


# ---------------------------------------------------------------------------- pure helpers
def check_delegate(caller_entries: Sequence[Entry], delegates: frozenset[SpiffeId]) -> SpiffeId:
    """The caller's SPIFFE ID that makes it a delegate; raises PERMISSION_DENIED otherwise."""
    if not caller_entries:
        raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
    for e in caller_entries:
        if e.spiffe_id in delegates:
            return e.spiffe_id
    raise GRPCError(Status.PERMISSION_DENIED, "caller not configured as an authorized delegate")


def selectors_from_proto(items: Iterable[selector_pb2.Selector]) -> frozenset[Selector]:
    try:
        return frozenset(Selector(s.type, s.value) for s in items)
    except InvalidSelectorError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, f"could not parse provided selectors: {exc}") from None


def spiffe_id_proto(sid: SpiffeId) -> spiffeid_pb2.SPIFFEID:
    return spiffeid_pb2.SPIFFEID(trust_domain=sid.trust_domain.name, path=sid.path)


def handed_out(entries: Iterable[Entry]) -> list[Entry]:
    # Admin and downstream SVIDs carry powers over the server; a delegate never gets them.
    return [e for e in entries if not e.admin and not e.downstream]


def x509_svids_response(cache: SvidCache, entries: Sequence[Entry]) -> pb.SubscribeToX509SVIDsResponse:
    """The SVIDs issued so far for `entries` (a new entry's SVID follows in a later message)."""
    out = pb.SubscribeToX509SVIDsResponse()
    federated: set[TrustDomain] = set()
    for e in entries:
        federated.update(td for td in e.federates_with if td in cache.federated)
        s = cache.svid_of(e)
        if s is None:
            continue
        out.x509_svids.append(
            pb.X509SVIDWithKey(
                x509_svid=x509svid_pb2.X509SVID(
                    cert_chain=[c.public_bytes(Encoding.DER) for c in s.chain],
                    id=spiffe_id_proto(s.spiffe_id),
                    expires_at=int(s.expires_at),
                    hint=e.hint,
                ),
                x509_svid_key=s.key_der,
            )
        )
    out.federates_with.extend(sorted(str(td.id) for td in federated))
    return out


def caller_for_pid(pid: int, proc_root: str = "/proc") -> Caller:
    """A Caller for an arbitrary local pid, with the start time pinned for the reuse guard."""
    start = process_start_time(pid, proc_root=proc_root)
    if start is None:
        raise GRPCError(Status.INVALID_ARGUMENT, f"no process with pid {pid}")
    try:
        # One small read of a pseudo-file: fine inline on the event loop.
        with open(f"{proc_root}/{pid}/status", encoding="utf-8", errors="surrogateescape") as f:
            creds = parse_status(f.read())
    except (FileNotFoundError, ProcessLookupError):
        raise GRPCError(Status.INVALID_ARGUMENT, f"no process with pid {pid}") from None
    except (OSError, ValueError) as exc:
        raise GRPCError(Status.UNAVAILABLE, f"cannot read credentials of pid {pid}: {exc}") from None
    return Caller(pid=pid, uid=creds.uid, gid=creds.gid, start_time=start)


# ---------------------------------------------------------------------------- handler
class DelegatedIdentityHandler(delegatedidentity_grpc.DelegatedIdentityBase):
    def __init__(self, identity: Identity, authorized_delegates: Iterable[SpiffeId]) -> None:
        self.id = identity
        self.cache = identity.cache
        self.delegates = frozenset(authorized_delegates)

    async def _authorized_caller(self, stream: Stream[Any, Any]) -> frozenset[Selector]:
        """Attest the caller once (as SPIRE does) and check it is a delegate."""
        selectors = await self.id.selectors(stream)
        await self.id.wait_ready()
        self._recheck(selectors)
        return selectors

    def _recheck(self, caller: frozenset[Selector]) -> None:
        check_delegate(self.cache.matching_entries(caller), self.delegates)

    async def _target(self, selectors: Sequence[selector_pb2.Selector], pid: int) -> frozenset[Selector]:
        """The selectors of the workload the delegate asks about: given, or attested from `pid`."""
        if bool(selectors) == bool(pid):
            raise GRPCError(Status.INVALID_ARGUMENT, "exactly one of selectors or pid must be set")
        if selectors:
            return selectors_from_proto(selectors)
        if pid < 0:
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid pid {pid}")
        caller = caller_for_pid(pid)
        try:
            return await self.id.attestation.attest(caller)
        except AttestationError as exc:
            self.id.manager.note_workload_failure(str(exc), caller.uid)
            raise GRPCError(Status.UNAVAILABLE, f"workload attestation of pid {pid} failed: {exc}") from None

    async def _push_on_change(
        self,
        stream: Stream[Any, Any],
        caller: frozenset[Selector],
        target: frozenset[Selector],
        build: Callable[[Watcher], Any],
    ) -> None:
        """Every subscription's shape: the complete state at once (even when empty), then
        again whenever the cache wakes the watcher and the state changed; authorization
        is re-checked on every update."""
        # Any entry change: the delegate's own authorization is re-checked on every update.
        watcher = self.cache.watch(target, any_entry_change=True)
        watcher.hold_first_message()
        try:
            last: Any = None
            while True:
                watcher.event.clear()
                self._recheck(caller)
                msg = build(watcher)
                if msg is not None and msg != last:
                    await stream.send_message(msg)
                    watcher.first_message_sent()
                    last = msg
                await watcher.event.wait()
        finally:
            self.cache.unwatch(watcher)

    async def SubscribeToX509SVIDs(
        self, stream: Stream[pb.SubscribeToX509SVIDsRequest, pb.SubscribeToX509SVIDsResponse]
    ) -> None:
        req = await recv_request(stream)
        caller = await self._authorized_caller(stream)
        target = await self._target(req.selectors, req.pid)

        def build(watcher: Watcher) -> pb.SubscribeToX509SVIDsResponse | None:
            entries = handed_out(self.cache.matching_entries(target))
            # Watch unissued entries too, so their first SVID wakes this stream.
            watcher.entry_ids = {e.id for e in entries}
            if watcher.holding_partial and any(self.cache.svid_of(e) is None for e in entries):
                return None
            return x509_svids_response(self.cache, entries)

        await self._push_on_change(stream, caller, target, build)

    async def SubscribeToX509Bundles(
        self, stream: Stream[pb.SubscribeToX509BundlesRequest, pb.SubscribeToX509BundlesResponse]
    ) -> None:
        await stream.recv_message()
        caller = await self._authorized_caller(stream)
        await self._push_on_change(
            stream,
            caller,
            caller,
            lambda _w: pb.SubscribeToX509BundlesResponse(ca_certificates=self.cache.x509_bundle_map()),
        )

    async def FetchJWTSVIDs(self, stream: Stream[pb.FetchJWTSVIDsRequest, pb.FetchJWTSVIDsResponse]) -> None:
        req = await recv_request(stream)
        audience = [a for a in req.audience if a]
        if not audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        try:
            check_audience_bounds(audience)
        except ValueError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        await self._authorized_caller(stream)
        target = await self._target(req.selectors, req.pid)
        entries = handed_out(self.cache.matching_entries(target))
        if not entries:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        out = pb.FetchJWTSVIDsResponse()
        for e in entries:
            try:
                j = await self.id.manager.jwt_svid(e, audience)
            except GRPCError:
                raise
            except Exception as exc:
                log.warning("JWT-SVID signing for %s failed: %s", e.spiffe_id, exc)
                raise GRPCError(Status.UNAVAILABLE, f"could not fetch JWT-SVID for {e.spiffe_id}") from None
            iat, exp = _token_times(j.token)
            out.svids.append(
                jwtsvid_pb2.JWTSVID(
                    token=j.token,
                    id=spiffe_id_proto(j.spiffe_id),
                    expires_at=exp or int(j.expires_at),
                    issued_at=iat,
                    hint=e.hint,
                )
            )
        await stream.send_message(out)

    async def SubscribeToJWTBundles(
        self, stream: Stream[pb.SubscribeToJWTBundlesRequest, pb.SubscribeToJWTBundlesResponse]
    ) -> None:
        await stream.recv_message()
        caller = await self._authorized_caller(stream)
        await self._push_on_change(
            stream,
            caller,
            caller,
            lambda _w: pb.SubscribeToJWTBundlesResponse(bundles=self.cache.jwt_bundle_map()),
        )


def _token_times(token: str) -> tuple[int, int]:
    """`iat` and `exp` as the token states them (0 when absent).

    Our own server just signed it and nothing is trusted from it; the token's `exp` is
    preferred over the expiry the server reports beside it, which can be a second later."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return 0, 0
    iat, exp = (claims.get(k) for k in ("iat", "exp"))
    as_int = lambda v: int(v) if isinstance(v, (int, float)) else 0  # noqa: E731
    return as_int(iat), as_int(exp)
