"""CA key lifecycle edge cases an operator hits: restarts after long outages, clock steps,
an upstream intermediate that expires before the CA TTL (or is renewed on disk), a crash
between two slot writes, replicas ticking together, a key sealed under another secret.
Injected clock, real SQLite datastore, real sealed keys, no sleeps."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pki_helpers import ca_cert
from test_ca_slots import FakeClock

from issuer.ca.keys import DiskKeyManager
from issuer.ca.minting import SigningError
from issuer.ca.sealing import KeySealer, SealError
from issuer.ca.slots import ACTIVE, JWT, OLD, PREPARED, X509, CaManager, LoadedKey
from issuer.ca.upstream import DiskUpstreamAuthority
from issuer.datastore.sqlite import SqliteDataStore
from issuer.events import ocsf
from meshid.errors import ConfigError
from meshid.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
SECRET = b"ca-lifecycle-edges-master-secret"
CA_TTL = 6000  # prepare at 3000 s left, activate at 1000 s left
SVID_TTL = 600
T0 = 1_800_000_000.0


async def make_ca(
    ds: SqliteDataStore,
    clock: FakeClock,
    secret: bytes = SECRET,
    upstream: DiskUpstreamAuthority | None = None,
    server_id: str = "replica-1",
    ca_ttl: float = CA_TTL,
) -> CaManager:
    km = DiskKeyManager(KeySealer(secret))
    ca = CaManager(ds, km, upstream, TD, ca_ttl, server_id=server_id, clock=clock)
    await ca.load()
    return ca


def sign_x509(ca: CaManager, now: float, ttl: int = SVID_TTL) -> x509.Certificate:
    """Sign a leaf with the active X509 CA the way the signing service does."""
    lk = ca.x509_active
    assert lk.minter is not None and lk.cert is not None
    leaf = lk.minter.mint_from_public_key(
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        SpiffeId.parse("spiffe://example.org/w"),
        [],
        ttl,
        dt.datetime.fromtimestamp(now, dt.UTC),
    )
    leaf.verify_directly_issued_by(lk.cert)
    ca.note_signed(lk.key_id, int(leaf.not_valid_after_utc.timestamp()))
    return leaf


def assert_can_sign(ca: CaManager, now: float) -> None:
    for kind in (X509, JWT):
        lk = ca.active(kind)
        assert lk is not None
        assert lk.record.not_after > now, f"active {kind} key expired"
    leaf = sign_x509(ca, now)
    assert leaf.not_valid_before_utc.timestamp() <= now < leaf.not_valid_after_utc.timestamp()
    ca_cert = ca.x509_active.cert
    assert ca_cert is not None and ca_cert.not_valid_before_utc.timestamp() <= now
    assert leaf.not_valid_after_utc <= ca_cert.not_valid_after_utc  # never outlives its CA


def slots(ca: CaManager, kind: str) -> dict[str, str]:
    return {k.key_id: k.record.state for k in ca.keys() if k.record.kind == kind}


def in_bundle(ca: CaManager, lk: LoadedKey) -> bool:
    if lk.record.kind == X509:
        return lk.cert in ca.bundle.x509_authorities
    return lk.record.extra.get("kid", lk.key_id) in ca.bundle.jwt_authorities


async def event_types(ds: SqliteDataStore) -> list[str]:
    return [r.event.type for r in await ds.fetch_outbox(0, 10_000)]


# --------------------------------------------------------------------------- outages and restarts
async def test_restart_after_an_outage_longer_than_the_ca_ttl_signs_with_a_valid_ca(
    ds: SqliteDataStore,
) -> None:
    clock = FakeClock(T0)
    first = await make_ca(ds, clock)
    old = {kind: first.active(kind).key_id for kind in (X509, JWT)}  # type: ignore[union-attr]
    clock.t = T0 + 3 * CA_TTL  # down for three CA lifetimes
    ca = await make_ca(ds, clock)  # the server mints its own SVID right after this
    assert_can_sign(ca, clock.t)
    for kind in (X509, JWT):
        assert ca.active(kind).key_id != old[kind]  # type: ignore[union-attr]
    await ca.tick()  # the expired keys signed nothing still valid: retired
    assert {k.key_id for k in ca.keys()} == {ca.x509_active.key_id, ca.jwt_active.key_id}


@pytest.mark.parametrize("restart", [False, True])
async def test_a_prepared_key_that_expired_meanwhile_is_never_activated(
    ds: SqliteDataStore, restart: bool
) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    clock.t = T0 + CA_TTL / 2
    await ca.tick()
    prepared = {kind: ca._in_state(kind, PREPARED)[0].key_id for kind in (X509, JWT)}
    clock.t = T0 + 5 * CA_TTL  # the clock jumps (or the server was down) past both keys
    if restart:
        ca = await make_ca(ds, clock)
    else:
        await ca.tick()
    assert_can_sign(ca, clock.t)
    for kind in (X509, JWT):
        assert ca.active(kind).key_id != prepared[kind]  # type: ignore[union-attr]
        assert slots(ca, kind).get(prepared[kind]) in (OLD, None)
    await ca.tick()  # retires the expired keys
    assert not await ca.tick()  # and then stays put: no new key per tick


async def test_restart_after_the_planned_activation_time_activates_the_prepared_key(
    ds: SqliteDataStore,
) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    clock.t = T0 + CA_TTL / 2
    await ca.tick()
    prepared = ca._in_state(X509, PREPARED)[0]
    clock.t = T0 + CA_TTL - 100  # down across the activation time, the active key still valid
    ca = await make_ca(ds, clock)
    assert ca.x509_active.key_id == prepared.key_id
    assert_can_sign(ca, clock.t)


async def test_a_crash_between_the_two_activation_writes_recovers_with_one_active_key(
    ds: SqliteDataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    old = ca.x509_active
    new = await ca.prepare(X509)
    real_put = ds.put_ca_key
    writes = 0

    async def crash_on_second_write(record: Any, events: Any = ()) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise ConnectionError("server killed")
        await real_put(record, events)

    monkeypatch.setattr(ds, "put_ca_key", crash_on_second_write)
    with pytest.raises(ConnectionError):
        await ca.activate(X509)
    monkeypatch.setattr(ds, "put_ca_key", real_put)
    again = await make_ca(ds, clock)
    assert slots(again, X509) == {old.key_id: OLD, new.key_id: ACTIVE}
    assert in_bundle(again, again.get(old.key_id)) and in_bundle(again, again.get(new.key_id))
    types = await event_types(ds)
    assert types.count(ocsf.CA_ACTIVATED) == 3  # first X509, first JWT, this one: once


async def test_replicas_ticking_at_once_share_one_jwt_key_per_slot(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    r1 = await make_ca(ds, clock, server_id="r1")
    r2 = await make_ca(ds, clock, server_id="r2")
    for t in (T0 + CA_TTL / 2, T0 + CA_TTL * 5 / 6, T0 + CA_TTL * 3):
        clock.t = t
        await asyncio.gather(r1.tick(), r2.tick())
        await asyncio.gather(r1.tick(), r2.tick())
        jwt = [r for r in await ds.list_ca_keys(JWT) if r.state == ACTIVE]
        assert len(jwt) == 1
        assert r1.jwt_active.key_id == r2.jwt_active.key_id == jwt[0].key_id
        assert len([r for r in await ds.list_ca_keys(JWT) if r.state == PREPARED]) <= 1
        for r in (r1, r2):
            assert_can_sign(r, clock.t)
            x509_active = [k for k in r.keys() if k.record.kind == X509 and k.record.state == ACTIVE]
            assert x509_active == [r.x509_active]


# --------------------------------------------------------------------------- clock steps
async def test_clock_stepped_back_never_signs_a_leaf_that_starts_in_the_future(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    ahead = ca.x509_active
    clock.t = T0 - 3 * 3600  # NTP corrects a clock that was three hours fast
    with pytest.raises(SigningError, match="not valid until"):
        sign_x509(ca, clock.t)
    assert await ca.tick()
    assert ca.x509_active.key_id != ahead.key_id
    assert_can_sign(ca, clock.t)
    assert in_bundle(ca, ca.get(ahead.key_id))  # what it signed still verifies
    assert not await ca.tick()  # no new key per tick


async def test_clock_stepped_forward_past_the_ca_ttl_recovers_in_one_tick(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    clock.t = T0 + 10 * 3600
    await ca.tick()
    assert_can_sign(ca, clock.t)
    assert not await ca.tick()


# --------------------------------------------------------------------------- keys at rest
async def test_a_key_sealed_under_another_secret_is_named_in_the_error(ds: SqliteDataStore) -> None:
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock)
    with pytest.raises(SealError) as err:
        await make_ca(ds, clock, secret=b"another-master-secret-0123456789")
    assert "master secret" in str(err.value)
    assert any(lk.key_id in str(err.value) for lk in ca.keys())


# --------------------------------------------------------------------------- upstream authority


class Pki:
    """A root and an upstream intermediate in PEM files, on the test's clock."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = ca_cert("root", self.root_key, self.root_key, None, T0 - 86400, T0 + 100 * 86400)
        (d / "root.pem").write_bytes(self.root.public_bytes(serialization.Encoding.PEM))

    def intermediate(self, not_before: float, not_after: float) -> x509.Certificate:
        """Write (or replace, as a renewal does) the intermediate and its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = ca_cert("upstream", key, self.root_key, self.root, not_before, not_after)
        (self.d / "int.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = self.d / "int.key"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_file.chmod(0o600)
        return cert

    def upstream(self) -> DiskUpstreamAuthority:
        d = self.d
        return DiskUpstreamAuthority(str(d / "int.pem"), str(d / "int.key"), str(d / "root.pem"))


async def upstream_ca(
    ds: SqliteDataStore, tmp_path: Path, not_before: float, not_after: float
) -> tuple[Pki, FakeClock, CaManager]:
    """A CA with a 24 h TTL under an upstream intermediate valid over the given times, at T0."""
    pki = Pki(tmp_path)
    pki.intermediate(not_before, not_after)
    clock = FakeClock(T0)
    return pki, clock, await make_ca(ds, clock, upstream=pki.upstream(), ca_ttl=24 * 3600)


async def test_upstream_expiring_before_the_ca_ttl_clamps_and_rotates_in_time(
    ds: SqliteDataStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = Pki(tmp_path)
    upstream_end = T0 + 10 * 3600
    pki.intermediate(T0 - 3600, upstream_end)
    clock = FakeClock(T0)
    ca = await make_ca(ds, clock, upstream=pki.upstream(), ca_ttl=24 * 3600)
    first = ca.x509_active
    assert first.record.not_after == upstream_end  # clamped to the upstream, not 24 h
    # Tick once a minute up to the upstream's end: the CA always signs, and no SVID outlives
    # it. A new CA could end no later than this one (the upstream clamps it too): rotating to
    # it would gain nothing, so none is made, and the log says why, once a minute at most.
    with caplog.at_level(logging.WARNING, logger="meshid.ca"):
        while clock.t < upstream_end - 120:
            clock.t += 60
            await ca.tick()
            assert ca.x509_active.key_id == first.key_id
            assert ca.bundle.x509_authorities == (pki.root,)  # only the root goes to trust stores
            assert_can_sign(ca, clock.t)
    assert [k.key_id for k in ca.keys() if k.record.kind == X509] == [first.key_id]
    refused = [r.getMessage() for r in caplog.records if "rotation of the x509 key failed" in r.getMessage()]
    assert refused and all("renew the upstream" in m for m in refused)
    assert len(refused) <= 6  # not one per tick
    # The upstream has expired and nobody renewed it: ticks warn in one line and go on.
    caplog.clear()
    clock.t = upstream_end + 60
    with caplog.at_level(logging.WARNING, logger="meshid.ca"):
        for _ in range(3):
            clock.t += 5
            await ca.tick()
    failures = [r for r in caplog.records if "rotation of the x509 key failed" in r.getMessage()]
    assert len(failures) == 1 and not failures[0].exc_info  # once, without a traceback
    assert "expired" in failures[0].getMessage() and "int.pem" in failures[0].getMessage()
    assert ca.jwt_active.record.not_after > clock.t  # the JWT key still rotates
    with pytest.raises(SigningError, match="expired"):
        sign_x509(ca, clock.t)
    # The operator renews the intermediate on disk: the next tick recovers, without a restart.
    pki.intermediate(clock.t - 60, clock.t + 30 * 86400)
    await ca.tick()
    assert_can_sign(ca, clock.t)
    assert ca.x509_active.record.not_after - clock.t == pytest.approx(24 * 3600, abs=1)


async def test_a_compromised_ca_is_replaced_even_when_the_upstream_clamps_the_new_one(
    ds: SqliteDataStore, tmp_path: Path
) -> None:
    pki, clock, ca = await upstream_ca(ds, tmp_path, T0 - 3600, T0 + 4 * 3600)
    compromised = ca.x509_active
    clock.t += 60
    new = await ca.prepare(X509)  # by hand: no later notAfter, but a key the attacker lacks
    await ca.activate(X509)
    await ca.taint(compromised.key_id)
    assert ca.x509_active.key_id == new.key_id and new.record.not_after == T0 + 4 * 3600
    assert_can_sign(ca, clock.t)


async def test_upstream_renewed_on_disk_is_used_by_the_next_rotation(
    ds: SqliteDataStore, tmp_path: Path
) -> None:
    pki, clock, ca = await upstream_ca(ds, tmp_path, T0 - 3600, T0 + 4 * 3600)
    renewed = pki.intermediate(T0, T0 + 30 * 86400)
    clock.t = T0 + 2 * 3600  # half of the clamped lifetime left: prepare
    await ca.tick()
    prepared = ca._in_state(X509, PREPARED)[0]
    assert prepared.chain == [renewed] and prepared.record.not_after == clock.t + 24 * 3600
    clock.t = T0 + 4 * 3600 - 1800  # less than one sixth left
    await ca.tick()
    assert ca.x509_active.key_id == prepared.key_id
    assert_can_sign(ca, clock.t)


async def test_upstream_already_expired_at_first_start_is_a_clear_error(
    ds: SqliteDataStore, tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    pki.intermediate(T0 - 86400, T0 - 60)
    with pytest.raises(ConfigError, match=r"int\.pem.*expired"):
        await make_ca(ds, FakeClock(T0), upstream=pki.upstream())
    assert [r for r in await ds.list_ca_keys() if r.kind == X509] == []


async def test_upstream_expired_while_down_does_not_stop_a_restart_with_a_valid_ca(
    ds: SqliteDataStore, tmp_path: Path
) -> None:
    pki, clock, ca = await upstream_ca(ds, tmp_path, T0 - 3600, T0 + 2 * 3600)
    # Restart past half of the CA's life (a prepare is due) with the upstream expired.
    pki.intermediate(T0 - 7200, T0 + 1.5 * 3600)
    clock.t = T0 + 1.6 * 3600
    ca = await make_ca(ds, clock, upstream=pki.upstream(), ca_ttl=24 * 3600)
    assert_can_sign(ca, clock.t)
