"""CA key slots (issuer/ca/slots.py): prepared → active → old on an injected clock, with the
bundle checked at every step; taint and revoke after a compromise. Real SQLite datastore,
real sealed keys, no sleeps."""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from issuer.ca.keys import DiskKeyManager, KeyType
from issuer.ca.sealing import KeySealer, SealError
from issuer.ca.slots import ACTIVE, JWT, OLD, PREPARED, X509, CaManager, CaOperationError, LoadedKey, jwt_kid
from issuer.datastore.sqlite import SqliteDataStore
from issuer.events import ocsf
from meshid import telemetry
from meshid.errors import NotFoundError
from meshid.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
SECRET = b"ca-slots-unit-test-master-secret"
CA_TTL = 6000  # seconds; prepare at 3000 s left, activate at 1000 s left
SVID_TTL = 600
T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t



async def make_ca(ds: SqliteDataStore, clock: FakeClock, secret: bytes = SECRET) -> CaManager:
    ca = CaManager(
        ds, DiskKeyManager(KeySealer(secret)), None, TD, CA_TTL, server_id="replica-1", clock=clock
    )
    await ca.load()
    return ca


def in_bundle(ca: CaManager, lk: LoadedKey) -> bool:
    if lk.record.kind == X509:
        return lk.cert in ca.bundle.x509_authorities
    return jwt_kid(lk) in ca.bundle.jwt_authorities


def bundle_size(ca: CaManager, kind: str) -> int:
    return len(ca.bundle.x509_authorities) if kind == X509 else len(ca.bundle.jwt_authorities)


def slots(ca: CaManager, kind: str) -> dict[str, str]:
    return {k.key_id: k.record.state for k in ca.keys() if k.record.kind == kind}


def sign_with(ca: CaManager, lk: LoadedKey, now: float) -> int:
    """Sign something with `lk` the way the signing service does; returns its notAfter."""
    if lk.record.kind == X509:
        assert lk.minter is not None
        leaf = lk.minter.mint_from_public_key(
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            SpiffeId.parse("spiffe://example.org/w"),
            [],
            SVID_TTL,
            dt.datetime.fromtimestamp(now, dt.UTC),
        )
        assert lk.cert is not None
        leaf.verify_directly_issued_by(lk.cert)
        not_after = int(leaf.not_valid_after_utc.timestamp())
    else:
        not_after = int(now) + SVID_TTL
    ca.note_signed(lk.key_id, not_after)
    return not_after


async def event_types(ds: SqliteDataStore) -> list[str]:
    return [r.event.type for r in await ds.fetch_outbox(0, 1000)]


# --------------------------------------------------------------------------- rotation schedule
@pytest.mark.parametrize("kind", [X509, JWT])
async def test_rotation_prepared_active_old_with_bundle_at_each_step(ds: SqliteDataStore, kind: str) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    first = ca.active(kind)
    assert first is not None
    assert slots(ca, kind) == {first.key_id: ACTIVE}
    assert in_bundle(ca, first) and bundle_size(ca, kind) == 1
    if kind == X509:
        assert first.cert is not None
        bc = first.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca and first.cert.issuer == first.cert.subject  # upstream None: self-signed root

    lifetime = first.record.not_after - first.record.not_before
    # First whole second at which the slot rule fires (left <= lifetime/2, left <= lifetime/6).
    prepare_at = math.ceil(first.record.not_after - lifetime / 2)
    activate_at = math.ceil(first.record.not_after - lifetime / 6)

    # Before half of the lifetime: nothing new.
    clock.t = prepare_at - 1
    await ca.tick()
    assert slots(ca, kind) == {first.key_id: ACTIVE}
    seq_before = ca.bundle.sequence

    # At half: a prepared key, published in the bundle before it signs anything.
    clock.t = prepare_at
    await ca.tick()
    states = slots(ca, kind)
    assert sorted(states.values()) == [ACTIVE, PREPARED]
    prepared = next(k for k in ca.keys() if k.record.kind == kind and k.record.state == PREPARED)
    assert in_bundle(ca, prepared) and in_bundle(ca, first) and bundle_size(ca, kind) == 2
    assert ca.bundle.sequence > seq_before
    assert ca.active(kind) is first  # signing still uses the old key
    assert prepared.record.max_signed_not_after == 0
    if kind == X509:
        assert ca.x509_active.key_id == first.key_id
    else:
        assert ca.jwt_active.key_id == first.key_id

    # The active key keeps signing until activation; the last SVID outlives the switch.
    clock.t = activate_at - 1
    used_until = sign_with(ca, first, clock.t)
    await ca.tick()
    assert ca.active(kind) is first and slots(ca, kind)[prepared.key_id] == PREPARED

    # At one sixth left: the prepared key becomes active, the old one stays published.
    clock.t = activate_at
    seq_before = ca.bundle.sequence
    await ca.tick()
    assert slots(ca, kind) == {first.key_id: OLD, prepared.key_id: ACTIVE}
    assert ca.active(kind).key_id == prepared.key_id  # type: ignore[union-attr]
    assert in_bundle(ca, first) and in_bundle(ca, prepared) and bundle_size(ca, kind) == 2
    assert ca.bundle.sequence > seq_before
    sign_with(ca, prepared, clock.t)  # the new active key signs now

    # A restart in between keeps the slots and what the old key signed (it was journaled).
    ca = await make_ca(ds, clock)
    assert slots(ca, kind) == {first.key_id: OLD, prepared.key_id: ACTIVE}
    first = ca.get(first.key_id)
    assert first.record.max_signed_not_after == used_until
    assert in_bundle(ca, first)

    # Until everything the old key signed has expired, it stays in the bundle.
    clock.t = used_until - 1
    await ca.tick()
    assert in_bundle(ca, first) and bundle_size(ca, kind) == 2

    # Then it leaves the bundle and the datastore.
    clock.t = used_until
    seq_before = ca.bundle.sequence
    assert await ca.tick()
    assert slots(ca, kind) == {prepared.key_id: ACTIVE}
    assert not in_bundle(ca, first) and bundle_size(ca, kind) == 1
    assert ca.bundle.sequence > seq_before
    assert first.key_id not in {r.key_id for r in await ds.list_ca_keys()}
    with pytest.raises(NotFoundError):
        ca.get(first.key_id)

    types = await event_types(ds)
    assert types.count(ocsf.CA_PREPARED) >= 2 and types.count(ocsf.CA_ACTIVATED) >= 2


async def test_both_kinds_rotate_on_the_same_schedule(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    x_first, j_first = ca.x509_active, ca.jwt_active
    clock.t = T0 + CA_TTL / 2 + 1
    await ca.tick()
    assert len(ca.bundle.x509_authorities) == 2 and len(ca.bundle.jwt_authorities) == 2
    clock.t = T0 + CA_TTL * 5 / 6 + 1
    await ca.tick()
    assert ca.x509_active.key_id != x_first.key_id and ca.jwt_active.key_id != j_first.key_id
    # Nothing was noted as signed by the old keys: they stay until their own notAfter.
    clock.t = max(x_first.record.not_after, j_first.record.not_after) - 1
    await ca.tick()
    assert in_bundle(ca, x_first) and in_bundle(ca, j_first)
    clock.t = max(x_first.record.not_after, j_first.record.not_after)
    await ca.tick()
    assert not in_bundle(ca, x_first) and not in_bundle(ca, j_first)


# --------------------------------------------------------------------------- taint and revoke
@pytest.mark.parametrize("kind", [X509, JWT])
async def test_taint_and_revoke(ds: SqliteDataStore, kind: str) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    first = ca.active(kind)
    assert first is not None

    with pytest.raises(CaOperationError, match="active"):
        await ca.taint(first.key_id)
    with pytest.raises(CaOperationError, match="only an old key"):
        await ca.revoke(first.key_id, force=True)

    second = await ca.prepare(kind)
    assert in_bundle(ca, second)
    with pytest.raises(CaOperationError, match="prepared"):
        await ca.taint(second.key_id)
    assert (await ca.prepare(kind)).key_id == second.key_id  # one prepared key at a time

    signed_until = sign_with(ca, first, clock.t)
    await ca.activate(kind)
    assert ca.active(kind).key_id == second.key_id  # type: ignore[union-attr]
    with pytest.raises(CaOperationError, match="active"):
        await ca.taint(second.key_id)
    with pytest.raises(CaOperationError, match="not tainted"):
        await ca.revoke(first.key_id)
    with pytest.raises(CaOperationError, match="no prepared"):
        await ca.activate(kind)

    await ca.taint(first.key_id)
    assert ca.tainted_key_ids() == [first.key_id]
    if kind == X509:
        assert first.cert is not None
        ski = first.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
        assert ca.tainted_authority_key_ids() == [ski]
    with pytest.raises(CaOperationError, match="already tainted"):
        await ca.taint(first.key_id)
    assert in_bundle(ca, first)  # tainting alone does not unpublish: agents are re-issuing

    # SVIDs it signed are still valid: revoke refused unless forced.
    clock.t = signed_until - 1
    with pytest.raises(CaOperationError, match="valid until"):
        await ca.revoke(first.key_id)
    assert in_bundle(ca, first)
    await ca.revoke(first.key_id, force=True)
    assert not in_bundle(ca, first)
    assert bundle_size(ca, kind) == 1 and in_bundle(ca, second)
    assert first.key_id not in {r.key_id for r in await ds.list_ca_keys()}
    with pytest.raises(NotFoundError):
        await ca.revoke(first.key_id)

    types = await event_types(ds)
    assert ocsf.CA_TAINTED in types and ocsf.CA_REVOKED in types


@pytest.mark.parametrize("kind", [X509, JWT])
async def test_revoke_without_force_once_signed_svids_expired(ds: SqliteDataStore, kind: str) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    first = ca.active(kind)
    assert first is not None
    await ca.prepare(kind)
    signed_until = sign_with(ca, first, clock.t)
    await ca.activate(kind)
    await ca.taint(first.key_id)
    clock.t = signed_until
    await ca.revoke(first.key_id)
    assert not in_bundle(ca, first) and bundle_size(ca, kind) == 1


async def test_tainted_old_key_leaves_the_bundle_on_tick_once_unused(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    first = ca.x509_active
    await ca.prepare(X509)
    signed_until = sign_with(ca, first, clock.t)
    await ca.activate(X509)
    await ca.taint(first.key_id)
    clock.t = signed_until - 1
    await ca.tick()
    assert in_bundle(ca, first)
    clock.t = signed_until
    await ca.tick()
    assert not in_bundle(ca, first)


# --------------------------------------------------------------------------- keys at rest
async def test_keys_do_not_load_under_another_master_secret(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    records = await ds.list_ca_keys()
    assert {r.kind for r in records} == {X509, JWT}
    with pytest.raises(SealError, match="master secret"):
        await make_ca(ds, clock, secret=b"some-other-master-secret-000000")
    # the right secret still loads the very same keys
    again = await make_ca(ds, clock)
    assert again.x509_active.key_id == ca.x509_active.key_id
    assert again.bundle.x509_authorities == ca.bundle.x509_authorities


# --------------------------------------------------------------------------- retired keys are destroyed
class RecordingKeyManager(DiskKeyManager):
    """The disk manager, recording what `delete` was asked to destroy and what the datastore
    listed at that moment; `fail` makes delete raise like a token error."""

    name = "recording"

    def __init__(self, ds: SqliteDataStore, fail: bool = False) -> None:
        super().__init__(KeySealer(SECRET))
        self.ds = ds
        self.fail = fail
        self.deleted: list[str] = []
        self.listed_at_delete: list[set[str]] = []

    async def delete(self, key_id: str) -> None:
        self.listed_at_delete.append({r.key_id for r in await self.ds.list_ca_keys()})
        self.deleted.append(key_id)
        if self.fail:
            raise RuntimeError("token said no")


class RefusingUpstream:
    name = "refusing"

    async def mint_x509_ca(self, csr_der: bytes, ttl_seconds: int, now: dt.datetime) -> Any:
        raise RuntimeError("upstream is down")


def destroy_failures(kind: str) -> float:
    total = 0.0
    for metric in telemetry.default_telemetry().collect():
        if metric.name == "meshid.ca.key.destroy.failures":
            for point in metric.data.data_points:
                attrs = dict(point.attributes or {})
                if attrs.get("key_manager") == "recording" and attrs.get("kind") == kind:
                    total += float(getattr(point, "value", 0))
    return total


async def rotated(
    ds: SqliteDataStore, clock: FakeClock, km: DiskKeyManager
) -> tuple[CaManager, dict[str, str]]:
    """A CA whose first keys of both kinds are old (and the X509 one tainted); returns the
    CA and {kind: old key id}."""
    ca = CaManager(ds, km, None, TD, CA_TTL, server_id="replica-1", clock=clock)
    await ca.load()
    old = {kind: ca.active(kind).key_id for kind in (X509, JWT)}  # type: ignore[union-attr]
    for kind in (X509, JWT):
        await ca.prepare(kind)
        await ca.activate(kind)
    await ca.taint(old[X509])
    return ca, old


async def test_disk_key_manager_delete_is_a_no_op() -> None:
    km = DiskKeyManager(KeySealer(SECRET))
    _, sealed = await km.generate("x509-a", KeyType.EC_P256)
    await km.delete("x509-a")
    await km.delete("x509-a")  # twice, and for a key it never saw: harmless
    await km.delete("x509-never-existed")
    assert (await km.load("x509-a", sealed)).public_key() is not None  # the sealed blob is the key


async def test_revoke_destroys_the_key_after_the_record_is_gone(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    km = RecordingKeyManager(ds)
    ca, old = await rotated(ds, clock, km)
    await ca.revoke(old[X509], force=True)
    assert km.deleted == [old[X509]]
    assert old[X509] not in km.listed_at_delete[0]  # the datastore change came first
    assert ca.x509_active.key_id in km.listed_at_delete[0]
    with pytest.raises(NotFoundError):  # a second revoke: nothing more is destroyed
        await ca.revoke(old[X509], force=True)
    assert km.deleted == [old[X509]]


async def test_a_key_the_manager_cannot_destroy_still_leaves_the_bundle(
    ds: SqliteDataStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(T0)
    km = RecordingKeyManager(ds, fail=True)
    ca, old = await rotated(ds, clock, km)
    revoked = ca.get(old[X509])
    failures = destroy_failures(X509)
    with caplog.at_level(logging.WARNING, logger="meshid.ca"):
        await ca.revoke(old[X509], force=True)
    assert km.deleted == [old[X509]]
    assert not in_bundle(ca, revoked) and bundle_size(ca, X509) == 1
    assert old[X509] not in {r.key_id for r in await ds.list_ca_keys()}
    assert destroy_failures(X509) == failures + 1
    assert f"{old[X509]} was not destroyed" in caplog.text and "token said no" in caplog.text


async def test_a_key_the_datastore_still_lists_is_never_destroyed(
    ds: SqliteDataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(T0)
    km = RecordingKeyManager(ds)
    ca, old = await rotated(ds, clock, km)

    async def lost_delete(key_id: str, events: Any = ()) -> None:
        return None  # the delete never reached the datastore

    monkeypatch.setattr(ds, "delete_ca_key", lost_delete)
    await ca.revoke(old[X509], force=True)
    assert km.deleted == []


async def test_prune_destroys_only_the_retired_old_keys(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    km = RecordingKeyManager(ds)
    ca, old = await rotated(ds, clock, km)
    jwt_old = ca.get(old[JWT])
    used_until = sign_with(ca, jwt_old, clock.t)
    await ca.tick()
    # The tainted X509 key signed nothing: retired at once; the JWT key waits for its SVIDs.
    assert km.deleted == [old[X509]]
    clock.t = used_until - 1
    await ca.tick()
    assert km.deleted == [old[X509]]
    clock.t = used_until
    assert await ca.tick()
    assert km.deleted == [old[X509], old[JWT]]
    assert old[JWT] not in km.listed_at_delete[-1]
    live = {k.key_id for k in ca.keys()}
    assert live == {ca.x509_active.key_id, ca.jwt_active.key_id} and not live & set(km.deleted)


async def test_replicas_destroy_only_what_they_retired(ds: SqliteDataStore) -> None:
    """Two replicas on one datastore: the one that retires a key destroys it, the other only
    forgets it; a gone replica's expired CA key is destroyed by the replica that retires it."""
    clock = FakeClock(T0)
    km1, km2 = RecordingKeyManager(ds), RecordingKeyManager(ds)
    r1 = CaManager(ds, km1, None, TD, CA_TTL, server_id="r1", clock=clock)
    r2 = CaManager(ds, km2, None, TD, CA_TTL, server_id="r2", clock=clock)
    await r1.load()
    await r2.load()
    shared_jwt = r1.jwt_active
    assert r2.jwt_active.key_id == shared_jwt.key_id
    await r1.prepare(JWT)
    await r1.activate(JWT)
    await r2.tick()
    await r1.tick()  # old, but neither expired nor tainted: stays
    assert km1.deleted == [] and km2.deleted == []
    await r1.taint(shared_jwt.key_id)
    await r1.tick()  # tainted and nothing it signed is valid: r1 retires and destroys it
    assert km1.deleted == [shared_jwt.key_id]
    await r2.tick()  # r2 only adopts the change
    assert km2.deleted == [] and shared_jwt.key_id not in {k.key_id for k in r2.keys()}

    gone = r2.x509_active  # r2 stops for good; once expired, r1 retires its CA key
    clock.t = gone.record.not_after + 1
    await r1.tick()
    assert gone.key_id in km1.deleted and km2.deleted == []
    # Whatever was destroyed, the datastore no longer listed at that moment.
    for key_id, listed in zip(km1.deleted, km1.listed_at_delete, strict=True):
        assert key_id not in listed


async def test_a_key_made_for_a_slot_that_failed_is_destroyed(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    km = RecordingKeyManager(ds)
    ca = CaManager(ds, km, RefusingUpstream(), TD, CA_TTL, server_id="replica-1", clock=clock)
    with pytest.raises(RuntimeError, match="upstream is down"):
        await ca.load()
    assert len(km.deleted) == 1 and km.deleted[0].startswith(f"{X509}-")
    assert [r for r in await ds.list_ca_keys() if r.kind == X509] == []
