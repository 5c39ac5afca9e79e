"""Rotation without storms, in real time on a real stack (server + agent in-process).

- A renewal time is drawn once per SVID: many syncs leave every workload SVID's schedule
  object untouched, and the agent's own SVID keeps its persisted renewal time across an
  agent restart. Workload SVIDs are memory-only, so a restart re-issues them all, with
  first renewals drawn from the stationary distribution.
- After that restart burst, 200+ SVIDs with a 120 s lifetime renew spread out in time:
  both the drawn schedule and the renewals actually observed over ~a minute stay within
  a small multiple of the mean per 2 s bucket.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from waiting import wait_for

from meshid.cli.dev import DevStack, start_dev
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from workload_api.agent import Agent
from workload_api.cache import X509Svid
from workload_api.node_identity import STATE_FILE

pytestmark = pytest.mark.integration

N_WORKLOADS = 200
TTL = 120
BUCKET = 2.0


async def restart_agent(stack: DevStack, before_start: object = None) -> Agent:
    """Stop the agent and start a fresh one on the same config and state directory."""
    config = stack.agent.config
    await stack.agent.stop()
    agent = Agent(config)
    if before_start is not None:
        before_start(agent)  # type: ignore[operator]
    stack.agent = agent
    await agent.start()
    return agent


def peak_to_mean(
    times: Iterable[float], start: float, end: float, bucket: float = BUCKET
) -> tuple[int, float]:
    """(largest bucket count, mean count per bucket) of `times` over [start, end)."""
    n_buckets = max(1, int((end - start) // bucket))
    counts = [0] * n_buckets
    for t in times:
        i = int((t - start) // bucket)
        if 0 <= i < n_buckets:
            counts[i] += 1
    return max(counts), sum(counts) / n_buckets


async def test_schedules_survive_syncs_and_agent_restart(short_tmp: Path) -> None:
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=3600)
    try:
        agent = stack.agent
        await wait_for(lambda: len(agent.cache.svids) == 1, 20, "the workload SVID")
        (eid, first), = agent.cache.svids.items()
        # Start-up draws are stationary, so now and then (~0.4 % of runs) one falls within the
        # next minute, in the middle of the checks below. Let that renewal happen first: its
        # successor's draw is the steady state's, at least half a lifetime away.
        if first.schedule.renew_at < time.time() + 60:
            await wait_for(lambda: agent.cache.svids.get(eid) is not first, 90, "the early renewal")
            first = agent.cache.svids[eid]
        early = agent.node.schedule
        if early is not None and early.renew_at < time.time() + 60:
            await wait_for(lambda: agent.node.schedule is not early, 90, "the agent SVID's early renewal")
        agent_schedule = agent.node.schedule
        agent_serial = agent.node.chain[0].serial_number
        assert agent_schedule is not None
        state = json.loads((agent.config.state_dir / STATE_FILE).read_text())
        assert state == {"renew_at": agent_schedule.renew_at, "drawn_with": agent_schedule.drawn_with}

        # Many syncs (1 s interval, plus forced extra rounds): nothing is re-drawn.
        manager = agent.manager
        for _ in range(10):
            last = manager.last_sync_ok
            manager.poke()
            await wait_for(lambda: manager.last_sync_ok != last, 10, "a sync round")  # noqa: B023 (awaited here)
        assert agent.cache.svids[eid] is first
        assert agent.cache.svids[eid].schedule is first.schedule
        assert agent.node.schedule is agent_schedule

        # Agent restart: its own SVID and the renewal time drawn for it come back from disk.
        agent = await restart_agent(stack)
        assert agent.node.chain[0].serial_number == agent_serial
        assert agent.node.schedule == agent_schedule
        # Workload SVIDs were memory-only: issued afresh, first renewal drawn stationary.
        await wait_for(lambda: eid in agent.cache.svids, 20, "the re-issued workload SVID")
        again = agent.cache.svids[eid]
        assert again.leaf.serial_number != first.leaf.serial_number
        assert again.schedule.drawn_with == "stationary"
        assert again.schedule.renew_at >= time.time() - 5
    finally:
        await stack.stop()


@pytest.mark.slow
async def test_renewals_of_200_svids_spread_over_the_window(short_tmp: Path) -> None:
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=TTL)
    try:
        agent_id = stack.agent.node.agent_id
        assert agent_id is not None
        td = stack.server.td
        # Entries parented to the agent are pre-fetched whether or not a workload calls.
        for i in range(N_WORKLOADS):
            await stack.server.entries.create(
                Entry("", SpiffeId(td, f"/wl/{i}"), agent_id, (Selector("unix", f"uid:{20000 + i}"),)))
        total = N_WORKLOADS + 1  # plus the dev user's entry
        stack.agent.manager.poke()
        await wait_for(lambda: len(stack.agent.cache.svids) == total, 60, f"{total} SVIDs")

        # Restart: every workload SVID is issued again at once, the burst a fleet sees
        # after an agent upgrade. Record every SVID the new agent puts in its cache.
        issued: list[tuple[float, X509Svid]] = []

        def record(agent: Agent) -> None:
            put = agent.cache.put_svids

            def recording(svids: Iterable[X509Svid]) -> None:
                batch = list(svids)
                now = time.time()
                issued.extend((now, s) for s in batch)
                put(batch)

            agent.cache.put_svids = recording  # type: ignore[method-assign]

        t0 = time.time()
        agent = await restart_agent(stack, record)
        await wait_for(lambda: len(agent.cache.svids) == total, 60, "the restart burst")
        burst = {s.entry_id: s for _, s in issued}
        assert len(burst) == total
        assert all(t - t0 < 15 for t, _ in issued)

        # 1. The drawn schedule: first renewals cover [t0, t0 + b·L] with no pile-up.
        drawn = [s.schedule for s in burst.values()]
        assert {d.drawn_with for d in drawn} == {"stationary"}
        assert all(t0 - 1 <= d.renew_at <= t0 + 0.8 * TTL + 15 for d in drawn)
        peak_drawn, mean_drawn = peak_to_mean((d.renew_at for d in drawn), t0, t0 + 0.8 * TTL)
        assert peak_drawn <= 4 * mean_drawn, (peak_drawn, mean_drawn)

        # 2. Real renewals over ~a minute: at the drawn times, at a steady rate.
        observe_until = t0 + 62
        await asyncio.sleep(observe_until - time.time())
        renewals = [(t, s) for t, s in issued if s.leaf.serial_number != burst[s.entry_id].leaf.serial_number]
        # Only each entry's first renewal follows the burst's schedule; an SVID due in the
        # first seconds renews again ≥ 0.5·L later, still inside the observation window.
        first_renewal: dict[str, float] = {}
        for t, s in renewals:
            first_renewal.setdefault(s.entry_id, t)
        for entry_id, t in first_renewal.items():
            planned = burst[entry_id].schedule.renew_at
            if planned >= t0 + 1:  # (due during the burst itself: renewed as soon as it landed)
                assert -0.5 <= t - planned <= 3.0, (entry_id, t - planned)
        window_start = t0 + 2  # after the burst itself
        times = [t for t, _ in renewals if t >= window_start]
        # Stationary start: renewals arrive at the steady rate N / (mean interval) at once.
        expected = total * (observe_until - window_start) / (0.65 * TTL)
        assert 0.6 * expected <= len(times) <= 1.4 * expected, (len(times), expected)
        peak, mean = peak_to_mean(times, window_start, observe_until)
        assert peak <= 4 * mean, (peak, mean)
        # Renewed SVIDs draw their next renewal uniformly in [a·L, b·L] of their lifetime,
        # measured from when the agent got them (notBefore is backdated for skew).
        for t, s in renewals:
            assert s.schedule.drawn_with == "uniform"
            life = s.expires_at - t
            assert 0.5 * life - 1 <= s.schedule.renew_at - t <= 0.8 * life + 1
        print(f"drawn schedule peak/mean per {BUCKET:.0f}s: {peak_drawn}/{mean_drawn:.2f}; observed "
              f"renewals {len(times)} (expected {expected:.0f}), peak/mean {peak}/{mean:.2f}")
    finally:
        await stack.stop()
