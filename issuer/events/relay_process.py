"""The outbox relay in a child process, owned by the server.

Publishing costs CPU in the Kafka client (building requests, copying them, the garbage
that leaves), and in the server's process that CPU is taken under the GIL from issuance.
`RelayProcess` runs the same OutboxRelay in `python -m issuer.events.relay_worker`, with
its own datastore connection (relays claim rows with leases, so that is as safe as a
relay on another replica); the server only appends to the outbox and pokes the child.

It has OutboxRelay's interface (start, stop, notify, status, running): the server's
status, /metrics and log show what the child reports, as if the relay ran in-process.
A child that dies is restarted with jittered backoff; a server that dies closes the
child's stdin, and the child exits on EOF.

`outbox_relay()` picks: the child process, or the in-process OutboxRelay where a child
cannot share the datastore (SQLite `:memory:`) or has nothing to publish (no broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import issuer
from issuer.datastore.base import DataStore
from issuer.datastore.postgres import PostgresDataStore
from issuer.datastore.sqlite import MEMORY, SqliteDataStore
from issuer.events.cloudevents import rfc3339
from issuer.events.relay import KafkaConfig, OutboxRelay
from issuer.events.relay_wire import WAKE, WorkerSpec, record_from_wire, replay
from meshid.backoff import Backoff
from meshid.tasks import cancel_and_wait
from meshid.telemetry import Telemetry, default_telemetry

log = logging.getLogger("issuer.events.relay")  # the relay's logger, wherever it runs

WORKER_MODULE = "issuer.events.relay_worker"
# The child's niceness relative to the server. Events may wait a little; issuance should
# not: on a busy host the scheduler then gives the signing threads the CPU first. Not
# more: at nice 10 the relay still gets about a tenth of a contended CPU, and keeps up.
CHILD_NICE = 10
LINE_LIMIT = 64 * 1024 * 1024  # a forwarded log line may carry a whole oversized event


def outbox_relay(
    ds: DataStore,
    dsn: str,
    kafka: KafkaConfig | None,
    *,
    source: str,
    owner: str = "",
    telemetry: Telemetry | None = None,
    child_process: bool = True,
    secret_env: tuple[str, ...] = (),
) -> OutboxRelay | RelayProcess:
    """The server's relay: in a child process unless told otherwise or it cannot be.
    `secret_env` names environment variables the child must not inherit (the master
    secret; the SASL password, which reaches it on stdin)."""
    location = shared_location(ds, dsn)
    if kafka is None or not child_process or location is None:
        return OutboxRelay(ds, kafka, source=source, owner=owner, telemetry=telemetry)
    return RelayProcess(location, kafka, source=source, owner=owner, telemetry=telemetry,
                        secret_env=secret_env)


def shared_location(ds: DataStore, dsn: str) -> str | None:
    """Where another process opens the same datastore, or None if it cannot."""
    if isinstance(ds, SqliteDataStore):
        # Absolute: the child must not depend on the server's working directory.
        return None if ds.path == MEMORY else os.path.abspath(ds.path)
    if isinstance(ds, PostgresDataStore):
        return dsn
    return None


class RelayProcess:
    """Owned by the server: `start()` spawns the supervisor task (which runs the child),
    `stop()` ends the child and awaits the task; `start()` again runs a new child, and
    status() counts on across children."""

    def __init__(
        self,
        datastore: str,
        kafka: KafkaConfig,
        *,
        source: str,
        owner: str = "",
        telemetry: Telemetry | None = None,
        retention: float | None = None,
        poll_interval: float = 0.5,
        nice: int = CHILD_NICE,
        stop_timeout: float = 10.0,
        restart_base: float = 0.5,
        restart_cap: float = 30.0,
        healthy_after: float = 60.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        secret_env: tuple[str, ...] = (),
    ) -> None:
        kafka.validate()
        self._secret_env = tuple(n for n in secret_env if n)
        self._datastore = datastore
        self._kafka = kafka
        self._source = source
        self._owner = owner or source
        self._telemetry = telemetry or default_telemetry()
        self._retention = retention
        self._poll = poll_interval
        self._nice = nice
        self._stop_timeout = stop_timeout
        self._restart = (restart_base, restart_cap)
        self._healthy_after = healthy_after  # a child that lived this long resets the backoff
        self._clock = clock
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        # One wake-up in flight at a time; notifies meanwhile fold into one more, sent
        # when the child acknowledges (a notify is never lost, nor repeated per append).
        self._wake_in_flight = False
        self._wake_again = False
        # status: the child's last report, plus counts of children that have ended
        self._status = self._blank_status()
        self._reported_at = clock()
        self._published_before = 0
        self._skipped_before = 0
        self._process_error: str | None = None
        self._process_error_at: float | None = None
        self._restarts = 0

    # --- OutboxRelay's interface ------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._stopping.clear()
        self._status["kafka"] = "starting"
        self._task = asyncio.create_task(self._supervise(), name="meshid-outbox-relay-process")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._close_stdin()  # EOF: the child stops its relay and exits
        await asyncio.wait({task}, timeout=self._stop_timeout)
        # Too slow (or never started): cancelling the supervisor kills and reaps the child.
        await cancel_and_wait(task)

    def notify(self) -> None:
        """Events were appended: wake the child. Synchronous and cheap: one byte, at most
        one in flight."""
        if self._wake_in_flight:
            self._wake_again = True
            return
        stdin = self._stdin()
        if stdin is None:
            return  # no child right now; the next one starts by claiming everything pending
        stdin.write(WAKE)
        self._wake_in_flight = True
        self._wake_again = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> dict[str, Any]:
        """OutboxRelay.status() as the child last reported it, plus `relay_process`."""
        st = dict(self._status)
        st["published"] = self._published_before + int(st["published"])
        st["skipped"] = self._skipped_before + int(st["skipped"])
        if st["oldest_pending_age_seconds"]:
            # Not reported while only the age changes: it grows with the clock meanwhile.
            elapsed = max(0.0, self._clock() - self._reported_at)
            st["oldest_pending_age_seconds"] = round(st["oldest_pending_age_seconds"] + elapsed, 3)
        if self._process_error is not None:
            st["kafka"] = f"error: {self._process_error}"
            st["last_error"] = self._process_error
            st["last_error_at"] = rfc3339(self._process_error_at) if self._process_error_at else None
        st["relay_process"] = {"pid": self._proc.pid if self._proc is not None else None,
                               "restarts": self._restarts}
        return st

    @property
    def _poll_interval(self) -> float:
        return self._poll

    @_poll_interval.setter
    def _poll_interval(self, seconds: float) -> None:
        # As on OutboxRelay, where tests lengthen the idle poll to prove wake-ups arrive.
        self._poll = seconds
        stdin = self._stdin()
        if stdin is not None:
            stdin.write(json.dumps({"poll_interval": seconds}).encode() + b"\n")

    # --- the supervisor ---------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = Backoff(*self._restart, rng=self._rng)
        while True:
            began = time.monotonic()
            try:
                ended = await self._run_child()
            except Exception as exc:  # a bug here must not end relaying for good
                log.exception("Kafka relay: supervising the relay process failed")
                ended = f"was lost ({type(exc).__name__})"
            if self._stopping.is_set():
                return
            if time.monotonic() - began >= self._healthy_after:
                backoff.reset()
            delay = backoff.next()
            self._child_failed(ended, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            self._restarts += 1

    async def _run_child(self) -> str:
        """Run one child until it exits; returns how it ended."""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", WORKER_MODULE, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT, env=_child_env(self._secret_env))
        except OSError as exc:
            return f"could not be started ({exc})"
        assert proc.stdin is not None and proc.stdout is not None
        self._wake_in_flight = self._wake_again = False
        if self._stopping.is_set():
            proc.stdin.close()  # stop() came while spawning: EOF before the spec, it exits at once
        else:
            proc.stdin.write(self._spec().to_line())
            self._proc = proc
        try:
            await self._read_reports(proc.stdout)
            await proc.wait()
        finally:
            self._proc = None
            await _kill_and_reap(proc)
            self._fold_counts()
        rc = proc.returncode
        if rc is not None and rc < 0:
            return f"was killed by {signal.Signals(-rc).name}"
        return f"exited unexpectedly with code {rc}"

    def _child_failed(self, ended: str, delay: float) -> None:
        self._process_error = f"relay process {ended}; restarting it in {delay:.1f}s"
        self._process_error_at = self._clock()
        self._status["kafka"] = "starting"
        self._telemetry.kafka_up.set(0)
        log.error("Kafka relay: relay process %s; restarting it in %.1fs (issuance continues, events "
                  "wait in the outbox)", ended, delay)

    def _spec(self) -> WorkerSpec:
        return WorkerSpec(
            datastore=self._datastore, kafka=self._kafka, source=self._source, owner=self._owner,
            retention=self._retention, poll_interval=self._poll, nice=self._nice,
            # What the relay's own log would pass here; the server filters again on re-emit.
            log_level=log.getEffectiveLevel())

    def _stdin(self) -> asyncio.StreamWriter | None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return None
        return proc.stdin

    def _close_stdin(self) -> None:
        stdin = self._stdin()
        if stdin is not None:
            stdin.close()

    # --- reports from the child -------------------------------------------------------------

    async def _read_reports(self, stdout: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # longer than LINE_LIMIT: dropped by the reader
                log.warning("relay process: dropped a report longer than %d bytes", LINE_LIMIT)
                continue
            if not line:
                return
            try:
                self._handle(json.loads(line))
            except Exception:  # a bad report must not take the supervisor down
                log.exception("relay process: could not handle report %r", line[:200])

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "wake":
            self._wake_in_flight = False
            if self._wake_again:
                self.notify()
        elif kind == "status":
            self._status = message["status"]
            self._reported_at = self._clock()
            self._process_error = None
            if message.get("telemetry"):
                replay(self._telemetry, message["telemetry"])
        elif kind == "log":
            record = record_from_wire(message["record"])
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)

    def _fold_counts(self) -> None:
        # The next child counts from zero; status() keeps adding up across children.
        self._published_before += int(self._status["published"])
        self._skipped_before += int(self._status["skipped"])
        self._status = {**self._status, "published": 0, "skipped": 0}

    def _blank_status(self) -> dict[str, Any]:
        return {"kafka": "starting", "topic": self._kafka.topic, "backlog": 0,
                "oldest_pending_age_seconds": 0.0, "published": 0, "skipped": 0,
                "last_delivered_seq": 0, "consecutive_failures": 0, "last_error": None,
                "last_error_at": None}


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    """Whatever brought us here, leave no process and no pipe behind."""
    if proc.stdin is not None:
        proc.stdin.close()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    # asyncio.subprocess.Process has no close(); its transport holds the pipes.
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


def _child_env(secret_env: tuple[str, ...] = ()) -> dict[str, str]:
    # The child must import this very code, whatever the server's sys.path tricks were,
    # and never sees secrets it does not need.
    env = {k: v for k, v in os.environ.items() if k not in secret_env}
    root = str(Path(issuer.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
