"""The outbox relay against a real Kafka-protocol broker (Tansu): events written to a
real SQLite outbox reach a plain aiokafka consumer, once each after dedup on id and in
per-key order, through broker freezes and restarts; a broker refusing the idempotent
producer is reported; the detector consumes the stream and publishes alerts."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from tansu import TansuBroker, free_port, tansu_broker  # noqa: F401  (registers the `tansu` fixture)
from waiting import wait_for

from issuer.datastore.sqlite import SqliteDataStore
from issuer.events import ocsf
from issuer.events.cloudevents import STRUCTURED_CONTENT_TYPE, CloudEvent, event_id, from_kafka
from issuer.events.detector import Detector
from issuer.events.detector_rules import DetectorConfig
from issuer.events.model import Event
from issuer.events.relay import KafkaConfig, OutboxRelay, iter_outbox, tail_outbox
from issuer.events.relay_process import RelayProcess
from meshid.telemetry import Telemetry

pytestmark = pytest.mark.integration

SOURCE = "meshid://example.org/server/relay-test"
TOPIC = "meshid.events"
PARTITIONS = 6
KEYS = [f"spiffe://example.org/w{i}" for i in range(10)]


def kafka(broker: TansuBroker, **kw: Any) -> KafkaConfig:
    base: dict[str, Any] = {"enable_idempotence": False, "auto_create_topics": True,
                            "topic_partitions": PARTITIONS, "request_timeout": 2.0, "batch_size": 50}
    base.update(kw)
    return KafkaConfig(broker.bootstrap, **base)


def relay_for(ds: SqliteDataStore, cfg: KafkaConfig, telemetry: Telemetry | None = None,
              **kw: Any) -> OutboxRelay:
    return OutboxRelay(ds, cfg, source=SOURCE, telemetry=telemetry or Telemetry(), poll_interval=0.05,
                       backoff_base=0.05, backoff_cap=0.5, **kw)


class Appender:
    """Writes test events to the outbox: per key a counter `n`, and a unique `uid`."""

    def __init__(self, ds: SqliteDataStore, relay: OutboxRelay | RelayProcess | None = None) -> None:
        self.ds, self.relay = ds, relay
        self.counters: dict[str, int] = defaultdict(int)
        self.uids: list[str] = []

    async def append(self, n: int) -> None:
        events = []
        for _ in range(n):
            key = KEYS[len(self.uids) % len(KEYS)]
            self.counters[key] += 1
            uid = f"{key}#{self.counters[key]}"
            self.uids.append(uid)
            events.append(Event("io.meshid.test.appended", key, key, time.time(),
                                {"key": key, "n": self.counters[key], "uid": uid}))
        await self.ds.append_events(events)
        if self.relay is not None:
            self.relay.notify()


@dataclass
class Collector:
    """A plain consumer assigned to every partition, running across the whole test."""

    consumer: AIOKafkaConsumer
    records: list[tuple[CloudEvent, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100)
            for recs in batches.values():
                for rec in recs:
                    self.records.append((from_kafka(rec.value, rec.headers), rec))

    def uids(self) -> set[str]:
        return {ev.data["uid"] for ev, _ in self.records}

    def check_exactly_once_in_order(self, expected: list[str]) -> int:
        """After dedup on id, every expected uid once, per-key in order; returns duplicates."""
        first: dict[str, CloudEvent] = {}
        per_key: dict[str, list[int]] = defaultdict(list)
        duplicates = 0
        for ev, rec in self.records:
            if ev.id in first:
                duplicates += 1
                assert first[ev.id].data == ev.data  # a re-sent event is the same event
                continue
            first[ev.id] = ev
            assert rec.key == ev.partitionkey.encode() == ev.data["key"].encode()
            per_key[ev.data["key"]].append(ev.data["n"])
        assert sorted(ev.data["uid"] for ev in first.values()) == sorted(expected)
        for key, ns in per_key.items():
            assert ns == sorted(ns), f"{key} out of order: {ns}"
        return duplicates


@contextlib.asynccontextmanager
async def collector(broker: TansuBroker) -> AsyncIterator[Collector]:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, request_timeout_ms=5000, retry_backoff_ms=50)
    await consumer.start()
    consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
    col = Collector(consumer)
    col.task = asyncio.create_task(col._loop())
    try:
        yield col
    finally:
        col.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await col.task
        await consumer.stop()


async def started(relay: OutboxRelay) -> OutboxRelay:
    await relay.start()
    await wait_for(lambda: relay.status()["kafka"] == "ok", 10, "the relay to connect")
    return relay


def metric_value(telemetry: Telemetry, name: str, **attrs: str) -> float:
    total = 0.0
    for metric in telemetry.collect():
        if metric.name == name:
            for point in metric.data.data_points:
                if all((point.attributes or {}).get(k) == v for k, v in attrs.items()):
                    total += getattr(point, "value", 0)
    return total


# --- tests ---------------------------------------------------------------------------------------


async def test_publishes_in_order_and_prunes(tansu: TansuBroker, ds: SqliteDataStore, tmp_path: Path) -> None:
    appender = Appender(ds)
    await appender.append(300)
    tel = Telemetry()
    relay = relay_for(ds, kafka(tansu), tel, retention=0.2)
    relay._prune_interval = 0.1  # prune soon after delivery, to see it happen
    await started(relay)
    try:
        async with collector(tansu) as col:
            await wait_for(lambda: len(col.uids()) == 300, 15, "300 events")
            assert col.check_exactly_once_in_order(appender.uids) == 0
            ids = sorted(ev.id for ev, _ in col.records)
            assert ids == sorted(event_id(SOURCE, seq) for seq in range(1, 301))  # deterministic ids
            ev, rec = col.records[0]
            assert dict(rec.headers)["content-type"] == STRUCTURED_CONTENT_TYPE.encode()
            assert ev.source == SOURCE and ev.type == "io.meshid.test.appended"
        await wait_for(lambda: relay.status()["backlog"] == 0, 5, "backlog 0")
        assert await ds.fetch_outbox(0, 10) == []
        assert metric_value(tel, "meshid.events.published") == 300
        assert "meshid_events_relay_lag_seconds_count 300" in tel.render_prometheus()

        def remaining() -> int:
            with sqlite3.connect(tmp_path / "meshid.sqlite3") as conn:
                return sum(int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                           for t in ("outbox", "outbox_state"))

        await wait_for(lambda: remaining() == 0, 5, "delivered rows to be pruned")
    finally:
        await relay.stop()


async def test_binary_mode(tansu: TansuBroker, ds: SqliteDataStore) -> None:
    appender = Appender(ds)
    await appender.append(20)
    relay = await started(relay_for(ds, kafka(tansu, mode="binary")))
    try:
        async with collector(tansu) as col:
            await wait_for(lambda: len(col.uids()) == 20, 10, "20 events")
            col.check_exactly_once_in_order(appender.uids)
            ev, rec = col.records[0]
            headers = dict(rec.headers)
            assert headers["ce_specversion"] == b"1.0" and headers["ce_id"] == ev.id.encode()
            assert headers["content-type"] == b"application/json"
            assert ev.data["key"].encode() == rec.key
    finally:
        await relay.stop()


async def test_outage_loses_nothing(tansu: TansuBroker, ds: SqliteDataStore) -> None:
    tel = Telemetry()
    relay = await started(relay_for(ds, kafka(tansu), tel))
    appender = Appender(ds, relay)
    running = asyncio.Event()
    running.set()

    async def keep_appending() -> None:
        while True:
            await running.wait()
            await appender.append(3)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(keep_appending())
    try:
        async with collector(tansu) as col:
            await wait_for(lambda: len(col.uids()) >= 100, 10, "traffic before the freeze")

            # 1. Freeze the broker while events keep coming: requests in flight time out,
            #    the relay backs off and re-sends; the broker keeps its data.
            tansu.pause()
            frozen_at = len(appender.uids)
            await wait_for(lambda: relay.status()["kafka"].startswith("error"), 10, "the relay to notice")
            await wait_for(lambda: len(appender.uids) > frozen_at + 150, 10, "appends during the freeze")
            tansu.resume()
            await wait_for(lambda: col.uids() >= set(appender.uids[: frozen_at + 150]), 20, "catch-up")

            # 2. Kill the broker. Tansu's memory engine restarts empty, so first let the
            #    consumer see everything the broker acknowledged (what it would forget).
            running.clear()
            await asyncio.sleep(0.05)
            await wait_for(lambda: col.uids() == set(appender.uids), 15, "everything before the restart")
            before = len(appender.uids)
            received_before = len(col.records)
            tansu.stop()
            running.set()
            await wait_for(lambda: relay.status()["kafka"].startswith("error"), 10, "the relay to notice")
            await wait_for(lambda: len(appender.uids) > before + 150, 10, "appends during the outage")
            # The gauges are refreshed once a second while publishing fails.
            await wait_for(lambda: relay.status()["backlog"] > 0, 5, "the backlog gauge to show the outage")
            status = relay.status()
            assert "unreachable" in status["kafka"]
            assert status["oldest_pending_age_seconds"] > 0
            tansu.start()
            await wait_for(lambda: relay.status()["kafka"] == "ok", 15, "the relay to reconnect")
            await col.consumer.seek_to_beginning()  # the new broker's logs start at 0 again
            await asyncio.sleep(0.3)
            running.clear()
            await asyncio.sleep(0.05)
            after = set(appender.uids[before:])
            await wait_for(lambda: col.uids() >= after, 20, "everything after the restart")

            duplicates = col.check_exactly_once_in_order(appender.uids)
            print(f"\noutage: appended {len(appender.uids)} events ({before} before the restart, "
                  f"{len(after)} after); consumer got {received_before} records before the restart and "
                  f"{len(col.records) - received_before} after; {duplicates} duplicates dropped by id")
            assert metric_value(tel, "meshid.events.kafka.errors", kind="connection") \
                + metric_value(tel, "meshid.events.kafka.errors", kind="timeout") > 0
            await wait_for(lambda: relay.status()["backlog"] == 0, 5, "backlog 0")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await relay.stop()


async def test_idempotence_refused_is_reported_then_nothing_lost(tansu: TansuBroker,
                                                                 ds: SqliteDataStore) -> None:
    appender = Appender(ds)
    await appender.append(40)
    tel = Telemetry()
    relay = relay_for(ds, kafka(tansu, enable_idempotence=True), tel)
    await relay.start()
    try:
        await wait_for(lambda: relay.status()["kafka"].startswith("error"), 10, "the refusal")
        status = relay.status()
        assert "InitProducerId" in status["kafka"] and "enable_idempotence=false" in status["kafka"]
        assert status["backlog"] == 40 and status["published"] == 0
        assert metric_value(tel, "meshid.events.kafka.errors", kind="idempotence") >= 1
        assert "meshid_events_kafka_up 0" in tel.render_prometheus()
    finally:
        await relay.stop()
    assert len(await ds.fetch_outbox(0, 100)) == 40  # still all there

    relay = await started(relay_for(ds, kafka(tansu, enable_idempotence=False), tel))
    try:
        async with collector(tansu) as col:
            await wait_for(lambda: len(col.uids()) == 40, 10, "40 events")
            assert col.check_exactly_once_in_order(appender.uids) == 0
        assert "meshid_events_kafka_up 1" in tel.render_prometheus()
    finally:
        await relay.stop()


async def test_missing_topic_is_a_clear_error(tansu: TansuBroker, ds: SqliteDataStore) -> None:
    await Appender(ds).append(5)
    relay = relay_for(ds, kafka(tansu, auto_create_topics=False))
    await relay.start()
    try:
        await wait_for(lambda: relay.status()["kafka"].startswith("error"), 10, "the error")
        assert "topic 'meshid.events' does not exist" in relay.status()["kafka"]
        admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
        finally:
            await admin.close()
        await wait_for(lambda: relay.status()["backlog"] == 0, 10, "delivery once the topic exists")
        assert relay.status()["kafka"] == "ok"
    finally:
        await relay.stop()


async def test_tail_outbox(ds: SqliteDataStore) -> None:
    appender = Appender(ds)
    await appender.append(7)
    rows = [row async for row in iter_outbox(ds, batch=3)]
    assert [r.event.data["uid"] for r in rows] == appender.uids
    out = io.StringIO()
    assert await tail_outbox(ds, source=SOURCE, out=out) == 7
    lines = [CloudEvent.from_json(line) for line in out.getvalue().splitlines()]
    assert [ev.id for ev in lines] == [event_id(SOURCE, r.seq) for r in rows]

    seen: list[int] = []

    async def follow() -> None:
        async for row in iter_outbox(ds, follow=True, after_seq=rows[-1].seq, poll_interval=0.05):
            seen.append(row.seq)

    task = asyncio.create_task(follow())
    try:
        await appender.append(2)
        await wait_for(lambda: len(seen) == 2, 5, "followed rows")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_detector_end_to_end(tansu: TansuBroker, ds: SqliteDataStore, tmp_path: Path) -> None:
    now = time.time()
    agent = "spiffe://example.org/spire/agent/a1"
    events = [ocsf.node_attestation_failed("join_token", "unknown token", now + i, trust_domain="example.org",
                                           src_ip="10.9.9.9") for i in range(12)]
    events.append(ocsf.ca_tainted("ca-old", "x509", now + 20, "example.org"))
    events.append(Event(ocsf.X509_ISSUED, KEYS[0], KEYS[0], now + 30, {"unmapped": {
        "spiffe_id": KEYS[0], "agent_id": agent, "parent_id": agent, "not_before": "2001-01-01T00:00:00Z"}}))
    await ds.append_events(events)
    relay = await started(relay_for(ds, kafka(tansu)))
    state = tmp_path / "detector" / "state.json"
    alerts: list[CloudEvent] = []
    detector = Detector(kafka(tansu), rules=DetectorConfig(learning_period=0), state_path=state,
                        save_interval=0.5, on_alert=alerts.append)
    await detector.start()
    consumer = AIOKafkaConsumer("meshid.alerts", bootstrap_servers=tansu.bootstrap,
                                auto_offset_reset="earliest")
    try:
        await wait_for(lambda: len(alerts) >= 4, 30, "the detector's alerts")
        assert sorted(a.type for a in alerts) == sorted([
            "io.meshid.alert.attestation_failures", "io.meshid.alert.ca_event",
            "io.meshid.alert.clock_skew", "io.meshid.alert.new_identity"])
        await consumer.start()
        published: list[CloudEvent] = []

        async def read() -> None:
            while len(published) < 4:
                for recs in (await consumer.getmany(timeout_ms=200)).values():
                    published.extend(from_kafka(r.value, r.headers) for r in recs)

        await asyncio.wait_for(read(), 15)
        assert {a.id for a in published} == {a.id for a in alerts}
        await wait_for(state.exists, 5, "the detector's state file")
    finally:
        await consumer.stop()
        await detector.stop()
        await relay.stop()
    assert detector.status()["consumed"] == len(events)


async def test_detector_skips_hostile_records_and_keeps_going(tansu: TansuBroker, tmp_path: Path) -> None:
    # Anyone who can produce to the events topic used to stall the detector for good: a
    # record it could not decode (a null header, JSON nested past the recursion limit) or
    # feed (a count of 1e999, selectors that are a number) failed the whole session, which
    # rolled back and re-read the same record forever, and no later event was looked at.
    from aiokafka import AIOKafkaProducer

    from issuer.events.cloudevents import from_outbox, to_kafka
    from issuer.events.model import OutboxRow
    from issuer.events.relay import ensure_topic

    cfg = kafka(tansu)
    await ensure_topic(cfg, TOPIC)
    now = time.time()
    good = [Event(ocsf.WORKLOAD_ATTESTATION_FAILED, "spiffe://example.org/spire/agent/a1",
                  "spiffe://example.org/spire/agent/a1", now, {"unmapped": {"count": 1e999}}),
            Event(ocsf.X509_ISSUED, KEYS[1], KEYS[1], now, {"unmapped": {
                "spiffe_id": KEYS[1], "agent_id": "spiffe://example.org/spire/agent/a1", "selectors": 5}}),
            ocsf.ca_tainted("ca-old", "x509", now + 1, "example.org")]
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        key = KEYS[0].encode()
        await producer.send_and_wait(TOPIC, b"{}", key=key, headers=[("ce_specversion", b"1.0"),
                                                                      ("ce_id", None)])
        await producer.send_and_wait(TOPIC, b"[" * 100_000, key=key)
        for i, ev in enumerate(good):
            k, value, headers = to_kafka(from_outbox(OutboxRow(i + 1, ev), SOURCE))
            await producer.send_and_wait(TOPIC, value, key=key, headers=headers)
    finally:
        await producer.stop()
    alerts: list[CloudEvent] = []
    detector = Detector(cfg, rules=DetectorConfig(learning_period=0, attestation_threshold=0),
                        state_path=tmp_path / "state.json", save_interval=0.5, on_alert=alerts.append)
    await detector.start()
    try:
        await wait_for(lambda: any(a.type == "io.meshid.alert.ca_event" for a in alerts), 30,
                       "the alert of the event after the hostile records")
    finally:
        await detector.stop()
    assert detector.status()["undecodable"] == 2
    assert detector.status()["consumed"] == len(good)
    assert detector.status()["state"] == "ok"


async def test_the_backlog_gauge_stays_current_through_a_long_backoff(ds: SqliteDataStore) -> None:
    """During an outage the publishing task waits in backoffs and request timeouts (up to
    30 s each) while events land in the outbox; the backlog status and gauge stood at their
    figure of the last failure meanwhile (seen as backlog 0 with hundreds waiting)."""
    tel = Telemetry()
    nobody = KafkaConfig(f"127.0.0.1:{free_port()}", topic=TOPIC, request_timeout=2.0)
    relay = OutboxRelay(ds, nobody, source=SOURCE, telemetry=tel, poll_interval=0.05,
                        backoff_base=60.0, backoff_cap=60.0)
    await relay.start()
    try:
        await wait_for(lambda: relay.status()["kafka"].startswith("error"), 15, "the relay to fail")
        assert relay.status()["backlog"] == 0
        await Appender(ds, relay).append(25)  # while the relay waits out a backoff of up to 60 s
        await wait_for(lambda: relay.status()["backlog"] == 25, 5, "the backlog to show the new events")
    finally:
        await asyncio.wait_for(relay.stop(), 10)
    assert not relay.running


async def test_stop_is_prompt_even_when_notified_at_the_same_moment(ds: SqliteDataStore) -> None:
    # A notify() landing as stop() cancels used to be swallowed by asyncio.wait_for (3.11),
    # leaving stop() waiting forever for a task that kept running.
    relay = OutboxRelay(ds, None, source=SOURCE, telemetry=Telemetry(), poll_interval=0.001)
    for _ in range(300):
        await relay.start()
        await asyncio.sleep(0.002)
        relay.notify()
        await asyncio.wait_for(relay.stop(), 5)
        assert not relay.running


async def test_a_clean_stop_hands_claimed_rows_to_other_relays_at_once(tansu: TansuBroker,
                                                                      ds: SqliteDataStore) -> None:
    """Rows a stopping relay had claimed but not seen acknowledged (here: the broker froze
    mid-publish) go back to the pool on stop(), rather than wait out the lease (30 s and
    more), so another replica's relay takes them on the spot."""
    relay = await started(relay_for(ds, kafka(tansu)))
    try:
        await wait_for(lambda: relay.status()["kafka"] == "ok", 15, "the relay to connect")
        tansu.pause()
        await Appender(ds, relay).append(20)

        def claimed() -> int:
            with contextlib.closing(sqlite3.connect(ds.path)) as conn:
                return int(conn.execute("SELECT COUNT(*) FROM outbox_state WHERE claimed_by IS NOT NULL"
                                        " AND delivered_at IS NULL").fetchone()[0])

        # Leased to the stopping relay: nobody else may take them. (A fixed 0.3 s wait here
        # let "other" claim them first on a loaded machine, before the relay's round ran.)
        await wait_for(lambda: claimed() == 20, 10, "the relay to claim the rows")
        assert await ds.claim_outbox("other", limit=100, lease_seconds=30, now=time.time()) == []
        await asyncio.wait_for(relay.stop(), 10)
        taken = await ds.claim_outbox("other", limit=100, lease_seconds=30, now=time.time())
        assert len(taken) == 20
    finally:
        tansu.resume()
        await relay.stop()
