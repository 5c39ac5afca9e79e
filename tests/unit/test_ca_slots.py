"""CA key slots (issuer/ca/slots.py): prepared → active → old on an injected clock, with the
bundle checked at every step; taint and revoke after a compromise. Real SQLite datastore,
real sealed keys, no sleeps."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from issuer.ca.keys import DiskKeyManager
from issuer.ca.sealing import KeySealer, SealError
from issuer.ca.slots import ACTIVE, JWT, OLD, PREPARED, X509, CaManager, CaOperationError, LoadedKey, jwt_kid
from issuer.datastore.sqlite import SqliteDataStore
from issuer.events import ocsf
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


@pytest.fixture
async def ds(tmp_path: Path) -> AsyncIterator[SqliteDataStore]:
    store = SqliteDataStore(tmp_path / "ca.sqlite3")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def make_ca(ds: SqliteDataStore, clock: FakeClock, secret: bytes = SECRET) -> CaManager:
    ca = CaManager(ds, DiskKeyManager(KeySealer(secret)), None, TD, CA_TTL, server_id="replica-1",
                   clock=clock)
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
            ec.generate_private_key(ec.SECP256R1()).public_key(), SpiffeId.parse("spiffe://example.org/w"),
            [], SVID_TTL, dt.datetime.fromtimestamp(now, dt.UTC),
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
