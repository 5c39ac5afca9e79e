"""The detector's rule engine on simulated fleets: normal jittered rotation raises no
alert, and each injected anomaly raises its own alert (and only it)."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from tansu import free_port

from issuer.events import ocsf
from issuer.events.cloudevents import CloudEvent, from_outbox, rfc3339
from issuer.events.detector import Detector, load_state, save_state
from issuer.events.detector_rules import Alert, DetectorConfig, RuleEngine
from issuer.events.model import Event, OutboxRow

TD = "spiffe://fleet.test"
SOURCE = "meshid://fleet.test/server/s1"
T0 = 1_750_000_000.0
TTL = 3600.0
HOUR = 3600.0
AGENTS = 12
PER_AGENT = 30


def agent_id(i: int) -> str:
    return f"{TD}/spire/agent/a{i}"


def workload_id(agent: int, w: int) -> str:
    return f"{TD}/a{agent}/w{w}"


class Stream:
    """Builds CloudEvents as the relay would publish them (one source, increasing seq)."""

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq

    def make(self, event: Event) -> CloudEvent:
        self.seq += 1
        return from_outbox(OutboxRow(self.seq, event), SOURCE)

    def issued(self, t: float, sid: str, agent: str, reason: str = "scheduled", parent: str | None = None,
               not_before: float | None = None) -> CloudEvent:
        parent = parent or agent
        unmapped = {"spiffe_id": sid, "agent_id": agent, "parent_id": parent, "entry_id": f"e-{sid}",
                    "selectors": ["unix:uid:1000"], "rotation_reason": reason,
                    "not_before": rfc3339(t if not_before is None else not_before),
                    "not_after": rfc3339(t + TTL)}
        return self.make(Event(ocsf.X509_ISSUED, sid, sid, t, {"class_uid": 3002, "unmapped": unmapped}))

    def other(self, type_: str, t: float, subject: str, **unmapped: object) -> CloudEvent:
        return self.make(Event(type_, subject, subject, t, {"unmapped": dict(unmapped)}))


def fleet(seed: int, stream: Stream, agents: int = AGENTS, per_agent: int = PER_AGENT, hours: float = 5.0,
          a: float = 0.5, b: float = 0.8) -> list[CloudEvent]:
    """Every agent attests at T0 and issues all its SVIDs within a minute; renewals then
    follow meshid's policy (stationary start, u ~ U[a, b] drawn once per SVID)."""
    rng = random.Random(seed)
    out: list[tuple[float, str, str, str]] = []
    horizon = T0 + hours * HOUR
    for i in range(agents):
        for w in range(per_agent):
            t = T0 + rng.uniform(1, 60)
            out.append((t, workload_id(i, w), agent_id(i), "initial"))
            # Stationary residual life: X with density ~ x on [aL, bL], renew at V * X.
            x = math.sqrt((a * TTL) ** 2 + rng.random() * ((b * TTL) ** 2 - (a * TTL) ** 2))
            t += rng.random() * x
            while t < horizon:
                out.append((t, workload_id(i, w), agent_id(i), "scheduled"))
                t += rng.uniform(a, b) * TTL
    events = [stream.other(ocsf.NODE_ATTESTED, T0, agent_id(i), agent_id=agent_id(i)) for i in range(agents)]
    events += [stream.issued(t, sid, agent, reason) for t, sid, agent, reason in sorted(out)]
    return events


@functools.cache
def base_fleet(seed: int) -> tuple[CloudEvent, ...]:
    return tuple(fleet(seed, Stream()))


def with_extra(seed: int, make: Callable[[Stream], list[CloudEvent]]) -> list[CloudEvent]:
    """The seed's fleet plus extra events (ids after the fleet's), in time order."""
    base = base_fleet(seed)
    return merged(list(base), make(Stream(seq=10 * len(base))))


def run(engine: RuleEngine, events: list[CloudEvent]) -> list[Alert]:
    return [alert for ev in events for alert in engine.feed(ev)]


def merged(base: list[CloudEvent], extra: list[CloudEvent]) -> list[CloudEvent]:
    return sorted(base + extra, key=lambda e: e.timestamp)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_normal_fleet_raises_nothing(seed: int) -> None:
    events = list(base_fleet(seed))
    engine = RuleEngine()
    alerts = run(engine, events)
    assert alerts == [], [a.message for a in alerts[:5]]
    assert engine.events == len(events) > 2000


def test_fixed_half_life_fleet_restart_is_also_quiet_after_warmup() -> None:
    # A narrow window (the storm-prone policy) still must not look like an attack.
    events = fleet(7, Stream(), a=0.49, b=0.51)
    assert run(RuleEngine(), events) == []


AT = T0 + 4 * HOUR  # well after warm-up and learning


def _anomaly(name: str, s: Stream) -> list[CloudEvent]:
    if name == "burst":
        return [s.issued(AT + i * 0.5, workload_id(3, i % PER_AGENT), agent_id(3)) for i in range(100)]
    if name == "new_identity":
        return [s.issued(AT, f"{TD}/evil/backdoor", agent_id(5))]
    if name == "unexpected_node":
        return [s.issued(AT, workload_id(1, 0), agent_id(7))]
    if name == "node_failures":
        return [s.other(ocsf.NODE_ATTESTATION_FAILED, AT + i * 5, "node-attestation:x509pop:10.0.0.66",
                        attestor="x509pop", reason="bad signature", src_ip="10.0.0.66") for i in range(15)]
    if name == "workload_failures":
        return [s.other(ocsf.WORKLOAD_ATTESTATION_FAILED, AT, agent_id(2), agent_id=agent_id(2),
                        reason="no matching entry", count=25)]
    if name == "clock_skew":
        return [s.issued(AT, workload_id(1, 1), agent_id(1), not_before=AT + HOUR)]
    if name == "ca_taint":
        return [s.other(ocsf.CA_TAINTED, AT, "ca-key-old", ca_key_id="ca-key-old", ca_kind="x509")]
    raise AssertionError(name)


@pytest.mark.parametrize(("anomaly", "rule", "key"), [
    ("burst", "issuance_burst", agent_id(3)),
    ("new_identity", "new_identity", f"{TD}/evil/backdoor"),
    ("unexpected_node", "unexpected_node", workload_id(1, 0)),
    ("node_failures", "attestation_failures", "node-attestation:x509pop:10.0.0.66"),
    ("workload_failures", "attestation_failures", agent_id(2)),
    ("clock_skew", "clock_skew", workload_id(1, 1)),
    ("ca_taint", "ca_event", "ca-key-old"),
])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_each_anomaly_yields_its_alert(seed: int, anomaly: str, rule: str, key: str) -> None:
    alerts = run(RuleEngine(), with_extra(seed, lambda s: _anomaly(anomaly, s)))
    assert [(a.rule, a.key) for a in alerts] == [(rule, key)], [a.message for a in alerts]
    alert = alerts[0]
    assert abs(alert.time - AT) < 120
    out = alert.to_cloudevent("meshid://fleet.test/detector/d1")
    assert out.type == f"io.meshid.alert.{rule}" and out.subject == key and out.partitionkey == key
    assert out.data["class_uid"] == 2004 and out.data["finding_info"]["types"] == [rule]
    assert out.id == alert.alert_id("meshid://fleet.test/detector/d1")  # deterministic
    json.dumps(out.to_dict())


def test_rotation_explained_by_ca_events_is_not_a_burst() -> None:
    def taint(s: Stream) -> list[CloudEvent]:
        # Every SVID of agent 3 re-issued within a minute, marked as such.
        out = [s.other(ocsf.CA_TAINTED, AT, "ca-old", ca_key_id="ca-old", ca_kind="x509")]
        return out + [s.issued(AT + 1 + i * 0.5, workload_id(3, i % PER_AGENT), agent_id(3), reason="tainted")
                      for i in range(120)]

    assert [a.rule for a in run(RuleEngine(), with_extra(21, taint))] == ["ca_event"]

    def activation(s: Stream) -> list[CloudEvent]:
        # After a CA activation, even unexplained re-issuance is not alerted for a while.
        out = [s.other(ocsf.CA_ACTIVATED, AT, "ca-new", ca_key_id="ca-new")]
        return out + [s.issued(AT + 1 + i * 0.5, workload_id(3, i % PER_AGENT), agent_id(3))
                      for i in range(120)]

    assert run(RuleEngine(), with_extra(21, activation)) == []

    def agent_restart(s: Stream) -> list[CloudEvent]:
        # Nor an agent's restart: it attests again and re-issues everything it serves.
        out = [s.other(ocsf.NODE_ATTESTED, AT, agent_id(3), agent_id=agent_id(3))]
        return out + [s.issued(AT + 1 + i * 0.5, workload_id(3, i % PER_AGENT), agent_id(3), reason="initial")
                      for i in range(120)]

    assert run(RuleEngine(), with_extra(21, agent_restart)) == []


def test_alerts_are_rate_limited_per_key() -> None:
    def storm(s: Stream) -> list[CloudEvent]:
        return [s.issued(AT + i * 0.2, workload_id(3, i % PER_AGENT), agent_id(3)) for i in range(600)]

    alerts = run(RuleEngine(), with_extra(31, storm))
    keys = [a.key for a in alerts]
    # One alert for the agent, one per identity renewed 20 times in two minutes; no repeats.
    assert {a.rule for a in alerts} == {"issuance_burst"} and len(keys) == len(set(keys)) == 1 + PER_AGENT
    assert agent_id(3) in keys


def test_duplicates_are_dropped() -> None:
    s = Stream()
    events = fleet(41, s, agents=2, per_agent=5, hours=1)
    engine = RuleEngine()
    run(engine, events)
    again = events[: len(events) // 2]
    assert run(engine, again) == [] and engine.duplicates == len(again) > 10


def _split_run(events: list[CloudEvent], tmp_path: Path) -> list[Alert]:
    half = len(events) // 2
    first = RuleEngine()
    alerts = run(first, events[:half])
    path = tmp_path / "state.json"
    save_state(path, first.to_state())
    second = load_state(path, DetectorConfig())
    return alerts + run(second, events[half:])


def test_hostile_field_types_do_not_break_the_rules() -> None:
    # An attestation failure count of 1e999 (inf) or 10**400 made int(total) / float(count)
    # raise; selectors that were a number were iterated.
    s = Stream()
    engine = RuleEngine(DetectorConfig(learning_period=0, attestation_threshold=0))
    events = [s.other(ocsf.WORKLOAD_ATTESTATION_FAILED, T0, agent_id(0), count=math.inf),
              s.other(ocsf.WORKLOAD_ATTESTATION_FAILED, T0 + 1000, agent_id(1), count=10**400),
              s.other(ocsf.X509_ISSUED, T0, workload_id(0, 0), spiffe_id=workload_id(0, 0),
                      agent_id=agent_id(0), selectors=5)]
    alerts = run(engine, events)
    assert sorted(a.rule for a in alerts) == ["attestation_failures", "attestation_failures", "new_identity"]
    for a in alerts:
        a.to_cloudevent(SOURCE).to_json()


def test_state_survives_restart(tmp_path: Path) -> None:
    events = with_extra(51, lambda s: _anomaly("burst", s) + _anomaly("new_identity", s)
                        + _anomaly("unexpected_node", s))
    straight = run(RuleEngine(), events)
    assert sorted(a.rule for a in straight) == ["issuance_burst", "new_identity", "unexpected_node"]
    assert _split_run(events, tmp_path) == straight


def test_unreadable_state_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    engine = load_state(path, DetectorConfig())
    assert engine.events == 0 and not path.exists()
    assert len(list(tmp_path.glob("state.json.unreadable-*"))) == 1


def test_real_builder_output_feeds_the_engine() -> None:
    # The engine reads what ocsf.x509_issued writes (not_before from the certificate).
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    nb = dt.datetime.fromtimestamp(T0 - 2 * HOUR, dt.UTC)  # backdated two hours
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(nb).not_valid_after(nb + dt.timedelta(hours=3))
            .sign(key, hashes.SHA256()))
    sid, agent = workload_id(0, 0), agent_id(0)
    ev = ocsf.x509_issued(cert, sid, "e", 0, agent, agent, ["unix:uid:1"], "k", "scheduled", None, T0, True)
    alerts = RuleEngine().feed(from_outbox(OutboxRow(1, ev), SOURCE))
    assert [a.rule for a in alerts] == ["clock_skew"]
    assert alerts[0].details["skew_seconds"] == pytest.approx(-2 * HOUR, abs=1)


def test_config_from_dict() -> None:
    cfg = DetectorConfig.from_dict({"burst_factor": 5.0, "explained_reasons": ["forced"]})
    assert cfg.burst_factor == 5.0 and cfg.explained_reasons == ("forced",)
    with pytest.raises(ValueError):
        DetectorConfig.from_dict({"burst_facto": 5})


def test_detector_settings_from_toml_document() -> None:
    from issuer.events.detector import detector_settings
    from meshid.errors import ConfigError

    kafka, rules = detector_settings(
        {"detector": {"attestation_threshold": 3}, "kafka": {"enable_idempotence": False,
                                                             "security_protocol": "SASL_SSL",
                                                             "sasl_mechanism": "SCRAM-SHA-512",
                                                             "sasl_username": "det",
                                                             "sasl_password_env": "DET_PW"}},
        "k1:9092,k2:9092", "meshid.events", env={"DET_PW": "s3cret"})
    assert rules.attestation_threshold == 3
    assert kafka.servers == ["k1:9092", "k2:9092"] and kafka.sasl_password == "s3cret"
    assert not kafka.enable_idempotence
    assert detector_settings({"burst_factor": 4.0}, "k:1", "t")[1].burst_factor == 4.0
    for bad in ({"kafka": {"linger": 1}}, {"detector": {"nope": 1}}, {"kafka": {"mode": "carrier"}}):
        with pytest.raises(ConfigError):
            detector_settings(bad, "k:1", "t")


async def test_stopping_goes_on_when_the_state_cannot_be_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """stop() raised the OSError of the last save_state; it is logged, and stopping ends."""
    from issuer.events.relay import KafkaConfig

    port = free_port()  # a loopback port nobody listens on: the session keeps failing
    (tmp_path / "file").write_text("")
    detector = Detector(KafkaConfig(f"127.0.0.1:{port}"), state_path=tmp_path / "file" / "state.json")
    await detector.start()
    await asyncio.sleep(0.2)
    await detector.stop()  # does not raise
    # ...and the save was attempted: a task cancelled before it ran would pass the line above.
    assert "could not save its state on stopping" in caplog.text
