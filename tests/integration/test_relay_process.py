"""The outbox relay in a child process (issuer.events.relay_process) against a real
Kafka-protocol broker (Tansu): events arrive once each after dedup and in per-key order
when the child is killed and restarted; stop() leaves no process behind; the child's
status, telemetry and log records show up in the server's; wake-ups are coalesced and
never lost; a child whose server died exits by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tansu import TansuBroker, tansu_broker  # noqa: F401  (registers the `tansu` fixture)
from test_relay import SOURCE, Appender, collector, kafka, metric_value, wait_for

from issuer.datastore.sqlite import SqliteDataStore
from issuer.events.relay import KafkaConfig
from issuer.events.relay_process import WORKER_MODULE, RelayProcess
from issuer.events.relay_wire import WAKE
from meshid.telemetry import Telemetry

pytestmark = pytest.mark.integration


def process_for(ds: SqliteDataStore, cfg: KafkaConfig, telemetry: Telemetry | None = None,
                **kw: Any) -> RelayProcess:
    base: dict[str, Any] = {"poll_interval": 0.05, "restart_base": 0.1, "restart_cap": 0.5,
                            "stop_timeout": 5.0}
    base.update(kw)
    return RelayProcess(ds.path, cfg, source=SOURCE, telemetry=telemetry or Telemetry(), **base)


async def started(relay: RelayProcess) -> RelayProcess:
    await relay.start()
    await wait_for(lambda: relay.status()["kafka"] == "ok", 20, "the relay process to connect")
    return relay


def child_pid(relay: RelayProcess) -> int:
    pid = relay.status()["relay_process"]["pid"]
    assert isinstance(pid, int) and pid != os.getpid()
    return pid


def gone(pid: int) -> bool:
    """No such process, or a zombie left to a reaper that is not us."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def relay_children() -> list[int]:
    """Our live child processes running the relay worker."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and WORKER_MODULE.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return [pid for pid in found if not gone(pid)]


async def test_publishes_with_status_and_telemetry_in_the_server(
        tansu: TansuBroker, ds: SqliteDataStore) -> None:
    appender = Appender(ds)
    await appender.append(300)
    tel = Telemetry()
    relay = await started(process_for(ds, kafka(tansu), tel))
    try:
        async with collector(tansu) as col:
            await wait_for(lambda: len(col.uids()) == 300, 15, "300 events")
            assert col.check_exactly_once_in_order(appender.uids) == 0
        await wait_for(lambda: relay.status()["published"] == 300, 5, "the count in status()")
        await wait_for(lambda: relay.status()["backlog"] == 0, 5, "backlog 0")
        status = relay.status()
        assert status["topic"] == "meshid.events" and status["last_error"] is None
        assert status["relay_process"]["restarts"] == 0
        child_pid(relay)
        assert metric_value(tel, "meshid.events.published", topic="meshid.events") == 300
        text = tel.render_prometheus()
        assert "meshid_events_relay_lag_seconds_count 300" in text
        assert "meshid_events_kafka_up 1" in text and "meshid_events_outbox_backlog 0" in text
    finally:
        await relay.stop()


async def test_killed_child_is_restarted_and_nothing_is_lost(
        tansu: TansuBroker, ds: SqliteDataStore, caplog: pytest.LogCaptureFixture) -> None:
    tel = Telemetry()
    relay = await started(process_for(ds, kafka(tansu), tel))
    appender = Appender(ds, relay)

    appending = True

    async def keep_appending() -> None:
        while appending:  # not cancelled: an append cut short would count events never written
            await appender.append(3)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(keep_appending())
    try:
        async with collector(tansu) as col:
            await wait_for(lambda: len(col.uids()) >= 100, 10, "traffic before the kill")
            first = child_pid(relay)
            with caplog.at_level(logging.ERROR, logger="issuer.events.relay"):
                os.kill(first, signal.SIGKILL)
                await wait_for(lambda: relay.status()["relay_process"]["restarts"] == 1, 10, "a restart")
            assert "relay process was killed by SIGKILL; restarting it" in caplog.text
            assert gone(first)
            await wait_for(lambda: relay.status()["kafka"] == "ok", 20, "the new child to connect")
            assert child_pid(relay) != first
            after = len(appender.uids) + 100
            await wait_for(lambda: len(col.uids()) >= after, 10, "traffic after the restart")
            appending = False
            await task
            await wait_for(lambda: col.uids() == set(appender.uids), 15, "every event")
            duplicates = col.check_exactly_once_in_order(appender.uids)
            print(f"\nchild killed: {len(appender.uids)} events, {duplicates} duplicates dropped by id")
        await wait_for(lambda: relay.status()["backlog"] == 0, 5, "backlog 0")
        status = relay.status()
        assert status["last_error"] is None  # the new child's report replaced the error
        assert status["oldest_pending_age_seconds"] == 0.0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await relay.stop()
    assert relay_children() == []


async def test_stop_leaves_no_process_behind_and_start_again_counts_on(
        tansu: TansuBroker, ds: SqliteDataStore) -> None:
    appender = Appender(ds)
    await appender.append(20)
    relay = await started(process_for(ds, kafka(tansu)))
    await wait_for(lambda: relay.status()["published"] == 20, 10, "20 published")
    pid = child_pid(relay)
    await relay.stop()
    assert not relay.running and gone(pid) and relay_children() == []
    await relay.stop()  # idempotent

    await appender.append(10)
    await started(relay)  # as bench/events.py does between its rounds
    try:
        assert child_pid(relay) != pid
        await wait_for(lambda: relay.status()["published"] == 30, 10, "the count to carry on")
        # With the broker gone the child's shutdown may hang on the producer: stop() still
        # returns within its timeout and kills it.
        tansu.stop()
        await appender.append(5)
        relay.notify()
        await wait_for(lambda: relay.status()["kafka"].startswith("error"), 20, "the outage")
        pid = child_pid(relay)
    finally:
        began = time.monotonic()
        await relay.stop()
    assert time.monotonic() - began < 5.0 + 3
    assert gone(pid) and relay_children() == []


async def test_child_logs_and_errors_reach_the_server(
        tansu: TansuBroker, ds: SqliteDataStore, caplog: pytest.LogCaptureFixture) -> None:
    await Appender(ds).append(10)
    tel = Telemetry()
    relay = process_for(ds, kafka(tansu, enable_idempotence=True), tel)  # Tansu refuses InitProducerId
    with caplog.at_level(logging.WARNING):
        await relay.start()
        try:
            await wait_for(lambda: relay.status()["kafka"].startswith("error"), 20, "the refusal")
            status = relay.status()
            assert "InitProducerId" in status["kafka"] and "enable_idempotence=false" in status["kafka"]
            assert status["backlog"] == 10 and status["published"] == 0 and status["last_error_at"]
            assert metric_value(tel, "meshid.events.kafka.errors", kind="idempotence") >= 1
            assert "meshid_events_kafka_up 0" in tel.render_prometheus()
            await wait_for(lambda: any("broker refused InitProducerId" in r.getMessage()
                                       for r in caplog.records), 5, "the log record")
            pid = child_pid(relay)
        finally:
            await relay.stop()
    record = next(r for r in caplog.records if "broker refused InitProducerId" in r.getMessage())
    assert record.name == "issuer.events.relay" and record.levelno == logging.ERROR
    assert record.getMessage().startswith("Kafka relay: broker refused InitProducerId")
    assert record.process == pid  # re-emitted as the child logged it


async def test_wake_ups_are_coalesced_and_never_lost(tansu: TansuBroker, ds: SqliteDataStore) -> None:
    # No idle polling: only wake-ups get events out within the test's waits.
    relay = await started(process_for(ds, kafka(tansu), poll_interval=600.0))
    appender = Appender(ds)
    try:
        proc = relay._proc
        assert proc is not None and proc.stdin is not None
        writes: list[bytes] = []
        write = proc.stdin.write

        def counting(data: bytes) -> None:
            writes.append(data)
            write(data)

        proc.stdin.write = counting  # type: ignore[method-assign, assignment]
        await asyncio.sleep(0.3)  # the first, idle round is over: the relay sleeps for 600 s

        # A burst of notifies: one byte now, one more (folding the rest) once acknowledged.
        await appender.append(5)
        for _ in range(1000):
            relay.notify()
        assert writes == [WAKE]
        await wait_for(lambda: relay.status()["published"] == 5, 10, "the woken round")
        await wait_for(lambda: not relay._wake_in_flight, 5, "the second wake-up's acknowledgement")
        assert writes == [WAKE, WAKE]

        # Appends racing the acknowledgement are never stranded.
        for _ in range(30):
            await appender.append(3)
            relay.notify()
            await asyncio.sleep(0.003)
        await wait_for(lambda: relay.status()["published"] == 95, 10, "every appended event")
        assert len(writes) <= 2 + 30
    finally:
        await relay.stop()


async def test_secrets_stay_out_of_argv_and_environment(
    tansu: TansuBroker, ds: SqliteDataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, master = "s3cret-not-in-proc", "master-secret-not-in-proc"
    monkeypatch.setenv("MESHID_MASTER_SECRET", master)
    monkeypatch.setenv("KAFKA_PW", secret)
    relay = process_for(ds, kafka(tansu, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                                  sasl_username="meshid", sasl_password=secret),
                        secret_env=("MESHID_MASTER_SECRET", "KAFKA_PW"))
    await relay.start()
    try:
        await wait_for(lambda: relay.status()["relay_process"]["pid"] is not None, 10, "the child")
        pid = child_pid(relay)
        for name in ("cmdline", "environ"):
            text = Path(f"/proc/{pid}/{name}").read_bytes()
            assert secret.encode() not in text and master.encode() not in text
    finally:
        await relay.stop()


async def test_the_servers_relay_child_gets_no_pkcs11_pin(
    tansu: TansuBroker, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server leaves every secret it names out of the child's environment: the HSM PIN
    (ca.pkcs11.pin_env) was passed on, though the child never touches a CA key."""
    from meshid.cli.dev import start_dev

    pin = "pkcs11-pin-not-in-relay"
    monkeypatch.setenv("MESHID_PKCS11_PIN", pin)
    kafka_on = {"events": {"kafka": {"bootstrap_servers": [tansu.bootstrap], "enable_idempotence": False,
                                     "auto_create_topics": True}}}
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"),
                            server_overrides=kafka_on)
    try:
        relay = stack.server.relay
        assert isinstance(relay, RelayProcess)
        await wait_for(lambda: relay.status()["relay_process"]["pid"] is not None, 10, "the child")
        assert pin.encode() not in Path(f"/proc/{child_pid(relay)}/environ").read_bytes()
    finally:
        await stack.stop()


ORPHAN_PARENT = """
import asyncio, sys
from issuer.events.relay import KafkaConfig
from issuer.events.relay_process import RelayProcess

async def main():
    cfg = KafkaConfig(sys.argv[2], enable_idempotence=False, auto_create_topics=True)
    relay = RelayProcess(sys.argv[1], cfg, source="meshid://example.org/server/orphan")
    await relay.start()
    while relay.status()["kafka"] != "ok":
        await asyncio.sleep(0.05)
    print(relay.status()["relay_process"]["pid"], flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_child_exits_when_its_server_is_killed(tansu: TansuBroker, ds: SqliteDataStore) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ORPHAN_PARENT, ds.path, tansu.bootstrap, stdout=asyncio.subprocess.PIPE)
    child: int | None = None
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 30)
        child = int(line)
        assert not gone(child)
        parent.kill()  # SIGKILL: no stop(), only the kernel closing the child's stdin
        await parent.wait()
        await wait_for(lambda: gone(child), 10, "the orphaned relay process to exit")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)  # do not leave it running if the test failed


# The server under a seccomp filter answering setpriority with EPERM, as the systemd unit's
# SystemCallFilter=~@resources does; the relay child inherits it.
SANDBOXED_PARENT = """
import asyncio, ctypes, os, struct, sys
from issuer.events.relay import KafkaConfig
from issuer.events.relay_process import RelayProcess

NR_SETPRIORITY = {"x86_64": 141, "aarch64": 140}[os.uname().machine]
program = b"".join([
    struct.pack("HBBI", 0x20, 0, 0, 0),                      # load the syscall number
    struct.pack("HBBI", 0x15, 0, 1, NR_SETPRIORITY),         # setpriority?
    struct.pack("HBBI", 0x06, 0, 0, 0x00050000 | 1),         #   SECCOMP_RET_ERRNO | EPERM
    struct.pack("HBBI", 0x06, 0, 0, 0x7FFF0000),             # else SECCOMP_RET_ALLOW
])

class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

buf = ctypes.create_string_buffer(program)
fprog = Fprog(4, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
try:
    os.nice(1)
    sys.exit("the filter did not refuse setpriority")
except PermissionError:
    pass

async def main():
    cfg = KafkaConfig(sys.argv[2], enable_idempotence=False, auto_create_topics=True)
    relay = RelayProcess(sys.argv[1], cfg, source="meshid://example.org/server/sandboxed",
                         restart_base=0.1, restart_cap=0.5)
    await relay.start()
    try:
        for _ in range(300):
            if relay.status()["kafka"] == "ok":
                break
            await asyncio.sleep(0.05)
        print(relay.status()["kafka"], relay.status()["relay_process"]["restarts"], flush=True)
    finally:
        await relay.stop()

asyncio.run(main())
"""


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="syscall number unknown")
async def test_child_relays_when_a_sandbox_refuses_it_a_lower_priority(
        tansu: TansuBroker, ds: SqliteDataStore) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SANDBOXED_PARENT, ds.path, tansu.bootstrap,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(parent.communicate(), 60)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
    assert parent.returncode == 0, err.decode()
    # Relaying, first time: the child was not restarted over its nice().
    assert out.decode().split() == ["ok", "0"], err.decode()[-2000:]
    assert b"could not lower its priority" in err
