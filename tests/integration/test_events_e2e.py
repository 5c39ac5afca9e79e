"""meshid's events end to end, through the real issuance path and a real Kafka-protocol
broker (Tansu): SVIDs fetched by workloads match their `io.meshid.svid.x509.issued`
events; a server killed with -9 while the broker is down delivers its whole outbox after
restart; a broker refusing the idempotent producer is visible (log, /metrics, /ready) and
loses nothing once the switch is off; agent-reported workload attestation failures reach
the outbox aggregated and rate-bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import secrets
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from tansu import TansuBroker, free_port, tansu_broker  # noqa: F401  (registers the `tansu` fixture)
from waiting import wait_for

from attestors.workload.base import Caller
from issuer.ca.devpki import ensure_dev_upstream
from issuer.events import ocsf, workload_failures
from issuer.events.cloudevents import CloudEvent, event_id, from_kafka, rfc3339, server_source
from issuer.events.relay import iter_outbox, tail_outbox
from issuer.events.workload_failures import WorkloadFailureAggregator
from meshid.cli.admin_client import AdminClient
from meshid.cli.dev import start_dev
from meshid.der import load_der_certificates
from meshid.entry import Entry
from meshid.errors import AttestationError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from workload_api._gen import workload_grpc, workload_pb2
from workload_api.agent import Agent
from workload_api.config import agent_config_from_dict

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
TOPIC = "meshid.events"
TD = "example.org"


# --- a plain consumer on every partition of the events topic --------------------------------


@dataclass
class EventReader:
    consumer: AIOKafkaConsumer
    events: dict[str, CloudEvent] = field(default_factory=dict)  # by CloudEvent id: dedup
    records: int = 0
    raw: list[bytes] = field(default_factory=list)  # each record's value and header values

    async def run(self) -> None:
        while True:
            for recs in (await self.consumer.getmany(timeout_ms=100)).values():
                for rec in recs:
                    self.records += 1
                    self.raw.append(b"\0".join([rec.value or b"", *(v for _, v in rec.headers)]))
                    ce = from_kafka(rec.value, rec.headers)
                    assert rec.key == ce.partitionkey.encode()  # one subject's events stay ordered
                    self.events.setdefault(ce.id, ce)

    def of_type(self, type_: str) -> list[CloudEvent]:
        return [ce for ce in self.events.values() if ce.type == type_]


@contextlib.asynccontextmanager
async def event_reader(bootstrap: str) -> AsyncIterator[EventReader]:
    """Starts once the relay has created the topic (it auto-creates it)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, request_timeout_ms=5000, retry_backoff_ms=50)
    await consumer.start()
    task: asyncio.Task[None] | None = None
    try:
        deadline = time.monotonic() + 20
        while not (parts := await consumer._client.fetch_all_metadata()).partitions_for_topic(TOPIC):
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {TOPIC} never appeared")
            await asyncio.sleep(0.2)
        consumer.assign([TopicPartition(TOPIC, p) for p in sorted(parts.partitions_for_topic(TOPIC) or ())])
        reader = EventReader(consumer)
        task = asyncio.create_task(reader.run())
        yield reader
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await consumer.stop()


# --- workloads --------------------------------------------------------------------------------


async def run_as(uid: int, sock: str, mode: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "workload_proc.py"), str(uid), sock, mode,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert lines, f"workload process printed nothing (rc={proc.returncode}): {err.decode()[-2000:]}"
    return dict(json.loads(lines[-1]))


async def fetch_own_svids(sock: str) -> list[tuple[str, Any]]:
    """Every X509-SVID the Workload API gives this process: (SPIFFE ID, leaf)."""
    ch = Channel(path=sock)
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(ch)
        async with stub.FetchX509SVID.open(metadata={"workload.spiffe.io": "true"}, timeout=15) as st:
            await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
            resp = await st.recv_message()
            await st.cancel()
        assert resp is not None
        return [(s.spiffe_id, load_der_certificates(s.x509_svid)[0]) for s in resp.svids]
    finally:
        ch.close()


def kafka_overrides(bootstrap: str) -> dict[str, Any]:
    return {"events": {"kafka": {"bootstrap_servers": [bootstrap], "enable_idempotence": False,
                                 "auto_create_topics": True}}}


# --- 1. SVIDs issued through the agent, read back from Kafka ----------------------------------


async def test_issued_svids_match_their_kafka_events(
        tansu: TansuBroker, short_tmp: Path, steady_renewals: None) -> None:
    # steady_renewals: a start-up SVID's renewal would be a second issuance event for its
    # SPIFFE ID (the test failed so, 1 run in ~30).
    stack = await start_dev(short_tmp / "d", TD, str(short_tmp / "s" / "api.sock"), svid_ttl=3600,
                            server_overrides=kafka_overrides(tansu.bootstrap))
    try:
        agent_id = stack.agent.node.agent_id
        assert agent_id is not None and stack.server.relay is not None
        # No idle polling within this test's waits: once the relay is idle, only issuance
        # waking it (SigningService.on_events -> relay.notify) gets the events out in time.
        relay = stack.server.relay
        await wait_for(lambda: relay.status()["kafka"] == "ok" and relay.status()["backlog"] == 0, 20,
                       "the relay to connect and drain the start-up events")
        relay._poll_interval = 600.0
        await asyncio.sleep(0.6)  # let a poll already under way end; the next one lasts 600 s
        entries: list[tuple[int, Entry]] = []
        # Several workloads: two more IDs for this uid (so one caller gets three SVIDs) and
        # one each for two other uids, fetched by processes running as those uids.
        for uid, path in ((os.getuid(), "/svc/a"), (os.getuid(), "/svc/b"), (1001, "/svc/u1001"),
                          (1002, "/svc/u1002")):
            e = await stack.server.entries.create(
                Entry("", SpiffeId(stack.server.td, path), agent_id, (Selector("unix", f"uid:{uid}"),)))
            entries.append((uid, e))
        stack.agent.manager.poke()
        await wait_for(lambda: all(e.id in stack.agent.cache.svids for _, e in entries), 20,
                       "the agent to hold an SVID for every entry")

        # What the workloads got, through the Workload API.
        got: dict[str, tuple[int, float]] = {}  # SPIFFE ID -> (serial, not_after)
        for sid, leaf in await fetch_own_svids(stack.socket_path):
            got[sid] = (leaf.serial_number, leaf.not_valid_after_utc.timestamp())
        for uid in (1001, 1002):
            res = await run_as(uid, stack.socket_path, "fetch")
            got[res["spiffe_id"]] = (res["serial"], res["not_after"])
        expected_ids = {str(stack.spiffe_id)} | {str(e.spiffe_id) for _, e in entries}
        assert set(got) == expected_ids

        # The agent's copies of the entries carry the revision the server signed against.
        by_sid = {str(e.spiffe_id): e for e in stack.agent.cache.entries.values()}
        source = server_source(TD, stack.server.server_id)

        def issued() -> dict[str, list[CloudEvent]]:
            out: dict[str, list[CloudEvent]] = {}
            for ce in reader.of_type(ocsf.X509_ISSUED):
                if ce.subject in expected_ids:
                    out.setdefault(ce.subject, []).append(ce)
            return out

        async with event_reader(tansu.bootstrap) as reader:
            await wait_for(lambda: set(issued()) == expected_ids, 20, "an issuance event per SVID")
            # A JWT-SVID too, for the secrets check below.
            jwt = await stack.agent.manager.jwt_svid(entries[0][1], ["secrets-check"])
            await wait_for(lambda: reader.of_type(ocsf.JWT_ISSUED), 20, "the JWT-SVID's event")
            await asyncio.sleep(0.5)  # anything extra (a second issuance) would show up by now
            events = issued()
            raw = list(reader.raw)
        for sid, (serial, not_after) in got.items():
            assert len(events[sid]) == 1, f"{sid}: {len(events[sid])} issuance events for one SVID"
            ce = events[sid][0]
            entry = by_sid[sid]
            cert, un = ce.data["certificate"], ce.data["unmapped"]
            assert ce.source == source and ce.partitionkey == sid
            assert cert["serial_number"] == format(serial, "x") == un["serial_number"]
            assert cert["expiration_time"] == int(not_after * 1000)
            assert un["not_after"] == rfc3339(not_after)
            assert un["spiffe_id"] == sid
            assert un["agent_id"] == str(agent_id)
            assert un["entry_id"] == entry.id and un["entry_revision"] == entry.revision_number
            assert un["rotation_reason"] == "initial"
            assert {"name": sid, "type": "URI"} in cert["sans"]
        # No event carries a secret: SVID private keys (in any encoding), the JWT-SVID (or
        # its signature), the agent's join token.
        join_token = stack.agent.config.node_attestor.join_token.token
        keys = [s.key_der for s in stack.agent.cache.svids.values()]
        assert join_token and len(keys) == len(entries) + 1 and raw
        secrets_ = [jwt.token, jwt.token.rsplit(".", 1)[1], join_token]
        for der in keys:
            secrets_ += [der.hex(), base64.b64encode(der).decode(), base64.urlsafe_b64encode(der).decode()]
        for value in raw:
            assert b"PRIVATE KEY" not in value
            text = value.decode(errors="replace")
            assert not [s for s in secrets_ if s in text]
            assert not [der for der in keys if der in value]
        assert stack.server.relay.status()["kafka"] == "ok"
    finally:
        await stack.stop()


# --- 2. workload attestation failures, reported by the agent ----------------------------------


class RefusingAttestor:
    """Stands in for a workload attestor that refuses callers (e.g. a process that exited
    before attestation completed): the reason cycles over `reasons` distinct values."""

    name = "test-refusal"

    def __init__(self, reasons: int) -> None:
        self.reasons = reasons
        self.counter = itertools.count()
        self.refused = 0

    async def attest(self, caller: Caller) -> list[Selector]:
        self.refused += 1
        raise AttestationError(f"test refusal #{next(self.counter) % self.reasons}")


async def refused_call(sock: str) -> None:
    with pytest.raises(GRPCError) as err:
        await fetch_own_svids(sock)
    assert err.value.status == Status.UNAVAILABLE and "workload attestation failed" in str(err.value.message)


async def test_workload_attestation_failures_reach_the_outbox_aggregated(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("issuer.server.TICK_SECONDS", 0.5)  # the flush rides the server tick
    refusing = RefusingAttestor(reasons=12)
    original = Agent._attestors
    monkeypatch.setattr(Agent, "_attestors", lambda self: [*original(self), refusing])
    stack = await start_dev(short_tmp / "d", TD, str(short_tmp / "s" / "api.sock"), svid_ttl=3600)
    try:
        server = stack.server
        ds = server.ds
        assert ds is not None
        agent_id = str(stack.agent.node.agent_id)
        # A short window so the test sees several; at most 4 events per agent per window.
        window, budget = 2.0, 4
        agg = WorkloadFailureAggregator(window=window, max_events_per_window=budget)
        workload_failures._aggregators[server] = agg

        async def failures() -> list[dict[str, Any]]:
            return [row.event.data | {"_time": row.event.time} async for row in iter_outbox(ds)
                    if row.event.type == ocsf.WORKLOAD_ATTESTATION_FAILED]

        async def counted(total: int) -> bool:
            return sum(d["count"] for d in await failures()) == total

        # 120 refused callers with 12 distinct reasons: far more than the budget allows
        # itemised, so the server folds them; every refusal is still counted.
        n = 120
        for _ in range(n // 10):
            await asyncio.gather(*(refused_call(stack.socket_path) for _ in range(10)))
        assert refusing.refused == n
        await wait_for(lambda: counted(n), 20, f"{n} refusals counted in the outbox")
        got = await failures()
        assert len(got) < n  # aggregated
        reasons = {f"test refusal #{i}" for i in range(12)}
        for d in got:
            un = d["unmapped"]
            assert un["agent_id"] == agent_id and d["status_id"] == ocsf.STATUS_FAILURE
            assert un["reason"] in reasons | {workload_failures.OVERFLOW_REASON}
            if un["reason"] != workload_failures.OVERFLOW_REASON:
                assert un["caller_uid"] == os.getuid()
        assert any(d["unmapped"]["reason"] == workload_failures.OVERFLOW_REASON for d in got)
        # The rate bound, window by window (windows open at a flush and last `window`).
        times = sorted(d["_time"] for d in got)
        start, in_window = times[0], 0
        for t in times:
            if t - start >= window:
                start, in_window = t, 0
            in_window += 1
            assert in_window <= budget, f"more than {budget} events in one {window}s window"

        # Held-back counts go out from the server's periodic tick even when the agent never
        # reports again: spend the budget, then add counts behind the agent API's back.
        agg.add(agent_id, "held back by the test", server.clock(), uid=4242, count=7)
        held = [row.seq async for row in iter_outbox(ds)]
        await wait_for(lambda: counted(n + 7), 10, "the tick to flush the held-back counts")
        new = [d for d in await failures() if d["unmapped"]["reason"] == "held back by the test"]
        assert len(new) == 1 and new[0]["count"] == 7 and new[0]["unmapped"]["caller_uid"] == 4242
        assert agg.pending() == 0

        # `meshid events tail` prints them with the ids the relay would publish.
        out = io.StringIO()
        source = server_source(TD, server.server_id)
        await tail_outbox(ds, source=source, out=out, after_seq=held[-1] if held else 0)
        tailed = [CloudEvent.from_json(line) for line in out.getvalue().splitlines()]
        assert any(ce.type == ocsf.WORKLOAD_ATTESTATION_FAILED and ce.subject == agent_id for ce in tailed)
    finally:
        await stack.stop()


# --- the server as a real process -------------------------------------------------------------


class ServerProcess:
    """`meshid server run --config server.toml` with its own health port and log file."""

    def __init__(self, root: Path, bootstrap: str) -> None:
        self.root = root
        self.bootstrap = bootstrap
        self.data_dir = root / "server"
        self.config = root / "server.toml"
        self.log = root / "server.log"
        self.health_port = free_port()
        self.agent_port = free_port()
        self.upstream = ensure_dev_upstream(root / "upstream")
        secret = root / "master.secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        self.proc: asyncio.subprocess.Process | None = None

    def write_config(self, *, enable_idempotence: bool) -> None:
        u = self.upstream
        self.config.write_text(f"""
trust_domain = "{TD}"
data_dir = "{self.data_dir}"

[server]
bind_address = "127.0.0.1"
agent_api_port = {self.agent_port}
grpc_enabled = false
health_port = {self.health_port}
master_secret_file = "{self.root / 'master.secret'}"
master_secret_env = ""

[upstream.disk]
cert_file = "{u.cert_file}"
key_file = "{u.key_file}"
bundle_file = "{u.bundle_file}"

[events.kafka]
bootstrap_servers = ["{self.bootstrap}"]
enable_idempotence = {str(enable_idempotence).lower()}
auto_create_topics = true
""")

    @property
    def admin_socket(self) -> str:
        return str(self.data_dir / "admin.sock")

    @property
    def source(self) -> str:
        return server_source(TD, (self.data_dir / "server_id").read_text().strip())

    async def start(self) -> None:
        log = self.log.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshid.cli.main", "server", "run", "--config", str(self.config),
                stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL)
        finally:
            log.close()  # the child has its own copy
        await wait_for(self._ready, 30, f"the server to be ready (log: {self.log})")

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            return bool((await self.ready())["ready"])
        return False

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.health_port}{path}",
                                                      timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status, await r.text()

    async def ready(self) -> dict[str, Any]:
        return dict(json.loads((await self.get("/ready"))[1]))

    async def metrics(self) -> str:
        return (await self.get("/metrics"))[1]

    async def kill(self, sig: int = signal.SIGKILL) -> int:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc is not None and proc.returncode is not None else 0
        proc.send_signal(sig)
        return await asyncio.wait_for(proc.wait(), 30)

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with AdminClient(self.admin_socket) as client:
            return await client.call(method, path, body)

    async def cli(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshid.cli.main", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, f"meshid {' '.join(args)}: {err.decode()[-2000:]}"
        return out.decode()

    def outbox(self) -> tuple[list[int], int]:
        """Every outbox seq, and how many are still undelivered (read straight from SQLite)."""
        with contextlib.closing(sqlite3.connect(self.data_dir / "datastore.sqlite3")) as conn:
            seqs = [int(r[0]) for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
            row = conn.execute("SELECT COUNT(*) FROM outbox_state WHERE delivered_at IS NULL").fetchone()
        return seqs, int(row[0])


@pytest.fixture
async def server_proc(tansu: TansuBroker, short_tmp: Path) -> AsyncIterator[ServerProcess]:
    proc = ServerProcess(short_tmp, tansu.bootstrap)
    try:
        yield proc
    finally:
        await proc.kill(signal.SIGTERM)


async def agent_for(srv: ServerProcess, root: Path) -> Agent:
    tok = await srv.admin("POST", "/v1/tokens", {"ttl": 600})
    agent = Agent(agent_config_from_dict({
        "trust_domain": TD, "data_dir": str(root / "agent"),
        "server_address": [f"127.0.0.1:{srv.agent_port}"],
        "trust_bundle_path": str(srv.upstream.bundle_file), "socket_path": str(root / "a" / "api.sock"),
        "sync_interval": 1, "health": {"enabled": False},
        "node_attestor": {"join_token": {"token": tok["token"]}},
    }, "test agent"))
    await agent.start()
    return agent


async def create_entries(srv: ServerProcess, parent: str, n: int, prefix: str) -> list[str]:
    ids = []
    for i in range(n):
        out = await srv.admin("POST", "/v1/entries", {
            "spiffe_id": f"spiffe://{TD}/{prefix}/{i}", "parent_id": parent,
            "selectors": [f"unix:uid:{2000 + i}"]})
        ids.append(out["id"])
    return ids


async def test_server_killed_with_undelivered_events_loses_nothing(
        tansu: TansuBroker, server_proc: ServerProcess, short_tmp: Path) -> None:
    srv = server_proc
    tansu.stop()  # the broker is down: every event waits in the outbox
    srv.write_config(enable_idempotence=False)
    await srv.start()
    await wait_for(lambda: _kafka_state(srv, "error"), 20, "the relay to report the broker down")

    agent = await agent_for(srv, short_tmp)
    try:
        agent_id = str(agent.node.agent_id)
        entry_ids = await create_entries(srv, agent_id, 5, "svc")
        # One more through the CLI, as an operator would.
        out = await srv.cli("entry", "create", "--server-socket", srv.admin_socket, "--spiffe-id",
                            f"spiffe://{TD}/svc/cli", "--parent-id", agent_id, "--selector", "unix:uid:2999")
        entry_ids.append(json.loads(out)["id"])
        agent.manager.poke()
        await wait_for(lambda: all(e in agent.cache.svids for e in entry_ids), 20, "SVIDs for every entry")
    finally:
        await agent.stop()
    seqs, pending = srv.outbox()
    assert pending == len(seqs) > 0

    assert await srv.kill(signal.SIGKILL) == -signal.SIGKILL

    # After the crash `meshid events tail` shows the backlog, with the relay's ids.
    tailed = [CloudEvent.from_json(line) for line in
              (await srv.cli("events", "tail", "--config", str(srv.config))).splitlines()]
    source = srv.source
    assert [ce.id for ce in tailed] == [event_id(source, s) for s in seqs]
    types = [ce.type for ce in tailed]
    assert types.count(ocsf.ENTRY_CREATED) == 6 and ocsf.NODE_ATTESTED in types
    issued = {ce.data["unmapped"]["entry_id"] for ce in tailed if ce.type == ocsf.X509_ISSUED}
    assert set(entry_ids) <= issued

    tansu.start()
    await srv.start()
    async with event_reader(tansu.bootstrap) as reader:
        await wait_for(lambda: set(reader.events) >= {ce.id for ce in tailed}, 30,
                       "every event written before the crash")
        await wait_for(lambda: srv.outbox()[1] == 0, 10, "the outbox to be fully delivered")
        seqs, _ = srv.outbox()
        await wait_for(lambda: set(reader.events) >= {event_id(source, s) for s in seqs}, 10,
                       "every outbox row, including the restart's own")
        for ce in tailed:
            assert reader.events[ce.id].data == ce.data and reader.events[ce.id].type == ce.type
    assert (await srv.ready())["events"]["kafka"] == "ok"


async def _kafka_state(srv: ServerProcess, prefix: str) -> bool:
    return str((await srv.ready()).get("events", {}).get("kafka", "")).startswith(prefix)


async def test_idempotence_refused_is_visible_then_nothing_lost(
        tansu: TansuBroker, server_proc: ServerProcess) -> None:
    srv = server_proc
    srv.write_config(enable_idempotence=True)  # Tansu's memory engine refuses InitProducerId
    await srv.start()
    tok = await srv.admin("POST", "/v1/tokens", {"ttl": 600})
    await create_entries(srv, tok["agent_id"], 5, "idem")
    await wait_for(lambda: _kafka_state(srv, "error"), 20, "the refusal to show on /ready")

    detail = (await srv.ready())["events"]
    assert "InitProducerId" in detail["kafka"] and "enable_idempotence=false" in detail["kafka"]
    assert detail["published"] == 0 and detail["last_error"]
    metrics = await srv.metrics()
    assert 'meshid_events_kafka_errors_total{kind="idempotence"}' in metrics
    assert "meshid_events_kafka_up 0" in metrics
    assert "broker refused InitProducerId" in srv.log.read_text()
    seqs, pending = srv.outbox()
    assert pending == len(seqs) >= 5

    assert await srv.kill(signal.SIGTERM) == 0
    srv.write_config(enable_idempotence=False)
    await srv.start()
    source = srv.source
    async with event_reader(tansu.bootstrap) as reader:
        await wait_for(lambda: srv.outbox()[1] == 0, 20, "the outbox to be delivered")
        seqs, _ = srv.outbox()
        await wait_for(lambda: set(reader.events) >= {event_id(source, s) for s in seqs}, 10,
                       "every outbox row at the consumer")
        assert len(reader.of_type(ocsf.ENTRY_CREATED)) == 5
    assert "meshid_events_kafka_up 1" in await srv.metrics()
    assert (await srv.ready())["events"]["kafka"] == "ok"
