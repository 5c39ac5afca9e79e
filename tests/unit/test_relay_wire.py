"""The relay process's parts that need no broker: which relay a server gets, the pipe
protocol's config line, telemetry recording and replay, and log records."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from issuer.config import KafkaSection
from issuer.datastore.factory import open_datastore
from issuer.datastore.sqlite import SqliteDataStore
from issuer.events.relay import KafkaConfig, OutboxRelay
from issuer.events.relay_process import RelayProcess, outbox_relay
from issuer.events.relay_wire import RecordingTelemetry, WorkerSpec, record_from_wire, record_to_wire, replay
from meshid.telemetry import Telemetry

SOURCE = "meshid://example.org/server/unit"
KAFKA = KafkaConfig(("k1:9092", "k2:9092"), enable_idempotence=False, security_protocol="SASL_SSL",
                    sasl_mechanism="SCRAM-SHA-512", sasl_username="meshid", sasl_password="s3cret")


async def test_child_process_by_default_in_process_where_it_cannot_be(ds: SqliteDataStore) -> None:
    assert KafkaSection().relay_process is True
    relay = outbox_relay(ds, "ignored for SQLite", KAFKA, source=SOURCE, owner="s1")
    assert isinstance(relay, RelayProcess) and relay._datastore == str(Path(ds.path).resolve())
    assert isinstance(outbox_relay(ds, "", KAFKA, source=SOURCE, child_process=False), OutboxRelay)
    assert isinstance(outbox_relay(ds, "", None, source=SOURCE), OutboxRelay)  # no broker: backlog only
    memory = await open_datastore("sqlite::memory:")
    try:
        # A second process opening ":memory:" would get a database of its own.
        assert isinstance(outbox_relay(memory, "sqlite::memory:", KAFKA, source=SOURCE), OutboxRelay)
    finally:
        await memory.close()


def test_worker_spec_round_trip_carries_the_secret_on_stdin_only() -> None:
    spec = WorkerSpec("postgresql://db/meshid", KAFKA, SOURCE, "s1", retention=60.0, poll_interval=0.2,
                      log_level=logging.INFO)
    line = spec.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert WorkerSpec.from_line(line) == spec
    assert WorkerSpec.from_line(WorkerSpec("/x.db", KafkaConfig("a:1,b:2"), SOURCE, "s1").to_line()).kafka \
        == KafkaConfig("a:1,b:2")


def test_recorded_telemetry_replays_onto_the_servers() -> None:
    rec = RecordingTelemetry()
    assert rec.drain() is None
    rec.events_published.add(250, {"topic": "t"})  # type: ignore[attr-defined]
    rec.events_published.add(50, {"topic": "t"})  # type: ignore[attr-defined]
    rec.kafka_errors.add(1, {"kind": "connection"})  # type: ignore[attr-defined]
    rec.relay_lag.record(0.01, 299)  # type: ignore[attr-defined]
    rec.relay_lag.record(0.01, 1)  # type: ignore[attr-defined]
    rec.kafka_up.set(1)  # type: ignore[attr-defined]
    rec.outbox_backlog.set(7)  # type: ignore[attr-defined]
    report = rec.drain()
    assert report is not None and rec.drain() is None
    tel = Telemetry()
    replay(tel, report)
    text = tel.render_prometheus()
    assert 'meshid_events_published_total{topic="t"} 300' in text
    assert 'meshid_events_kafka_errors_total{kind="connection"} 1' in text
    assert "meshid_events_relay_lag_seconds_count 300" in text
    assert "meshid_events_kafka_up 1" in text and "meshid_events_outbox_backlog 7" in text
    # A gauge set again to the value already shipped is not news; a new value is.
    rec.kafka_up.set(1)  # type: ignore[attr-defined]
    assert rec.drain() is None
    rec.outbox_backlog.set(0)  # type: ignore[attr-defined]
    assert rec.drain() == {"add": [], "set": {"outbox_backlog": 0}, "record": []}


def test_log_records_keep_logger_level_message_and_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("issuer.events.relay").makeRecord(
            "issuer.events.relay", logging.ERROR, __file__, 1, "Kafka relay: %s (%d)", ("refused", 3),
            sys.exc_info())
    back = record_from_wire(record_to_wire(record, 1000))
    assert back.name == "issuer.events.relay" and back.levelno == logging.ERROR
    assert back.getMessage() == "Kafka relay: refused (3)"
    assert "ValueError: boom" in logging.Formatter().format(back)
    long = logging.makeLogRecord({"msg": "x" * 50})
    assert record_from_wire(record_to_wire(long, 10)).getMessage() == "x" * 10 + "... [40 characters cut]"
