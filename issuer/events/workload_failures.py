"""Aggregation and rate bound for agent-reported workload attestation failures.

A misbehaving process can hit the Workload API thousands of times a second; one event
per refusal would flood the outbox and the SOC. Failures are folded per agent into one
group per (reason, caller uid) over a window; each agent yields at most
`max_groups_per_agent` events per window plus one overflow event, and every failure is
counted in some event, so totals stay exact while the event rate is bounded.

Memory is bounded per agent (the group cap); the number of agents is bounded by the
fleet, since only attested agents can report. Pure and clock-free: callers pass times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from issuer.events import ocsf
from issuer.events.model import Event

OVERFLOW_REASON = "various"


@dataclass(slots=True)
class _Group:
    count: int
    first_at: float
    last_at: float
    pid: int | None
    gid: int | None


@dataclass(slots=True)
class _AgentWindow:
    opened_at: float
    groups: dict[tuple[str, int | None], _Group] = field(default_factory=dict)
    overflow_count: int = 0
    overflow_keys: set[tuple[str, int | None]] = field(default_factory=set)
    overflow_first: float = 0.0
    overflow_last: float = 0.0


class WorkloadFailureAggregator:
    def __init__(self, window: float = 60.0, max_groups_per_agent: int = 8,
                 max_overflow_keys: int = 1024) -> None:
        if window <= 0 or max_groups_per_agent < 1:
            raise ValueError("window must be positive and max_groups_per_agent at least 1")
        self.window = window
        self.max_groups_per_agent = max_groups_per_agent
        self.max_overflow_keys = max_overflow_keys  # only for counting distinct folded groups
        self._agents: dict[str, _AgentWindow] = {}
        self.total_failures = 0
        self.total_events = 0

    def add(self, agent_id: str, reason: str, at: float, *, pid: int | None = None, uid: int | None = None,
            gid: int | None = None, count: int = 1) -> None:
        """Record `count` refusals (an agent may report an already-aggregated count)."""
        if count <= 0:
            return
        self.total_failures += count
        win = self._agents.get(agent_id)
        if win is None:
            win = self._agents[agent_id] = _AgentWindow(opened_at=at)
        key = (reason, uid)
        group = win.groups.get(key)
        if group is not None:
            group.count += count
            group.first_at = min(group.first_at, at)
            group.last_at = max(group.last_at, at)
            group.pid, group.gid = pid if pid is not None else group.pid, gid if gid is not None else group.gid
        elif len(win.groups) < self.max_groups_per_agent:
            win.groups[key] = _Group(count, at, at, pid, gid)
        else:
            if win.overflow_count == 0:
                win.overflow_first = win.overflow_last = at
            win.overflow_count += count
            win.overflow_first = min(win.overflow_first, at)
            win.overflow_last = max(win.overflow_last, at)
            if len(win.overflow_keys) < self.max_overflow_keys:
                win.overflow_keys.add(key)

    def pending(self) -> int:
        """Failures recorded but not yet emitted."""
        return sum(g.count for w in self._agents.values() for g in w.groups.values()) + sum(
            w.overflow_count for w in self._agents.values())

    def flush(self, now: float, *, force: bool = False) -> list[Event]:
        """Events for every agent whose window has closed (all agents when `force`)."""
        out: list[Event] = []
        for agent_id in [a for a, w in self._agents.items() if force or now - w.opened_at >= self.window]:
            win = self._agents.pop(agent_id)
            for (reason, uid), g in sorted(win.groups.items(), key=lambda kv: kv[1].first_at):
                out.append(ocsf.workload_attestation_failed(
                    agent_id, reason, g.count, g.first_at, g.last_at, now,
                    caller_pid=g.pid, caller_uid=uid, caller_gid=g.gid))
            if win.overflow_count:
                out.append(ocsf.workload_attestation_failed(
                    agent_id, OVERFLOW_REASON, win.overflow_count, win.overflow_first, win.overflow_last,
                    now, suppressed=len(win.overflow_keys)))
        self.total_events += len(out)
        return out
