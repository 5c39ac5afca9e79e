"""SPIRE's `spire.api.server.entry.v1.Entry` service (the calls Cilium's operator makes).

Thin handlers: authorize the caller, convert proto <-> `meshid.entry.Entry`, call the
EntryService (the same one the CLI uses) and the pure logic in `issuer.entry_filters`.
Named errors become gRPC status codes in `status_of`, the one place that maps them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from cryptography import x509
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from issuer._gen.spire.api.server.entry.v1 import entry_grpc, entry_pb2
from issuer.authorization import EntryIndex
from issuer.datastore.base import EntryAlreadyExistsError, EntryChangedError
from issuer.entries import EntryService, check_entry_id
from issuer.entry_filters import (
    MASKABLE_FIELDS,
    EntryFilter,
    FederatesWithMatch,
    Match,
    SelectorMatch,
    apply_output_mask,
    filter_entries,
    paginate,
)
from meshid._gen.spire.api.types import entry_pb2 as types_entry_pb2
from meshid._gen.spire.api.types import selector_pb2, spiffeid_pb2, status_pb2
from meshid.entry import Entry
from meshid.errors import (
    AlreadyExistsError,
    MeshidError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from meshid.grpc_base import recv_request
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from meshid.tls import peer_certificate, peer_spiffe_id

log = logging.getLogger("meshid.entry_api")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
FilterProto = entry_pb2.ListEntriesRequest.Filter | entry_pb2.CountEntriesRequest.Filter

# revision_number and created_at belong to the server: never taken from a request.
WRITABLE_FIELDS = tuple(f for f in MASKABLE_FIELDS if f not in ("revision_number", "created_at"))
_ATTRIBUTES = "additional_attributes"  # kept in Entry.extra: meshid itself does not act on them


# ---------------------------------------------------------------------- error mapping
def status_of(exc: BaseException) -> tuple[Status, str]:
    """The gRPC status for an exception: the one mapping for this API."""
    if isinstance(exc, GRPCError):
        return exc.status, exc.message or ""
    if isinstance(exc, UnauthenticatedError):
        return Status.UNAUTHENTICATED, str(exc)
    if isinstance(exc, PermissionDeniedError):
        return Status.PERMISSION_DENIED, str(exc)
    if isinstance(exc, NotFoundError):
        return Status.NOT_FOUND, str(exc)
    if isinstance(exc, AlreadyExistsError):
        return Status.ALREADY_EXISTS, str(exc)
    if isinstance(exc, EntryChangedError):
        return Status.ABORTED, str(exc)
    if isinstance(exc, OverloadedError):
        return Status.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, MeshidError | ValueError):
        return Status.INVALID_ARGUMENT, str(exc)
    log.error("internal error in the Entry API", exc_info=exc)
    return Status.INTERNAL, "internal error"


def _status(code: Status, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value, message=message)


_OK = _status(Status.OK, "OK")


# ---------------------------------------------------------------------- proto -> meshid
def spiffe_id_from_proto(pb: spiffeid_pb2.SPIFFEID) -> SpiffeId:
    return SpiffeId.from_parts(pb.trust_domain, pb.path)


def spiffe_id_to_proto(sid: SpiffeId) -> spiffeid_pb2.SPIFFEID:
    return spiffeid_pb2.SPIFFEID(trust_domain=sid.trust_domain.name, path=sid.path)


def member_id(pb: spiffeid_pb2.SPIFFEID, td: TrustDomain) -> SpiffeId:
    """A SPIFFE ID with a path inside our trust domain (SPIRE's TrustDomainMemberIDFromProto)."""
    sid = spiffe_id_from_proto(pb)
    if sid.trust_domain != td:
        raise ValueError(f"{sid} is not a member of trust domain {td}")
    if sid.is_trust_domain_id:
        raise ValueError(f"{sid} has no path")
    return sid


def selectors_from_proto(pbs: Iterable[selector_pb2.Selector]) -> tuple[Selector, ...]:
    return tuple(sorted({Selector(s.type, s.value) for s in pbs}))


def trust_domains_from_proto(names: Iterable[str]) -> tuple[TrustDomain, ...]:
    # SPIRE accepts "example.org" and "spiffe://example.org"; keep first-seen order.
    return tuple(dict.fromkeys(TrustDomain.parse(n) for n in names))


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _required_id(pb: types_entry_pb2.Entry, name: str, td: TrustDomain) -> SpiffeId:
    if not pb.HasField(name):
        raise ValueError("missing")
    return member_id(getattr(pb, name), td)


_FIELD_FROM_PROTO: dict[str, Callable[[types_entry_pb2.Entry, TrustDomain], Any]] = {
    "spiffe_id": lambda pb, td: _required_id(pb, "spiffe_id", td),
    "parent_id": lambda pb, td: _required_id(pb, "parent_id", td),
    "selectors": lambda pb, td: selectors_from_proto(pb.selectors),
    "x509_svid_ttl": lambda pb, td: pb.x509_svid_ttl,
    "jwt_svid_ttl": lambda pb, td: pb.jwt_svid_ttl,
    "federates_with": lambda pb, td: trust_domains_from_proto(pb.federates_with),
    "admin": lambda pb, td: pb.admin,
    "downstream": lambda pb, td: pb.downstream,
    "expires_at": lambda pb, td: _non_negative(pb.expires_at),
    "dns_names": lambda pb, td: tuple(dict.fromkeys(pb.dns_names)),
    "store_svid": lambda pb, td: pb.store_svid,
    "hint": lambda pb, td: pb.hint,
}


def entry_changes(
    pb: types_entry_pb2.Entry, td: TrustDomain, fields: Iterable[str], extra: dict[str, Any]
) -> dict[str, Any]:
    """Entry constructor/replace() arguments for `fields` of `pb` (an input mask's fields);
    fields outside the mask are neither read nor validated, as in SPIRE."""
    changes: dict[str, Any] = {}
    for name in fields:
        if name == _ATTRIBUTES:
            extra = {k: v for k, v in extra.items() if k != _ATTRIBUTES}
            if pb.HasField(_ATTRIBUTES):
                a = pb.additional_attributes
                extra[_ATTRIBUTES] = {
                    "disable_x509_svid_prefetch": a.disable_x509_svid_prefetch,
                    "jwt_svid_include_jti": a.jwt_svid_include_jti,
                }
            changes["extra"] = extra
            continue
        convert = _FIELD_FROM_PROTO.get(name)
        if convert is None:
            continue
        try:
            changes[name] = convert(pb, td)
        except ValueError as exc:
            raise ValueError(f"invalid {name}: {exc}") from None
    return changes


def entry_from_proto(pb: types_entry_pb2.Entry, td: TrustDomain) -> Entry:
    """A new entry from a BatchCreateEntry request; ValueError says what is wrong."""
    changes = entry_changes(pb, td, WRITABLE_FIELDS, {})
    return Entry(id=check_entry_id(pb.id), **changes)


def entry_to_proto(e: Entry) -> types_entry_pb2.Entry:
    pb = types_entry_pb2.Entry(
        id=e.id,
        spiffe_id=spiffe_id_to_proto(e.spiffe_id),
        parent_id=spiffe_id_to_proto(e.parent_id),
        selectors=[selector_pb2.Selector(type=s.type, value=s.value) for s in e.selectors],
        x509_svid_ttl=e.x509_svid_ttl,
        federates_with=[td.name for td in e.federates_with],
        admin=e.admin,
        downstream=e.downstream,
        expires_at=e.expires_at,
        dns_names=list(e.dns_names),
        revision_number=e.revision_number,
        store_svid=e.store_svid,
        jwt_svid_ttl=e.jwt_svid_ttl,
        hint=e.hint,
        created_at=e.created_at,
    )
    attrs = e.extra.get(_ATTRIBUTES)
    if isinstance(attrs, dict):
        pb.additional_attributes.disable_x509_svid_prefetch = bool(attrs.get("disable_x509_svid_prefetch"))
        pb.additional_attributes.jwt_svid_include_jti = bool(attrs.get("jwt_svid_include_jti"))
    return pb


def mask_fields(msg: Any, name: str) -> frozenset[str] | None:
    """The fields an EntryMask field of `msg` selects; None when the mask is absent (= all)."""
    if not msg.HasField(name):
        return None
    mask = getattr(msg, name)
    return frozenset(f for f in MASKABLE_FIELDS if getattr(mask, f))


def filter_from_proto(f: FilterProto, td: TrustDomain) -> EntryFilter:
    """SPIRE's validation and messages: a malformed filter is INVALID_ARGUMENT, never ignored."""
    kw: dict[str, Any] = {}
    try:
        if f.HasField("by_spiffe_id"):
            kw["by_spiffe_id"] = member_id(f.by_spiffe_id, td)
    except ValueError as exc:
        raise ValueError(f"malformed SPIFFE ID filter: {exc}") from None
    try:
        if f.HasField("by_parent_id"):
            kw["by_parent_id"] = member_id(f.by_parent_id, td)
    except ValueError as exc:
        raise ValueError(f"malformed parent ID filter: {exc}") from None
    try:
        if f.HasField("by_selectors"):
            kw["by_selectors"] = SelectorMatch(
                frozenset(selectors_from_proto(f.by_selectors.selectors)), _match(f.by_selectors.match)
            )
    except ValueError as exc:
        raise ValueError(f"malformed selectors filter: {exc}") from None
    try:
        if f.HasField("by_federates_with"):
            kw["by_federates_with"] = FederatesWithMatch(
                frozenset(trust_domains_from_proto(f.by_federates_with.trust_domains)),
                _match(f.by_federates_with.match),
            )
    except ValueError as exc:
        raise ValueError(f"malformed federates with filter: {exc}") from None
    if f.HasField("by_hint"):
        kw["by_hint"] = f.by_hint.value
    if f.HasField("by_downstream"):
        kw["by_downstream"] = f.by_downstream.value
    return EntryFilter(**kw)


def _match(value: int) -> Match:
    try:
        return Match(value)
    except ValueError:
        raise ValueError(f"unknown match behavior {value}") from None


# ---------------------------------------------------------------------- the service
class EntryApi(entry_grpc.EntryBase):
    """Handler names are the gRPC method names, as grpclib's generated base requires."""

    def __init__(
        self, entries: EntryService, td: TrustDomain, admin_ids: Iterable[SpiffeId],
        known_ca: Callable[[x509.Certificate], bool] | None = None,
    ) -> None:
        self.entries = entries
        self.known_ca = known_ca
        self.td = td
        self.admin_ids = frozenset(admin_ids)
        self._admin_index: EntryIndex | None = None
        self._admin_entry_ids: frozenset[SpiffeId] = frozenset()

    # -- plumbing
    async def _unary(self, stream: Stream[Req, Resp], handle: Callable[[Req], Awaitable[Resp]]) -> None:
        try:
            await self.authorize(stream)
            request = await recv_request(stream)  # malformed or missing: INVALID_ARGUMENT
            reply = await handle(request)
        except GRPCError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            raise GRPCError(code, message) from None
        await stream.send_message(reply)

    async def authorize(self, stream: Stream[Any, Any]) -> SpiffeId:
        """The caller's X509-SVID must name a configured admin ID or an admin entry's ID."""
        # grpclib's Peer only offers the decoded cert dict; the SPIFFE ID check wants DER.
        transport = getattr(stream.peer, "_transport", None)
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        caller = peer_spiffe_id(ssl_object)
        if caller.trust_domain != self.td:
            raise PermissionDeniedError(f"caller {caller} is not in trust domain {self.td}")
        cert = peer_certificate(ssl_object)
        if self.known_ca is not None and (cert is None or not self.known_ca(cert)):
            raise PermissionDeniedError("caller SVID was not signed by a CA key this server still trusts")
        # The handshake checked the validity period once, but a gRPC client keeps its
        # connection for call after call: one opened just before the SVID expired went on
        # being served (the agent API checks every call for the same reason).
        if cert is not None and cert.not_valid_after_utc.timestamp() <= self.entries.clock():
            raise UnauthenticatedError("caller SVID has expired")
        if caller in self.admin_ids or caller in await self._admin_entry_spiffe_ids():
            return caller
        raise PermissionDeniedError(f"caller {caller} is not an admin")

    async def _admin_entry_spiffe_ids(self) -> frozenset[SpiffeId]:
        idx = await self.entries.index()
        if idx is not self._admin_index:
            now = self.entries.clock()
            self._admin_entry_ids = frozenset(
                e.spiffe_id
                for e in idx.by_id.values()
                if e.admin and (not e.expires_at or e.expires_at > now)
            )
            self._admin_index = idx
        return self._admin_entry_ids

    async def _all_entries(self) -> list[Entry]:
        # The revision-checked index is a cached snapshot of every entry: Cilium lists
        # once per identity, and re-reading the whole table each time would be quadratic.
        return list((await self.entries.index()).by_id.values())

    # -- reads
    async def CountEntries(
        self, stream: Stream[entry_pb2.CountEntriesRequest, entry_pb2.CountEntriesResponse]
    ) -> None:
        async def handle(req: entry_pb2.CountEntriesRequest) -> entry_pb2.CountEntriesResponse:
            f = filter_from_proto(req.filter, self.td) if req.HasField("filter") else EntryFilter()
            return entry_pb2.CountEntriesResponse(count=len(filter_entries(await self._all_entries(), f)))

        await self._unary(stream, handle)

    async def ListEntries(
        self, stream: Stream[entry_pb2.ListEntriesRequest, entry_pb2.ListEntriesResponse]
    ) -> None:
        async def handle(req: entry_pb2.ListEntriesRequest) -> entry_pb2.ListEntriesResponse:
            f = filter_from_proto(req.filter, self.td) if req.HasField("filter") else EntryFilter()
            mask = mask_fields(req, "output_mask")
            page = paginate(filter_entries(await self._all_entries(), f), req.page_size, req.page_token)
            return entry_pb2.ListEntriesResponse(
                entries=[apply_output_mask(entry_to_proto(e), mask) for e in page.entries],
                next_page_token=page.next_page_token,
            )

        await self._unary(stream, handle)

    async def GetEntry(
        self, stream: Stream[entry_pb2.GetEntryRequest, types_entry_pb2.Entry]
    ) -> None:
        async def handle(req: entry_pb2.GetEntryRequest) -> types_entry_pb2.Entry:
            if not req.id:
                raise ValueError("missing ID")
            try:
                e = await self.entries.get(req.id)
            except NotFoundError:
                raise NotFoundError("entry not found") from None
            return apply_output_mask(entry_to_proto(e), mask_fields(req, "output_mask"))

        await self._unary(stream, handle)

    # -- writes: one status per item, so one bad entry never fails the batch
    async def BatchCreateEntry(
        self, stream: Stream[entry_pb2.BatchCreateEntryRequest, entry_pb2.BatchCreateEntryResponse]
    ) -> None:
        async def handle(req: entry_pb2.BatchCreateEntryRequest) -> entry_pb2.BatchCreateEntryResponse:
            mask = mask_fields(req, "output_mask")
            return entry_pb2.BatchCreateEntryResponse(
                results=[await self._create(pb, mask) for pb in req.entries]
            )

        await self._unary(stream, handle)

    async def _create(
        self, pb: types_entry_pb2.Entry, mask: frozenset[str] | None
    ) -> entry_pb2.BatchCreateEntryResponse.Result:
        Result = entry_pb2.BatchCreateEntryResponse.Result
        try:
            entry = entry_from_proto(pb, self.td)
        except Exception as exc:
            return Result(status=_status(Status.INVALID_ARGUMENT, f"failed to convert entry: {exc}"))
        try:
            created = await self.entries.create(entry)
        except EntryAlreadyExistsError as exc:
            # As SPIRE: the caller gets the entry that already holds this identity.
            return Result(
                status=_status(Status.ALREADY_EXISTS, "similar entry already exists"),
                entry=apply_output_mask(entry_to_proto(exc.existing), mask),
            )
        except Exception as exc:
            code, message = status_of(exc)
            return Result(status=_status(code, f"failed to create entry: {message}"))
        return Result(status=_OK, entry=apply_output_mask(entry_to_proto(created), mask))

    async def BatchUpdateEntry(
        self, stream: Stream[entry_pb2.BatchUpdateEntryRequest, entry_pb2.BatchUpdateEntryResponse]
    ) -> None:
        async def handle(req: entry_pb2.BatchUpdateEntryRequest) -> entry_pb2.BatchUpdateEntryResponse:
            in_mask = mask_fields(req, "input_mask")
            fields = WRITABLE_FIELDS if in_mask is None else tuple(f for f in WRITABLE_FIELDS if f in in_mask)
            out_mask = mask_fields(req, "output_mask")
            return entry_pb2.BatchUpdateEntryResponse(
                results=[await self._update(pb, fields, out_mask) for pb in req.entries]
            )

        await self._unary(stream, handle)

    async def _update(
        self, pb: types_entry_pb2.Entry, fields: tuple[str, ...], mask: frozenset[str] | None
    ) -> entry_pb2.BatchUpdateEntryResponse.Result:
        Result = entry_pb2.BatchUpdateEntryResponse.Result
        try:
            found = await self._entry_to_update(pb)
            # The masked fields over the entry as stored at the write: a concurrent update
            # of other fields is kept, not overwritten with what was read here.
            stored = await self.entries.modify(
                found.id, lambda current: current.replace(**entry_changes(pb, self.td, fields, current.extra))
            )
        except EntryAlreadyExistsError as exc:
            return Result(status=_status(Status.ALREADY_EXISTS, f"failed to update entry: {exc}"))
        except Exception as exc:
            code, message = status_of(exc)
            return Result(status=_status(code, f"failed to update entry: {message}"))
        return Result(status=_OK, entry=apply_output_mask(entry_to_proto(stored), mask))

    async def _entry_to_update(self, pb: types_entry_pb2.Entry) -> Entry:
        if pb.id:
            try:
                return await self.entries.get(pb.id)
            except NotFoundError:
                raise NotFoundError("entry not found") from None
        # Cilium's operator updates without an id: find the entry by SPIRE's natural key.
        try:
            key = entry_changes(pb, self.td, ("spiffe_id", "parent_id", "selectors"), {})
            probe = Entry(id="", **key)
        except ValueError as exc:
            raise ValueError(f"no entry ID, and no valid spiffe_id, parent_id and selectors: {exc}") from None
        for e in await self._all_entries():
            if e.same_identity(probe):
                return e
        raise NotFoundError("entry not found")

    async def BatchDeleteEntry(
        self, stream: Stream[entry_pb2.BatchDeleteEntryRequest, entry_pb2.BatchDeleteEntryResponse]
    ) -> None:
        async def handle(req: entry_pb2.BatchDeleteEntryRequest) -> entry_pb2.BatchDeleteEntryResponse:
            return entry_pb2.BatchDeleteEntryResponse(results=[await self._delete(i) for i in req.ids])

        await self._unary(stream, handle)

    async def _delete(self, entry_id: str) -> entry_pb2.BatchDeleteEntryResponse.Result:
        Result = entry_pb2.BatchDeleteEntryResponse.Result
        if not entry_id:
            return Result(id=entry_id, status=_status(Status.INVALID_ARGUMENT, "missing entry ID"))
        try:
            await self.entries.delete(entry_id)
        except NotFoundError:
            return Result(id=entry_id, status=_status(Status.NOT_FOUND, "entry not found"))
        except Exception as exc:
            code, message = status_of(exc)
            return Result(id=entry_id, status=_status(code, f"failed to delete entry: {message}"))
        return Result(id=entry_id, status=_OK)
