"""meshid/durable_files.py: files replaced whole, with their mode, never written through a
link planted at the temporary name."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from meshid.durable_files import replace_together, write_atomically, write_off_loop


def test_a_file_is_replaced_whole_with_the_mode_asked(tmp_path: Path) -> None:
    target = tmp_path / "svid.key"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_atomically(target, b"new key", 0o600)
    assert target.read_bytes() == b"new key"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svid.key"]


def test_links_planted_at_the_temporary_name_are_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.link(victim, tmp_path / "a.pem.tmp")
    (tmp_path / "b.pem.tmp").symlink_to(victim)
    replace_together([(tmp_path / "a.pem", b"a", 0o644), (tmp_path / "b.pem", b"b", 0o644)])
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "a.pem").read_bytes() == b"a" and (tmp_path / "b.pem").read_bytes() == b"b"


def test_a_failed_write_leaves_every_old_file_as_it_was(tmp_path: Path) -> None:
    for name in ("key", "cert"):
        (tmp_path / name).write_bytes(b"old " + name.encode())
    (tmp_path / "cert.tmp").mkdir()  # its write fails, as on a full disk
    with pytest.raises(OSError):
        replace_together([(tmp_path / "key", b"new key", 0o600), (tmp_path / "cert", b"new cert", 0o644)])
    assert (tmp_path / "key").read_bytes() == b"old key" and (tmp_path / "cert").read_bytes() == b"old cert"
    assert not (tmp_path / "key.tmp").exists()


async def test_a_write_off_the_loop_ends_before_a_cancellation_goes_on(tmp_path: Path) -> None:
    """The agent wrote bundle.json on a thread; a stop() right after a bundle change returned
    while the thread was still writing, and an agent started then read the old bundle (seen
    under CPU steal in test_taint_flow). A cancelled caller now waits for the write."""
    started = threading.Event()
    target = tmp_path / "bundle.json"

    def slow_write(path: Path, data: bytes) -> None:
        started.set()
        time.sleep(0.3)
        write_atomically(path, data)

    task = asyncio.create_task(write_off_loop(slow_write, target, b"new"))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert target.read_bytes() == b"new"  # written by the time the cancellation went on


async def test_a_write_off_the_loop_raises_its_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await write_off_loop(write_atomically, tmp_path / "missing" / "bundle.json", b"x")
