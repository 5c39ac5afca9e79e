"""Files replaced whole: written to a synced temporary file beside the target, then renamed
over it, so a reader (a restarted agent, a proxy reloading its certificate) never sees a
half-written file, and the file has the mode asked for whatever one of that name had."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def stage(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """`data` in a new, synced `<path>.tmp` with `mode`. A leftover temporary file is removed
    first and the new one made with O_EXCL|O_NOFOLLOW: in a directory others can write (a
    `--write` target), one they planted as a symlink or hard link is never written through."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def replace_together(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Each (path, data, mode) staged, and only once all are, each renamed into place: a write
    that fails (disk full) leaves every old file as it was, not a new key beside an old
    certificate."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((stage(path, data, mode), path))
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """One file replaced whole (see replace_together)."""
    replace_together([(path, data, mode)])


def sync_directory(path: Path) -> None:
    """Sync the directory `path`, so a rename into it survives a power cut."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def write_off_loop(write: Callable[..., None], *args: Any) -> None:
    """`write(*args)` on a thread, so its fsyncs on a slow disk do not hold the event loop.
    A cancellation of the caller (a stop) waits for the write to end before it goes on: the
    thread cannot be stopped midway, and a restart that read the file meanwhile (in the same
    process, or a stop() that returned) found the previous content."""
    done = asyncio.ensure_future(asyncio.to_thread(write, *args))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.wait([done])  # asyncio.wait leaves `done` running if cancelled again
        if not done.cancelled():
            done.exception()  # the caller is going away: nothing left to act on a failure
        raise
