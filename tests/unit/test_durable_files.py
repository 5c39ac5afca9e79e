"""meshid/durable_files.py: files replaced whole, with their mode, never written through a
link planted at the temporary name."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshid.durable_files import replace_together, write_atomically


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
