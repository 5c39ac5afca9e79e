"""SQLite datastore (the default; one server process) on aiosqlite.

One writer connection guarded by an asyncio lock: every mutating call is one
`BEGIN IMMEDIATE` transaction holding the act and its outbox events, so an act is
never recorded without its events. Reads use a second connection; under WAL they see
the last committed state and never wait for the writer. The outbox relay's claims and
delivery marks go through a third, under the same lock: single statements committed
without waiting for fsync (synchronous=NORMAL), which a power cut may only roll back
into a re-sent event with the same id. Acts and their events always commit FULL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from issuer.datastore import codec
from issuer.datastore.base import AgentRecord, CaKeyRecord, EntryAlreadyExistsError, EntryChangedError
from issuer.datastore.migrations import CREATE_VERSION_TABLE, load_migrations, pending, split_statements
from issuer.events.model import Event, OutboxRow, StoredEvent
from meshid.durable_files import sync_directory
from meshid.entry import Entry
from meshid.errors import AlreadyExistsError, NotFoundError
from meshid.spiffe_id import SpiffeId

MEMORY = ":memory:"
_MIN_SQLITE = (3, 35, 0)  # RETURNING


def _q(_: int) -> str:
    return "?"


def _marks(n: int) -> str:
    return ", ".join("?" * n)


_ENTRY_COLS = ", ".join(codec.ENTRY_COLUMNS)
_ENTRY_INSERT = (
    f"INSERT INTO entries ({_ENTRY_COLS}) VALUES ({_marks(len(codec.ENTRY_COLUMNS))}) "
    "ON CONFLICT DO NOTHING RETURNING id"
)
_ENTRY_UPDATE = (
    "UPDATE entries SET " + ", ".join(f"{c} = ?" for c in codec.ENTRY_COLUMNS[1:]) + " WHERE id = ?"
)
_SELECTOR_INSERT = "INSERT INTO entry_selectors (entry_id, type, value) VALUES (?, ?, ?)"
_AGENT_UPSERT = codec.upsert_sql("agents", codec.AGENT_COLUMNS, "agent_id", _q)
_AGENT_SELECT = f"SELECT {', '.join(codec.AGENT_COLUMNS)} FROM agents"
_AGENT_RENEW = codec.agent_renew_sql(_q)
_AGENT_PROMOTE = codec.agent_promote_sql(_q)
_CA_KEY_UPSERT = codec.upsert_sql("ca_keys", codec.CA_KEY_COLUMNS, "key_id", _q)
_CA_KEY_SELECT = f"SELECT {', '.join(codec.CA_KEY_COLUMNS)} FROM ca_keys"
_META_UPSERT = codec.upsert_sql("meta", ("key", "value"), "key", _q)
_EVENT_INSERT = (
    f"INSERT INTO outbox ({', '.join(codec.EVENT_COLUMNS)}) VALUES ({_marks(len(codec.EVENT_COLUMNS))})"
)
_OUTBOX_COLS = "seq, " + ", ".join(codec.EVENT_COLUMNS)
# Lease and delivery state lives in the narrow outbox_state table (migration 0002), so
# the relay's bookkeeping never rewrites the ~2 KB event rows.
_CLAIM = """
UPDATE outbox_state SET claimed_by = :owner, lease_until = :until
WHERE seq IN (
    SELECT o.seq FROM outbox_state AS o
    WHERE o.delivered_at IS NULL
      AND (o.claimed_by IS NULL OR o.claimed_by = :owner OR o.lease_until <= :now)
      AND NOT EXISTS (
          SELECT 1 FROM outbox_state AS p
          WHERE p.partition_key = o.partition_key AND p.seq < o.seq AND p.delivered_at IS NULL
            AND p.claimed_by <> :owner AND p.lease_until > :now)
    ORDER BY o.seq
    LIMIT :limit)
RETURNING seq
"""
_BY_SEQS = f"SELECT {_OUTBOX_COLS} FROM outbox WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq"
_UNDELIVERED = (
    f"SELECT {', '.join('o.' + c for c in _OUTBOX_COLS.split(', '))} FROM outbox_state AS s "
    "JOIN outbox AS o ON o.seq = s.seq WHERE s.delivered_at IS NULL AND s.seq > ? ORDER BY s.seq LIMIT ?"
)
_RELEASE = (
    "UPDATE outbox_state SET claimed_by = NULL, lease_until = NULL "
    "WHERE claimed_by = ? AND delivered_at IS NULL RETURNING seq"
)
_DELIVER = (
    "UPDATE outbox_state SET delivered_at = ?, claimed_by = NULL, lease_until = NULL "
    "WHERE delivered_at IS NULL AND seq IN (SELECT value FROM json_each(?))"
)


class SqliteDataStore(codec.AgentSerialWrites):
    """DataStore on one SQLite file (or `:memory:`, for throw-away use)."""

    agent_renew_sql = _AGENT_RENEW
    agent_promote_sql = _AGENT_PROMOTE

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 10_000) -> None:
        self._path = os.fspath(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._relay: aiosqlite.Connection | None = None  # the relay's writes (see the module doc)
        self._write_lock = asyncio.Lock()
        self._named_locks: dict[str, asyncio.Lock] = {}
        # Group commit of append_events (see there).
        self._pending_events: list[tuple[list[tuple[Any, ...]], asyncio.Future[None]]] = []
        self._event_commit: asyncio.Task[None] | None = None

    @property
    def path(self) -> str:
        return self._path

    # --- lifecycle ------------------------------------------------------------------
    async def open(self) -> None:
        if self._writer is not None:
            return
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise RuntimeError(f"SQLite {sqlite3.sqlite_version} is too old; meshid needs 3.35 or later")
        if self._path != MEMORY:
            await asyncio.to_thread(_create_private_file, Path(self._path))
        writer = await self._connect()
        reader: aiosqlite.Connection | None = None
        relay: aiosqlite.Connection | None = None
        try:
            # WAL lets readers run beside the writer; FULL because the outbox promises
            # that an acknowledged act's events survive a power cut, not just a crash.
            mode = await self._enable_wal(writer)
            if self._path != MEMORY and str(mode).lower() != "wal":
                raise RuntimeError(f"could not put {self._path} in WAL mode (got {mode})")
            await writer.execute("PRAGMA synchronous = FULL")
            await self._migrate(writer)
            if self._path != MEMORY:
                reader = await self._connect()
                await reader.execute("PRAGMA query_only = ON")
                relay = await self._connect()
                await relay.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            for conn in (relay, reader):
                if conn is not None:
                    await conn.close()
            await writer.close()
            raise
        self._writer = writer
        # :memory: cannot have a second connection: it would be a different database
        # (and synchronous does not matter there).
        self._reader = reader or writer
        self._relay = relay or writer

    async def close(self) -> None:
        if self._event_commit is not None:
            await asyncio.wait({self._event_commit})  # commits what callers are waiting for
        writer, reader, relay = self._writer, self._reader, self._relay
        self._writer = self._reader = self._relay = None
        if reader is not None and reader is not writer:
            await reader.close()
        if writer is not None:
            async with self._write_lock:  # let an in-flight transaction finish first
                if relay is not None and relay is not writer:
                    await relay.close()
                await writer.close()

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, sqlite3 must not.
        conn = await aiosqlite.connect(self._path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        await conn.execute("PRAGMA foreign_keys = ON")
        return conn

    async def _enable_wal(self, conn: aiosqlite.Connection) -> Any:
        # Switching a new file to WAL needs an exclusive lock, and SQLite reports BUSY at
        # once rather than calling the busy handler: retry while another process (or a
        # second store) is opening the same file.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout_ms / 1000
        while True:
            try:
                return await _scalar(conn, "PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.01)

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        migrations = await asyncio.to_thread(load_migrations, "sqlite")
        # IMMEDIATE takes the write lock up front, so two processes opening the same
        # file at once apply each migration exactly once.
        try:
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute(CREATE_VERSION_TABLE)
            applied = {
                int(r[0]) for r in await conn.execute_fetchall("SELECT version FROM schema_migrations")
            }
            for migration in pending(migrations, applied):
                for statement in split_statements(migration.sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
        except BaseException:
            await _rollback(conn)
            raise
        await conn.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; rolled back if the body raises."""
        async with self._write_lock:
            conn = self._require(self._writer)
            try:
                # Inside the try: if we are cancelled while BEGIN waits, it still runs
                # and must be rolled back.
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
            except BaseException:
                await _rollback(conn)
                raise
            await conn.execute("COMMIT")

    async def _relay_write(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[sqlite3.Row]:
        """One statement of the relay's bookkeeping, on its own connection: a transaction
        by itself (one round trip to the connection's thread, no BEGIN/COMMIT), under the
        write lock so that it never waits for the writer inside SQLite."""
        async with self._write_lock:
            return list(await self._require(self._relay).execute_fetchall(sql, params))

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        reader = self._require(self._reader)
        if reader is self._writer:
            # :memory: shares the writer; don't read into someone's open transaction.
            async with self._write_lock:
                yield reader
        else:
            yield reader

    async def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        async with self._read() as conn:
            return list(await conn.execute_fetchall(sql, params))

    @staticmethod
    def _require(conn: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if conn is None:
            raise RuntimeError("datastore is not open")
        return conn

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        # One server process per SQLite file, so a process-local lock is the whole story.
        async with self._named_locks.setdefault(name, asyncio.Lock()):
            yield

    async def backup(self, dest_path: str | os.PathLike[str]) -> None:
        """Write a consistent copy of the database to dest_path (replaced atomically),
        while the server keeps running: sqlite3's online backup API, in a thread."""
        if self._path == MEMORY:
            raise RuntimeError("an in-memory datastore cannot be backed up")
        await asyncio.to_thread(_backup_file, self._path, Path(dest_path), self._busy_timeout_ms)

    # --- entries --------------------------------------------------------------------
    async def create_entry(self, entry: Entry, events: Sequence[Event] = ()) -> Entry:
        stored = codec.canonical_entry(
            entry.replace(
                id=entry.id or str(uuid.uuid4()),
                created_at=entry.created_at or int(time.time()),
                revision_number=0,
            )
        )
        params = codec.entry_params(stored)
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            if not await conn.execute_fetchall(_ENTRY_INSERT, params):
                clash = await _entry_with_key(conn, params[3])
                if clash is not None:
                    raise EntryAlreadyExistsError(clash)
                raise AlreadyExistsError(f"entry id {stored.id!r} is already taken")
            await conn.executemany(_SELECTOR_INSERT, codec.selector_params(stored))
            await conn.executemany(_EVENT_INSERT, event_rows)
        return stored

    async def update_entry(
        self, entry: Entry, events: Sequence[Event] = (), *, expected_revision: int | None = None
    ) -> Entry:
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            rows = list(
                await conn.execute_fetchall(
                    "SELECT revision_number, created_at FROM entries WHERE id = ?", (entry.id,)
                )
            )
            if not rows:
                raise NotFoundError(f"entry {entry.id!r} not found")
            if expected_revision is not None and int(rows[0][0]) != expected_revision:
                raise EntryChangedError(
                    f"entry {entry.id!r} is at revision {rows[0][0]}, not {expected_revision}"
                )
            stored = codec.canonical_entry(
                entry.replace(revision_number=int(rows[0][0]) + 1, created_at=int(rows[0][1]))
            )
            params = codec.entry_params(stored)
            clash = await _entry_with_key(conn, params[3], exclude_id=stored.id)
            if clash is not None:
                raise EntryAlreadyExistsError(clash)
            await conn.execute(_ENTRY_UPDATE, (*params[1:], stored.id))
            await conn.execute("DELETE FROM entry_selectors WHERE entry_id = ?", (stored.id,))
            await conn.executemany(_SELECTOR_INSERT, codec.selector_params(stored))
            await conn.executemany(_EVENT_INSERT, event_rows)
        return stored

    async def delete_entry(self, entry_id: str, events: Sequence[Event] = ()) -> Entry:
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            rows = list(
                await conn.execute_fetchall("DELETE FROM entries WHERE id = ? RETURNING body", (entry_id,))
            )
            if not rows:
                raise NotFoundError(f"entry {entry_id!r} not found")
            await conn.executemany(_EVENT_INSERT, event_rows)
        return codec.entry_from_body(rows[0][0])

    async def get_entry(self, entry_id: str) -> Entry | None:
        rows = await self._rows("SELECT body FROM entries WHERE id = ?", (entry_id,))
        return codec.entry_from_body(rows[0][0]) if rows else None

    async def list_entries(self) -> list[Entry]:
        return _entries(await self._rows("SELECT body FROM entries ORDER BY id"))

    async def entries_by_parents(self, parents: Collection[SpiffeId]) -> list[Entry]:
        if not parents:
            return []
        # json_each keeps this one statement whatever the number of parents (no limit on
        # bound variables) and still lets SQLite use entries_by_parent_id.
        rows = await self._rows(
            "SELECT body FROM entries WHERE parent_id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (codec.dumps(sorted({str(p) for p in parents})),),
        )
        return _entries(rows)

    async def entries_by_spiffe_id(self, spiffe_id: SpiffeId) -> list[Entry]:
        rows = await self._rows("SELECT body FROM entries WHERE spiffe_id = ? ORDER BY id", (str(spiffe_id),))
        return _entries(rows)

    # --- agents ---------------------------------------------------------------------
    async def get_agent(self, agent_id: SpiffeId) -> AgentRecord | None:
        rows = await self._rows(f"{_AGENT_SELECT} WHERE agent_id = ?", (str(agent_id),))
        return codec.agent_from_row(rows[0]) if rows else None

    async def put_agent(self, record: AgentRecord, events: Sequence[Event] = ()) -> None:
        params = codec.agent_params(record)
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            await conn.execute(_AGENT_UPSERT, params)
            await conn.executemany(_EVENT_INSERT, event_rows)

    async def _agent_cas(self, query: str, params: tuple[object, ...], events: Sequence[Event]) -> bool:
        """A conditional agent UPDATE ... RETURNING and its events, or nothing at all."""
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            rows = await conn.execute_fetchall(query, params)
            if not list(rows):
                return False
            await conn.executemany(_EVENT_INSERT, event_rows)
        return True

    async def list_agents(self) -> list[AgentRecord]:
        return [codec.agent_from_row(r) for r in await self._rows(f"{_AGENT_SELECT} ORDER BY agent_id")]

    async def delete_agent(self, agent_id: SpiffeId, events: Sequence[Event] = ()) -> None:
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            rows = await conn.execute_fetchall(
                "DELETE FROM agents WHERE agent_id = ? RETURNING agent_id", (str(agent_id),)
            )
            if not list(rows):
                raise NotFoundError(f"agent {agent_id} not found")
            await conn.executemany(_EVENT_INSERT, event_rows)

    # --- join tokens ------------------------------------------------------------------
    async def create_join_token(self, token_hash: str, token_id: str, expires_at: int) -> None:
        async with self._tx() as conn:
            rows = await conn.execute_fetchall(
                "INSERT INTO join_tokens (token_hash, token_id, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING token_hash",
                (token_hash, token_id, expires_at),
            )
            if not list(rows):
                raise AlreadyExistsError("a join token with this hash already exists")

    async def consume_join_token(self, token_hash: str, now: int) -> str | None:
        async with self._tx() as conn:
            rows = list(
                await conn.execute_fetchall(
                    "DELETE FROM join_tokens WHERE token_hash = ? RETURNING token_id, expires_at",
                    (token_hash,),
                )
            )
        if not rows or now >= int(rows[0][1]):
            return None
        return str(rows[0][0])

    # --- CA keys ------------------------------------------------------------------------
    async def put_ca_key(self, record: CaKeyRecord, events: Sequence[Event] = ()) -> None:
        params = codec.ca_key_params(record)
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            await conn.execute(_CA_KEY_UPSERT, params)
            await conn.executemany(_EVENT_INSERT, event_rows)

    async def list_ca_keys(self, kind: str | None = None) -> list[CaKeyRecord]:
        if kind is None:
            rows = await self._rows(f"{_CA_KEY_SELECT} ORDER BY not_before, key_id")
        else:
            rows = await self._rows(f"{_CA_KEY_SELECT} WHERE kind = ? ORDER BY not_before, key_id", (kind,))
        return [codec.ca_key_from_row(r) for r in rows]

    async def delete_ca_key(self, key_id: str, events: Sequence[Event] = ()) -> None:
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            rows = await conn.execute_fetchall(
                "DELETE FROM ca_keys WHERE key_id = ? RETURNING key_id", (key_id,)
            )
            if not list(rows):
                raise NotFoundError(f"CA key {key_id!r} not found")
            await conn.executemany(_EVENT_INSERT, event_rows)

    async def raise_max_signed(self, key_id: str, not_after: int) -> None:
        async with self._tx() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE ca_keys SET max_signed_not_after = MAX(max_signed_not_after, ?) "
                "WHERE key_id = ? RETURNING key_id",
                (not_after, key_id),
            )
            if not list(rows):
                raise NotFoundError(f"CA key {key_id!r} not found")

    # --- metadata -------------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        rows = await self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        async with self._tx() as conn:
            await conn.execute(_META_UPSERT, (key, value))

    async def increment_meta(self, key: str) -> int:
        async with self._tx() as conn:
            rows = list(await conn.execute_fetchall("SELECT value FROM meta WHERE key = ?", (key,)))
            # Parse here: SQLite's CAST would quietly turn a non-number into 0.
            value = _parse_counter(key, rows[0][0]) + 1 if rows else 1
            await conn.execute(_META_UPSERT, (key, str(value)))
        return value

    # --- outbox -----------------------------------------------------------------------------
    async def append_events(self, events: Sequence[Event]) -> None:
        """Events whose act writes nothing else (issuance): one transaction per call, but
        calls that arrive while the writer is busy share the next one (group commit), so
        many concurrent small signings cost one fsync, not one each. Returns once the
        events are durable; each call's events still commit all together or not at all."""
        if not events:
            return
        rows = [codec.event_params(e) for e in events]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_events.append((rows, done))
        if self._event_commit is None or self._event_commit.done():
            self._event_commit = asyncio.create_task(self._commit_events(), name="meshid-sqlite-events")
        # Shielded: a caller that goes away does not abort the others' transaction.
        await asyncio.shield(done)

    async def _commit_events(self) -> None:
        while self._pending_events:
            group: list[tuple[list[tuple[Any, ...]], asyncio.Future[None]]] = []
            try:
                async with self._tx() as conn:
                    # Taken once the lock is ours: everything queued while we waited joins.
                    group, self._pending_events = self._pending_events, []
                    await conn.executemany(_EVENT_INSERT, [r for rows, _ in group for r in rows])
            except BaseException as exc:
                if not group:  # BEGIN failed: the queue is still ours to fail
                    group, self._pending_events = self._pending_events, []
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for _, fut in group:
                if not fut.done():
                    fut.set_result(None)

    async def fetch_outbox(self, after_seq: int, limit: int) -> list[OutboxRow]:
        rows = await self._rows(_UNDELIVERED, (after_seq, limit))
        return [codec.outbox_row_from_row(r) for r in rows]

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float, now: float) -> list[OutboxRow]:
        return [r.decode() for r in await self.claim_outbox_stored(owner, limit, lease_seconds, now)]

    async def claim_outbox_stored(self, owner: str, limit: int, lease_seconds: float,
                                  now: float) -> list[StoredEvent]:
        # One writer per file makes this trivially exclusive; the lease logic is the same
        # as PostgreSQL's so that relays behave alike on both backends.
        params = {"owner": owner, "until": now + lease_seconds, "now": now, "limit": limit}
        seqs = [int(r[0]) for r in await self._relay_write(_CLAIM, params)]
        if not seqs:
            return []
        # The event rows never change once written: read them outside the write lock.
        rows = await self._rows(_BY_SEQS, (codec.dumps(seqs),))
        # The columns are StoredEvent's fields in order, already of its types (time is
        # REAL, data TEXT): no per-row conversion on the relay's path.
        return list(map(StoredEvent._make, rows))

    async def mark_delivered(self, seqs: Sequence[int], now: float) -> None:
        if seqs:
            # Only rows not yet delivered: a late duplicate mark changes nothing.
            await self._relay_write(_DELIVER, (now, codec.dumps([int(s) for s in seqs])))

    async def release_outbox(self, owner: str) -> int:
        rows = await self._relay_write(_RELEASE, (owner,))
        return len(rows)

    async def prune_outbox(self, delivered_before: float) -> int:
        async with self._tx() as conn:
            cursor = await conn.execute(
                "DELETE FROM outbox WHERE seq IN "
                "(SELECT seq FROM outbox_state WHERE delivered_at < ?)", (delivered_before,)
            )
            await conn.execute("DELETE FROM outbox_state WHERE delivered_at < ?", (delivered_before,))
        return max(cursor.rowcount, 0)

    async def outbox_backlog(self) -> int:
        rows = await self._rows("SELECT COUNT(*) FROM outbox_state WHERE delivered_at IS NULL")
        return int(rows[0][0])


# --- helpers ---------------------------------------------------------------------------------
def _entries(rows: Iterable[sqlite3.Row]) -> list[Entry]:
    return [codec.entry_from_body(r[0]) for r in rows]


def _parse_counter(key: str, value: Any) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"meta {key!r} holds {value!r}, not an integer") from None


async def _entry_with_key(conn: aiosqlite.Connection, key: str, exclude_id: str = "") -> Entry | None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT body FROM entries WHERE natural_key = ? AND id <> ?", (key, exclude_id)
        )
    )
    return codec.entry_from_body(rows[0][0]) if rows else None


async def _scalar(conn: aiosqlite.Connection, sql: str) -> Any:
    rows = list(await conn.execute_fetchall(sql))
    return rows[0][0] if rows else None


async def _rollback(conn: aiosqlite.Connection) -> None:
    # Always queue the ROLLBACK rather than test in_transaction first: after a
    # cancellation our BEGIN may still be waiting in aiosqlite's queue, and it runs
    # before anything queued later. "No transaction is active" is then harmless (SQLite
    # also rolls back by itself on some errors, e.g. disk full).
    with contextlib.suppress(sqlite3.OperationalError):
        await conn.execute("ROLLBACK")


def _create_private_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would honour the umask):
    it holds sealed CA keys and agent records. SQLite gives -wal/-shm the same mode."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _backup_file(source: str, dest: Path, busy_timeout_ms: int) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        src = sqlite3.connect(source, timeout=busy_timeout_ms / 1000)
        try:
            dst = sqlite3.connect(tmp)
            try:
                # pages=-1 copies everything in one step under one read transaction: a
                # consistent snapshot even while the writer keeps committing (WAL).
                src.backup(dst, pages=-1)
            finally:
                dst.close()
        finally:
            src.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RestoreError(Exception):
    """The file given to restore is not a usable meshid SQLite backup."""


_REQUIRED_TABLES = ("schema_migrations", "ca_keys", "entries", "agents", "meta", "outbox")


def check_backup(source: str | os.PathLike[str]) -> None:
    """Raise RestoreError unless `source` is an intact meshid SQLite datastore."""
    path = Path(source)
    if not path.is_file():
        raise RestoreError(f"{path}: no such file")
    try:
        # immutable: read a static file without creating -wal/-shm beside it.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise RestoreError(f"{path}: not an SQLite database ({exc})") from None
    if check is None or check[0] != "ok":
        raise RestoreError(f"{path}: integrity check failed: {check[0] if check else 'no answer'}")
    missing = [t for t in _REQUIRED_TABLES if t not in tables]
    if missing:
        raise RestoreError(f"{path}: not a meshid datastore (no {', '.join(missing)} table)")


# Outbox sequence numbers skipped at a restore: more than the events a server could have
# written between the backup and the restore (2^44: ~5 years at 100,000 events/s).
RESTORE_SEQ_GAP = 1 << 44


def _skip_used_outbox_seqs(path: Path) -> None:
    """The events written after the backup was taken were published with ids derived from
    the seqs that follow the backup's; a restored outbox handing those seqs out again would
    give new events the ids of delivered ones, and consumers deduplicating on source + id
    would drop them. Continue past them instead."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            last = int(row[0]) if row is not None else 0
            conn.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)",
                         (last + RESTORE_SEQ_GAP,))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def restore_backup(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Replace the database at `dest` with the backup `source`; the server must be stopped.

    The backup is checked first, copied beside the target (0600) and renamed over it, so
    a bad backup or a failed copy leaves the current database as it was."""
    check_backup(source)
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.restore")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        _skip_used_outbox_seqs(tmp)
        # The old database's WAL would be replayed onto the restored file: drop it first.
        for suffix in ("-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(target.parent)
