"""The agent's rotation decisions with an injected clock and rng: which SVIDs are due and
why, renewal drawn once per SVID (never on a check or a sync), stationary draws after a
burst, the taint window spread drawn once per SVID (the agent's own SVID included),
per-entry backoff after a refusal, and re-attestation when the server stops trusting the
agent's SVID."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import random
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from issuer.ca import minting
from meshid.bundle import Bundle
from meshid.entry import Entry
from meshid.errors import OverloadedError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api.cache import SvidCache
from workload_api.keys import authority_key_id, csr_for, new_key, subject_key_id
from workload_api.manager import SvidManager
from workload_api.rotation import RenewalSchedule, RotationPolicy
from workload_api.server_client import IdentityRejectedError, ServerUnavailableError, chain_verifies

TD = TrustDomain.parse("example.org")
AGENT = SpiffeId(TD, "/meshid/agent/test")
T0 = 1_700_000_000.0
TTL = 3600


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Ca:
    """A real CA key and minter, so AKIs, lifetimes and chains are what the server makes."""

    def __init__(self, clock: Clock) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = minting.self_signed_ca(self.key, TD, 30 * 24 * 3600, _utc(clock() - 60))
        self.minter = minting.X509Minter(self.key, self.cert)
        self.clock = clock

    @property
    def ski(self) -> str:
        return subject_key_id(self.cert)

    def sign(self, csr: bytes, spiffe_id: SpiffeId, ttl: int = TTL) -> list[x509.Certificate]:
        leaf = self.minter.mint_from_csr(csr, spiffe_id, [], ttl, _utc(self.clock()))
        return [leaf, self.cert]


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def _b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


class FakeClient:
    def __init__(self, ca: Ca, entries: dict[str, Entry]) -> None:
        self.ca = ca
        self.entries = entries
        self.refuse: set[str] = set()
        self.mislabel: dict[str, SpiffeId] = {}  # entry -> the SPIFFE ID a faulty server signs
        self.other_key: set[str] = set()  # entries signed over a key that is not the CSR's
        self.calls: list[list[str]] = []
        self.sync_data: dict[str, Any] = {}
        self.sync_errors: list[Exception] = []
        self.roots: list[x509.Certificate] = []

    async def sign_x509(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.calls.append([r["entry_id"] for r in requests])
        out: list[dict[str, Any]] = []
        for r in requests:
            eid = r["entry_id"]
            if eid in self.refuse:
                out.append({"entry_id": eid, "error": {"code": "permission_denied", "message": "no"}})
                continue
            csr = base64.b64decode(r["csr"]) if eid not in self.other_key else csr_for(new_key())
            chain = self.ca.sign(csr, self.mislabel.get(eid, self.entries[eid].spiffe_id))
            out.append({"entry_id": eid, "svid": [_b64(c) for c in chain]})
        return out

    async def sync(self, *args: Any) -> dict[str, Any]:
        if self.sync_errors:
            raise self.sync_errors.pop(0)
        return self.sync_data

    def set_roots(self, roots: Any) -> None:
        self.roots = list(roots)

    async def report(self, failures: list[dict[str, Any]]) -> None:
        return None


class FakeNode:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.schedule = None
        self.chain: list[x509.Certificate] = []
        self.valid = True
        self.attests = 0
        self.renewals: list[bool] = []

    @property
    def authority_key_id(self) -> str:
        return authority_key_id(self.chain[0]) if self.chain else ""

    def due(self) -> bool:
        return False

    async def attest(self) -> dict[str, Any]:
        self.attests += 1
        return {}

    async def renew(self, stationary: bool = False) -> None:
        self.renewals.append(stationary)


def entry(i: int, revision: int = 1) -> Entry:
    return Entry(f"e{i}", SpiffeId(TD, f"/w/{i}"), AGENT, (Selector("unix", f"uid:{i}"),),
                 revision_number=revision)


def make(tmp_path: Path, n: int, seed: int = 1) -> tuple[SvidManager, Clock, Ca, FakeClient, FakeNode]:
    clock = Clock()
    ca = Ca(clock)
    entries = {e.id: e for e in (entry(i) for i in range(n))}
    client = FakeClient(ca, entries)
    node = FakeNode(tmp_path)
    cache = SvidCache(TD)
    cache.set_entries(entries.values(), [AGENT])
    cache.set_bundle(Bundle(TD, (ca.cert,)))
    mgr = SvidManager(cache, client, node, RotationPolicy(0.5, 0.8), random.Random(seed),  # type: ignore[arg-type]
                      sync_interval=5.0, clock=clock)
    return mgr, clock, ca, client, node


# ---------------------------------------------------------------------------- due()


async def test_due_reasons(tmp_path: Path) -> None:
    mgr, clock, _, _, _ = make(tmp_path, 4)
    assert sorted(r for _, r in mgr.due(clock())) == ["initial"] * 4
    await mgr.rotate()
    assert mgr.due(clock()) == []
    svids = mgr.cache.svids
    # Entry changed on the server: re-issue at once.
    changed = entry(1, revision=2)
    mgr.cache.set_entries([*(e for e in mgr.cache.entries.values() if e.id != "e1"), changed], [AGENT])
    assert [(e.id, r) for e, r in mgr.due(clock())] == [("e1", "entry_changed")]
    # Scheduled renewal exactly at the drawn time, not a moment before.
    renew_at = svids["e2"].schedule.renew_at
    clock.t = renew_at - 0.001
    assert "e2" not in {e.id for e, _ in mgr.due(clock())}
    clock.t = renew_at
    assert ("e2", "scheduled") in {(e.id, r) for e, r in mgr.due(clock())}
    clock.t = svids["e3"].expires_at
    assert ("e3", "expired") in {(e.id, r) for e, r in mgr.due(clock())}


async def test_an_entry_recreated_under_its_id_is_reissued_at_once(tmp_path: Path) -> None:
    """Deleted and re-created under the same id, an entry is at revision 0 again, maybe the
    revision its held SVID was signed for: by revision alone the SVID (naming the old
    entry's SPIFFE ID, which the new entry's workloads are not given) waited for its
    scheduled renewal. Its creation time tells the two apart."""
    mgr, clock, _, client, _ = make(tmp_path, 2)
    await mgr.rotate()
    old = mgr.cache.entries["e1"]
    recreated = dataclasses.replace(old, spiffe_id=SpiffeId(TD, "/w/new"), created_at=old.created_at + 60)
    client.entries["e1"] = recreated
    client.sync_data = {"entries": [recreated.to_json()], "workload_parents": [str(AGENT)]}
    await mgr.sync()
    assert [(e.id, r) for e, r in mgr.due(clock())] == [("e1", "entry_changed")]
    await mgr.rotate()
    assert mgr.cache.svids["e1"].spiffe_id == recreated.spiffe_id and mgr.due(clock()) == []


async def test_schedule_drawn_once_across_checks_and_syncs(tmp_path: Path) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 20)
    await mgr.rotate()
    before = {eid: s.schedule for eid, s in mgr.cache.svids.items()}
    first_renewal = min(s.renew_at for s in before.values())
    client.sync_data = {
        "entries": [], "removed": [], "workload_parents": [str(AGENT)], "bundle_sequence": -1,
        "tainted_authorities": [], "taint_window": 600,
    }
    state = mgr.rng.getstate()
    # Many syncs and checks before the first renewal: nothing is drawn again.
    while clock.t + 7 < first_renewal:
        clock.t += 7
        await mgr.sync()
        await mgr.rotate()
    after = {eid: s.schedule for eid, s in mgr.cache.svids.items()}
    assert all(after[eid] is before[eid] for eid in before)
    assert mgr.rng.getstate() == state  # checks consume no randomness at all


async def test_start_is_stationary_then_steady_state_uniform(tmp_path: Path) -> None:
    mgr, clock, _, _, _ = make(tmp_path, 200)
    await mgr.rotate()
    svids = list(mgr.cache.svids.values())
    assert {s.schedule.drawn_with for s in svids} == {"stationary"}
    # Measured from when the agent got them, not from the backdated notBefore: no draw
    # lands in the past (that would be a second burst right after the first).
    assert all(s.issued_at < T0 for s in svids)
    assert min(s.schedule.renew_at for s in svids) >= T0
    # Stationary residual life: spread from the start up to b·L, not inside [a·L, b·L].
    fractions = sorted((s.schedule.renew_at - s.issued_at) / TTL for s in svids)
    assert fractions[0] < 0.1 and fractions[-1] <= 0.8
    assert sum(f < 0.5 for f in fractions) > 100
    # The next renewal of each is a plain uniform draw in [a·L, b·L] of its new lifetime.
    clock.t = max(s.schedule.renew_at for s in svids) + 1
    await mgr.rotate()
    renewed = list(mgr.cache.svids.values())
    assert {s.schedule.drawn_with for s in renewed} == {"uniform"}
    for s in renewed:
        assert 0.5 <= (s.schedule.renew_at - s.issued_at) / TTL <= 0.8


async def test_new_entries_after_start_draw_uniform(tmp_path: Path) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 1)
    await mgr.rotate()
    client.entries["e7"] = entry(7)
    mgr.cache.set_entries([*mgr.cache.entries.values(), entry(7)], [AGENT])
    clock.t += 10
    await mgr.rotate()
    assert mgr.cache.svids["e7"].schedule.drawn_with == "uniform"


def test_next_due_with_nothing_is_one_sync_interval(tmp_path: Path) -> None:
    mgr, clock, _, _, _ = make(tmp_path, 0)
    assert mgr.next_due() == clock() + 5.0


# ---------------------------------------------------------------------------- taint spread


async def test_taint_spread_is_drawn_once_and_uniform_over_the_window(tmp_path: Path) -> None:
    n, window = 1000, 600.0
    mgr, clock, ca, _, _ = make(tmp_path, n)
    mgr._startup = False  # uniform schedules (>= 0.5 L away): only the taint makes anything due
    await mgr.rotate()
    mgr.tainted_akis = {ca.ski}
    mgr.taint_window = window
    t_taint = clock()
    assert mgr.due(t_taint) == []  # nothing at once: U(0, w) is almost surely > 0
    drawn = dict(mgr._taint_due)
    assert len(drawn) == n
    assert all(t_taint <= t <= t_taint + window for t in drawn.values())
    counts = [0] * 10
    for t in drawn.values():
        counts[min(9, int((t - t_taint) / window * 10))] += 1
    assert max(counts) <= 1.4 * n / 10 and min(counts) >= 0.6 * n / 10, counts
    # Later checks keep the same times and draw nothing.
    state = mgr.rng.getstate()
    for step in (1.0, 50.0, 100.0):
        clock.t = t_taint + step
        due = {e.id for e, r in mgr.due(clock()) if r == "tainted"}
        assert due == {eid for eid, t in drawn.items() if t <= clock()}
    assert mgr._taint_due == drawn
    assert mgr.rng.getstate() == state
    assert mgr.next_due() == min(drawn.values())


async def test_taint_reissue_is_stationary_and_from_the_new_key(tmp_path: Path) -> None:
    mgr, clock, old_ca, client, _ = make(tmp_path, 50)
    await mgr.rotate()
    new_ca = Ca(clock)
    client.ca = new_ca
    mgr.cache.set_bundle(Bundle(TD, (old_ca.cert, new_ca.cert), sequence=2))  # published before use
    mgr.tainted_akis = {old_ca.ski}
    mgr.taint_window = 60.0
    mgr.due(clock())
    clock.t += 61
    await mgr.rotate()
    svids = list(mgr.cache.svids.values())
    assert {authority_key_id(s.leaf) for s in svids} == {new_ca.ski}
    assert {s.schedule.drawn_with for s in svids} == {"stationary"}
    assert mgr._taint_due == {}


async def test_scheduled_renewal_before_the_taint_slot_is_not_delayed(tmp_path: Path) -> None:
    mgr, clock, ca, _, _ = make(tmp_path, 1)
    await mgr.rotate()
    svid = mgr.cache.svids["e0"]
    mgr.tainted_akis = {ca.ski}
    mgr.taint_window = 10 * TTL  # the taint slot falls far after the scheduled renewal
    clock.t = svid.schedule.renew_at - 1
    assert mgr.due(clock()) == []
    clock.t = svid.schedule.renew_at
    assert [r for _, r in mgr.due(clock())] == ["tainted"]
    # While it waits, next_due() points at the earlier of the two, never into the past.
    clock.t = svid.schedule.renew_at - 1
    assert mgr.next_due() == svid.schedule.renew_at


async def test_taint_times_are_forgotten_when_the_key_is_no_longer_tainted(tmp_path: Path) -> None:
    mgr, clock, ca, _, _ = make(tmp_path, 5)
    mgr._startup = False  # uniform schedules: the first renewal is >= 0.5 L away
    await mgr.rotate()
    mgr.tainted_akis = {ca.ski}
    mgr.taint_window = 30.0
    mgr.due(clock())
    assert len(mgr._taint_due) == 5
    mgr.tainted_akis = set()  # revoked (or un-tainted) before their turn came
    mgr.due(clock())
    assert mgr._taint_due == {}
    clock.t += 60
    assert mgr.next_due() > clock()  # no stale taint time in the past to spin on
    assert mgr.next_due() == min(s.schedule.renew_at for s in mgr.cache.svids.values())


def test_agent_svid_taint_slot_drawn_once(tmp_path: Path) -> None:
    mgr, clock, ca, _, node = make(tmp_path, 0)
    node.chain = ca.sign(csr_for(new_key()), AGENT)
    mgr.taint_window = 100.0
    assert not mgr.agent_svid_tainted_due(clock())
    assert mgr._agent_taint_due is None
    mgr.tainted_akis = {ca.ski}
    t = clock()
    mgr.agent_svid_tainted_due(t)
    slot = mgr._agent_taint_due
    assert slot is not None and t <= slot <= t + 100
    clock.t = slot - 0.01
    assert not mgr.agent_svid_tainted_due(clock())
    assert mgr._agent_taint_due == slot
    assert mgr.next_due() <= slot
    clock.t = slot
    assert mgr.agent_svid_tainted_due(clock())


async def test_step_renews_a_tainted_agent_svid_stationary(tmp_path: Path) -> None:
    mgr, clock, ca, client, node = make(tmp_path, 0)
    node.chain = ca.sign(csr_for(new_key()), AGENT)
    client.sync_data = {"workload_parents": [str(AGENT)], "tainted_authorities": [ca.ski], "taint_window": 10}
    await mgr.step()  # learns of the taint and draws the agent SVID's slot at once
    slot = mgr._agent_taint_due
    assert node.renewals == [] and slot is not None and clock() <= slot <= clock() + 10
    assert mgr.next_due() <= slot
    clock.t += 11
    await mgr.step()
    assert node.renewals == [True]  # stationary: a taint renews every agent together
    assert mgr._agent_taint_due is None


# ---------------------------------------------------------------------------- refusals


async def test_refused_entry_backs_off_instead_of_retrying_every_loop(tmp_path: Path) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 3)
    client.refuse = {"e1"}
    await mgr.rotate()
    assert set(mgr.cache.svids) == {"e0", "e2"}
    held = mgr._hold["e1"]
    assert clock() <= held <= clock() + 1.0  # first delay: full jitter up to the 1 s base
    clock.t = held - 0.001
    assert "e1" not in {e.id for e, _ in mgr.due(clock())}
    assert mgr.next_due() <= held
    # Successive refusals widen the window (capped exponential backoff).
    ceilings = []
    for _ in range(6):
        clock.t = mgr._hold["e1"]
        ceilings.append(mgr._entry_backoff["e1"].ceiling())
        await mgr.rotate()
    assert ceilings == sorted(ceilings) and ceilings[-1] > ceilings[0]
    client.refuse = set()
    clock.t = mgr._hold["e1"]
    await mgr.rotate()
    assert "e1" in mgr.cache.svids and "e1" not in mgr._hold and "e1" not in mgr._entry_backoff


async def test_an_svid_not_for_the_entry_is_never_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A faulty server's SVID for another SPIFFE ID or another key is discarded, never
    served, and retried with backoff rather than on every loop."""
    mgr, clock, _, client, _ = make(tmp_path, 3)
    client.mislabel = {"e1": SpiffeId(TD, "/w/someone-else")}
    client.other_key = {"e2"}
    await mgr.rotate()
    assert set(mgr.cache.svids) == {"e0"}
    assert "for spiffe://example.org/w/someone-else, not the entry's spiffe://example.org/w/1" in caplog.text
    assert "for a different key" in caplog.text
    assert {"e1", "e2"} <= set(mgr._hold) and not {"e1", "e2"} & {e.id for e, _ in mgr.due(clock())}
    client.mislabel, client.other_key = {}, set()
    clock.t = max(mgr._hold.values())
    await mgr.rotate()
    assert set(mgr.cache.svids) == {"e0", "e1", "e2"}
    assert mgr.cache.svids["e1"].spiffe_id == SpiffeId(TD, "/w/1")


async def test_an_svid_outside_the_trust_bundle_is_never_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An SVID from a CA the bundle does not hold (a server signing with a key it has not
    published yet, say) is one its peers cannot verify: discarded, the held SVID kept and
    the entry retried with backoff; once the bundle holds the CA it is taken."""
    mgr, clock, ca, client, _ = make(tmp_path, 2)
    await mgr.rotate()
    held = dict(mgr.cache.svids)
    unpublished = Ca(clock)
    client.ca = unpublished
    mgr.cache.set_entries([entry(0, revision=2), entry(1, revision=2)], [AGENT])
    await mgr.rotate()
    assert mgr.cache.svids == held
    assert "that does not chain to the trust bundle (entry e0); discarded" in caplog.text
    assert {"e0", "e1"} <= set(mgr._hold)
    mgr.cache.set_bundle(Bundle(TD, (ca.cert, unpublished.cert), sequence=1))
    clock.t = max(mgr._hold.values())
    await mgr.rotate()
    assert {authority_key_id(s.leaf) for s in mgr.cache.svids.values()} == {unpublished.ski}


async def test_an_svid_whose_chain_is_broken_is_never_cached(tmp_path: Path) -> None:
    """The chain's own links are checked too: a leaf sent with an intermediate that did not
    sign it does not reach the root through that intermediate."""
    mgr, clock, ca, client, _ = make(tmp_path, 1)
    other = Ca(clock)
    signed_by_other = other.sign

    def sign(csr: bytes, spiffe_id: SpiffeId, ttl: int = TTL) -> list[x509.Certificate]:
        return [signed_by_other(csr, spiffe_id, ttl)[0], ca.cert]  # leaf from `other`, claimed under `ca`

    client.ca = ca
    ca.sign = sign  # type: ignore[method-assign]
    await mgr.rotate()
    assert mgr.cache.svids == {} and "e0" in mgr._hold


async def test_an_unbounded_retry_after_does_not_end_the_sync_loop(tmp_path: Path) -> None:
    """The overload handler computes the delay itself: a raise from it (jittered() on an
    infinite hint) ended run() for good, and with it the agent's syncing."""
    mgr, clock, _, client, _ = make(tmp_path, 1)
    client.sync_errors = [OverloadedError("busy", retry_after=float("inf")),
                          OverloadedError("busy", retry_after=float("nan"))]
    task = asyncio.create_task(mgr.run())
    try:
        for _ in range(200):
            if not client.sync_errors:
                break
            mgr.poke()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not client.sync_errors and not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_removed_entry_forgets_its_backoff(tmp_path: Path) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 2)
    client.refuse = {"e1"}
    await mgr.rotate()
    assert "e1" in mgr._hold
    mgr.cache.set_entries([mgr.cache.entries["e0"]], [AGENT])
    mgr.due(clock())
    assert mgr._hold == {} and mgr._entry_backoff == {}


# ---------------------------------------------------------------------------- re-attestation


async def _run_until(mgr: SvidManager, cond: Any, limit: float = 5.0) -> None:
    task = asyncio.create_task(mgr.run())
    try:
        async with asyncio.timeout(limit):
            while not cond():  # noqa: ASYNC110 (polling the manager's plain attributes)
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_identity_rejected_by_the_server_triggers_reattestation(tmp_path: Path) -> None:
    mgr, clock, _, client, node = make(tmp_path, 1)
    new_root = Ca(clock).cert
    bundle = {"keys": [{"use": "x509-svid", "x5c": [base64.b64encode(
        new_root.public_bytes(serialization.Encoding.DER)).decode()]}], "spiffe_sequence": 7}
    client.sync_errors = [IdentityRejectedError("no longer trusted", bundle)]
    client.sync_data = {"workload_parents": [str(AGENT)]}
    await _run_until(mgr, lambda: node.attests == 1 and mgr.last_sync_ok > 0)
    assert client.roots == [new_root]  # the probed bundle was adopted
    assert mgr.bundle_sequence == 7


async def test_an_outage_does_not_trigger_reattestation(tmp_path: Path) -> None:
    mgr, _, _, client, node = make(tmp_path, 1)
    client.sync_errors = [ServerUnavailableError("down")] * 2
    client.sync_data = {"workload_parents": [str(AGENT)]}
    mgr.backoff.base = mgr.backoff.cap = 0.01
    await _run_until(mgr, lambda: mgr.last_sync_ok > 0)
    assert node.attests == 0


def test_chain_verifies(tmp_path: Path) -> None:
    clock = Clock(dt.datetime.now(dt.UTC).timestamp())
    ca, other = Ca(clock), Ca(clock)
    chain = ca.sign(csr_for(new_key()), AGENT, ttl=600)
    now = clock()
    assert chain_verifies(chain, [ca.cert], now)
    assert chain_verifies(chain[:1], [ca.cert], now)  # leaf issued directly by a root
    assert not chain_verifies(chain, [other.cert], now)  # the CA's root left the bundle
    assert not chain_verifies(chain, [ca.cert], now + 601)  # expired
    assert not chain_verifies([chain[0], other.cert], [other.cert], now)  # broken link
    assert not chain_verifies([], [ca.cert], now)


def test_agent_tls_contexts_trust_only_the_bundle() -> None:
    """The agent authenticates the server with the SPIFFE bundle alone: no system CA store
    (any public or enterprise CA would otherwise be trusted too)."""
    from workload_api.server_client import ServerClient

    clock = Clock(dt.datetime.now(dt.UTC).timestamp())
    ca = Ca(clock)
    client = ServerClient(["127.0.0.1:1"], SpiffeId(TD, "/meshid/server"))
    client.set_roots([ca.cert])
    client.set_identity(ca.sign(csr_for(key := new_key()), AGENT), key)
    for with_identity in (False, True):
        ctx = client._ctx(with_identity)
        assert [int(str(c["serialNumber"]), 16) for c in ctx.get_ca_certs()] == [ca.cert.serial_number]


# ---------------------------------------------------------------------------- server outage


async def test_an_svid_that_expires_during_an_outage_is_no_longer_served(tmp_path: Path) -> None:
    """Expired SVIDs were dropped only after a successful sync: while the server was down,
    an SVID past its notAfter stayed in the cache and was handed to every new caller (and no
    stream was told), a credential every peer refuses."""
    mgr, clock, _, client, _ = make(tmp_path, 2)
    await mgr.rotate()
    watcher = mgr.cache.watch(frozenset(mgr.cache.entries["e0"].selectors))
    watcher.entry_ids = {"e0"}
    clock.t = max(s.expires_at for s in mgr.cache.svids.values()) + 1
    client.sync_errors = [ServerUnavailableError("down")] * 1000
    await _run_until(mgr, lambda: mgr.consecutive_failures >= 1)
    assert mgr.cache.svids == {}
    assert watcher.event.is_set()  # the stream holding it pushes the state without it


async def test_the_outage_loop_wakes_at_the_next_expiry(tmp_path: Path) -> None:
    """The retry backoff (up to 30 s) must not keep an SVID served past its expiry."""
    mgr, clock, _, client, _ = make(tmp_path, 1)
    await mgr.rotate()
    svid = mgr.cache.svids["e0"]
    clock.t = svid.expires_at - 0.2
    client.sync_errors = [ServerUnavailableError("down")] * 1000
    mgr.backoff.base = mgr.backoff.cap = 30.0
    mgr.backoff._attempt = 10  # well into the outage: ~30 s waits
    task = asyncio.create_task(mgr.run())
    try:
        await asyncio.sleep(0.05)
        assert mgr.consecutive_failures == 1 and "e0" in mgr.cache.svids
        clock.t = svid.expires_at
        await asyncio.sleep(0.5)  # the loop's own wait, capped at the expiry (0.2 s)
        assert mgr.cache.svids == {}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_failed_agent_svid_renewal_does_not_stop_workload_rotation(tmp_path: Path) -> None:
    """The agent SVID's renewal came first in every round, and a failure the server's
    availability has nothing to do with (the renewed SVID cannot be saved: a full disk; the
    server refuses the renewal) ended the round: no sync and no workload renewal while the
    agent's SVID was still good, until the workloads' SVIDs expired. Now the renewal backs
    off on its own and the round goes on with the SVID held."""
    mgr, clock, _, client, node = make(tmp_path, 1)
    await mgr.rotate()
    held = mgr.cache.svids["e0"]
    renew_at = held.schedule.renew_at
    failures: list[float] = []

    async def renew(stationary: bool = False) -> None:
        failures.append(clock())
        raise OSError(28, "No space left on device")

    node.due = lambda: clock() >= renew_at  # type: ignore[method-assign]
    node.renew = renew  # type: ignore[method-assign]
    node.schedule = RenewalSchedule(renew_at, "uniform")  # type: ignore[assignment]
    client.sync_data = {"workload_parents": [str(AGENT)]}
    clock.t = renew_at
    await mgr.step()  # did raise OSError
    assert mgr.cache.svids["e0"] is not held and failures == [renew_at]
    assert mgr.next_due() > clock()  # the failed renewal is held: no 50 ms loop
    await mgr.step()
    assert failures == [renew_at]
    clock.t = mgr.next_due()
    await mgr.step()
    assert len(failures) == 2


async def test_a_bundle_that_could_not_be_saved_is_saved_at_a_later_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed write of bundle.json (disk full) raised out of the sync after the bundle was
    adopted, and the next syncs of the same sequence returned early: the file kept the old
    roots for the next start. Now the bundle is in use at once and written when it can be."""
    from workload_api import manager as manager_module

    mgr, _, ca, _, node = make(tmp_path, 1)
    doc = Bundle(TD, (ca.cert,), sequence=2).to_spiffe_json()
    real_write = manager_module.write_atomically

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager_module, "write_atomically", disk_full)
    for _ in range(2):  # two syncs bringing the same bundle
        mgr._try_bundle(doc, "sync")
        await mgr._save_bundle()
    assert mgr.cache.bundle is not None and mgr.cache.bundle.sequence == 2
    assert not (node.dir / "bundle.json").exists()
    assert caplog.text.count("could not save the bundle") == 1  # not once per sync
    monkeypatch.setattr(manager_module, "write_atomically", real_write)
    mgr._try_bundle(doc, "sync")
    await mgr._save_bundle()
    assert Bundle.from_spiffe_json(TD, (node.dir / "bundle.json").read_bytes()).sequence == 2


async def test_a_synced_bundle_is_written_once_the_whole_sync_is_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bundle.json is written on a thread, so the sync waits for it: the wait comes after the
    entries of the same answer are in the cache, or workloads would meanwhile be served the
    new bundle with the old entries."""
    from workload_api import manager as manager_module

    mgr, _, ca, client, node = make(tmp_path, 1)
    new_entry = entry(7)
    client.sync_data = {
        "bundle": Bundle(TD, (ca.cert,), sequence=5).to_spiffe_json(),
        "entries": [new_entry.to_json()],
        "workload_parents": [str(AGENT)],
    }
    real_write = manager_module.write_atomically
    seen: list[set[str]] = []

    def recording_write(path: Path, data: bytes) -> None:
        seen.append(set(mgr.cache.entries))
        real_write(path, data)

    monkeypatch.setattr(manager_module, "write_atomically", recording_write)
    await mgr.sync()
    assert seen == [{"e0", new_entry.id}]
    assert Bundle.from_spiffe_json(TD, (node.dir / "bundle.json").read_bytes()).sequence == 5
    await mgr.sync()  # the same sequence again: nothing more to write
    assert len(seen) == 1
