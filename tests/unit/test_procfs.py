"""read_proc_text (attestors/workload/procfs.py): the whole file, bytes kept, errors as open()'s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attestors.workload.procfs import read_proc_text


def test_reads_all_of_a_file_longer_than_one_read_and_keeps_bad_bytes(tmp_path: Path) -> None:
    p = tmp_path / "status"
    body = b"Name:\tx\xff)\n" + b"a" * 20_000 + b"\nEnd\n"
    p.write_bytes(body)
    text = read_proc_text(str(p))
    assert text.encode("utf-8", "surrogateescape") == body


def test_reads_a_real_proc_file() -> None:
    assert read_proc_text(f"/proc/{os.getpid()}/stat").startswith(f"{os.getpid()} (")


def test_missing_file_raises_like_open(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_proc_text(str(tmp_path / "gone"))
