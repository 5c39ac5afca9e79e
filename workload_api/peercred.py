"""Who is on the other end of a Workload API Unix socket (SO_PEERCRED) and the PID-reuse guard.

SO_PEERCRED gives the pid/uid/gid the peer had when it called connect(). Attestation then
looks the pid up in /proc, which races with the peer exiting and its pid being reused by
another process. The guard (SPEC-PROTOCOLS §1): record the process start time
(/proc/<pid>/stat field 22) at accept time and require it unchanged after attestation.
Where the kernel offers SO_PEERPIDFD (Linux ≥ 6.5) we also pin the accept-time reading to
the connecting process itself: a pidfd cannot be recycled, so "still alive after we read
the start time" proves the start time belongs to the peer and not to a pid successor.
"""

from __future__ import annotations

import os
import signal
import socket
import struct

from attestors.workload.base import Caller
from attestors.workload.procfs import parse_stat_start_time, read_proc_text
from meshid.errors import AttestationError

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
# Python 3.11 lacks the constant; 77 is its value in the Linux UAPI on every architecture.
SO_PEERPIDFD: int = getattr(socket, "SO_PEERPIDFD", 77)


def process_start_time(pid: int, *, proc_root: str = "/proc") -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if there is no such process."""
    if pid <= 0:
        return None
    try:
        # One small read of a pseudo-file: fine inline on the event loop.
        text = read_proc_text(f"{proc_root}/{pid}/stat")
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    try:
        return parse_stat_start_time(text)
    except ValueError:
        return None


def still_same_process(caller: Caller) -> bool:
    """True if `caller.pid` still names the process that connected (call after attestation).

    No recorded start time means we could not prove identity at accept time: refuse.
    """
    if caller.start_time is None:
        return False
    return process_start_time(caller.pid) == caller.start_time


def _peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd for the peer, or None where the kernel (or socket type) does not offer one."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except ProcessLookupError as exc:
        # ESRCH: the peer has already been reaped, so its pid may be anyone's by now.
        raise AttestationError("peer process exited before it could be identified") from exc
    except OSError:
        # ENOPROTOOPT before Linux 6.5, ENODATA without a recorded peer pid: fall back to
        # the start-time check alone.
        return None
    return fd if fd >= 0 else None


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Signal 0 to another user's process without CAP_KILL: it exists, we just may not signal it.
        return True
    return True


def peer_credentials(sock: socket.socket) -> Caller:
    """The connected peer of an accepted AF_UNIX stream socket, with its start time recorded.

    Raises AttestationError when the peer cannot be identified: its pid is not visible in
    our PID namespace (the kernel reports 0) or it exited before we could pin it.
    """
    if sock.family != socket.AF_UNIX:
        raise AttestationError("peer credentials need an AF_UNIX socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise AttestationError("peer process is not visible in this PID namespace")

    pidfd = _peer_pidfd(sock)
    try:
        start_time = process_start_time(pid)
        if start_time is None:
            raise AttestationError(f"peer process {pid} exited before it could be identified")
        if pidfd is not None and not _pidfd_alive(pidfd):
            # The peer died around our /proc read: the start time may be a pid successor's.
            raise AttestationError(f"peer process {pid} exited before it could be identified")
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return Caller(pid=pid, uid=uid, gid=gid, start_time=start_time)
