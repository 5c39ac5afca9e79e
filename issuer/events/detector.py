"""`meshid detect`: the reference detector, a Kafka consumer group on the events topic
that turns events into `io.meshid.alert.<rule>` CloudEvents on the alerts topic.

The rules live in detector_rules.py (pure); this module is the edge: consume, feed the
engine, publish alerts, persist state, commit offsets — in that order, so a crash
replays events rather than skipping them. Replays are harmless: the engine drops event
ids it has seen (the set is part of the saved state) and alert ids are deterministic.

Run one detector per event stream: per-agent rates need every event of that agent, and
the topic is keyed by SPIFFE ID, so several group members would each see a share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from issuer.events.cloudevents import CloudEvent, CloudEventError, from_kafka, to_kafka
from issuer.events.detector_rules import Alert, DetectorConfig, RuleEngine
from issuer.events.relay import KafkaConfig, ensure_topic, full_jitter
from meshid.durable_files import write_atomically, write_off_loop
from meshid.errors import ConfigError
from meshid.telemetry import Telemetry, default_telemetry

log = logging.getLogger(__name__)

DEFAULT_GROUP = "meshid-detector"
DEFAULT_ALERTS_TOPIC = "meshid.alerts"


def load_state(path: Path, config: DetectorConfig) -> RuleEngine:
    """The engine saved at `path`, or a fresh one. A state file that cannot be read is
    moved aside (never silently overwritten) and the detector starts learning again."""
    if not path.exists():
        return RuleEngine(config)
    try:
        doc = json.loads(path.read_text())
        return RuleEngine.from_state(config, doc.get("engine", {}))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        aside = path.with_name(path.name + f".unreadable-{int(time.time())}")
        with contextlib.suppress(OSError):
            path.rename(aside)
        log.error("detector state %s is unreadable (%s); moved to %s, learning from scratch", path, exc,
                  aside)
        return RuleEngine(config)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically (write_atomically): a crash mid-save leaves the previous state whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"saved_at": time.time(), "engine": state}, separators=(",", ":"))
    write_atomically(path, data.encode())


class Detector:
    """Owns one task (`start`/`stop`), or run in the foreground with `run()`."""

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        rules: DetectorConfig | None = None,
        state_path: str | os.PathLike[str] | None = None,
        group_id: str = DEFAULT_GROUP,
        alerts_topic: str = DEFAULT_ALERTS_TOPIC,
        source: str = "",
        save_interval: float = 30.0,
        batch_size: int = 500,
        telemetry: Telemetry | None = None,
        on_alert: Callable[[CloudEvent], None] | None = None,
    ) -> None:
        kafka.validate()
        self.kafka = kafka
        self.rules = rules or DetectorConfig()
        self.state_path = Path(state_path) if state_path else None
        self.group_id = group_id
        self.alerts_topic = alerts_topic
        self.source = source or f"meshid://detector/{socket.gethostname()}"
        self.save_interval = save_interval
        self.batch_size = batch_size
        self._telemetry = telemetry or default_telemetry()
        self._on_alert = on_alert
        self.engine = load_state(self.state_path, self.rules) if self.state_path else RuleEngine(self.rules)
        # The engine as of the last checkpoint: every event in it has had its alerts
        # published. A failed session rolls back to it, since its uncommitted events
        # will be consumed again.
        self._snapshot = self.engine.to_state()
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self.consumed = 0
        self.undecodable = 0
        self.alerts_sent = 0
        self.state = "starting"
        self.last_error: str | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="meshid-detector")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "consumed": self.consumed, "alerts": self.alerts_sent,
                "undecodable": self.undecodable, "duplicates": self.engine.duplicates,
                "last_error": self.last_error}

    async def run(self) -> None:
        """Consume until cancelled; on Kafka errors reconnect with capped, jittered backoff."""
        failures = 0
        try:
            while True:
                try:
                    await self._session()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.engine = RuleEngine.from_state(self.rules, self._snapshot)
                    failures += 1
                    self.state, self.last_error = "error", f"{type(exc).__name__}: {exc}"
                    self._telemetry.kafka_errors.add(1, {"kind": "detector"})
                    log.error("detector: %s; reconnecting", self.last_error)
                    await asyncio.sleep(full_jitter(failures, 0.5, 30.0, self._rng))
                else:
                    failures = 0
        finally:
            if self.state_path:
                try:
                    save_state(self.state_path, self._snapshot)
                except OSError as exc:
                    # Stopping goes on (the offsets committed match the last saved state);
                    # raising here made stop() fail with it.
                    log.error("detector: could not save its state on stopping: %s", exc)

    async def _session(self) -> None:
        kw = self.kafka.client_kwargs()
        # Group joins can take longer than a produce round trip; keep aiokafka's default.
        consumer_kw = {**kw, "request_timeout_ms": max(kw["request_timeout_ms"], 40_000)}
        producer = AIOKafkaProducer(**kw, client_id=f"{self.kafka.client_id}-detector",
                                    acks=-1 if self.kafka.acks == "all" else self.kafka.acks,
                                    enable_idempotence=self.kafka.enable_idempotence)
        consumer = AIOKafkaConsumer(self.kafka.topic, **consumer_kw, group_id=self.group_id,
                                    client_id=f"{self.kafka.client_id}-detector",
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        try:
            await producer.start()
            await ensure_topic(self.kafka, self.alerts_topic)
            await consumer.start()
            self.state, self.last_error = "ok", None
            last_save = time.monotonic()
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=self.batch_size)
                events: list[CloudEvent] = []
                for records in batches.values():
                    for rec in records:
                        try:
                            events.append(from_kafka(rec.value, rec.headers))
                        except CloudEventError as exc:
                            self.undecodable += 1
                            log.warning("skipping undecodable record %s/%d@%d: %s", rec.topic, rec.partition,
                                        rec.offset, exc)
                # Partitions interleave in time; the rules want (roughly) time order.
                events.sort(key=_event_time)
                alerts = [a for ev in events for a in self._feed(ev)]
                self.consumed += len(events)
                if alerts:
                    await self._publish(producer, alerts)
                if batches and (time.monotonic() - last_save >= self.save_interval or alerts):
                    await self._checkpoint(consumer)
                    last_save = time.monotonic()
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()

    def _feed(self, ev: CloudEvent) -> list[Alert]:
        # One event the rules choke on is skipped: failing the session would roll back and
        # consume the same record again, forever, and no later event would be looked at.
        try:
            return self.engine.feed(ev)
        except Exception:
            self.undecodable += 1
            log.exception("detector: skipping event %s from %s that the rules could not take", ev.id,
                          ev.source)
            return []

    async def _checkpoint(self, consumer: AIOKafkaConsumer) -> None:
        """Save state, then commit offsets (a crash in between replays; never skips)."""
        state = self.engine.to_state()
        if self.state_path:
            await write_off_loop(save_state, self.state_path, state)
        self._snapshot = state
        await consumer.commit()

    async def _publish(self, producer: AIOKafkaProducer, alerts: list[Alert]) -> None:
        futures = []
        for alert in alerts:
            ce = alert.to_cloudevent(self.source)
            key, value, headers = to_kafka(ce, self.kafka.mode)
            futures.append(await producer.send(self.alerts_topic, value, key=key, headers=headers))
            self._telemetry.alerts.add(1, {"rule": alert.rule})
            log.warning("alert %s: %s", alert.rule, alert.message)
            if self._on_alert is not None:
                self._on_alert(ce)
        await asyncio.gather(*futures)
        self.alerts_sent += len(alerts)


def _event_time(ce: CloudEvent) -> float:
    try:
        return ce.timestamp
    except CloudEventError:
        return 0.0


_KAFKA_TOML_KEYS = ("enable_idempotence", "acks", "mode", "security_protocol", "ssl_cafile", "ssl_certfile",
                    "ssl_keyfile", "sasl_mechanism", "sasl_username", "auto_create_topics",
                    "topic_partitions", "topic_replication_factor", "request_timeout", "client_id")


def detector_settings(doc: dict[str, Any], bootstrap: str, events_topic: str,
                      env: dict[str, str] | None = None) -> tuple[KafkaConfig, DetectorConfig]:
    """From a detector TOML document: thresholds at the top level or under [detector],
    Kafka client settings under [kafka] (`sasl_password_env` names the variable holding
    the SASL password). Raises ConfigError naming the bad key."""
    env = dict(os.environ) if env is None else env
    doc = dict(doc)
    kafka_doc = doc.pop("kafka", {})
    rules_doc = doc.pop("detector", doc)
    if not isinstance(kafka_doc, dict) or not isinstance(rules_doc, dict):
        raise ConfigError("detector config: [kafka] and [detector] must be tables")
    unknown = set(kafka_doc) - set(_KAFKA_TOML_KEYS) - {"sasl_password_env"}
    if unknown:
        raise ConfigError(f"detector config: unknown [kafka] keys: {', '.join(sorted(unknown))}")
    kw = {k: v for k, v in kafka_doc.items() if k in _KAFKA_TOML_KEYS}
    if kafka_doc.get("sasl_password_env"):
        kw["sasl_password"] = env.get(kafka_doc["sasl_password_env"], "")
    try:
        rules = DetectorConfig.from_dict(rules_doc)
        kafka = KafkaConfig(bootstrap_servers=bootstrap, topic=events_topic, **kw)
        kafka.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"detector config: {exc}") from None
    return kafka, rules


def load_detector_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


async def run_detector_cli(args: Any) -> int:
    """`meshid detect`: args.bootstrap, args.config (TOML, optional), args.state,
    args.group, args.events_topic, args.alerts_topic. Runs until SIGINT/SIGTERM."""
    import signal

    doc = load_detector_toml(args.config) if getattr(args, "config", None) else {}
    kafka, rules = detector_settings(doc, args.bootstrap, args.events_topic)
    detector = Detector(kafka, rules=rules, state_path=args.state, group_id=args.group,
                        alerts_topic=args.alerts_topic)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    log.info("detector: consuming %s on %s as group %s, alerts to %s", kafka.topic, ",".join(kafka.servers),
             args.group, args.alerts_topic)
    await detector.start()
    try:
        await stop.wait()
    finally:
        await detector.stop()
    return 0

