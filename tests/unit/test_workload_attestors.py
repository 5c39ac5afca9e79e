"""unix and systemd workload attestors against real processes and a table of cgroup files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestors.workload import unix as unix_mod
from attestors.workload.base import Caller, WorkloadAttestor
from attestors.workload.systemd import SystemdAttestor, systemd_cgroup_path, unit_from_cgroup_path
from attestors.workload.unix import UnixAttestor, parse_status
from meshid.errors import AttestationError
from meshid.selector import Selector

SLEEP = "/usr/bin/sleep"  # readable by nobody, unlike an interpreter under /root
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start processes as nobody")


def sel(text: str) -> Selector:
    return Selector.parse(text)


def caller(pid: int) -> Caller:
    return Caller(pid=pid, uid=0, gid=0)


def _gone_pid() -> int:
    # Above pid_max no process can exist.
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


@pytest.fixture
def sleeper_as_nobody(nobody: pwd.struct_passwd) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [SLEEP, "60"], user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[nobody.pw_gid, 4242]
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_attestors_satisfy_protocol() -> None:
    attestors: list[WorkloadAttestor] = [UnixAttestor(), SystemdAttestor()]
    assert [a.name for a in attestors] == ["unix", "systemd"]


# ---- unix -------------------------------------------------------------------------------


async def test_unix_current_process() -> None:
    got = set(await UnixAttestor().attest(caller(os.getpid())))
    assert sel(f"unix:uid:{os.geteuid()}") in got
    assert sel(f"unix:gid:{os.getegid()}") in got
    assert sel(f"unix:user:{pwd.getpwuid(os.geteuid()).pw_name}") in got
    for sgid in os.getgroups():
        assert sel(f"unix:supplementary_gid:{sgid}") in got
    # Path selectors only on request.
    assert not any(s.value.startswith(("path:", "sha256:")) for s in got)


@needs_root
async def test_unix_subprocess_as_nobody(
    sleeper_as_nobody: subprocess.Popen[bytes], nobody: pwd.struct_passwd
) -> None:
    got = set(await UnixAttestor().attest(caller(sleeper_as_nobody.pid)))
    expected = {
        sel(f"unix:uid:{nobody.pw_uid}"),
        sel("unix:user:nobody"),
        sel(f"unix:gid:{nobody.pw_gid}"),
        sel(f"unix:supplementary_gid:{nobody.pw_gid}"),
        # 4242 has no name: the gid selector stays, the name selector is omitted.
        sel("unix:supplementary_gid:4242"),
    }
    assert expected <= got
    group = {s for s in got if s.value.startswith("group:")}
    assert len(group) <= 1
    assert not any(s.value.startswith("supplementary_group:") and "4242" in s.value for s in got)
    assert sel("unix:uid:0") not in got


@pytest.fixture
def sleeper_euid_nobody(nobody: pwd.struct_passwd) -> Iterator[subprocess.Popen[bytes]]:
    def drop_effective_only() -> None:
        os.setresgid(0, nobody.pw_gid, 0)
        os.setresuid(0, nobody.pw_uid, 0)

    proc = subprocess.Popen([SLEEP, "60"], preexec_fn=drop_effective_only)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@needs_root
async def test_unix_uses_effective_ids(
    sleeper_euid_nobody: subprocess.Popen[bytes], nobody: pwd.struct_passwd
) -> None:
    # Real uid root, effective nobody: SPIRE (and we) attest the effective uid.
    pid = sleeper_euid_nobody.pid
    assert f"Uid:\t0\t{nobody.pw_uid}\t" in _read(f"/proc/{pid}/status")
    got = set(await UnixAttestor().attest(caller(pid)))
    assert sel(f"unix:uid:{nobody.pw_uid}") in got
    assert sel(f"unix:gid:{nobody.pw_gid}") in got
    assert sel("unix:uid:0") not in got


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the unix attestor hashes (not served from its digest cache), in order."""
    calls: list[str] = []
    real_hash = unix_mod._hash_file

    def counting_hash(path: str, limit: int) -> tuple[unix_mod.FileKey, str]:
        calls.append(path)
        return real_hash(path, limit)

    monkeypatch.setattr(unix_mod, "_hash_file", counting_hash)
    return calls


@needs_root
async def test_unix_path_and_sha256(sleeper_as_nobody: subprocess.Popen[bytes], hashed: list[str]) -> None:
    pid = sleeper_as_nobody.pid
    exe = os.readlink(f"/proc/{pid}/exe")
    digest = _sha256_of(exe)
    attestor = UnixAttestor(discover_workload_path=True)
    got = set(await attestor.attest(caller(pid)))
    assert sel(f"unix:path:{exe}") in got
    assert sel(f"unix:sha256:{digest}") in got
    # Same binary again (another process even): served from the cache.
    again = set(await attestor.attest(caller(pid)))
    assert sel(f"unix:sha256:{digest}") in again
    assert len(hashed) == 1


@needs_root
@pytest.mark.parametrize("limit", [1, -1])
async def test_unix_size_limit_omits_digest(sleeper_as_nobody: subprocess.Popen[bytes], limit: int) -> None:
    got = await UnixAttestor(discover_workload_path=True, workload_size_limit=limit).attest(
        caller(sleeper_as_nobody.pid)
    )
    assert any(s.value.startswith("path:") for s in got)
    assert not any(s.value.startswith("sha256:") for s in got)


@pytest.mark.parametrize("discover", [False, True])
async def test_unix_missing_process(discover: bool) -> None:
    with pytest.raises(AttestationError):
        await UnixAttestor(discover_workload_path=discover).attest(caller(_gone_pid()))
    with pytest.raises(AttestationError):
        await UnixAttestor().attest(caller(0))


@pytest.fixture
def exited_pid() -> int:
    proc = subprocess.Popen([SLEEP, "0"])
    proc.wait()
    return proc.pid


async def test_unix_and_systemd_exited_process(exited_pid: int) -> None:
    with pytest.raises(AttestationError):
        await UnixAttestor(discover_workload_path=True).attest(caller(exited_pid))
    with pytest.raises(AttestationError):
        await SystemdAttestor().attest(caller(exited_pid))


async def test_unix_names_are_looked_up_once_per_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """NSS lookups (a thread hop, and maybe LDAP/nss-systemd) happen once per caller shape
    and NAME_TTL_SECONDS, not on every Workload API call; a rename shows up after the TTL."""
    calls: list[int] = []
    names = {os.getuid(): "first"}

    def user_name(uid: int) -> str | None:
        calls.append(uid)
        return names.get(uid)

    monkeypatch.setattr(unix_mod, "_user_name", user_name)
    now = [1000.0]
    attestor = UnixAttestor()
    attestor._by_creds._clock = lambda: now[0]
    me = caller(os.getpid())
    assert sel("unix:user:first") in await attestor.attest(me)
    assert sel("unix:user:first") in await attestor.attest(me)
    assert len(calls) == 1
    names[os.getuid()] = "renamed"
    now[0] += unix_mod.NAME_TTL_SECONDS + 1
    got = await attestor.attest(me)
    assert sel("unix:user:renamed") in got and sel("unix:user:first") not in got
    assert len(calls) == 2


def test_parse_status_reads_kernel_layout_and_falls_back() -> None:
    text = Path(f"/proc/{os.getpid()}/status").read_text()
    creds = parse_status(text)
    assert (creds.uid, creds.gid) == (os.geteuid(), os.getegid())
    # Same answer when the fields are not where the kernel puts them (full scan).
    shuffled = "uid:\t1 2 3 4\nGID:\t5 6 7 8\ngroups:\t9 10\n"
    assert parse_status(shuffled) == unix_mod.ProcessCredentials(2, 6, (9, 10))


def test_parse_status() -> None:
    text = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t50\t51\t52\t53\nGroups:\t4 24 27 \n"
    creds = parse_status(text)
    assert (creds.uid, creds.gid, creds.supplementary_gids) == (1001, 51, (4, 24, 27))
    assert parse_status("Uid:\t7\nGid:\t8\nGroups:\n").supplementary_gids == ()
    with pytest.raises(ValueError):
        parse_status("Name:\tx\n")


# ---- systemd ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/nginx.service\n", "nginx.service"),
        ("0::/system.slice/system-getty.slice/getty@tty1.service\n", "getty@tty1.service"),
        ("0::/init.scope\n", "init.scope"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        # A user unit attests as the user manager, as the system manager (and SPIRE) sees it.
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope\n", "user@1000.service"),
        # Delegated subtree: the service named its sub-cgroup like a unit; still the service.
        ("0::/system.slice/ci-runner.service/payload/admin.service\n", "ci-runner.service"),
        ("0::/system.slice/docker-0123abcd.scope\n", "docker-0123abcd.scope"),
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/"
            "cri-containerd-5678.scope\n",
            "cri-containerd-5678.scope",
        ),
        ("0::/system.slice/foo\\x2dbar.service\n", "foo\\x2dbar.service"),
        # cgroup v1
        (
            "12:pids:/system.slice/sshd.service\n4:memory:/system.slice/sshd.service\n"
            "1:name=systemd:/system.slice/sshd.service\n0::/\n",
            "sshd.service",
        ),
        ("1:name=systemd:/system.slice/cron.service\n", "cron.service"),
        # hybrid: both agree
        ("1:name=systemd:/system.slice/a.service\n0::/system.slice/a.service\n", "a.service"),
        # not in a unit
        ("0::/\n", None),
        ("0::/system.slice\n", None),
        ("0::/system.slice/some-cgroup\n", None),
        ("0::/../../system.slice/x.service\n", None),
        ("9:name=systemd:/\n4:memory:/process_api/abc\n0::/\n", None),
        ("", None),
        ("garbage\n", None),
        ("5:cpu:/system.slice/x.service\n", None),
    ],
)
def test_systemd_unit_table(cgroup: str, unit: str | None) -> None:
    path = systemd_cgroup_path(cgroup)
    assert (unit_from_cgroup_path(path) if path is not None else None) == unit


def test_cgroup_path_may_contain_colon() -> None:
    assert systemd_cgroup_path("0::/system.slice/a:b.service\n") == "/system.slice/a:b.service"
    assert unit_from_cgroup_path("/system.slice/a:b.service") == "a:b.service"


async def test_systemd_attest_from_proc_table(tmp_path: Path) -> None:
    (tmp_path / "321").mkdir()
    (tmp_path / "321" / "cgroup").write_text("0::/system.slice/nginx.service\n")
    (tmp_path / "322").mkdir()
    (tmp_path / "322" / "cgroup").write_text("0::/\n")
    attestor = SystemdAttestor(proc_root=str(tmp_path))
    assert await attestor.attest(caller(321)) == [sel("systemd:id:nginx.service")]
    assert await attestor.attest(caller(322)) == []
    with pytest.raises(AttestationError):
        await attestor.attest(caller(323))


async def test_systemd_real_process() -> None:
    got = await SystemdAttestor().attest(caller(os.getpid()))
    assert all(s.type == "systemd" and s.value.startswith("id:") for s in got)
    with pytest.raises(AttestationError):
        await SystemdAttestor().attest(caller(_gone_pid()))


@needs_root
async def test_unix_sha256_is_hashed_once_per_uid_at_a_time(
    sleeper_as_nobody: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binary of up to workload_size_limit (64 MB) is hashed on a cache miss, and a user
    can force misses (touch its binary) on many connections at once: every executor thread
    hashed for it, and other workloads' attestations (NSS lookups) queued behind. Now one
    uid's hashes run one at a time, on their own threads, and concurrent requests for one
    binary share one hash."""
    import threading
    import time

    pid = sleeper_as_nobody.pid
    running, most, calls = 0, 0, 0
    lock = threading.Lock()
    real_hash = unix_mod._hash_file

    def slow_hash(path: str, limit: int) -> tuple[unix_mod.FileKey, str]:
        nonlocal running, most, calls
        with lock:
            running += 1
            calls += 1
            most = max(most, running)
        time.sleep(0.1)
        try:
            return real_hash(path, limit)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(unix_mod, "_hash_file", slow_hash)
    attestor = UnixAttestor(discover_workload_path=True)
    results = await asyncio.gather(*(attestor.attest(caller(pid)) for _ in range(4)))
    assert calls == 1, "concurrent requests for one binary each hashed it"
    assert all(any(s.value.startswith("sha256:") for s in r) for r in results)
    monkeypatch.setattr(attestor._digests, "get", lambda key: None)  # every request a miss
    await asyncio.gather(*(attestor.attest(caller(pid)) for _ in range(4)))
    assert most == 1, f"{most} hashes ran at once for one uid"


async def test_unix_a_hung_hash_keeps_its_uid_to_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binary whose read never returns (a hung NFS mount) held its caller, and every later
    request of its uid, for good; now the caller is refused after the timeout. The hash
    still holds its thread: the uid's next request started another, so one uid took every
    hashing thread and other uids' hashes timed out behind them. Now the uid's next request
    waits for that thread (up to the timeout) instead of taking another."""
    import threading

    release = threading.Event()
    hung: list[str] = []
    real = unix_mod._hash_file

    def hash_file(path: str, limit: int) -> tuple[unix_mod.FileKey, str]:
        if "/7/" in path:
            hung.append(path)
            release.wait(10)
            raise OSError("released")
        return real(path, limit)

    monkeypatch.setattr(unix_mod, "_hash_file", hash_file)
    monkeypatch.setattr(unix_mod, "HASH_TIMEOUT_SECONDS", 0.1)
    binary = tmp_path / "app"
    binary.write_bytes(b"A" * 100)
    proc_root = _fake_proc(tmp_path / "proc", 7, str(binary))  # uid 0
    _fake_proc(tmp_path / "proc", 8, str(binary))
    (tmp_path / "proc" / "8" / "status").write_text(ROOT_STATUS.replace("\t0", "\t1000"))
    attestor = UnixAttestor(discover_workload_path=True, proc_root=proc_root)
    try:
        with pytest.raises(AttestationError, match=r"took over 0\.1 s"):
            await attestor.attest(caller(7))
        for _ in range(unix_mod._HASH_THREADS):
            with pytest.raises(AttestationError, match=r"has not ended in 0\.1 s"):
                await attestor.attest(caller(7))
        assert len(hung) == 1
        digest = hashlib.sha256(b"A" * 100).hexdigest()
        assert Selector("unix", f"sha256:{digest}") in await attestor.attest(caller(8))
        release.set()
        for _ in range(100):  # the hung thread ends: its uid is hashed again
            if not attestor._outliving:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(AttestationError, match="released"):
            await attestor.attest(caller(7))
    finally:
        release.set()
        await attestor.close()


async def test_unix_a_hash_whose_caller_went_away_is_waited_for_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workload that disconnects while its large binary is hashed and connects again
    gets its sha256 selector once that hash ends, not a refusal, and from that hash."""
    import time

    real = unix_mod._hash_file
    hashes: list[str] = []

    def slow_hash(path: str, limit: int) -> tuple[unix_mod.FileKey, str]:
        hashes.append(path)
        time.sleep(0.2)
        return real(path, limit)

    monkeypatch.setattr(unix_mod, "_hash_file", slow_hash)
    attestor = _hashing_attestor(tmp_path)
    try:
        gone = asyncio.create_task(attestor.attest(caller(7)))
        await asyncio.sleep(0.05)
        gone.cancel()
        digest = hashlib.sha256(b"A" * 100).hexdigest()
        assert Selector("unix", f"sha256:{digest}") in await attestor.attest(caller(7))
        assert len(hashes) == 1  # hashed once
    finally:
        await attestor.close()


async def test_unix_a_read_that_times_out_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ETIMEDOUT from the read (a soft-mounted NFS) is a TimeoutError too; it was reported
    as the hash taking over the 30 s limit."""
    import errno

    def timed_out(path: str, limit: int) -> tuple[unix_mod.FileKey, str]:
        raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(unix_mod, "_hash_file", timed_out)
    attestor = _hashing_attestor(tmp_path)
    try:
        with pytest.raises(AttestationError, match=r"cannot hash the binary .*Connection timed out"):
            await attestor.attest(caller(7))
    finally:
        await attestor.close()


async def test_unix_a_stat_that_hangs_holds_only_its_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stat of a binary on a hung hard-mounted NFS blocks too; on the event loop it held
    every workload's calls. Now it runs on a thread and its caller is refused after the
    timeout, while the loop goes on."""
    import threading

    release = threading.Event()

    def hung_stat(path: str) -> os.stat_result:
        release.wait(10)
        raise OSError("released")

    monkeypatch.setattr(unix_mod, "_stat_file", hung_stat)
    monkeypatch.setattr(unix_mod, "HASH_TIMEOUT_SECONDS", 0.2)
    attestor = _hashing_attestor(tmp_path)
    ticks = 0

    async def loop_runs() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(loop_runs())
    try:
        with pytest.raises(AttestationError, match=r"did not answer stat in 0\.2 s"):
            await attestor.attest(caller(7))
        assert ticks >= 5  # the loop was not held
    finally:
        ticker.cancel()
        release.set()
        await attestor.close()


def _hashing_attestor(tmp_path: Path) -> UnixAttestor:
    """An attestor with path discovery for a root process 7 running a 100-byte binary."""
    binary = tmp_path / "app"
    binary.write_bytes(b"A" * 100)
    return UnixAttestor(discover_workload_path=True, proc_root=_fake_proc(tmp_path / "proc", 7, str(binary)))


ROOT_STATUS = "Name:\tw\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n"


def _fake_proc(root: Path, pid: int, exe: str | bytes) -> str:
    """A /proc/<pid> with a root-owned status and `exe` linking to `exe`; returns the root."""
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "status").write_text(ROOT_STATUS)
    os.symlink(exe, os.fsencode(d / "exe"))
    return str(root)


async def test_unix_sha256_cache_sees_a_same_size_rewrite_with_the_mtime_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest cache was keyed by (dev, inode, mtime, size): the binary's owner could
    rewrite it at the same size, set the mtime back with utime() and keep the old digest,
    so an entry pinned to the old binary's sha256 matched the new one. ctime cannot be set."""
    monkeypatch.setattr(unix_mod, "_RECENT_CTIME_NS", 0, raising=False)  # cache a new file too
    binary = tmp_path / "app"
    binary.write_bytes(b"A" * 100)
    before = binary.stat()
    await asyncio.sleep(0.05)  # past the coarse tick inode times are taken from
    proc_root = _fake_proc(tmp_path / "proc", 7, str(binary))
    attestor = UnixAttestor(discover_workload_path=True, proc_root=proc_root)
    assert sel(f"unix:sha256:{_sha256_of(str(binary))}") in await attestor.attest(caller(7))
    binary.write_bytes(b"B" * 100)
    os.utime(binary, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert binary.stat().st_mtime_ns == before.st_mtime_ns
    got = await attestor.attest(caller(7))
    assert sel(f"unix:sha256:{hashlib.sha256(b'B' * 100).hexdigest()}") in got


async def test_unix_sha256_of_a_just_changed_binary_is_not_cached(tmp_path: Path, hashed: list[str]) -> None:
    """Inode times come from a coarse clock: a rewrite within the same tick as the hash
    keeps even the ctime, so a binary changed a moment ago is hashed again each time."""
    binary = tmp_path / "app"
    binary.write_bytes(b"A" * 100)
    proc_root = _fake_proc(tmp_path / "proc", 7, str(binary))
    attestor = UnixAttestor(discover_workload_path=True, proc_root=proc_root)
    await attestor.attest(caller(7))
    await attestor.attest(caller(7))
    assert len(hashed) == 2


async def test_unix_sha256_refuses_a_fifo_or_device_without_blocking(tmp_path: Path) -> None:
    """An exe that is a FIFO blocked a hashing thread in open() for good (two such callers
    and no binary got hashed any more), and /dev/zero with no size limit was read forever.
    The kernel only execs regular files, so this takes a proc_root that is not the kernel's."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc_root = _fake_proc(tmp_path / "proc", 7, str(fifo))
    _fake_proc(tmp_path / "proc", 8, "/dev/zero")
    attestor = UnixAttestor(discover_workload_path=True, workload_size_limit=0, proc_root=proc_root)
    try:
        with pytest.raises(AttestationError, match="regular file"):
            await asyncio.wait_for(attestor.attest(caller(7)), 5)
        with pytest.raises(AttestationError, match="regular file"):
            await asyncio.wait_for(attestor.attest(caller(8)), 5)
    finally:
        try:  # a reader blocked in open() (the bug) is let go, so the thread pool can end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        await attestor.close()


@pytest.mark.parametrize("name", ["new\nline", "/".join(c * 250 for c in "wxyz")])
async def test_unix_path_that_cannot_be_a_selector_is_left_out(tmp_path: Path, name: str) -> None:
    """A binary whose path has a newline, or is longer than a selector may be, raised
    InvalidSelectorError out of attest() (not an AttestationError: an internal error with a
    traceback). No entry can hold such a selector, so it is left out; the rest stay."""
    binary = tmp_path / name
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_bytes(b"A")
    proc_root = _fake_proc(tmp_path / "proc", 7, str(binary))
    attestor = UnixAttestor(discover_workload_path=True, proc_root=proc_root)
    got = await attestor.attest(caller(7))
    assert sel("unix:uid:0") in got
    assert sel(f"unix:sha256:{hashlib.sha256(b'A').hexdigest()}") in got
    assert not any(s.value.startswith("path:") for s in got)
