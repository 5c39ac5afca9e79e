"""CA key slots: prepared → active → old, for the X509 CA and the JWT signing key.

Timings as in SPIRE: prepare a new key when half of the active key's lifetime is left,
activate it when one sixth is left; an old key stays in the bundle until everything it
signed has expired. A prepared key is published in the bundle before it signs anything.
After a compromise: prepare, activate, taint the old key (never the active one), agents
re-issue, then revoke removes it from the bundle.

A key that leaves the datastore (revoked, or retired by the schedule) is then destroyed by
the key manager (an HSM object, for PKCS#11). Only the replica that removed the record
destroys the key, and only after the removal committed: a crash in between leaves at worst
an orphan key, never a bundle entry whose key is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from issuer.ca import keys as keymod
from issuer.ca import minting
from issuer.ca.upstream import UpstreamAuthority
from issuer.datastore.base import CaKeyRecord, DataStore
from issuer.events import ocsf
from issuer.events.model import Event
from meshid import telemetry
from meshid.bundle import Bundle
from meshid.certs import authority_key_id, subject_key_id
from meshid.errors import MeshidError, NotFoundError
from meshid.spiffe_id import TrustDomain

log = logging.getLogger("meshid.ca")

X509 = "x509"
JWT = "jwt"
PREPARED, ACTIVE, OLD = "prepared", "active", "old"
ROTATION_WARN_EVERY = 60.0  # seconds between repeats of one rotation failure in the log


class CaOperationError(MeshidError):
    """A CA lifecycle operation is not allowed in the current state."""


@dataclass
class LoadedKey:
    record: CaKeyRecord
    key: PrivateKeyTypes
    cert: x509.Certificate | None = None  # x509 only
    chain: list[x509.Certificate] = field(default_factory=list)  # upstream chain, no roots
    roots: list[x509.Certificate] = field(default_factory=list)
    minter: minting.X509Minter | None = None

    @property
    def key_id(self) -> str:
        return self.record.key_id

    @property
    def public_key(self) -> PublicKeyTypes:
        return self.key.public_key()


class CaManager:
    def __init__(
        self,
        ds: DataStore,
        key_manager: keymod.KeyManager,
        upstream: UpstreamAuthority | None,
        trust_domain: TrustDomain,
        ca_ttl: float,
        x509_key_type: str = "ec-p256",
        jwt_key_type: str = "ec-p256",
        server_id: str = "",
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.ds = ds
        self.key_manager = key_manager
        self.upstream = upstream
        self.td = trust_domain
        self.ca_ttl = ca_ttl
        self.key_types = {X509: keymod.KeyType.parse(x509_key_type), JWT: keymod.KeyType.parse(jwt_key_type)}
        self.server_id = server_id
        self.clock = clock
        self.on_change = on_change
        self._keys: dict[str, LoadedKey] = {}
        self._bundle: Bundle | None = None
        self._lock = asyncio.Lock()
        self._max_signed: dict[str, int] = {}
        self._known_authorities: frozenset[str] = frozenset()
        self._foreign: dict[str, CaKeyRecord] = {}  # other replicas' X509 CA keys (records only)
        self._last_rotation_warning: dict[str, tuple[str, float]] = {}  # kind -> (message, monotonic)

    # ------------------------------------------------------------------ loading
    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Our lock, then the datastore-wide CA lock: replicas sharing a datastore take CA
        decisions one at a time, each on fresh state, so they never both make a JWT key."""
        async with self._lock, self.ds.exclusive("ca"):
            yield

    def _is_foreign(self, rec: CaKeyRecord) -> bool:
        # Another replica's X509 CA key: it reaches us through the bundle; JWT keys are shared.
        return rec.kind == X509 and bool(rec.server_id) and rec.server_id != self.server_id

    async def load(self) -> None:
        """Load keys from the datastore (decrypting them) and make sure both kinds have an active key.

        Replicas starting together queue on the datastore lock: the first makes the JWT key,
        the others load it."""
        async with self._exclusive():
            await self._sync()
            now = self.clock()
            for kind in (X509, JWT):
                # The schedule, not just "is there an active key": after an outage longer
                # than the CA TTL the active key is expired, and the server's own SVID is
                # minted from it right after this.
                try:
                    await self._schedule(kind, now)
                except Exception as exc:
                    active = self.active(kind)
                    if active is None or not self._usable(active, now):
                        raise
                    # Only the routine prepare failed (upstream expired, say): the active key
                    # still signs, so start; tick() retries and warns.
                    self._warn_rotation_failed(kind, exc)
            await self._rebuild_bundle(bump=self._bundle is None)

    async def _load_record(self, rec: CaKeyRecord) -> LoadedKey:
        key = await self.key_manager.load(rec.key_id, rec.sealed_key)
        lk = LoadedKey(rec, key)
        if rec.kind == X509:
            certs = [x509.load_der_x509_certificate(d) for d in rec.cert_chain_der]
            lk.cert = certs[0]
            n_roots = int(rec.extra.get("roots", "0"))
            lk.chain = certs[1 : len(certs) - n_roots] if n_roots else certs[1:]
            lk.roots = certs[len(certs) - n_roots :] if n_roots else []
            if not lk.roots:
                lk.roots = [lk.cert]  # self-signed: the CA is its own root
            lk.minter = minting.X509Minter(key, lk.cert, lk.chain)
        return lk

    # ------------------------------------------------------------------ queries
    def _in_state(self, kind: str, state: str) -> list[LoadedKey]:
        return sorted(
            (k for k in self._keys.values() if k.record.kind == kind and k.record.state == state),
            key=lambda k: (k.record.not_before, k.key_id),  # same order on every replica
        )

    def active(self, kind: str) -> LoadedKey | None:
        found = self._in_state(kind, ACTIVE)
        return found[-1] if found else None

    @property
    def x509_active(self) -> LoadedKey:
        k = self.active(X509)
        if k is None:
            raise CaOperationError("no active X509 CA (server not started?)")
        return k

    @property
    def jwt_active(self) -> LoadedKey:
        k = self.active(JWT)
        if k is None:
            raise CaOperationError("no active JWT key (server not started?)")
        return k

    def keys(self) -> list[LoadedKey]:
        return sorted(self._keys.values(), key=lambda k: (k.record.kind, k.record.not_before))

    def get(self, key_id: str) -> LoadedKey:
        k = self._keys.get(key_id)
        if k is None:
            raise NotFoundError(f"no CA key with id {key_id!r}")
        return k

    def tainted_key_ids(self) -> list[str]:
        return sorted(k.key_id for k in self._keys.values() if k.record.tainted)

    def issued_by_known_ca(self, cert: x509.Certificate) -> bool:
        """Was `cert` signed by one of our (any replica's) X509 CA keys still in the datastore?
        With an upstream, a revoked CA's SVIDs still chain to the trusted root: this check is
        what makes revocation bite for agent and admin SVIDs."""
        return authority_key_id(cert) in self._known_authorities

    def tainted_authority_key_ids(self) -> list[str]:
        """Subject key identifiers (hex) of tainted X509 CAs, every replica's: agents match
        them to their SVIDs' AKI, whichever replica they sync with."""
        certs = [k.cert for k in self._keys.values() if k.record.tainted and k.cert is not None]
        certs += [
            x509.load_der_x509_certificate(r.cert_chain_der[0])
            for r in self._foreign.values()
            if r.tainted and r.cert_chain_der
        ]
        out = []
        for cert in certs:
            try:
                out.append(
                    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
                )
            except x509.ExtensionNotFound:
                continue
        return sorted(out)

    @property
    def bundle(self) -> Bundle:
        if self._bundle is None:
            raise CaOperationError("CA not loaded")
        return self._bundle

    # ------------------------------------------------------------------ lifecycle
    async def prepare(self, kind: str) -> LoadedKey:
        async with self._exclusive():
            await self._sync()
            lk = await self._prepare(kind)
            await self._rebuild_bundle()
        return lk

    async def activate(self, kind: str) -> LoadedKey:
        async with self._exclusive():
            await self._sync()
            lk = await self._activate(kind)
            await self._rebuild_bundle()
        return lk

    async def _prepare(self, kind: str, routine: bool = False) -> LoadedKey:
        """Make the prepared key; `routine`: the schedule's, while the active key still signs."""
        for existing in self._in_state(kind, PREPARED):
            return existing  # one prepared key at a time
        now = self.clock()
        key_type = self.key_types[kind]
        key_id_tmp = f"{kind}-{int(now * 1000)}"
        priv, _ = await self.key_manager.generate(key_id_tmp, key_type)
        key_id = f"{kind}-{keymod.key_id_for(priv.public_key())}"
        known_as = key_id_tmp  # the name the key manager knows the key by
        try:
            sealed = await self._seal(key_id, priv)
            known_as = key_id
            not_before = int(now)
            not_after = int(now + self.ca_ttl)
            extra: dict[str, str] = {}
            chain_der: tuple[bytes, ...] = ()
            lk = LoadedKey(
                CaKeyRecord(key_id, kind, PREPARED, sealed, _spki(priv.public_key()), not_before, not_after),
                priv,
            )
            if kind == X509:
                cert, chain, roots = await self._mint_ca_cert(priv, now)
                not_before = int(cert.not_valid_before_utc.timestamp())
                not_after = int(cert.not_valid_after_utc.timestamp())
                active = self.active(kind)
                clamped = not_after < int(now) + int(self.ca_ttl)  # as _mint_ca_cert asks
                if routine and clamped and active is not None and not_after <= active.record.not_after:
                    # The upstream clamps the new CA to its own notAfter, no later than the
                    # active CA's: a scheduled rotation to it gains nothing and, repeated, makes
                    # a cascade of ever shorter CAs (and SVIDs). Only renewing the upstream
                    # helps. (`meshid ca prepare` after a compromise still gets its key.)
                    raise CaOperationError(
                        f"the upstream signed a CA valid only until {_iso(not_after)}, no later than "
                        f"the active CA {active.key_id} (until {_iso(active.record.not_after)}); "
                        "renew the upstream certificate"
                    )
                chain_der = tuple(c.public_bytes(serialization.Encoding.DER) for c in [cert, *chain, *roots])
                extra["roots"] = str(len(roots))
                lk.cert, lk.chain, lk.roots = cert, chain, roots or [cert]
                lk.minter = minting.X509Minter(priv, cert, chain)
        except BaseException:
            # Nothing refers to the new key yet (the upstream refused, say): do not leave one
            # HSM object behind per failed attempt. Not past this point: a failed put_ca_key
            # may still have committed, and then the record needs its key.
            await self._destroy([(known_as, kind)], check_datastore=False)
            raise
        lk.record = CaKeyRecord(
            key_id=key_id,
            kind=kind,
            state=PREPARED,
            sealed_key=sealed,
            public_key_der=_spki(priv.public_key()),
            not_before=not_before,
            not_after=not_after,
            cert_chain_der=chain_der,
            server_id=self.server_id if kind == X509 else "",
            created_at=int(now),
            extra=extra,
        )
        await self.ds.put_ca_key(
            lk.record, [_ca_event(ocsf.ca_prepared, self.td, lk, now, self.upstream is not None)]
        )
        self._keys[key_id] = lk
        log.info("prepared %s key %s (not after %s)", kind, key_id, _iso(not_after))
        return lk

    async def _seal(self, key_id: str, priv: PrivateKeyTypes) -> bytes:
        return await self.key_manager.seal(key_id, priv)

    async def _mint_ca_cert(
        self, priv: PrivateKeyTypes, now: float
    ) -> tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate]]:
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        if self.upstream is None:
            cert = minting.self_signed_ca(priv, self.td, int(self.ca_ttl), when)
            return cert, [], []
        csr = minting.build_ca_csr(priv, self.td)
        result = await self.upstream.mint_x509_ca(csr, int(self.ca_ttl), when)
        return result.ca_cert, list(result.upstream_chain), list(result.roots)

    def _usable(self, lk: LoadedKey, now: float) -> bool:
        """Can `lk` sign now? Not once expired; an X509 CA not before its notBefore either
        (the clock stepped back past it), or its SVIDs would start in the future."""
        if now >= lk.record.not_after:
            return False
        return lk.record.kind != X509 or now >= lk.record.not_before

    async def _schedule(self, kind: str, now: float) -> bool:
        """Apply the rotation schedule to one kind; True when it changed a slot."""
        changed = False
        for lk in self._in_state(kind, PREPARED):
            if not self._usable(lk, now):
                # The server was down past its activation (or the clock stepped): never
                # activate it. As an old key that signed nothing it stays in the bundle
                # until it expires, then retires like any other.
                rec = replace(lk.record, state=OLD)
                await self.ds.put_ca_key(rec)
                lk.record = rec
                log.warning("prepared %s key %s is not valid now; not activating it", kind, lk.key_id)
                changed = True
        active = self.active(kind)
        if active is None or not self._usable(active, now):
            # No key (deleted elsewhere), or one that cannot sign (expired during an outage,
            # clock stepped): a usable key now, not at the next tick.
            if not self._in_state(kind, PREPARED):
                await self._prepare(kind)
            await self._activate(kind)
            return True
        lifetime = active.record.not_after - active.record.not_before
        left = active.record.not_after - now
        if left <= lifetime / 2 and not self._in_state(kind, PREPARED):
            await self._prepare(kind, routine=True)
            changed = True
        if left <= lifetime / 6 and self._in_state(kind, PREPARED):
            await self._activate(kind)
            changed = True
        return changed

    async def _activate(self, kind: str) -> LoadedKey:
        prepared = self._in_state(kind, PREPARED)
        if not prepared:
            raise CaOperationError(f"no prepared {kind} key to activate; run `meshid ca prepare` first")
        new = prepared[0]
        now = self.clock()
        changes: list[tuple[LoadedKey, CaKeyRecord, list[Event]]] = []
        for old in self._in_state(kind, ACTIVE):
            changes.append((old, replace(old.record, state=OLD), []))
        changes.append(
            (
                new,
                replace(new.record, state=ACTIVE),
                [_ca_event(ocsf.ca_activated, self.td, new, now, self.upstream is not None)],
            )
        )
        for lk, rec, events in changes:
            await self.ds.put_ca_key(rec, events)
            lk.record = rec
        log.info("activated %s key %s", kind, new.key_id)
        return new

    async def taint(self, key_id: str) -> LoadedKey:
        async with self._exclusive():
            await self._sync()
            lk = self.get(key_id)
            if lk.record.state == ACTIVE:
                raise CaOperationError(
                    f"{key_id} is the active {lk.record.kind} key and cannot be tainted; "
                    "prepare and activate a new key first"
                )
            if lk.record.state == PREPARED:
                raise CaOperationError(f"{key_id} is only prepared; nothing it signed needs re-issuing")
            if lk.record.tainted:
                raise CaOperationError(f"{key_id} is already tainted")
            lk.record = rec = replace(lk.record, tainted=True)
            await self.ds.put_ca_key(
                rec, [_ca_event(ocsf.ca_tainted, self.td, lk, self.clock(), self.upstream is not None)]
            )
            await self._rebuild_bundle()
            log.warning("tainted %s key %s: agents re-issue what it signed", lk.record.kind, key_id)
        return lk

    async def revoke(self, key_id: str, force: bool = False) -> None:
        retired: list[tuple[str, str]] = []
        try:
            async with self._exclusive():
                await self._sync()
                lk = self.get(key_id)
                if lk.record.state != OLD:
                    raise CaOperationError(f"{key_id} is {lk.record.state}; only an old key can be revoked")
                if not lk.record.tainted and not force:
                    raise CaOperationError(f"{key_id} is not tainted; taint it first (or --force)")
                in_use_until = max(lk.record.max_signed_not_after, self._max_signed.get(key_id, 0))
                if in_use_until > self.clock() and not force:
                    raise CaOperationError(
                        f"SVIDs signed by {key_id} are valid until {_iso(in_use_until)}; wait for agents "
                        "to re-issue them or use --force"
                    )
                await self.ds.delete_ca_key(
                    key_id, [_ca_event(ocsf.ca_revoked, self.td, lk, self.clock(), self.upstream is not None)]
                )
                retired.append((key_id, lk.record.kind))
                del self._keys[key_id]
                await self._rebuild_bundle()
                log.warning("revoked %s key %s: removed from the bundle", lk.record.kind, key_id)
        finally:
            # Outside the datastore lock: token calls need not hold up the other replicas.
            await self._destroy(retired)

    async def tick(self) -> bool:
        """Adopt other replicas' changes, then apply the rotation schedule; returns True when
        this replica changed anything."""
        retired: list[tuple[str, str]] = []
        try:
            return await self._tick(retired)
        finally:
            await self._destroy(retired)

    async def _tick(self, retired: list[tuple[str, str]]) -> bool:
        """tick() under the locks; appends the keys it removed from the datastore to `retired`."""
        changed = False
        async with self._exclusive():
            await self._flush_max_signed()
            records = await self._sync()
            now = self.clock()
            for kind in (X509, JWT):
                try:
                    changed = await self._schedule(kind, now) or changed
                except Exception as exc:
                    # An upstream that is down or expired: the rest of the tick (the other
                    # kind, retiring old keys, the bundle, the server's own SVID) still runs,
                    # and an error of ours is one line, not a traceback.
                    self._warn_rotation_failed(kind, exc)
            for lk in list(self._keys.values()):
                if lk.record.state != OLD:
                    continue
                used_until = max(lk.record.max_signed_not_after, self._max_signed.get(lk.key_id, 0))
                if now >= used_until and (now >= lk.record.not_after or used_until > 0 or lk.record.tainted):
                    with contextlib.suppress(NotFoundError):  # already retired by another replica
                        await self.ds.delete_ca_key(lk.key_id)
                    retired.append((lk.key_id, lk.record.kind))
                    del self._keys[lk.key_id]
                    changed = True
            for rec in list(self._foreign.values()):
                # A replica that is gone for good (or came back under a new server id) leaves
                # its CA key behind: once expired it has nothing valid left, so retire it.
                if now >= rec.not_after and now >= rec.max_signed_not_after:
                    with contextlib.suppress(NotFoundError):
                        await self.ds.delete_ca_key(rec.key_id)
                    retired.append((rec.key_id, rec.kind))  # its HSM object, if the token is shared
                    del self._foreign[rec.key_id]
                    changed = True
            if changed:
                await self._rebuild_bundle()
            else:
                # Another replica may have published or retired a key: the bundle (and with it
                # our TLS roots and the agents' bundle) follows the datastore.
                await self._rebuild_bundle(bump=False, records=records, quiet_if_same=True)
        return changed

    def _warn_rotation_failed(self, kind: str, exc: Exception) -> None:
        """Log a failed rotation step; the same failure again within ROTATION_WARN_EVERY
        seconds goes to debug, so a tick every few seconds does not flood the log."""
        text = str(exc) or type(exc).__name__
        last = self._last_rotation_warning.get(kind)
        mono = time.monotonic()  # not self.clock: a clock step must not silence it for hours
        if last is not None and last[0] == text and mono - last[1] < ROTATION_WARN_EVERY:
            log.debug("CA rotation of the %s key failed (again): %s", kind, text)
            return
        self._last_rotation_warning[kind] = (text, mono)
        log.warning(
            "CA rotation of the %s key failed: %s", kind, text, exc_info=not isinstance(exc, MeshidError)
        )

    async def _destroy(self, retired: Sequence[tuple[str, str]], check_datastore: bool = True) -> None:
        """Have the key manager destroy retired keys, given as (key id, kind). Never raises:
        the keys are out of the datastore and the bundle already; a key the manager cannot
        destroy is logged and counted, and stays behind as an orphan for an operator."""
        if not retired:
            return
        if check_datastore:
            # Belt and braces before an irreversible step: never destroy a key the shared
            # datastore still lists (active, prepared or old on any replica).
            try:
                listed = {rec.key_id for rec in await self.ds.list_ca_keys()}
            except Exception as exc:
                log.warning("not destroying retired CA keys: cannot list the datastore's keys: %s", exc)
                return
            for key_id, _ in retired:
                if key_id in listed:
                    log.warning("not destroying CA key %s: the datastore still lists it", key_id)
            retired = [(key_id, kind) for key_id, kind in retired if key_id not in listed]
        for key_id, kind in retired:
            try:
                await self.key_manager.delete(key_id)
            except Exception as exc:
                log.warning(
                    "retired %s key %s was not destroyed by key manager %s (left behind, remove it by "
                    "hand): %s",
                    kind,
                    key_id,
                    self.key_manager.name,
                    exc,
                )
                telemetry.default_telemetry().ca_key_destroy_failures.add(
                    1, {"key_manager": self.key_manager.name, "kind": kind}
                )

    async def _sync(self) -> list[CaKeyRecord]:
        """Adopt what other replicas wrote: shared JWT keys (new, re-slotted, retired),
        changes to our own keys made elsewhere (a taint), other replicas' X509 CA records.
        The datastore is the truth: every change is written there before it is applied in
        memory, and unflushed signing bookkeeping is flushed before this runs."""
        records = await self.ds.list_ca_keys()
        present: set[str] = set()
        foreign: dict[str, CaKeyRecord] = {}
        for rec in records:
            if self._is_foreign(rec):
                foreign[rec.key_id] = rec
                continue
            present.add(rec.key_id)
            lk = self._keys.get(rec.key_id)
            if lk is None:
                self._keys[rec.key_id] = await self._load_record(rec)
            elif lk.record != rec:
                lk.record = rec
        for key_id in self._keys.keys() - present:
            del self._keys[key_id]
        self._foreign = foreign
        return records

    # ------------------------------------------------------------------ bookkeeping
    def note_signed(self, key_id: str, not_after: int) -> None:
        if not_after > self._max_signed.get(key_id, 0):
            self._max_signed[key_id] = not_after

    async def _flush_max_signed(self) -> None:
        pending, self._max_signed = self._max_signed, {}
        for key_id, not_after in pending.items():
            lk = self._keys.get(key_id)
            if lk is None or not_after <= lk.record.max_signed_not_after:
                continue
            try:
                await self.ds.raise_max_signed(key_id, not_after)
            except NotFoundError:
                # Retired meanwhile by another replica (our expired CA key, a shared JWT key):
                # nothing left to account for, and the tick (our rotation) must go on.
                continue
            lk.record = replace(lk.record, max_signed_not_after=not_after)

    async def flush(self) -> None:
        async with self._lock:
            await self._flush_max_signed()

    async def _rebuild_bundle(
        self, bump: bool = True, records: list[CaKeyRecord] | None = None, quiet_if_same: bool = False
    ) -> None:
        """Build the bundle from every key in the datastore (all replicas'); `quiet_if_same`:
        skip on_change (re-issuing the server SVID, swapping TLS contexts) when nothing changed."""
        roots: dict[bytes, x509.Certificate] = {}
        jwt_keys: dict[str, PublicKeyTypes] = {}
        known: set[str] = set()
        for rec in records if records is not None else await self.ds.list_ca_keys():
            if rec.kind == X509:
                certs = [x509.load_der_x509_certificate(d) for d in rec.cert_chain_der]
                known.add(subject_key_id(certs[0]))
                n_roots = int(rec.extra.get("roots", "0"))
                for c in certs[len(certs) - n_roots :] if n_roots else certs[:1]:
                    roots[c.fingerprint(_SHA256)] = c
            else:
                jwt_keys[rec.extra.get("kid", rec.key_id)] = serialization.load_der_public_key(
                    rec.public_key_der
                )
        seq = (
            await self.ds.increment_meta("bundle_sequence")
            if bump
            else int(await self.ds.get_meta("bundle_sequence") or 0)
        )
        previous, self._bundle = self._bundle, Bundle(self.td, tuple(roots.values()), jwt_keys, seq)
        self._known_authorities = frozenset(known)
        if quiet_if_same and previous is not None and _same_bundle(previous, self._bundle):
            return
        if self.on_change is not None:
            await self.on_change()

    async def refresh_from_datastore(self) -> None:
        """Pick up keys other replicas published or retired (shared bundle, shared JWT key).
        tick() does this too; this is for callers that must not wait for the next tick."""
        async with self._exclusive():
            records = await self._sync()
            await self._rebuild_bundle(bump=False, records=records, quiet_if_same=True)


def _same_bundle(a: Bundle, b: Bundle) -> bool:
    return (
        a.sequence == b.sequence
        and a.jwt_authorities.keys() == b.jwt_authorities.keys()
        and [c.fingerprint(_SHA256) for c in a.x509_authorities]
        == [c.fingerprint(_SHA256) for c in b.x509_authorities]
    )


def _ca_event(
    builder: Callable[..., Event], td: TrustDomain, lk: LoadedKey, now: float, upstream: bool
) -> Event:
    r = lk.record
    return builder(
        r.key_id,
        r.kind,
        now,
        td.name,
        cert=lk.cert,
        not_before=r.not_before,
        not_after=r.not_after,
        upstream=upstream and r.kind == X509,
        server_id=r.server_id,
    )


def jwt_kid(lk: LoadedKey) -> str:
    return lk.record.extra.get("kid", lk.key_id)


def _spki(pub: PublicKeyTypes) -> bytes:
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


from cryptography.hazmat.primitives import hashes  # noqa: E402

_SHA256 = hashes.SHA256()


def svid_chain(lk: LoadedKey, leaf: x509.Certificate) -> Sequence[x509.Certificate]:
    assert lk.cert is not None
    return [leaf, *minting.ca_chain(lk.cert, lk.chain)]
