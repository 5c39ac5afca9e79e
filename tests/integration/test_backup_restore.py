"""Backup and restore through the real CLI. SQLite: `meshid server backup` while the server
runs and writes, stop, wipe the datastore, `meshid server restore`, restart: entries,
agents and CA keys (the same bundle) are back and the agent keeps its persisted SVID.
PostgreSQL: pg_dump of the live database, pg_restore into a fresh one, the server starts
on it with the same state."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pg import PostgresCluster, _clean_env
from spiffe import WorkloadApiClient
from waiting import wait_for

from issuer.datastore.sqlite import RESTORE_SEQ_GAP
from meshid.cli.dev import DevStack, start_dev
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId

pytestmark = pytest.mark.integration

TD = "example.org"


@dataclass(frozen=True)
class State:
    ca_keys: dict[str, str]  # key_id -> state
    roots: frozenset[bytes]  # SHA-256 fingerprints
    jwt_kids: frozenset[str]
    entries: dict[str, int]  # id -> revision
    agents: dict[str, str]  # agent id -> serial


async def snapshot(stack: DevStack) -> State:
    ds = stack.server.ds
    assert ds is not None
    bundle = stack.server.ca.bundle
    return State(
        {r.key_id: r.state for r in await ds.list_ca_keys()},
        frozenset(c.fingerprint(hashes.SHA256()) for c in bundle.x509_authorities),
        frozenset(bundle.jwt_authorities),
        {e.id: e.revision_number for e in await ds.list_entries()},
        {str(a.agent_id): a.serial for a in await ds.list_agents()},
    )


def fetch_ids(sock: str) -> dict[str, x509.Certificate]:
    client = WorkloadApiClient(socket_path=f"unix://{sock}")
    try:
        return {str(s.spiffe_id): s.leaf for s in client.fetch_x509_context().x509_svids}
    finally:
        client.close()


async def meshid(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshid.cli.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def start(d: Path, sock: str, dsn: str = "") -> DevStack:
    return await start_dev(d, TD, sock, svid_ttl=3600, server_overrides={"datastore": {"dsn": dsn}})


async def add_workload_entry(stack: DevStack, path: str) -> Entry:
    agent_id = stack.agent.node.agent_id
    assert agent_id is not None
    selectors = (Selector("unix", f"uid:{os.getuid()}"),)
    spiffe_id = SpiffeId.parse(f"spiffe://{TD}{path}")
    entry = await stack.server.entries.create(Entry("", spiffe_id, agent_id, selectors))
    stack.agent.manager.poke()
    return entry


async def check_restored(stack: DevStack, before: State, agent_serial: int, wanted_ids: set[str]) -> None:
    """The restarted stack has the saved state and the agent works on its persisted SVID."""
    after = await snapshot(stack)
    assert after.ca_keys == before.ca_keys  # the same CA keys, in the same slots
    assert after.roots == before.roots and after.jwt_kids == before.jwt_kids  # the same bundle
    assert before.entries.items() <= after.entries.items()
    assert before.agents.items() <= after.agents.items()
    assert stack.agent.node.chain[0].serial_number == agent_serial  # no re-attestation
    synced_after = time.time()
    await wait_for(lambda: stack.agent.manager.last_sync_ok > synced_after, 20, "a sync with the kept SVID")

    async def served() -> bool:
        try:
            return set(await asyncio.to_thread(fetch_ids, stack.socket_path)) == wanted_ids
        except Exception:
            return False

    await wait_for(served, 20, "the workload SVIDs after the restore")


async def test_sqlite_online_backup_wipe_restore(short_tmp: Path) -> None:
    d, sock = short_tmp / "d", str(short_tmp / "s" / "api.sock")
    config = short_tmp / "server.toml"
    config.write_text(
        f'trust_domain = "{TD}"\ndata_dir = "{d / "server"}"\n'
        f'[server]\nmaster_secret_file = "{d / "master.secret"}"\nmaster_secret_env = ""\n')
    backup = short_tmp / "backup.sqlite3"
    stack = await start(d, sock)
    stopped = False
    try:
        await add_workload_entry(stack, "/backed-up")
        wanted = {str(stack.spiffe_id), f"spiffe://{TD}/backed-up"}
        await wait_for(lambda: asyncio.to_thread(lambda: set(fetch_ids(sock)) == wanted), 20, "both SVIDs")
        before = await snapshot(stack)
        agent_serial = stack.agent.node.chain[0].serial_number
        parent = SpiffeId.parse(f"spiffe://{TD}/elsewhere")
        stop_writing = asyncio.Event()

        async def writer() -> int:
            # Keeps committing (entry + its outbox event, one transaction) during the backup.
            n = 0
            while not stop_writing.is_set():
                await stack.server.entries.create(Entry(
                    "", SpiffeId.parse(f"spiffe://{TD}/load/{n}"), parent, (Selector("unix", f"uid:{n}"),)))
                n += 1
                await asyncio.sleep(0)
            return n

        writing = asyncio.create_task(writer())
        await asyncio.sleep(0.2)
        missing = short_tmp / "no-such-dir" / "b.sqlite3"
        rc, out = await meshid("server", "backup", "--config", str(config), "--output", str(missing))
        assert rc == 1 and f"--output {missing}: directory {missing.parent} does not exist" in out, out
        rc, out = await meshid("server", "backup", "--config", str(config), "--output", str(backup))
        stop_writing.set()
        written = await writing
        assert rc == 0, out
        assert written > 0
        assert backup.stat().st_mode & 0o777 == 0o600
        # Restoring under the running server is refused; so is a file that is no backup.
        restore = ("server", "restore", "--config", str(config), "--input")
        rc, out = await meshid(*restore, str(backup), "--force")
        assert rc == 1 and "running" in out, out
        (short_tmp / "junk").write_bytes(b"not a database" * 100)

        await stack.stop()
        stopped = True
        datastore = d / "server" / "datastore.sqlite3"
        rc, out = await meshid(*restore, str(short_tmp / "junk"), "--force")
        assert rc == 1 and "nothing restored" in out, out
        assert datastore.exists()  # untouched
        for suffix in ("", "-wal", "-shm"):  # wipe
            await asyncio.to_thread(Path(f"{datastore}{suffix}").unlink, missing_ok=True)
        rc, out = await meshid(*restore, str(backup))
        assert rc == 0, out
        assert datastore.stat().st_mode & 0o777 == 0o600
        assert not Path(f"{datastore}-wal").exists() or Path(f"{datastore}-wal").stat().st_size == 0
        conn = sqlite3.connect(f"{backup.resolve().as_uri()}?immutable=1", uri=True)
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            backed_up_seq = int(row[0])
        finally:
            conn.close()

        stack = await start(d, sock)
        stopped = False
        await check_restored(stack, before, agent_serial, wanted)
        # Consistent snapshot: an entry is there exactly when its creation event is.
        assert stack.server.ds is not None
        loads = {e.id for e in await stack.server.ds.list_entries() if e.spiffe_id.path.startswith("/load/")}
        events = {r.event.data["unmapped"]["entry_id"] for r in await stack.server.ds.fetch_outbox(0, 100_000)
                  if r.event.type.endswith("entry.created") and r.event.subject.startswith(f"spiffe://{TD}/load/")}
        assert loads and loads == events
        # Events written after the backup went out with the seqs that follow the backup's
        # (and ids derived from them): the restored outbox continues past them.
        newer = [r.seq for r in await stack.server.ds.fetch_outbox(0, 100_000) if r.seq > backed_up_seq]
        assert newer and min(newer) > backed_up_seq + RESTORE_SEQ_GAP
    finally:
        if not stopped:
            await stack.stop()


async def test_postgres_pg_dump_restore_into_fresh_database(
    postgres_cluster: PostgresCluster, postgres_db: str, short_tmp: Path,
) -> None:
    d, sock = short_tmp / "d", str(short_tmp / "s" / "api.sock")
    dump = short_tmp / "meshid.dump"
    stack = await start(d, sock, postgres_db)
    stopped = False
    try:
        await add_workload_entry(stack, "/backed-up")
        wanted = {str(stack.spiffe_id), f"spiffe://{TD}/backed-up"}
        await wait_for(lambda: asyncio.to_thread(lambda: set(fetch_ids(sock)) == wanted), 20, "both SVIDs")
        before = await snapshot(stack)
        agent_serial = stack.agent.node.chain[0].serial_number
        # Online: pg_dump takes one consistent snapshot while the server keeps running.
        pg(postgres_cluster, "pg_dump", "--format=custom", "--no-owner", f"--file={dump}", postgres_db)
        await stack.stop()
        stopped = True

        fresh = postgres_cluster.create_database()
        pg(postgres_cluster, "pg_restore", "--no-owner", "--exit-on-error", f"--dbname={fresh}", str(dump))
        # README's step after pg_restore: the outbox continues past the seqs (and so the
        # CloudEvents ids) that events written after the dump were published with.
        pg(postgres_cluster, "psql", "--no-psqlrc", "-v", "ON_ERROR_STOP=1", f"--dbname={fresh}", "-c",
           PG_SKIP_USED_SEQS)
        stack = await start(d, sock, fresh)
        stopped = False
        await check_restored(stack, before, agent_serial, wanted)
        assert stack.server.ds is not None
        seqs = [r.seq for r in await stack.server.ds.fetch_outbox(0, 100_000)]
        assert seqs and max(seqs) > RESTORE_SEQ_GAP
    finally:
        if not stopped:
            await stack.stop()


PG_SKIP_USED_SEQS = ("SELECT setval(pg_get_serial_sequence('outbox', 'seq'), "
                     "nextval(pg_get_serial_sequence('outbox', 'seq')) + 17592186044416)")


def pg(cluster: PostgresCluster, tool: str, *args: str) -> None:
    result = subprocess.run([str(cluster.bindir / tool), *args], capture_output=True, text=True,
                            env=_clean_env(), timeout=60, check=False)
    assert result.returncode == 0, f"{tool} failed: {result.stderr}"
