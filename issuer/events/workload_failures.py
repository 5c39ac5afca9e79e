"""Aggregation and rate bound for agent-reported workload attestation failures.

A misbehaving process can hit the Workload API thousands of times a second; one event
per refusal would flood the outbox and the SOC. Agents already send counts per
(reason, caller uid); the server folds them per agent into groups and emits at most
`max_events_per_window` events per agent per window. Groups beyond that budget wait for
the next window, and groups beyond `max_groups` are folded into one `various` group,
so every failure is counted in some event: totals stay exact while the rate is bounded.

`WorkloadFailureAggregator` is pure (callers pass times); `record` and `flush` are the
server-side edge the agent API calls.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

from issuer.events import ocsf
from issuer.events.model import Event
from meshid import telemetry

OVERFLOW_REASON = "various"
MAX_REASON_LENGTH = 200
MAX_UNSENT = 10_000  # events kept for the next flush while the datastore refuses them

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Group:
    count: int
    first_at: float
    last_at: float
    pid: int | None = None
    gid: int | None = None
    folded: int = 0  # distinct (reason, uid) groups folded in (overflow group only)


@dataclass(slots=True)
class _Agent:
    window_start: float = float("-inf")
    emitted: int = 0  # events in the current window
    groups: dict[tuple[str, int | None], _Group] = field(default_factory=dict)
    overflow: _Group | None = None


class WorkloadFailureAggregator:
    def __init__(self, window: float = 60.0, max_events_per_window: int = 8, max_groups: int = 16) -> None:
        if window <= 0 or max_events_per_window < 2 or max_groups < 1:
            raise ValueError("window > 0, max_events_per_window >= 2 and max_groups >= 1 are required")
        self.window = window
        self.max_events_per_window = max_events_per_window
        self.max_groups = max_groups
        self._agents: dict[str, _Agent] = {}
        # Events flushed whose write to the outbox failed: written first next time.
        self.unsent: list[Event] = []
        self.total_failures = 0
        self.total_events = 0

    def add(self, agent_id: str, reason: str, at: float, *, uid: int | None = None, pid: int | None = None,
            gid: int | None = None, count: int = 1) -> None:
        """Record `count` refusals of callers with this uid for this reason."""
        if count <= 0:
            return
        self.total_failures += count
        agent = self._agents.setdefault(agent_id, _Agent())
        key = (reason[:MAX_REASON_LENGTH], uid)
        group = agent.groups.get(key)
        if group is None and len(agent.groups) >= self.max_groups:
            # Bounded memory per agent: the rest is counted, not itemised.
            if agent.overflow is None:
                agent.overflow = _Group(0, at, at)
            group = agent.overflow
            group.folded += 1
        elif group is None:
            group = agent.groups[key] = _Group(0, at, at)
        group.count += count
        group.first_at = min(group.first_at, at)
        group.last_at = max(group.last_at, at)
        if pid is not None:
            group.pid = pid
        if gid is not None:
            group.gid = gid

    def pending(self) -> int:
        """Failures recorded but not yet emitted."""
        return sum(sum(g.count for g in a.groups.values()) + (a.overflow.count if a.overflow else 0)
                   for a in self._agents.values())

    def flush(self, now: float) -> list[Event]:
        """Events for pending failures, within each agent's budget for its window."""
        out: list[Event] = []
        for agent_id in list(self._agents):
            agent = self._agents[agent_id]
            if now - agent.window_start >= self.window:
                agent.window_start, agent.emitted = now, 0
            budget = self.max_events_per_window - agent.emitted
            if budget <= 0:
                continue
            items = sorted(agent.groups.items(), key=lambda kv: kv[1].first_at)
            overflow = agent.overflow
            slots = len(items) + (1 if overflow else 0)
            if slots > budget:
                # Keep the oldest groups itemised and fold the rest into one event.
                keep, rest = items[: budget - 1], items[budget - 1:]
                overflow = overflow or _Group(0, rest[0][1].first_at, rest[0][1].last_at)
                for _, g in rest:
                    overflow.count += g.count
                    overflow.first_at = min(overflow.first_at, g.first_at)
                    overflow.last_at = max(overflow.last_at, g.last_at)
                    overflow.folded += 1
                items = keep
            for (reason, uid), g in items:
                out.append(ocsf.workload_attestation_failed(
                    agent_id, reason, g.count, g.first_at, g.last_at, now,
                    caller_pid=g.pid, caller_uid=uid, caller_gid=g.gid))
            if overflow is not None and overflow.count:
                out.append(ocsf.workload_attestation_failed(
                    agent_id, OVERFLOW_REASON, overflow.count, overflow.first_at, overflow.last_at, now,
                    suppressed=overflow.folded))
            agent.emitted += len(items) + (1 if overflow is not None and overflow.count else 0)
            agent.groups.clear()
            agent.overflow = None
        # Forget agents with nothing pending once their window is over.
        for agent_id in [a for a, st in self._agents.items()
                         if not st.groups and st.overflow is None and now - st.window_start >= self.window]:
            del self._agents[agent_id]
        self.total_events += len(out)
        return out


# --- server edge ---------------------------------------------------------------------------

_aggregators: weakref.WeakKeyDictionary[Any, WorkloadFailureAggregator] = weakref.WeakKeyDictionary()


def aggregator_for(server: Any) -> WorkloadFailureAggregator:
    agg = _aggregators.get(server)
    if agg is None:
        agg = _aggregators[server] = WorkloadFailureAggregator()
    return agg


def _opt_int(item: dict[str, Any], name: str) -> int | None:
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"workload_attestation_failures[].{name} must be an integer in [0, 2^32)")
    return value


def parse_report(failures: list[Any]) -> list[tuple[str, int | None, int | None, int | None, int]]:
    """Validate an agent's report: items {reason, uid?, pid?, gid?, count?}. ValueError if bad."""
    out = []
    for item in failures:
        if not isinstance(item, dict):
            raise ValueError("workload_attestation_failures items must be objects")
        reason = item.get("reason")
        if not isinstance(reason, str) or not reason:
            raise ValueError("workload_attestation_failures[].reason must be a non-empty string")
        count = item.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10**9:
            raise ValueError("workload_attestation_failures[].count must be an integer in [1, 10^9]")
        out.append((reason[:MAX_REASON_LENGTH], _opt_int(item, "uid"), _opt_int(item, "pid"),
                     _opt_int(item, "gid"), count))
    return out


async def record(server: Any, agent: Any, failures: list[Any]) -> None:
    """Agent API edge: fold an agent's report in and write whatever the budget allows.
    `server` provides `clock()`, `ds` and optionally `relay` (to wake it)."""
    items = parse_report(failures)
    now = server.clock()
    agg = aggregator_for(server)
    agent_id = str(agent.agent_id)
    total = 0
    for reason, uid, pid, gid, count in items:
        agg.add(agent_id, reason, now, uid=uid, pid=pid, gid=gid, count=count)
        total += count
    if total:
        telemetry.default_telemetry().record_attestation("workload", "agent", False, n=total)
    await flush(server, now)


async def flush(server: Any, now: float | None = None) -> int:
    """Write pending events whose budget has come back; call it from a periodic tick so
    held-back counts go out even if the agent stops reporting. Returns events written."""
    agg = aggregator_for(server)
    events = agg.unsent + agg.flush(server.clock() if now is None else now)
    agg.unsent = []
    if events:
        try:
            await server.ds.append_events(events)
        except BaseException as exc:
            # agg.flush() has cleared every agent's groups: keep the events for the next
            # flush (the tick's), or a datastore error lost those counts. Not raised to the
            # reporting agent either: it would re-send its report, counted twice then.
            agg.unsent = events[-MAX_UNSENT:]
            if len(events) > MAX_UNSENT:
                log.warning("dropped %d workload attestation failure events the datastore did not "
                            "take", len(events) - MAX_UNSENT)
            if not isinstance(exc, Exception):
                raise
            log.warning("could not record %d workload attestation failure events (%s); retrying at "
                        "the next tick", len(events), exc)
            return 0
        relay = getattr(server, "relay", None)
        if relay is not None:
            relay.notify()
    return len(events)
