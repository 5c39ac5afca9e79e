"""Server admission control: token bucket arithmetic, the order refusals are checked in,
that a refused request costs nothing, and that refusals reach the metrics."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

import issuer.admission as admission_mod
from issuer import signing
from issuer.admission import Admission
from issuer.ca.slots import CaManager
from issuer.datastore.base import AgentRecord, DataStore
from issuer.entries import EntryService
from issuer.events import ocsf
from issuer.events.model import Event
from issuer.signing import SigningService, X509Request
from meshid import telemetry
from meshid.errors import OverloadedError
from meshid.spiffe_id import SpiffeId
from meshid.token_bucket import TokenBucket


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def refused_count(kind: str) -> float:
    """Current value of meshid.svid.refused{kind, reason="overloaded"} in the process telemetry."""
    total = 0.0
    for metric in telemetry.default_telemetry().collect():
        if metric.name != "meshid.svid.refused":
            continue
        for point in metric.data.data_points:
            attrs = dict(point.attributes or {})
            if attrs.get("kind") == kind and attrs.get("reason") == "overloaded":
                total += float(point.value)  # type: ignore[union-attr]
    return total


# ---------------------------------------------------------------------------- token bucket


def test_bucket_starts_full_and_refuses_with_exact_wait() -> None:
    clock = Clock()
    b = TokenBucket(rate=10.0, burst=20, clock=clock)
    assert b.try_take(15) == 0.0
    assert b.tokens == pytest.approx(5)
    # 8 more are needed, 3 are missing, at 10 tokens/s: 0.3 s.
    assert b.try_take(8) == pytest.approx(0.3)
    assert b.tokens == pytest.approx(5)  # a refusal takes nothing


def test_bucket_refills_at_rate_and_caps_at_burst() -> None:
    clock = Clock()
    b = TokenBucket(rate=10.0, burst=20, clock=clock)
    assert b.try_take(20) == 0.0
    clock.t += 0.5
    assert b.try_take(5) == 0.0  # 5 tokens refilled in 0.5 s
    assert b.try_take(1) == pytest.approx(0.1)
    clock.t += 3600
    assert b.try_take(0) == 0.0
    assert b.tokens == pytest.approx(20)  # never above the burst however long idle


def test_batch_larger_than_burst_passes_only_when_full() -> None:
    clock = Clock()
    b = TokenBucket(rate=10.0, burst=20, clock=clock)
    assert b.try_take(50) == 0.0  # full bucket: the oversized batch is charged the whole burst
    assert b.tokens == pytest.approx(0)
    assert b.try_take(50) == pytest.approx(2.0)  # wait for a full bucket again: 20 / 10
    clock.t += 2.0
    assert b.try_take(50) == 0.0


def test_give_back_and_is_full() -> None:
    clock = Clock()
    b = TokenBucket(rate=1.0, burst=10, clock=clock)
    assert b.is_full()
    b.try_take(4)
    assert not b.is_full()
    b.give_back(100)
    assert b.tokens == pytest.approx(10)
    b.try_take(1)
    clock.t += 1.0
    assert b.is_full()  # refilled when asked, not only when used


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 10), (-1.0, 10), (1.0, 0)])
def test_bucket_rejects_degenerate_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(rate, burst)


def test_admission_rejects_degenerate_configuration() -> None:
    with pytest.raises(ValueError, match="max_concurrent_signing"):
        Admission(0, 10, 10, 10, 10, 1)
    with pytest.raises(ValueError, match="agent_rate"):
        Admission(1, 0, 10, 10, 10, 1)
    with pytest.raises(ValueError, match="rate > 0"):
        Admission(1, 10, 10, 0, 10, 1)


# ---------------------------------------------------------------------------- refusal order


def _adm(clock: Clock, *, max_concurrent: int = 4, agent_rate: float = 10.0, agent_burst: int = 20,
         global_rate: float = 100.0, global_burst: int = 200, max_queue: int = 4) -> Admission:
    return Admission(max_concurrent, agent_rate, agent_burst, global_rate, global_burst, max_queue, clock)


async def test_agent_bucket_is_checked_first_and_leaves_global_untouched() -> None:
    clock = Clock()
    adm = _adm(clock)
    async with adm.admit("a", 20):
        pass
    global_before = adm._global.tokens
    with pytest.raises(OverloadedError, match="agent signing rate") as exc:
        async with adm.admit("a", 5):
            pytest.fail("admitted past the agent's bucket")
    assert exc.value.retry_after == pytest.approx(0.5)  # 5 tokens at 10/s
    assert adm._global.tokens == pytest.approx(global_before)
    # Other agents are not affected by one agent's exhausted bucket.
    async with adm.admit("b", 20):
        pass
    assert (adm.stats.admitted, adm.stats.refused_rate, adm.stats.refused_busy) == (2, 1, 0)


async def test_global_bucket_refusal_gives_back_the_agent_tokens() -> None:
    clock = Clock()
    adm = _adm(clock, agent_burst=50, global_rate=10.0, global_burst=60)
    async with adm.admit("a", 50):
        pass
    with pytest.raises(OverloadedError, match="server signing rate") as exc:
        async with adm.admit("b", 20):
            pytest.fail("admitted past the global bucket")
    assert exc.value.retry_after == pytest.approx(1.0)  # 10 missing at 10/s
    assert adm._agents["b"].tokens == pytest.approx(50)  # refused: b paid nothing
    assert adm.stats.refused_rate == 1


async def test_busy_refusal_gives_back_both_buckets_and_queue_is_bounded() -> None:
    clock = Clock()
    adm = _adm(clock, max_concurrent=1, max_queue=1)
    release = asyncio.Event()
    entered: list[str] = []

    async def hold(agent: str) -> None:
        async with adm.admit(agent, 1):
            entered.append(agent)
            await release.wait()

    first = asyncio.create_task(hold("a"))
    await asyncio.sleep(0)
    queued = asyncio.create_task(hold("b"))  # waits for the single slot: within max_queue
    await asyncio.sleep(0)
    assert entered == ["a"]
    global_before, c_before = adm._global.tokens, adm._bucket("c").tokens
    with pytest.raises(OverloadedError, match="busy") as exc:
        async with adm.admit("c", 3):
            pytest.fail("admitted past the queue bound")
    assert exc.value.retry_after == pytest.approx(0.5)
    assert adm._global.tokens == pytest.approx(global_before)
    assert adm._bucket("c").tokens == pytest.approx(c_before)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, queued), 5)
    assert entered == ["a", "b"]
    assert (adm.stats.admitted, adm.stats.refused_busy) == (2, 1)


async def test_retry_after_has_a_floor() -> None:
    clock = Clock()
    adm = _adm(clock, agent_rate=1000.0, agent_burst=10)
    async with adm.admit("a", 10):
        pass
    with pytest.raises(OverloadedError) as exc:
        async with adm.admit("a", 1):
            pass
    assert exc.value.retry_after == pytest.approx(0.05)  # 1 ms computed, 50 ms floor


async def test_refusals_are_counted_in_telemetry_by_kind() -> None:
    clock = Clock()
    adm = _adm(clock, agent_burst=1)
    x509_before, jwt_before = refused_count("x509"), refused_count("jwt")
    async with adm.admit("a", 1):
        pass
    for kind in ("x509", "jwt", "jwt"):
        with pytest.raises(OverloadedError):
            async with adm.admit("a", 1, kind=kind):
                pass
    assert refused_count("x509") == x509_before + 1
    assert refused_count("jwt") == jwt_before + 2
    text = telemetry.default_telemetry().render_prometheus()
    assert 'meshid_svid_refused_total{kind="jwt",reason="overloaded"}' in text


async def test_tracked_agents_are_bounded_by_dropping_full_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission_mod, "MAX_TRACKED_AGENTS", 3)
    clock = Clock()
    adm = _adm(clock, agent_rate=1.0, agent_burst=10)
    async with adm.admit("busy", 10):  # drained: its state matters and must be kept
        pass
    for name in ("idle1", "idle2"):
        adm._bucket(name)
    adm._bucket("new")
    assert set(adm._agents) == {"busy", "new"}
    with pytest.raises(OverloadedError):
        async with adm.admit("busy", 1):
            pass


# ---------------------------------------------------------------------------- refusal events


class _Outbox:
    """The one DataStore call SigningService makes on a refusal."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def append_events(self, events: list[Event]) -> None:
        self.events.extend(events)


async def test_overload_refusals_become_rate_limited_svid_refused_events() -> None:
    # SPEC-EVENTS: io.meshid.svid.refused is written for overload too, not only for
    # unauthorized entries and bad CSRs; at most one per agent and kind per interval.
    clock = Clock()
    adm = _adm(clock, max_concurrent=1, max_queue=0)
    outbox = _Outbox()
    woken: list[int] = []
    svc = SigningService(cast(DataStore, outbox), cast(CaManager, None), cast(EntryService, None), adm,
                         3600, 300, clock=clock, on_events=lambda: woken.append(1))
    agent = AgentRecord(SpiffeId.parse("spiffe://example.org/spire/agent/x"), "join_token", ())
    async with adm.admit("someone-else", 1):  # the one signing slot is taken, no queue
        for _ in range(3):
            with pytest.raises(OverloadedError):
                await svc.sign_x509(agent, [X509Request("e1", b""), X509Request("e2", b"")])
        with pytest.raises(OverloadedError):
            await svc.sign_jwt(agent, "e1", ["aud"])
        clock.t += signing.OVERLOAD_EVENT_INTERVAL
        with pytest.raises(OverloadedError):
            await svc.sign_x509(agent, [X509Request("e1", b"")])
    assert [(e.type, e.data["unmapped"]["svid_kind"]) for e in outbox.events] == \
        [(ocsf.SVID_REFUSED, "x509"), (ocsf.SVID_REFUSED, "jwt"), (ocsf.SVID_REFUSED, "x509")]
    first, _, later = outbox.events
    assert first.partition_key == str(agent.agent_id) and first.data["status_id"] == ocsf.STATUS_FAILURE
    assert first.data["unmapped"]["reason"] == "overloaded" and first.data["unmapped"]["count"] == 2
    assert later.data["unmapped"]["count"] == 5  # the two suppressed batches (4) and this one
    assert len(woken) == 3

    # The overload ends with refusals held back: the tick reports them once the interval
    # has passed, and then forgets the agent.
    outbox.events.clear()
    with pytest.raises(OverloadedError):
        async with adm.admit("someone-else", 1):
            await svc.sign_x509(agent, [X509Request("e1", b"")] * 3)
    await svc.flush_overload_refusals()
    assert outbox.events == []  # still inside the interval
    clock.t += signing.OVERLOAD_EVENT_INTERVAL
    await svc.flush_overload_refusals()
    reported = [(e.data["unmapped"]["svid_kind"], e.data["unmapped"]["count"]) for e in outbox.events]
    assert reported == [("x509", 3)]
    clock.t += signing.OVERLOAD_EVENT_INTERVAL
    await svc.flush_overload_refusals()
    assert len(outbox.events) == 1 and svc._overload_reported == {}
