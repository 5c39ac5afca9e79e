"""SO_PEERCRED, /proc/<pid>/stat start time and the PID-reuse guard, on real sockets and processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestors.workload.base import Caller
from attestors.workload.procfs import parse_stat_start_time
from meshid.errors import AttestationError
from workload_api import peercred
from workload_api.peercred import (
    peer_credentials,
    process_start_time,
    still_same_process,
)

# Child: connect to the socket given in argv, rename itself (comm) when told, exit on EOF.
CHILD = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
print("connected", flush=True)
for line in sys.stdin:
    with open("/proc/self/comm", "w") as f:
        f.write(line.strip())
    print("renamed", flush=True)
"""


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("stat", "expected"),
    [
        ("1234 (python3) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1 2 3", 98765),
        ("1234 (a b) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 555 1 2 3", 555),
        # comm chosen to fool a whitespace split or a first-')' split.
        ("1234 (x) 1 2 (y) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 42 1 2", 42),
        ("1234 ()) R 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 7 0 0", 7),
    ],
)
def test_parse_stat_start_time(stat: str, expected: int) -> None:
    assert parse_stat_start_time(stat) == expected


@pytest.mark.parametrize(
    "stat", ["garbage", "1 (x) S 1 2 3", "1 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 zz 1"]
)
def test_parse_stat_start_time_malformed(stat: str) -> None:
    with pytest.raises(ValueError):
        parse_stat_start_time(stat)


def test_process_start_time_of_self_and_missing() -> None:
    mine = process_start_time(os.getpid())
    assert isinstance(mine, int) and mine > 0
    assert process_start_time(0) is None
    assert process_start_time(-1) is None
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert process_start_time(pid_max + 1) is None


def test_socketpair_peer_is_self() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        before = _open_fds()
        caller = peer_credentials(a)
        assert _open_fds() == before  # the pidfd is closed
    assert caller == Caller(os.getpid(), os.getuid(), os.getgid(), process_start_time(os.getpid()))
    assert still_same_process(caller)


def test_falls_back_without_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    # An option number no kernel knows: getsockopt fails as on kernels before 6.5.
    monkeypatch.setattr(peercred, "SO_PEERPIDFD", 0x7FFF)
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a).pid == os.getpid()


def test_non_unix_socket_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(AttestationError):
        peer_credentials(s)


def test_guard_refuses_unknown_or_changed_start_time() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    assert not still_same_process(Caller(me, 0, 0, None))
    assert not still_same_process(Caller(me, 0, 0, start + 1))


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "api.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    srv.settimeout(10)
    with srv:
        yield srv, path


def test_real_subprocess_peer(listener: tuple[socket.socket, str]) -> None:
    srv, path = listener
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "connected"
        conn, _ = srv.accept()
        with conn:
            caller = peer_credentials(conn)
        assert (caller.pid, caller.uid, caller.gid) == (child.pid, os.getuid(), os.getgid())
        assert caller.start_time is not None and caller.start_time == process_start_time(child.pid)
        assert still_same_process(caller)

        # A hostile comm must not shift the fields: same start time after the rename.
        child.stdin.write("x) 1 2 (y\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "renamed"
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert "(x) 1 2 (y)" in stat
        assert stat.split()[21] != str(caller.start_time)  # the naive parse is fooled
        assert process_start_time(child.pid) == caller.start_time
        assert still_same_process(caller)
    finally:
        child.stdin.close()
        child.wait(10)
    # Exited and reaped: the pid no longer names the caller.
    assert not still_same_process(caller)


def test_peer_gone_before_identification(listener: tuple[socket.socket, str]) -> None:
    srv, path = listener
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    child.wait(10)  # connected, then exited on stdin EOF, and reaped
    conn, _ = srv.accept()
    with conn, pytest.raises(AttestationError):
        peer_credentials(conn)


def test_pidfd_catches_pid_reuse_at_accept(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer died and (simulated) its pid now names another process: /proc looks fine,
    but the peer's pidfd says it is gone, so the borrowed start time is not recorded."""
    srv, path = listener
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    child.wait(10)
    conn, _ = srv.accept()
    probe = socket.socketpair()
    try:
        supported = peercred._peer_pidfd(probe[0])
    finally:
        probe[0].close()
        probe[1].close()
    if supported is None:
        conn.close()
        pytest.skip("kernel has no SO_PEERPIDFD")
    os.close(supported)
    monkeypatch.setattr(peercred, "process_start_time", lambda pid: 12345)  # a pid successor
    with conn, pytest.raises(AttestationError):
        peer_credentials(conn)


async def test_attestation_refuses_a_caller_whose_process_changed_meanwhile() -> None:
    """WorkloadAttestation runs the PID-reuse guard after the attestors (SPEC §1)."""
    from meshid.selector import Selector
    from workload_api.attestation import WorkloadAttestation

    class Uid:
        name = "unix"
        local = True

        async def attest(self, caller: Caller) -> list[Selector]:
            return [Selector("unix", f"uid:{caller.uid}")]

    me, uid = os.getpid(), os.getuid()
    start = process_start_time(me)
    assert start is not None
    attestation = WorkloadAttestation([Uid()])
    assert await attestation.attest(Caller(me, uid, 0, start)) == {Selector("unix", f"uid:{uid}")}
    for recorded in (start + 1, None):  # another process now holds the pid; never proven
        with pytest.raises(AttestationError, match="PID reuse"):
            await attestation.attest(Caller(me, uid, 0, recorded))
