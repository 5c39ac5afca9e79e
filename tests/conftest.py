"""Shared fixtures: short temp dirs (Unix socket paths must stay under 108 bytes), a
master secret in the environment, and a whole meshid stack (server + agent) in-process."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from issuer.datastore.sqlite import SqliteDataStore

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The PostgreSQL fixtures, registered here once: a module importing them made a session
# fixture of its own, so each such module started its own cluster, all kept until the end.
from pg import postgres_cluster, postgres_db, postgres_dsn  # noqa: F401


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="mi", dir="/tmp"))
    os.chmod(d, 0o755)  # other uids (tests drop to nobody) must traverse to sockets
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def master_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    secret = "test-master-secret-0123456789abcdef"
    monkeypatch.setenv("MESHID_MASTER_SECRET", secret)
    return secret


@pytest.fixture
def steady_renewals(monkeypatch: pytest.MonkeyPatch) -> None:
    """First renewals drawn as in the steady state. The SVIDs of the agent's start-up burst
    draw theirs from the stationary residual life: now and then seconds away (~0.4 % per 10 s
    of a 1 h SVID), an unforced rotation (and issuance event) in the middle of a test that
    expects quiet, the same serial or each SVID issued once. The steady-state draw puts it at
    least half the lifetime away."""
    from workload_api.rotation import RotationPolicy

    monkeypatch.setattr(RotationPolicy, "renew_at_stationary", RotationPolicy.renew_at)


@pytest.fixture
async def dev_stack(short_tmp: Path, steady_renewals: None) -> AsyncIterator[object]:
    from meshid.cli.dev import start_dev

    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=3600)
    try:
        yield stack
    finally:
        await stack.stop()


@pytest.fixture
async def ds(tmp_path: Path) -> AsyncIterator[SqliteDataStore]:
    """An empty SQLite datastore (migrated), closed after the test."""
    store = SqliteDataStore(tmp_path / "meshid.sqlite3")
    await store.open()
    try:
        yield store
    finally:
        await store.close()
