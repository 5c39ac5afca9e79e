"""Envoy SDS v3 (``envoy.service.secret.v3.SecretDiscoveryService``) on the Workload API
socket: the calling workload's SVIDs and trust bundles as Envoy ``Secret`` resources.

Resource names (SPEC-PROTOCOLS §4, the same names SPIRE's sdsv3 handler answers):

- a SPIFFE ID the caller holds → ``tls_certificate`` named with that ID (PEM chain, PEM PKCS#8 key)
- ``default``                   → the caller's first identity, named ``default``
- ``spiffe://<td>``             → ``validation_context`` for that trust domain
- ``ROOTCA``                    → ``validation_context`` for our own trust domain
- ``ALL``                       → one SPIFFE validator covering every trust domain the caller may use
- no names                      → everything the caller may have
- anything else                 → INVALID_ARGUMENT

Unlike the Workload API there is no security header (Envoy cannot send one); the caller
is still attested through SO_PEERCRED. Resolution is a pure function of a
:class:`CallerView`; the handler only does the xDS bookkeeping (versions, nonces, ACK/NACK).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_spiffe_validator_config_pb2
from google.protobuf import any_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from meshid.bundle import Bundle
from meshid.errors import InvalidSpiffeIdError
from meshid.grpc_base import bounded_status_message, recv_request
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api.cache import SvidCache, X509Svid
from workload_api.sds_service import DiscoveryRequest, DiscoveryResponse, SecretDiscoveryServiceBase
from workload_api.workload_handler import Identity

log = logging.getLogger("meshid.agent.sds")

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
DEFAULT_SVID_NAME = "default"
ROOT_CA_NAME = "ROOTCA"
ALL_BUNDLES_NAME = "ALL"
# Node metadata key SPIRE honours: lets an operator force `trusted_ca` on a new Envoy.
DISABLE_SPIFFE_VALIDATION_KEY = "disable_spiffe_cert_validation"
# The SPIFFE certificate validator first shipped in Envoy 1.18.
LAST_ENVOY_WITHOUT_SPIFFE_VALIDATOR = (1, 17)
# One workload's secrets are a handful of names; a request of 100k names held the event loop
# (every workload on the node) for a second of parsing.
MAX_RESOURCE_NAMES = 1024
MAX_NAMES_IN_ERROR = 10


# ---------------------------------------------------------------------------- errors
class SdsError(Exception):
    """A request SDS cannot answer; `status` is what the client sees."""

    status = Status.INVALID_ARGUMENT


class UnknownResourceError(SdsError):
    def __init__(self, names: Iterable[str]) -> None:
        self.names = sorted(set(names))
        shown = self.names[:MAX_NAMES_IN_ERROR]
        more = len(self.names) - len(shown)
        super().__init__(f"workload is not authorized for the requested identities {shown}"
                         + (f" and {more} more" if more else ""))


class UnsupportedResourceError(SdsError):
    status = Status.FAILED_PRECONDITION


class NotIssuedYetError(SdsError):
    """The caller holds the identity but its SVID has not been signed yet (streams wait)."""

    status = Status.UNAVAILABLE


def grpc_error(exc: SdsError) -> GRPCError:
    return GRPCError(exc.status, str(exc))


# ---------------------------------------------------------------------------- pure core
@dataclass(frozen=True)
class CallerView:
    """What one caller may receive, snapshotted from the cache."""

    own_td: TrustDomain
    svids: tuple[X509Svid, ...]  # one per SPIFFE ID, in Workload API order (first = default)
    held: frozenset[SpiffeId]  # every ID the caller has an entry for, issued or not
    bundles: dict[TrustDomain, Bundle] = field(default_factory=dict)  # own first, then federated

    @classmethod
    def from_cache(cls, cache: SvidCache, selectors: frozenset[Selector]) -> CallerView:
        assert cache.bundle is not None
        entries = cache.matching_entries(selectors)
        svids: dict[SpiffeId, X509Svid] = {}
        for e in entries:
            s = cache.svid_of(e)
            if s is not None:
                svids.setdefault(s.spiffe_id, s)  # two entries, one ID: Envoy wants one secret per name
        bundles: dict[TrustDomain, Bundle] = {cache.td: cache.bundle}
        for e in entries:
            for td in e.federates_with:
                b = cache.federated.get(td)
                if b is not None:
                    bundles.setdefault(td, b)
        return cls(cache.td, tuple(svids.values()), frozenset(e.spiffe_id for e in entries), bundles)


def spiffe_validator_supported(node: base_pb2.Node) -> bool:
    """False for Envoy ≤ 1.17 (no SPIFFE validator) or when the node opts out in its metadata.

    A node that does not report a build version is taken to be current (SPEC §4 only asks
    for the fallback when the node *says* it is old)."""
    if node.HasField("metadata") and DISABLE_SPIFFE_VALIDATION_KEY in node.metadata.fields:
        value = node.metadata.fields[DISABLE_SPIFFE_VALIDATION_KEY]
        kind = value.WhichOneof("kind")
        if kind == "bool_value" and value.bool_value:
            return False
        if kind == "string_value" and value.string_value.strip().lower() in ("1", "t", "true"):
            return False
    if node.HasField("user_agent_build_version") and node.user_agent_build_version.HasField("version"):
        v = node.user_agent_build_version.version
        return (v.major_number, v.minor_number) > LAST_ENVOY_WITHOUT_SPIFFE_VALIDATOR
    return True


def _pem_chain(svid: X509Svid) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)


def _pem_key(svid: X509Svid) -> bytes:
    return svid.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())


def tls_certificate_secret(name: str, svid: X509Svid) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=_pem_chain(svid)),
        private_key=base_pb2.DataSource(inline_bytes=_pem_key(svid)),
    ))


def validation_secret(name: str, bundles: Sequence[Bundle], spiffe_validator: bool) -> secret_pb2.Secret:
    if spiffe_validator:
        config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(trust_domains=[
            tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                name=b.trust_domain.name, trust_bundle=base_pb2.DataSource(inline_bytes=b.x509_pem()))
            for b in sorted(bundles, key=lambda b: b.trust_domain.name)
        ])
        packed = any_pb2.Any()
        packed.Pack(config, deterministic=True)
        validator = extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR, typed_config=packed)
        context = common_pb2.CertificateValidationContext(custom_validator_config=validator)
    else:
        # Old Envoy: plain roots; only ever one trust domain here (see resolve() for ALL).
        context = common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=b"".join(b.x509_pem() for b in bundles)))
    return secret_pb2.Secret(name=name, validation_context=context)


def resolve(names: Sequence[str], view: CallerView, spiffe_validator: bool) -> list[secret_pb2.Secret]:
    """The secrets answering `names` (SPEC §4 table), in request order.

    Raises UnknownResourceError for names the caller may not have, NotIssuedYetError when a
    held identity has no SVID yet, UnsupportedResourceError for ALL on an old Envoy, and
    SdsError for more than MAX_RESOURCE_NAMES names."""
    if len(names) > MAX_RESOURCE_NAMES:
        raise SdsError(f"at most {MAX_RESOURCE_NAMES} resource names per request, got {len(names)}")
    wanted = list(dict.fromkeys(n for n in names if n))  # Envoy may repeat names; answer each once
    by_id = {s.spiffe_id: s for s in view.svids}
    if not wanted:
        out = [validation_secret(str(td.id), [b], spiffe_validator) for td, b in view.bundles.items()]
        out.extend(tls_certificate_secret(str(s.spiffe_id), s) for s in view.svids)
        return out
    out = []
    unknown: list[str] = []
    pending: list[str] = []
    for name in wanted:
        if name == DEFAULT_SVID_NAME:
            if view.svids:
                out.append(tls_certificate_secret(name, view.svids[0]))
            elif view.held:
                pending.append(name)
            else:
                unknown.append(name)
        elif name == ROOT_CA_NAME:
            out.append(validation_secret(name, [view.bundles[view.own_td]], spiffe_validator))
        elif name == ALL_BUNDLES_NAME:
            if not spiffe_validator:
                # trusted_ca with every root would let any federated CA vouch for any trust
                # domain's IDs; SPIRE refuses the same way.
                raise UnsupportedResourceError(f"{ALL_BUNDLES_NAME} needs the SPIFFE certificate validator "
                                               "(Envoy 1.18 or later)")
            out.append(validation_secret(name, list(view.bundles.values()), True))
        else:
            try:
                sid = SpiffeId.parse(name)
            except InvalidSpiffeIdError:
                unknown.append(name)
                continue
            if sid.is_trust_domain_id:
                bundle = view.bundles.get(sid.trust_domain)
                if bundle is None:
                    unknown.append(name)
                else:
                    out.append(validation_secret(name, [bundle], spiffe_validator))
            elif sid in by_id:
                out.append(tls_certificate_secret(name, by_id[sid]))
            elif sid in view.held:
                pending.append(name)
            else:
                unknown.append(name)
    if unknown:
        raise UnknownResourceError(unknown)
    if pending:
        raise NotIssuedYetError(f"SVIDs not issued yet for {sorted(pending)}")
    return out


def pack(secrets_: Iterable[secret_pb2.Secret]) -> list[any_pb2.Any]:
    out = []
    for s in secrets_:
        a = any_pb2.Any()
        # Deterministic bytes so "did anything change?" is a byte comparison.
        a.Pack(s, deterministic=True)
        out.append(a)
    return out


def check_type_url(req: DiscoveryRequest) -> None:
    if req.type_url and req.type_url != SECRET_TYPE_URL:
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"unsupported type_url {req.type_url!r} (want {SECRET_TYPE_URL})")


# ---------------------------------------------------------------------------- stream state
MAX_LOGGED_ERROR = 512  # characters of an Envoy NACK's message put in our log
MAX_LOGGED_VALUE = 128  # characters of a resource name, nonce or version put in our log


def _short(value: str) -> str:
    return bounded_status_message(value, MAX_LOGGED_VALUE) or ""


@dataclass
class _StreamState:
    """xDS state-of-the-world bookkeeping for one StreamSecrets call."""

    request: DiscoveryRequest | None = None  # the last request we act on
    # Envoy may send `node` on the first request only; the Envoy version decides the
    # validation context format for the whole stream.
    node: base_pb2.Node | None = None
    version: int = 0
    nonce: str = ""  # nonce of the last response sent ("" = none yet)
    sent: tuple[bytes, ...] | None = None  # resources of the last response
    nacked: str | None = None  # nonce of the last response whose rejection was logged

    def accept(self, req: DiscoveryRequest) -> bool:
        """Record `req`; True if it changes what must be sent (new subscription or names)."""
        if self.nonce and req.response_nonce != self.nonce:
            # Answers a response we have since superseded: xDS says ignore it.
            log.debug("SDS: ignoring request with stale nonce %r (expected %r)",
                      _short(req.response_nonce), self.nonce)
            return False
        if req.HasField("error_detail"):
            # Once per response, cut short: the message is the caller's, and one that repeated
            # a 1 MB NACK of the same response wrote 482 MB of warnings in 5 s.
            # The names are the caller's as well: one of 1 MB was logged whole.
            names = [_short(n) for n in req.resource_names[:MAX_NAMES_IN_ERROR]]
            if self.nacked != self.nonce:
                self.nacked = self.nonce
                log.warning("SDS: Envoy rejected version %s of %s: %s", req.version_info[:64] or "?",
                            names, bounded_status_message(req.error_detail.message, MAX_LOGGED_ERROR))
            else:
                log.debug("SDS: Envoy rejected version %s again", req.version_info[:64] or "?")
        elif self.nonce and req.version_info != str(self.version):
            log.debug("SDS: client is at version %r, expected %s", _short(req.version_info), self.version)
        if req.HasField("node") or self.node is None:
            self.node = req.node
        previous = self.request
        self.request = req
        # An ACK or NACK of what we sent repeats the same names: nothing new to send.
        return previous is None or set(previous.resource_names) != set(req.resource_names)


class SdsHandler(SecretDiscoveryServiceBase):
    def __init__(self, identity: Identity) -> None:
        self.id = identity
        self.cache = identity.cache

    def _view(self, selectors: frozenset[Selector]) -> CallerView:
        return CallerView.from_cache(self.cache, selectors)

    async def FetchSecrets(self, stream: Stream[DiscoveryRequest, DiscoveryResponse]) -> None:
        req = await recv_request(stream)
        check_type_url(req)
        selectors = await self.id.selectors(stream)
        await self.id.wait_ready()
        try:
            found = resolve(req.resource_names, self._view(selectors), spiffe_validator_supported(req.node))
        except SdsError as exc:
            raise grpc_error(exc) from None
        # Unary fetch has no version or nonce (as in SPIRE): nothing to acknowledge.
        await stream.send_message(DiscoveryResponse(resources=pack(found), type_url=SECRET_TYPE_URL))

    async def StreamSecrets(self, stream: Stream[DiscoveryRequest, DiscoveryResponse]) -> None:
        selectors = await self.id.selectors(stream)
        await self.id.wait_ready()
        watcher = self.cache.watch(selectors)
        inbox: list[DiscoveryRequest] = []
        ended: list[BaseException | None] = []
        taken = asyncio.Event()  # the loop has taken what the reader put in the inbox

        async def read() -> None:
            # Requests and cache changes both wake the same event, so one loop serves both.
            try:
                async for msg in stream:
                    inbox.append(msg)
                    watcher.event.set()
                    # The next request is read once the loop has taken this one: while a response
                    # waits on a client that does not read, its requests wait in HTTP/2 flow
                    # control, not in our memory (a 1 MB request at a time piled up without bound).
                    taken.clear()
                    await taken.wait()
                ended.append(None)
            except Exception as exc:
                ended.append(exc)
            watcher.event.set()

        reader = asyncio.create_task(read(), name="sds-reader")
        state = _StreamState()
        try:
            while True:
                watcher.event.clear()
                while inbox:
                    req = inbox.pop(0)
                    check_type_url(req)
                    if state.accept(req):
                        state.sent = None  # names changed: answer even if the content is the same
                taken.set()
                if ended:
                    if ended[0] is not None:
                        raise ended[0]
                    return  # Envoy closed its side
                view = self._view(selectors)
                watcher.entry_ids = {e.id for e in self.cache.matching_entries(selectors)}
                if state.request is not None:
                    await self._maybe_send(stream, state, view)
                await watcher.event.wait()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self.cache.unwatch(watcher)

    async def _maybe_send(self, stream: Stream[DiscoveryRequest, DiscoveryResponse], state: _StreamState,
                          view: CallerView) -> None:
        req, node = state.request, state.node
        assert req is not None and node is not None
        try:
            found = resolve(req.resource_names, view, spiffe_validator_supported(node))
        except NotIssuedYetError:
            return  # the SVID lands in the cache soon and wakes us
        except SdsError as exc:
            raise grpc_error(exc) from None
        resources = pack(found)
        raw = tuple(a.SerializeToString(deterministic=True) for a in resources)
        if raw == state.sent:
            return
        state.version += 1
        state.nonce = secrets.token_hex(8)
        state.sent = raw
        await stream.send_message(DiscoveryResponse(version_info=str(state.version), resources=resources,
                                                    type_url=SECRET_TYPE_URL, nonce=state.nonce))

