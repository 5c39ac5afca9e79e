"""The outbox relay: publishes outbox rows to Kafka in order, marks them delivered only
after the broker acknowledged them, and retries with backoff while the broker is down.

Order without the idempotent producer: each round takes a prefix of the undelivered
rows (in seq order) and builds exactly one record batch per partition. A Kafka batch is
appended atomically, and a round starts only when the previous one has settled, so for
every partition what the broker holds is always a prefix of that partition's rows plus
resent duplicates of it. Consumers that drop duplicates by CloudEvent id therefore see
each key's events once and in order, whatever failed when. With the idempotent producer
the broker additionally drops the duplicates itself.

Issuance never waits for this task: the server only appends to the outbox and calls
`notify()`, which is synchronous and cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    RecordTooLargeError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner

from issuer.datastore.base import DataStore
from issuer.events.cloudevents import Mode, StoredEncoder, from_outbox, rfc3339
from issuer.events.model import OutboxRow
from meshid.errors import ConfigError
from meshid.tasks import cancel_and_wait
from meshid.telemetry import Telemetry, default_telemetry

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (KafkaConnectionError, NodeNotReadyError, RequestTimedOutError, KafkaTimeoutError,
                      TimeoutError, OSError)
_SIZE_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError)


@dataclass(frozen=True)
class KafkaConfig:
    """How to reach Kafka; shared by the relay and the detector."""

    bootstrap_servers: tuple[str, ...] | str
    topic: str = "meshid.events"
    enable_idempotence: bool = True
    acks: str | int = "all"
    mode: Mode = "structured"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    sasl_mechanism: str = ""  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    auto_create_topics: bool = False
    topic_partitions: int = 6  # used only when auto-creating
    topic_replication_factor: int = 1
    # Outbox rows per round: bounds memory whatever the backlog. ~0.5 MB of issuance
    # events: aiokafka makes several whole copies of a produce request, and with larger
    # rounds malloc hands them fresh pages each time (page faults cost more than rounds).
    batch_size: int = 250
    max_batch_bytes: int = 1_000_000  # one record batch per partition per round
    request_timeout: float = 30.0  # seconds; an unacknowledged batch fails after this
    client_id: str = "meshid"
    retention: float = 24 * 3600.0  # delivered outbox rows are pruned after this

    def validate(self) -> None:
        if not self.bootstrap_servers:
            raise ConfigError("events.kafka.bootstrap_servers: required to publish to Kafka")
        if self.mode not in ("structured", "binary"):
            raise ConfigError("events.kafka.mode: must be 'structured' or 'binary'")
        if self.enable_idempotence and self.acks not in ("all", -1):
            raise ConfigError("events.kafka.acks: the idempotent producer needs acks=all")
        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ConfigError("events.kafka.security_protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ConfigError("events.kafka.sasl_mechanism: required with a SASL security protocol")
        if self.batch_size < 1 or self.request_timeout <= 0:
            raise ConfigError("events.kafka: batch_size and request_timeout must be positive")

    @property
    def servers(self) -> list[str]:
        if isinstance(self.bootstrap_servers, str):
            return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]
        return list(self.bootstrap_servers)

    def client_kwargs(self) -> dict[str, Any]:
        """Connection settings common to aiokafka producers, consumers and admin clients."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": int(self.request_timeout * 1000),
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kw["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile or None, certfile=self.ssl_certfile or None,
                keyfile=self.ssl_keyfile or None)
        if self.security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password
        return kw


def relay_config_from(section: Any, env: Mapping[str, str] | None = None) -> KafkaConfig:
    """Build from the server's `[events.kafka]` config section (issuer.config.KafkaSection);
    the SASL password comes from the environment variable the section names."""
    env = os.environ if env is None else env
    password_env = getattr(section, "sasl_password_env", "")
    cfg = KafkaConfig(
        bootstrap_servers=tuple(section.bootstrap_servers),
        topic=section.topic,
        enable_idempotence=section.enable_idempotence,
        mode=section.mode,
        security_protocol=section.security_protocol,
        ssl_cafile=section.ssl_cafile,
        ssl_certfile=section.ssl_certfile,
        ssl_keyfile=section.ssl_keyfile,
        sasl_mechanism=section.sasl_mechanism,
        sasl_username=section.sasl_username,
        sasl_password=env.get(password_env, "") if password_env else "",
        auto_create_topics=section.auto_create_topics,
        retention=float(getattr(section, "retention", 24 * 3600.0)),
    )
    cfg.validate()
    return cfg


class RelayError(Exception):
    """A failure the relay explains in status(); `kind` labels the error metric."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base·2^attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2 ** min(attempt, 30))))


async def ensure_topic(cfg: KafkaConfig, topic: str) -> None:
    """Raise RelayError(kind='topic') if the topic is missing, unless auto-creation is on."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**cfg.client_kwargs(), client_id=f"{cfg.client_id}-admin")
    await admin.start()
    try:
        if topic in await admin.list_topics():
            return
        if not cfg.auto_create_topics:
            raise RelayError(
                f"topic {topic!r} does not exist; create it (see deploy/kafka) or set "
                "events.kafka.auto_create_topics=true", kind="topic")
        resp = await admin.create_topics(
            [NewTopic(topic, cfg.topic_partitions, cfg.topic_replication_factor)])
        for err in getattr(resp, "topic_errors", ()):
            code = err[1]
            if code not in (0, TopicAlreadyExistsError.errno):
                raise RelayError(f"could not create topic {topic!r}: error code {code} "
                                 f"{err[2] if len(err) > 2 else ''}".rstrip(), kind="topic")
        log.warning("created Kafka topic %r (%d partitions, replication %d)", topic,
                    cfg.topic_partitions, cfg.topic_replication_factor)
    finally:
        await admin.close()


class OutboxRelay:
    """Owned by the server: `start()` spawns its tasks (publishing, and with a broker the
    backlog gauges while publishing fails), `stop()` cancels and awaits them.

    With `kafka=None` (no broker configured) nothing is published; the task only keeps
    the backlog gauge current and `meshid events tail` reads the outbox.
    """

    def __init__(
        self,
        ds: DataStore,
        kafka: KafkaConfig | None,
        *,
        source: str,
        owner: str = "",
        telemetry: Telemetry | None = None,
        retention: float | None = None,
        prune_interval: float = 300.0,
        poll_interval: float = 0.5,
        backoff_base: float = 0.2,
        backoff_cap: float = 30.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if kafka is not None:
            kafka.validate()
        self._ds = ds
        self._kafka = kafka
        self._source = source
        self._owner = owner or source
        self._telemetry = telemetry or default_telemetry()
        self._retention = retention if retention is not None else (kafka.retention if kafka else 24 * 3600.0)
        self._prune_interval = prune_interval
        self._poll_interval = poll_interval
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._clock = clock
        self._rng = rng or random.Random()
        self._partitioner = DefaultPartitioner()
        # Keys (SPIFFE IDs) recur at every renewal: remember their partition rather than
        # hash each time; valid for one partition list, bounded.
        self._partition_of: dict[bytes, int] = {}
        self._partitions_seen: list[int] = []
        self._encoder = StoredEncoder(source, kafka.mode if kafka else "structured")
        self._task: asyncio.Task[None] | None = None
        self._gauge_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._isolate_rows = 0  # > 0 after a size error: send one row per round
        self._busy = False  # the last round published something
        # status
        self._state = "disabled" if kafka is None else "starting"
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._failures = 0
        self._published = 0
        self._skipped = 0
        self._last_seq = 0
        self._backlog = 0
        self._oldest_pending: float | None = None
        self._last_backlog_check = 0.0
        self._last_prune = 0.0

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="meshid-outbox-relay")
        if self._kafka is not None:  # with none, _run keeps the gauges current itself
            self._gauge_task = asyncio.create_task(self._gauges_while_failing(), name="meshid-outbox-gauges")

    async def stop(self) -> None:
        gauges, self._gauge_task = self._gauge_task, None
        if gauges is not None:
            await cancel_and_wait(gauges)
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
            await self._release_leases()
        await self._close_producer()

    async def _release_leases(self) -> None:
        # Rows this relay claimed but did not see acknowledged go back to the pool, so a
        # rolling restart does not hold them for a lease (30 s or more). A publish cut
        # short may have reached the broker: delivery is at least once either way, and
        # the CloudEvents id (stable per row) lets consumers drop the repeat.
        try:
            released = await self._ds.release_outbox(self._owner)
        except Exception as exc:  # stopping must not fail; the leases then just expire
            log.warning("could not release outbox leases on stop (%s); they expire by themselves", exc)
            return
        if released:
            log.info("released %d undelivered outbox rows for other relays", released)

    def notify(self) -> None:
        """Events were appended: publish now rather than at the next poll."""
        self._wakeup.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> dict[str, Any]:
        """For /ready: `kafka` is "ok", "starting", "disabled" or "error: <why>"."""
        now = self._clock()
        kafka = self._state if self._state != "error" else f"error: {self._last_error}"
        return {
            "kafka": kafka,
            "topic": self._kafka.topic if self._kafka else None,
            "backlog": self._backlog,
            "oldest_pending_age_seconds": (round(now - self._oldest_pending, 3)
                                           if self._oldest_pending is not None else 0.0),
            "published": self._published,
            "skipped": self._skipped,
            "last_delivered_seq": self._last_seq,
            "consecutive_failures": self._failures,
            "last_error": self._last_error,
            "last_error_at": rfc3339(self._last_error_at) if self._last_error_at else None,
        }

    # --- the task -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if self._kafka is None:
                    await self._refresh_backlog(force=True)
                    await self._sleep_or_wakeup(self._poll_interval * 10)
                    continue
                await self._maybe_prune()
                if self._producer is None:
                    self._producer = await self._connect(self._kafka)
                n = await self._publish_round(self._kafka, self._producer)
                self._busy = n > 0
                self._on_success()
                await self._refresh_backlog(force=n == 0)
                if n == 0:
                    await self._sleep_or_wakeup(self._poll_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._busy = False
                self._on_failure(exc)
                await self._close_producer()
                with contextlib.suppress(Exception):
                    await self._refresh_backlog(force=True)
                delay = full_jitter(self._failures, self._backoff_base, self._backoff_cap, self._rng)
                await asyncio.sleep(delay)

    async def _gauges_while_failing(self) -> None:
        """The backlog gauges (and status()) kept current, once a second, while publishing
        fails. The publishing task then spends its time in backoffs and request timeouts (up
        to 30 s each) while the outbox grows, and the gauges stood at their figure of the
        last failure: 0 for an outage that began right after a drain."""
        while True:
            await asyncio.sleep(1.0)
            if self._state == "error":
                with contextlib.suppress(Exception):  # the publishing task reports these
                    await self._refresh_backlog()

    async def _sleep_or_wakeup(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: a notify() racing stop() must not eat the cancel.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        self._wakeup.clear()

    async def _connect(self, cfg: KafkaConfig) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **cfg.client_kwargs(),
            client_id=f"{cfg.client_id}-relay",
            acks=-1 if cfg.acks == "all" else cfg.acks,
            enable_idempotence=cfg.enable_idempotence,
            max_batch_size=cfg.max_batch_bytes,
            max_request_size=max(cfg.max_batch_bytes + 64 * 1024, 1_048_576),
            linger_ms=0,
        )
        try:
            await asyncio.wait_for(producer.start(), cfg.request_timeout + 5)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)
            # With idempotence on, start() sends InitProducerId; any refusal that is not a
            # connection problem means the broker does not support it.
            if (cfg.enable_idempotence and isinstance(exc, KafkaError)
                    and not isinstance(exc, _CONNECTION_ERRORS)):
                raise RelayError(
                    f"broker refused InitProducerId (idempotent producer): {type(exc).__name__}; "
                    "set events.kafka.enable_idempotence=false", kind="idempotence") from exc
            raise
        try:
            await asyncio.wait_for(ensure_topic(cfg, cfg.topic), cfg.request_timeout + 5)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)
            raise
        return producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        timeout = (self._kafka.request_timeout if self._kafka else 30.0) + 5
        try:
            await asyncio.wait_for(producer.stop(), timeout)
        except Exception as exc:  # never let cleanup mask the failure being handled
            log.warning("closing the Kafka producer failed: %r", exc)

    async def _publish_round(self, cfg: KafkaConfig, producer: AIOKafkaProducer) -> int:
        # After a batch was refused for size, rows go one at a time until the oversized
        # one is found (and skipped) or a whole batch's worth went through.
        isolating = self._isolate_rows > 0
        # A cheap read first (partial index) so an idle relay takes no write lock; after a
        # round that published, more is likely waiting and the claim finds out itself.
        if not self._busy and not await self._ds.fetch_outbox(0, 1):
            self._oldest_pending = None
            self._isolate_rows = 0
            return 0
        # Claiming (rather than a seq cursor) always starts from the lowest undelivered
        # rows, which a late-committing lower seq needs, and lets relays on several
        # replicas share the outbox without publishing a row twice or out of key order.
        rows = await self._ds.claim_outbox_stored(self._owner, 1 if isolating else cfg.batch_size,
                                                  2 * cfg.request_timeout + 30, self._clock())
        if not rows:
            return 0  # everything pending is leased by another replica
        self._oldest_pending = rows[0].time
        partitions = sorted(await asyncio.wait_for(producer.partitions_for(cfg.topic), cfg.request_timeout))
        if partitions != self._partitions_seen:
            self._partition_of.clear()
            self._partitions_seen = partitions
        partition_of = self._partition_of
        builders: dict[int, Any] = {}
        parts: list[int] = []  # parts[i] is rows[i]'s partition; rows beyond it wait for the next round
        encode = self._encoder.encode
        for row in rows:
            key, value, headers = encode(row)
            part = partition_of.get(key)
            if part is None:
                part = self._partition(key, partitions)
            builder = builders.get(part)
            if builder is None:
                builder = builders[part] = producer.create_batch()
            if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                break  # that partition's batch is full: the round ends before this row
            parts.append(part)
        sent = [(part, await producer.send_batch(b, cfg.topic, partition=part))
                for part, b in builders.items() if b.record_count() > 0]
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(f for _, f in sent), return_exceptions=True), cfg.request_timeout + 5)
        except TimeoutError:
            raise RelayError(f"no acknowledgement within {cfg.request_timeout + 5:.0f}s",
                             kind="timeout") from None
        failed = {part: r for (part, _), r in zip(sent, results, strict=True) if isinstance(r, BaseException)}
        included = rows[:len(parts)]
        done = included
        if failed:
            done = [row for row, part in zip(included, parts, strict=True) if part not in failed]
        now = self._clock()
        if done:
            seqs = [r.seq for r in done]
            await self._ds.mark_delivered(seqs, now)
            self._published += len(done)
            self._last_seq = max(self._last_seq, max(seqs))
            self._telemetry.events_published.add(len(done), {"topic": cfg.topic})
            # One signing batch's events share their act time, hence their lag.
            for t, n in Counter(r.time for r in done).items():
                self._telemetry.relay_lag.record(max(0.0, now - t), n)
        if failed:
            first = next(iter(failed.values()))
            if not isinstance(first, _SIZE_ERRORS):
                raise first
            if not isolating:
                self._isolate_rows = cfg.batch_size
                raise RelayError(f"broker refused a batch as too large ({first!r}); isolating the record",
                                 kind="too_large")
            # One record the broker will never take would block the stream forever: skip
            # it, logging the whole event so it is not lost from sight.
            row = included[0]
            await self._ds.mark_delivered([row.seq], now)
            self._skipped += 1
            self._isolate_rows = 0
            self._telemetry.kafka_errors.add(1, {"kind": "too_large"})
            log.error("outbox row %d (%s) is too large for the broker; skipped: %s", row.seq, row.type,
                      from_outbox(row.decode(), self._source).to_json().decode())
            return 1
        if isolating:
            self._isolate_rows -= 1
        return len(done)

    def _partition(self, key: bytes, partitions: list[int]) -> int:
        """Hash a key not yet in self._partition_of (kept for the current partition list)."""
        if len(self._partition_of) >= 100_000:
            self._partition_of.clear()
        part = self._partition_of[key] = self._partitioner(key, partitions, partitions)
        return part

    # --- bookkeeping --------------------------------------------------------------------

    def _on_success(self) -> None:
        if self._state == "error":
            log.warning("Kafka relay recovered after %d failed attempt(s); backlog %d", self._failures,
                        self._backlog)
        self._state = "ok"
        self._failures = 0
        self._telemetry.kafka_up.set(1)

    def _on_failure(self, exc: BaseException) -> None:
        message, kind = self._describe(exc)
        self._failures += 1
        self._telemetry.kafka_errors.add(1, {"kind": kind})
        self._telemetry.kafka_up.set(0)
        if message != self._last_error or self._state != "error":
            # Loud once per distinct problem; repeats go to debug to keep logs readable.
            log.error("Kafka relay: %s (retrying with backoff; issuance continues, events wait "
                      "in the outbox)", message)
        else:
            log.debug("Kafka relay still failing (%d): %s", self._failures, message)
        self._state = "error"
        self._last_error = message
        self._last_error_at = self._clock()

    def _describe(self, exc: BaseException) -> tuple[str, str]:
        servers = ",".join(self._kafka.servers) if self._kafka else ""
        if isinstance(exc, RelayError):
            return str(exc), exc.kind
        if isinstance(exc, _CONNECTION_ERRORS):
            return f"broker unreachable at {servers} ({type(exc).__name__}: {exc})", "connection"
        if isinstance(exc, KafkaError):
            return f"broker refused the request: {type(exc).__name__}: {exc}", "produce"
        return f"{type(exc).__name__}: {exc}", "datastore"

    async def _refresh_backlog(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_backlog_check < 1.0:
            return
        self._last_backlog_check = now
        self._backlog = await self._ds.outbox_backlog()
        head = await self._ds.fetch_outbox(0, 1) if self._backlog else []
        self._oldest_pending = head[0].event.time if head else None
        self._telemetry.outbox_backlog.set(self._backlog)
        # A gauge, unlike the lag histogram, shows an outage while it lasts.
        age = max(0.0, self._clock() - self._oldest_pending) if self._oldest_pending is not None else 0.0
        self._telemetry.outbox_oldest_age.set(age)

    async def _maybe_prune(self) -> None:
        now = self._clock()
        if now - self._last_prune < self._prune_interval:
            return
        self._last_prune = now
        pruned = await self._ds.prune_outbox(now - self._retention)
        if pruned:
            log.info("pruned %d delivered outbox rows older than %.0fs", pruned, self._retention)


async def iter_outbox(ds: DataStore, follow: bool = False, *, after_seq: int = 0, batch: int = 500,
                      poll_interval: float = 1.0) -> AsyncIterator[OutboxRow]:
    """Undelivered outbox rows in seq order. With no broker configured every event stays
    undelivered, so this is the whole stream; with `follow` it keeps polling."""
    cursor = after_seq
    while True:
        rows = await ds.fetch_outbox(cursor, batch)
        for row in rows:
            yield row
            cursor = row.seq
        if len(rows) < batch:
            if not follow:
                return
            await asyncio.sleep(poll_interval)


async def tail_outbox(ds: DataStore, follow: bool = False, *, source: str, out: TextIO | None = None,
                      after_seq: int = 0, poll_interval: float = 1.0) -> int:
    """`meshid events tail`: print undelivered events as CloudEvent JSON, one per line.
    Pass the server's real source (meshid://<td>/server/<server-id>) for the ids to match
    what the relay publishes. Returns the number printed."""
    out = out or sys.stdout
    printed = 0
    async for row in iter_outbox(ds, follow, after_seq=after_seq, poll_interval=poll_interval):
        out.write(from_outbox(row, source).to_json().decode() + "\n")
        out.flush()
        printed += 1
    return printed
