"""The reference detector's rules: a pure engine fed CloudEvents in stream order.

No I/O and no wall clock: every decision uses the events' own times, so a recorded
stream replays to the same alerts and unit tests can drive simulated fleets. State
(baselines, identities seen, ...) round-trips through plain JSON for persistence.

Rules (SPEC-EVENTS.md):
- issuance_burst: issuances per agent and per SPIFFE ID over a sliding window, against a
  baseline learnt per key (EWMA of per-window counts). Fires when the window count is
  both > factor x baseline and >= a floor, once the key has a few windows of history.
  Issuances that explain themselves (rotation_reason forced/tainted) are not counted,
  and no burst fires shortly after a CA activation/taint/revocation or after the agent
  itself (re-)attested (an agent start re-issues everything it serves).
- new_identity: a SPIFFE ID issued for the first time (after a learning period).
- unexpected_node: a SPIFFE ID issued through an agent that never held it, when every
  issuance so far was pinned to its node (parent_id == agent_id, or a node-pinning
  selector such as k8s:node-name).
- attestation_failures: node or workload attestation failures (workload events carry a
  count) over a sliding window above a threshold, per agent/source and fleet-wide.
- clock_skew: an SVID's not_before outside +/- cushion of the event time.
- ca_event: any CA key taint or revocation.
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from issuer.events import ocsf
from issuer.events.cloudevents import ID_NAMESPACE, CloudEvent, CloudEventError, parse_rfc3339, rfc3339
from meshid import __version__

ALERT_TYPE_PREFIX = "io.meshid.alert."
RULES = ("issuance_burst", "new_identity", "unexpected_node", "attestation_failures", "clock_skew",
         "ca_event")
STATE_VERSION = 1
_MAX_FAILURE_COUNT = 1e9  # one event's attestation failure count is taken up to this
_BUCKETS = 10  # sliding windows are kept as this many sub-buckets: bounded memory per key


@dataclass
class DetectorConfig:
    burst_window: float = 300.0  # seconds
    burst_factor: float = 3.0
    burst_min_count_agent: int = 30  # never alert below this many issuances per window per agent
    burst_min_count_identity: int = 10  # ... per SPIFFE ID
    baseline_alpha: float = 0.1  # EWMA weight of the newest window
    warmup_windows: int = 6  # windows of history a key needs before it can alert
    explained_reasons: tuple[str, ...] = ("forced", "tainted")
    ca_quiet: float = 1800.0  # no burst alerts this long after a CA activation/taint/revocation
    attest_quiet: float = 600.0  # ... nor for an agent this long after it attested
    learning_period: float = 3600.0  # new_identity/unexpected_node silent while learning the fleet
    node_pin_selectors: tuple[str, ...] = ("k8s:node-name:", "k8s_psat:agent_node_name:")
    attestation_window: float = 300.0
    attestation_threshold: int = 10  # failures per agent / source per window
    attestation_threshold_global: int = 50  # node attestation failures fleet-wide per window
    clock_skew_cushion: float = 120.0
    cooldown: float = 900.0  # one alert per (rule, key) per cooldown
    max_keys: int = 200_000  # rate keys and identities kept (least recently seen evicted)
    max_holders: int = 16  # agents remembered per SPIFFE ID
    dedup_ids: int = 50_000  # recent CloudEvent ids remembered to drop re-sent events
    # Agent SVIDs (issued at node attestation) are covered by node events; join-token agent
    # IDs are new at every attestation, so identity rules would only add noise.
    identity_rules_for_agents: bool = False

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DetectorConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(doc) - names
        if unknown:
            raise ValueError(f"unknown detector settings: {', '.join(sorted(unknown))}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()}
        return cls(**kw)


@dataclass(frozen=True)
class Alert:
    rule: str
    key: str  # what it is about: an agent ID, a SPIFFE ID, a CA key ID, an attestation source
    time: float  # the triggering event's time
    severity: ocsf.Severity
    message: str
    cause_id: str  # CloudEvent id of the triggering event
    cause_source: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return ALERT_TYPE_PREFIX + self.rule

    def alert_id(self, source: str) -> str:
        # Deterministic: a detector replaying the same events re-emits the same ids.
        name = f"{source}|{self.rule}|{self.key}|{self.cause_source}|{self.cause_id}"
        return str(uuid.uuid5(ID_NAMESPACE, name))

    def to_cloudevent(self, source: str) -> CloudEvent:
        """As an OCSF Detection Finding (class 2004, activity 1 Create)."""
        data: dict[str, Any] = {
            "class_uid": 2004,
            "class_name": "Detection Finding",
            "category_uid": 2,
            "category_name": "Findings",
            "activity_id": 1,
            "activity_name": "Create",
            "type_uid": 200401,
            "type_name": "Detection Finding: Create",
            "severity_id": int(self.severity),
            "severity": self.severity.name.title(),
            "status_id": 1,
            "status": "New",
            "time": round(self.time * 1000),
            "message": self.message,
            "metadata": {"product": {"name": "meshid", "vendor_name": "meshid", "version": __version__},
                         "version": ocsf.OCSF_SCHEMA_VERSION, "uid": self.alert_id(source)},
            "finding_info": {"uid": self.alert_id(source), "title": self.message, "types": [self.rule],
                             "related_events": [{"uid": self.cause_id}]},
            "unmapped": {"rule": self.rule, "key": self.key, **self.details},
        }
        return CloudEvent(id=self.alert_id(source), source=source, type=self.type, subject=self.key,
                          time=rfc3339(self.time), partitionkey=self.key, data=data)


class _Sliding:
    """Counts over a sliding window, kept as _BUCKETS sub-buckets."""

    __slots__ = ("buckets", "width")

    def __init__(self, window: float, buckets: list[list[float]] | None = None) -> None:
        self.width = window / _BUCKETS
        self.buckets: list[list[float]] = buckets or []  # [bucket index, count], ascending

    def add(self, t: float, n: float) -> None:
        idx = math.floor(t / self.width)
        if self.buckets and self.buckets[-1][0] >= idx:
            # Slightly late events (other partitions) count in the newest bucket.
            self.buckets[-1][1] += n
        else:
            self.buckets.append([idx, n])

    def total(self, t: float) -> float:
        floor_idx = math.floor(t / self.width) - _BUCKETS
        while self.buckets and self.buckets[0][0] <= floor_idx:
            self.buckets.pop(0)
        return sum(b[1] for b in self.buckets)


@dataclass
class _Rate:
    """Issuance rate of one key: sliding count, and the EWMA baseline of window counts."""

    win: int = -1  # current tumbling window index
    count: float = 0.0  # issuances in the current tumbling window
    baseline: float | None = None
    windows: int = 0  # completed windows that fed the baseline
    skip_first: bool = True
    sliding: list[list[float]] = field(default_factory=list)

    def observe(self, t: float, window: float, alpha: float) -> None:
        k = math.floor(t / window)
        if self.win < 0:
            self.win = k
        elif k > self.win:
            if self.skip_first:
                # The first window is partial, and at a fleet's start it holds the initial
                # issuance of everything: learning from it would blunt the rule for hours.
                self.skip_first = False
            else:
                self.baseline = self.count if self.baseline is None else (
                    alpha * self.count + (1 - alpha) * self.baseline)
                self.windows += 1
            gap = min(k - self.win - 1, 10_000)
            if gap > 0:
                self.baseline = (self.baseline or 0.0) * (1 - alpha) ** gap  # quiet windows are zeros
                self.windows += gap
            self.win, self.count = k, 0.0
        self.count += 1


@dataclass
class _Identity:
    agents: list[str] = field(default_factory=list)  # most recent last
    pinned: bool = True  # every issuance so far was pinned to its node
    first_seen: float = 0.0


def _unmapped(ce: CloudEvent) -> dict[str, Any]:
    u = ce.data.get("unmapped")
    return u if isinstance(u, dict) else {}


class RuleEngine:
    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.first_time: float | None = None
        self.clock = 0.0  # latest event time seen
        self.ca_quiet_until = 0.0
        self.agent_quiet_until: OrderedDict[str, float] = OrderedDict()
        self.rates: OrderedDict[str, _Rate] = OrderedDict()
        self.identities: OrderedDict[str, _Identity] = OrderedDict()
        self.failures: OrderedDict[str, _Sliding] = OrderedDict()
        self.cooldowns: dict[str, float] = {}
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.events = 0
        self.duplicates = 0

    # --- feeding --------------------------------------------------------------------------

    def feed(self, ce: CloudEvent) -> list[Alert]:
        dedup_key = f"{ce.source}|{ce.id}"
        if dedup_key in self.seen:
            self.duplicates += 1
            return []
        self.seen[dedup_key] = None
        if len(self.seen) > self.config.dedup_ids:
            self.seen.popitem(last=False)
        try:
            t = ce.timestamp
        except CloudEventError:
            return []
        self.events += 1
        if self.first_time is None:
            self.first_time = t
        self.clock = max(self.clock, t)
        alerts: list[Alert] = []
        kind = ce.type
        if kind in ocsf.ISSUED_TYPES:
            alerts += self._issued(ce, t)
        elif kind in (ocsf.NODE_ATTESTATION_FAILED, ocsf.WORKLOAD_ATTESTATION_FAILED):
            alerts += self._attestation_failed(ce, t)
        elif kind == ocsf.NODE_ATTESTED:
            agent = str(_unmapped(ce).get("agent_id") or ce.subject)
            self._lru_put(self.agent_quiet_until, agent, t + self.config.attest_quiet)
        elif kind in (ocsf.CA_ACTIVATED, ocsf.CA_TAINTED, ocsf.CA_REVOKED):
            self.ca_quiet_until = max(self.ca_quiet_until, t + self.config.ca_quiet)
            if kind != ocsf.CA_ACTIVATED:
                act = "tainted" if kind == ocsf.CA_TAINTED else "revoked"
                sev = ocsf.Severity.HIGH if act == "tainted" else ocsf.Severity.MEDIUM
                alerts.append(Alert("ca_event", ce.subject, t, sev, f"CA key {ce.subject} {act}", ce.id,
                                    ce.source, {"ca_key_id": ce.subject, "act": act,
                                     "ca_kind": _unmapped(ce).get("ca_kind")}))
        if len(self.cooldowns) > 4 * self.config.max_keys:
            self.cooldowns = {k: v for k, v in self.cooldowns.items() if v > self.clock}
        return alerts

    def _issued(self, ce: CloudEvent, t: float) -> list[Alert]:
        cfg = self.config
        u = _unmapped(ce)
        sid = str(u.get("spiffe_id") or ce.subject)
        agent = str(u.get("agent_id") or "")
        parent = str(u.get("parent_id") or "")
        raw_selectors = u.get("selectors")
        selectors = [str(s) for s in raw_selectors] if isinstance(raw_selectors, list) else []
        alerts: list[Alert] = []
        learning = self.first_time is not None and t < self.first_time + cfg.learning_period

        # clock_skew
        nb_text = u.get("not_before")
        if isinstance(nb_text, str):
            try:
                skew = parse_rfc3339(nb_text) - t
            except CloudEventError:
                skew = 0.0
            if abs(skew) > cfg.clock_skew_cushion and self._cool("clock_skew", sid, t):
                alerts.append(Alert("clock_skew", sid, t, ocsf.Severity.MEDIUM,
                                    f"{sid}: not_before is {skew:+.0f}s from the issuance time",
                                    ce.id, ce.source,
                                    {"spiffe_id": sid, "agent_id": agent, "skew_seconds": round(skew, 3),
                                     "not_before": nb_text, "cushion_seconds": cfg.clock_skew_cushion}))

        if sid == agent and not cfg.identity_rules_for_agents:
            return alerts
        # new_identity / unexpected_node
        pinned_now = bool(agent) and (parent == agent or any(
            s.startswith(p) for s in selectors for p in cfg.node_pin_selectors))
        ident = self.identities.get(sid)
        if ident is None:
            ident = _Identity(agents=[agent] if agent else [], pinned=pinned_now, first_seen=t)
            self._lru_put(self.identities, sid, ident)
            if not learning:
                alerts.append(Alert("new_identity", sid, t, ocsf.Severity.LOW,
                                    f"first issuance of {sid} (via {agent or 'unknown agent'})",
                                    ce.id, ce.source,
                                    {"spiffe_id": sid, "agent_id": agent, "parent_id": parent,
                                     "entry_id": u.get("entry_id"), "selectors": selectors}))
        else:
            self.identities.move_to_end(sid)
            if agent and agent not in ident.agents:
                if ident.pinned and ident.agents and not learning:
                    alerts.append(Alert("unexpected_node", sid, t, ocsf.Severity.HIGH,
                                        f"{sid} issued through {agent}, which never held it "
                                        f"(pinned to {', '.join(ident.agents[-3:])})", ce.id, ce.source,
                                        {"spiffe_id": sid, "agent_id": agent, "parent_id": parent,
                                         "previous_agents": ident.agents[-cfg.max_holders:],
                                         "entry_id": u.get("entry_id")}))
                ident.agents.append(agent)
                del ident.agents[:-cfg.max_holders]
            elif agent:
                ident.agents.remove(agent)
                ident.agents.append(agent)
            ident.pinned = ident.pinned and pinned_now

        # issuance_burst
        if u.get("rotation_reason") not in cfg.explained_reasons:
            suppressed = t < self.ca_quiet_until or t < self.agent_quiet_until.get(agent, 0.0)
            for scope, key, floor in (("agent", agent, cfg.burst_min_count_agent),
                                      ("identity", sid, cfg.burst_min_count_identity)):
                if not key:
                    continue
                alert = self._burst(scope, key, floor, t, suppressed, ce)
                if alert is not None:
                    alerts.append(alert)
        return alerts

    def _burst(self, scope: str, key: str, floor: int, t: float, suppressed: bool,
               ce: CloudEvent) -> Alert | None:
        cfg = self.config
        rkey = f"{scope}:{key}"
        rate = self.rates.get(rkey)
        if rate is None:
            rate = _Rate()
            self._lru_put(self.rates, rkey, rate)
        else:
            self.rates.move_to_end(rkey)
        rate.observe(t, cfg.burst_window, cfg.baseline_alpha)
        sliding = _Sliding(cfg.burst_window, rate.sliding)
        sliding.add(t, 1)
        current = sliding.total(t)
        rate.sliding = sliding.buckets
        if suppressed or rate.windows < cfg.warmup_windows or rate.baseline is None:
            return None
        threshold = max(float(floor), cfg.burst_factor * rate.baseline)
        if current < threshold or not self._cool("issuance_burst", rkey, t):
            return None
        return Alert("issuance_burst", key, t, ocsf.Severity.HIGH,
                     f"{int(current)} issuances for {scope} {key} in {cfg.burst_window:.0f}s "
                     f"(baseline {rate.baseline:.1f})", ce.id, ce.source,
                     {"scope": scope, "count": int(current), "baseline": round(rate.baseline, 3),
                      "window_seconds": cfg.burst_window, "factor": cfg.burst_factor})

    def _attestation_failed(self, ce: CloudEvent, t: float) -> list[Alert]:
        cfg = self.config
        u = _unmapped(ce)
        count = u.get("count", 1)
        # Capped: 1e999 parses as inf and a huge int overflows float(); either broke int(total).
        n = float(min(count, _MAX_FAILURE_COUNT)) if isinstance(count, int | float) and count > 0 else 1.0
        workload = ce.type == ocsf.WORKLOAD_ATTESTATION_FAILED
        key = f"{'workload' if workload else 'node'}:{ce.partitionkey or ce.subject}"
        checks = [(key, cfg.attestation_threshold)]
        if not workload:
            checks.append(("node:*", cfg.attestation_threshold_global))
        alerts = []
        for k, threshold in checks:
            sl = self.failures.get(k)
            if sl is None:
                sl = _Sliding(cfg.attestation_window)
                self._lru_put(self.failures, k, sl)
            else:
                self.failures.move_to_end(k)
            sl.add(t, n)
            total = sl.total(t)
            if total > threshold and self._cool("attestation_failures", k, t):
                what = "workload" if workload else "node"
                scope = "fleet-wide" if k == "node:*" else (ce.partitionkey or ce.subject)
                subject = k if k == "node:*" else k.split(":", 1)[1]
                window = cfg.attestation_window
                alerts.append(Alert("attestation_failures", subject, t, ocsf.Severity.HIGH,
                                    f"{int(total)} {what} attestation failures in {window:.0f}s ({scope})",
                                    ce.id, ce.source,
                                    {"kind": what, "count": int(total), "threshold": threshold,
                                     "window_seconds": cfg.attestation_window,
                                     "last_reason": u.get("reason"), "agent_id": u.get("agent_id"),
                                     "src_ip": u.get("src_ip")}))
        return alerts

    # --- helpers ----------------------------------------------------------------------------

    def _cool(self, rule: str, key: str, t: float) -> bool:
        """True (and start the cooldown) if (rule, key) may alert at t."""
        ck = f"{rule}|{key}"
        if t < self.cooldowns.get(ck, -math.inf):
            return False
        self.cooldowns[ck] = t + self.config.cooldown
        return True

    def _lru_put(self, d: OrderedDict[str, Any], key: str, value: Any) -> None:
        d[key] = value
        d.move_to_end(key)
        while len(d) > self.config.max_keys:
            d.popitem(last=False)

    # --- persistence ------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "first_time": self.first_time,
            "clock": self.clock,
            "ca_quiet_until": self.ca_quiet_until,
            "agent_quiet_until": list(self.agent_quiet_until.items()),
            "rates": [[k, asdict(v)] for k, v in self.rates.items()],
            "identities": [[k, asdict(v)] for k, v in self.identities.items()],
            "failures": [[k, [list(b) for b in v.buckets]] for k, v in self.failures.items()],
            "cooldowns": {k: v for k, v in self.cooldowns.items() if v > self.clock},
            "seen": list(self.seen)[-self.config.dedup_ids:],
        }

    @classmethod
    def from_state(cls, config: DetectorConfig, state: dict[str, Any]) -> RuleEngine:
        eng = cls(config)
        if not state:
            return eng
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"detector state version {state.get('version')!r} is not {STATE_VERSION}")
        eng.first_time = state.get("first_time")
        eng.clock = float(state.get("clock", 0.0))
        eng.ca_quiet_until = float(state.get("ca_quiet_until", 0.0))
        eng.agent_quiet_until = OrderedDict((k, float(v)) for k, v in state.get("agent_quiet_until", []))
        eng.rates = OrderedDict((k, _Rate(**v)) for k, v in state.get("rates", []))
        eng.identities = OrderedDict((k, _Identity(**v)) for k, v in state.get("identities", []))
        eng.failures = OrderedDict((k, _Sliding(config.attestation_window, b))
                                   for k, b in state.get("failures", []))
        eng.cooldowns = {k: float(v) for k, v in state.get("cooldowns", {}).items()}
        eng.seen = OrderedDict((k, None) for k in state.get("seen", []))
        return eng
