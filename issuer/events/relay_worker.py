"""The relay process: `python -m issuer.events.relay_worker`, started and owned by
issuer.events.relay_process.RelayProcess. It runs an OutboxRelay on its own datastore
connection, so the Kafka client's work (request building, copies, garbage) competes with
the server's issuance for a CPU, not for the server's GIL.

It reads its WorkerSpec from stdin, then wake-ups until EOF; it writes status, telemetry
and log records to the server as JSON lines (see issuer.events.relay_wire). EOF on stdin
means shut down, which is also how it learns that the server died, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, cast

from issuer.datastore.base import DataStore
from issuer.datastore.factory import open_datastore
from issuer.events.relay import OutboxRelay
from issuer.events.relay_wire import WAKE, RecordingTelemetry, WorkerSpec, encode, record_to_wire
from meshid.telemetry import Telemetry

log = logging.getLogger("issuer.events.relay_worker")

MAX_LOG_CHARS = 8 * 1024 * 1024  # a skipped oversized event is logged whole; bound the line


class Channel:
    """The JSON-lines channel to the server. Blocking writes: a few lines per round, and a
    server that stopped reading has closed the pipe (EPIPE) rather than stalled it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()  # log records may come from other threads
        self.broken = False

    def send(self, message: dict[str, Any]) -> None:
        data = memoryview(encode(message))
        with self._lock:
            if self.broken:
                return
            try:
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError:
                self.broken = True  # the server is gone; EOF on stdin ends this process


class ForwardingHandler(logging.Handler):
    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._channel.send({"kind": "log", "record": record_to_wire(record, MAX_LOG_CHARS)})
        except Exception:
            self.handleError(record)


class Reporter:
    """Sends the relay's status and telemetry when either changed (the age of the oldest
    pending event growing is not news: the server extrapolates it)."""

    def __init__(self, channel: Channel, telemetry: RecordingTelemetry) -> None:
        self._channel = channel
        self._telemetry = telemetry
        self._last: dict[str, Any] | None = None
        self.relay: OutboxRelay | None = None

    def __call__(self) -> None:
        if self.relay is None:
            return
        status = self.relay.status()
        key = status | {"oldest_pending_age_seconds": bool(status["oldest_pending_age_seconds"])}
        metrics = self._telemetry.drain()
        if key == self._last and metrics is None:
            return
        self._last = key
        self._channel.send({"kind": "status", "status": status, "telemetry": metrics})


class ReportingRelay(OutboxRelay):
    """OutboxRelay reporting after every round and every failure: each ends with a backlog
    refresh (which returns at once unless due), so the server's status() is at most one
    round behind, which the bench's "on" case (ends at a published count) relies on, and
    an error is reported together with the backlog it leaves."""

    def __init__(self, *args: Any, report: Reporter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._report = report
        report.relay = self

    async def _refresh_backlog(self, *, force: bool = False) -> None:
        try:
            await super()._refresh_backlog(force=force)
        finally:  # a datastore error here still reports the failure state
            self._report()


async def serve(stdin: asyncio.StreamReader, relay: OutboxRelay, channel: Channel) -> None:
    """Hand wake-ups to the relay until EOF."""
    while line := await stdin.readline():
        if line == WAKE:
            relay.notify()
            channel.send({"kind": "wake"})
            continue
        settings = json.loads(line)
        if "poll_interval" in settings:
            relay._poll_interval = float(settings["poll_interval"])


async def run(channel: Channel) -> int:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin.buffer)
    line = await stdin.readline()
    if not line:
        return 0  # the server went away before sending the spec
    spec = WorkerSpec.from_line(line)
    root = logging.getLogger()
    root.handlers[:] = [ForwardingHandler(channel)]
    root.setLevel(spec.log_level)
    if spec.nice:
        try:
            os.nice(spec.nice)
        except OSError as exc:
            # A sandbox may refuse setpriority (systemd's SystemCallFilter=~@resources answers
            # EPERM): relay at the server's priority rather than die and be restarted forever.
            log.warning("Kafka relay process: could not lower its priority by %d (%s); it runs at "
                        "the server's", spec.nice, exc.strerror or exc)
    try:
        ds = await open_datastore(spec.datastore)  # the server migrated it: nothing pending
        try:
            await relay_until_eof(spec, ds, stdin, channel)
        finally:
            await ds.close()
    except Exception:
        log.exception("Kafka relay process failed")  # to the server's log, then a restart
        return 1
    return 0


async def relay_until_eof(spec: WorkerSpec, ds: DataStore, stdin: asyncio.StreamReader,
                          channel: Channel) -> None:
    telemetry = RecordingTelemetry()
    reporter = Reporter(channel, telemetry)
    # OutboxRelay touches only the instruments RecordingTelemetry records.
    relay = ReportingRelay(ds, spec.kafka, source=spec.source, owner=spec.owner,
                           telemetry=cast(Telemetry, telemetry), retention=spec.retention,
                           poll_interval=spec.poll_interval, report=reporter)
    await relay.start()
    try:
        await serve(stdin, relay, channel)
    finally:
        await relay.stop()
        reporter()  # the last figures


def main() -> None:
    # The server owns our lifetime: we stop when it closes our stdin, or dies. Signals meant
    # for it (Ctrl-C in a terminal, systemd stopping the whole unit) must neither kill us
    # mid-round nor make the server restart us while it shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # stdout is the protocol channel: keep a private handle on it and point fd 1 at stderr,
    # so a stray print() (ours or a library's) cannot corrupt the stream.
    channel = Channel(os.dup(1))
    os.dup2(2, 1)
    sys.exit(asyncio.run(run(channel)))


if __name__ == "__main__":
    main()
