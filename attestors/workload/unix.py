"""The `unix` workload attestor: selectors from the caller's process credentials and binary.

Selector spelling and semantics follow SPIRE's unix plugin so existing registration
entries keep working: uid/gid are the *effective* ids (second column of the Uid:/Gid:
lines in /proc/<pid>/status, what SPIRE takes from gopsutil), supplementary groups come
from the Groups: line, and names that do not resolve are simply omitted.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import hashlib
import logging
import os
import pwd
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from attestors.workload.base import Caller
from attestors.workload.procfs import read_proc_text
from meshid.errors import AttestationError, InvalidSelectorError
from meshid.selector import Selector

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_WORKLOAD_SIZE_LIMIT = 64 * 1024 * 1024
_HASH_CACHE_SIZE = 1024
_CHUNK = 1024 * 1024
# Hashing runs on threads of its own, so hashes a user forces (touching its binary makes every
# request a cache miss) cannot take the default executor's threads from NSS lookups.
_HASH_THREADS = 2
# A binary on a hung network filesystem would block its hashing thread for good: its caller
# is refused after this instead, and its uid's next request waits this long for that thread.
# Its stat blocks as well, so that runs on threads of its own, refused after as long.
HASH_TIMEOUT_SECONDS = 30.0
_STAT_THREADS = 2
# A digest is not cached while the file's ctime is this recent: inode times come from a
# coarse clock (a few ms; a second on some filesystems), so a rewrite within the same tick
# would keep the key the digest was cached under.
_RECENT_CTIME_NS = 2_000_000_000
# Names resolved through NSS are kept this long (found or not): a lookup can cost
# hundreds of µs (nss-systemd, LDAP) plus a thread hop, on every Workload API call.
NAME_TTL_SECONDS = 30.0
_NAME_CACHE_SIZE = 4096

# (st_dev, st_ino, st_mtime_ns, st_ctime_ns, st_size). ctime too: a binary's owner can
# rewrite it at the same size and set the mtime back with utime(), but cannot set the ctime.
FileKey = tuple[int, int, int, int, int]


def _file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class ProcessCredentials:
    """The parts of /proc/<pid>/status the attestor uses."""

    uid: int
    gid: int
    supplementary_gids: tuple[int, ...]


def _status_fields(text: str) -> dict[str, str]:
    """The Uid/Gid/Groups lines; the kernel's own spelling is found without splitting the
    ~55-line file (this runs on every Workload API call), anything else by a full scan."""
    fields: dict[str, str] = {}
    for key in ("Uid", "Gid", "Groups"):
        start = text.find(f"\n{key}:")
        if start < 0:
            break
        start += len(key) + 2
        end = text.find("\n", start)
        fields[key.lower()] = text[start:end if end >= 0 else len(text)].strip()
    else:
        return fields
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def parse_status(text: str) -> ProcessCredentials:
    """Effective uid/gid and supplementary gids from /proc/<pid>/status text."""
    fields = _status_fields(text)
    try:
        uids = [int(v) for v in fields["uid"].split()]
        gids = [int(v) for v in fields["gid"].split()]
        groups = tuple(int(v) for v in fields.get("groups", "").split())
    except (KeyError, ValueError) as exc:
        raise ValueError("malformed /proc/<pid>/status") from exc
    if not uids or not gids:
        raise ValueError("malformed /proc/<pid>/status: empty Uid/Gid")
    # Same rule as SPIRE: real, effective, saved, fs -> take effective when present.
    uid = uids[1] if len(uids) > 1 else uids[0]
    gid = gids[1] if len(gids) > 1 else gids[0]
    return ProcessCredentials(uid=uid, gid=gid, supplementary_gids=groups)


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


class _CredentialCache:
    """Process credentials → their unix selectors (names included) with a short TTL; only
    touched on the event loop. A renamed or new user shows up within NAME_TTL_SECONDS."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._items: dict[ProcessCredentials, tuple[list[Selector], float]] = {}

    def get(self, creds: ProcessCredentials) -> list[Selector] | None:
        hit = self._items.get(creds)
        if hit is None or hit[1] <= self._clock():
            return None
        return hit[0]

    def put(self, creds: ProcessCredentials, selectors: list[Selector]) -> None:
        if len(self._items) >= self._size:
            self._items.clear()  # bounded; a cold refill costs one lookup per caller shape
        self._items[creds] = (selectors, self._clock() + self._ttl)


def _selector_values(creds: ProcessCredentials) -> list[str]:
    """uid, user, gid, group and supplementary ones; names come from NSS (may hit
    LDAP/sssd/systemd), so this runs in an executor thread."""
    values = [f"uid:{creds.uid}"]
    if (user := _user_name(creds.uid)) is not None:
        values.append(f"user:{user}")
    values.append(f"gid:{creds.gid}")
    if (group := _group_name(creds.gid)) is not None:
        values.append(f"group:{group}")
    for sgid in creds.supplementary_gids:
        values.append(f"supplementary_gid:{sgid}")
        if (sgroup := _group_name(sgid)) is not None:
            values.append(f"supplementary_group:{sgroup}")
    return values


def _selector(value: str) -> Selector | None:
    """A unix selector, or None for a value no entry can hold: a binary path over the selector
    length limit or with a control character (a newline in a file name), or such an NSS name.
    It raised InvalidSelectorError out of attest(), an internal error with a traceback."""
    try:
        return Selector("unix", value)
    except InvalidSelectorError:
        return None


class _DigestCache:
    """Bounded LRU of sha256 digests; touched from executor threads, hence the lock."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[FileKey, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: FileKey) -> str | None:
        with self._lock:
            digest = self._items.get(key)
            if digest is not None:
                self._items.move_to_end(key)
            return digest

    def put(self, key: FileKey, digest: str) -> None:
        with self._lock:
            self._items[key] = digest
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class _UidTurn:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class UnixAttestor:
    """Selectors `unix:uid|user|gid|group|supplementary_gid|supplementary_group`, and with
    `discover_workload_path` also `unix:path` and `unix:sha256`.

    `workload_size_limit`: binaries larger than this get no sha256 selector (0 = no limit,
    negative = never hash), so a huge binary costs nothing and can still match entries that
    do not ask for a digest. `proc_root` lets an agent read a host /proc mounted elsewhere.
    """

    name = "unix"
    local = True  # /proc only: awaited inline (see WorkloadAttestor)

    def __init__(
        self,
        discover_workload_path: bool = False,
        workload_size_limit: int = DEFAULT_WORKLOAD_SIZE_LIMIT,
        *,
        proc_root: str = "/proc",
    ) -> None:
        self.discover_workload_path = discover_workload_path
        self.workload_size_limit = workload_size_limit
        self._proc_root = proc_root.rstrip("/") or "/"
        self._digests = _DigestCache(_HASH_CACHE_SIZE)
        self._hash_pool: ThreadPoolExecutor | None = None
        self._stat_pool: ThreadPoolExecutor | None = None
        self._hashing: dict[int, _UidTurn] = {}  # uid -> its hashes, one at a time
        # uid -> its hash that outlived its caller (timed out, or the caller went away) and
        # still holds a thread: the uid's next hash waits for it, or one uid could take every
        # thread.
        self._outliving: dict[int, Future[tuple[FileKey, str]]] = {}
        self._by_creds = _CredentialCache(NAME_TTL_SECONDS, _NAME_CACHE_SIZE)

    async def close(self) -> None:
        """Stop the hashing threads (an agent shutting down does not wait for a hash)."""
        for pool in (self._hash_pool, self._stat_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._hash_pool = self._stat_pool = None

    def _proc(self, pid: int, leaf: str) -> str:
        return f"{self._proc_root}/{pid}/{leaf}"

    async def attest(self, caller: Caller) -> list[Selector]:
        pid = caller.pid
        if pid <= 0:
            raise AttestationError(f"invalid workload pid {pid}")
        try:
            # A few hundred bytes from a pseudo-file: a thread hop would cost more than the read.
            creds = parse_status(read_proc_text(self._proc(pid, "status")))
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise AttestationError(f"workload process {pid} not found") from exc
        except (OSError, ValueError) as exc:
            raise AttestationError(f"cannot read credentials of workload process {pid}: {exc}") from exc

        path: str | None = None
        if self.discover_workload_path:
            path = self._exe_path(pid)

        selectors = self._by_creds.get(creds)
        if selectors is None:
            values = await asyncio.get_running_loop().run_in_executor(None, _selector_values, creds)
            selectors = [s for value in values if (s := _selector(value)) is not None]
            self._by_creds.put(creds, selectors)
        selectors = list(selectors)  # the cached list is shared; path/sha256 are appended
        if path is not None:
            if (path_selector := _selector(f"path:{path}")) is not None:
                selectors.append(path_selector)
            digest = await self._sha256(pid, creds.uid)
            if digest is not None:
                selectors.append(Selector("unix", f"sha256:{digest}"))
        return selectors

    def _exe_path(self, pid: int) -> str:
        try:
            return os.readlink(self._proc(pid, "exe"))
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise AttestationError(f"workload process {pid} not found") from exc
        except OSError as exc:
            # Kernel threads have no exe; EACCES means the agent lacks ptrace-read rights.
            raise AttestationError(f"cannot discover the binary of workload process {pid}: {exc}") from exc

    async def _sha256(self, pid: int, uid: int) -> str | None:
        """The binary's digest: from the cache, else hashed, one hash at a time per uid (a
        request waiting its turn may then find the digest cached by the one before it)."""
        turn = self._hashing.get(uid)
        if turn is None:
            turn = self._hashing[uid] = _UidTurn()
        turn.users += 1
        try:
            async with turn.lock:
                return await self._sha256_now(pid, uid)
        finally:
            turn.users -= 1
            if not turn.users:
                del self._hashing[uid]

    async def _sha256_now(self, pid: int, uid: int) -> str | None:
        limit = self.workload_size_limit
        if limit < 0:
            return None
        # /proc/<pid>/exe opens the inode the process runs, even if deleted or in another
        # mount namespace.
        exe = self._proc(pid, "exe")
        st = await self._stat(pid, exe)
        cached = self._digests.get(_file_key(st))
        if cached is not None:
            return cached
        if limit and st.st_size > limit:
            log.warning(
                "workload %d binary is %d bytes, over the %d-byte limit: no sha256 selector",
                pid,
                st.st_size,
                limit,
            )
            return None
        earlier = self._outliving.get(uid)
        if earlier is not None:
            # Often just a large binary whose caller went away: waited for, not refused.
            try:
                key, digest = await asyncio.wait_for(
                    asyncio.shield(asyncio.wrap_future(earlier)), HASH_TIMEOUT_SECONDS
                )
            except TimeoutError:
                raise AttestationError(
                    f"an earlier hash of a binary of uid {uid} has not ended in {HASH_TIMEOUT_SECONDS:g} s: "
                    f"no sha256 for workload process {pid}"
                ) from None
            except Exception:
                pass  # that hash's own failure was reported to its caller
            else:
                if key == _file_key(st):  # the same binary: its digest, without hashing again
                    return self._keep(key, digest)
        if self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="meshid-sha256")
        job = self._hash_pool.submit(_hash_file, exe, limit)
        try:
            key, digest = await _on_thread(
                job, pid, "hash",
                f"hashing the binary of workload process {pid} took over {HASH_TIMEOUT_SECONDS:g} s",
            )
        except _TooLarge as exc:
            log.warning(
                "workload %d binary is %d bytes, over the %d-byte limit: no sha256 selector",
                pid,
                exc.size,
                limit,
            )
            return None
        finally:
            # A hash still queued never starts; one running keeps its thread until it ends.
            if not job.cancel() and not job.done():
                self._outliving[uid] = job
                job.add_done_callback(lambda done: self._forget_outliving(uid, done))
        return self._keep(key, digest)

    async def _stat(self, pid: int, exe: str) -> os.stat_result:
        """stat of the binary, off the event loop: on a hung hard-mounted network filesystem
        stat blocks too, and on the loop it held every workload's calls, not only this one's."""
        if self._stat_pool is None:
            self._stat_pool = ThreadPoolExecutor(_STAT_THREADS, thread_name_prefix="meshid-stat")
        return await _on_thread(
            self._stat_pool.submit(_stat_file, exe), pid, "stat",
            f"the binary of workload process {pid} did not answer stat in {HASH_TIMEOUT_SECONDS:g} s",
        )

    def _keep(self, key: FileKey, digest: str) -> str:
        # Keyed by what was actually opened, in case the exe changed between stat and open.
        if time.time_ns() - key[3] >= _RECENT_CTIME_NS:
            self._digests.put(key, digest)
        return digest

    def _forget_outliving(self, uid: int, job: Future[tuple[FileKey, str]]) -> None:
        # Runs on the hashing thread; dict reads and pops are atomic.
        if self._outliving.get(uid) is job:
            self._outliving.pop(uid, None)


async def _on_thread(job: Future[_T], pid: int, doing: str, too_slow: str) -> _T:
    """The result of `job` (a stat or hash of the binary of `pid`, on one of our threads)
    within HASH_TIMEOUT_SECONDS: past it, AttestationError(too_slow); an OSError of its own
    becomes an AttestationError saying what it could not `doing`."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(job), HASH_TIMEOUT_SECONDS)
    except TimeoutError as exc:
        if exc.errno is None:  # our limit, not ETIMEDOUT from a network filesystem
            raise AttestationError(too_slow) from None
        raise AttestationError(f"cannot {doing} the binary of workload process {pid}: {exc}") from exc
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise AttestationError(f"workload process {pid} not found") from exc
    except OSError as exc:
        raise AttestationError(f"cannot {doing} the binary of workload process {pid}: {exc}") from exc


def _stat_file(path: str) -> os.stat_result:
    """os.stat, by a name of this module (tests stand in a stat that hangs)."""
    return os.stat(path)


def _hash_file(path: str, limit: int) -> tuple[FileKey, str]:
    """sha256 of the file at `path` and its identity key; runs in an executor thread."""
    # The kernel only execs regular files, but a proc_root view need not be the kernel's: a
    # FIFO would block this thread in open() for good, /dev/zero never end with no limit.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if limit and st.st_size > limit:
            raise _TooLarge(st.st_size)
        h = hashlib.sha256()
        read = 0
        while chunk := f.read(_CHUNK):
            read += len(chunk)
            # Guards against a file that grows while being read.
            if limit and read > limit:
                raise _TooLarge(read)
            h.update(chunk)
    return _file_key(st), h.hexdigest()
