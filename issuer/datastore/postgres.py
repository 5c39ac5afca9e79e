"""PostgreSQL datastore (server replicas in HA) on an asyncpg pool.

Same behaviour as the SQLite backend: each mutating call is one transaction holding
the act and its outbox events. Replicas coordinate only through the database:
unique constraints for entries and join tokens, row-level atomic statements for
counters, advisory locks for migrations and outbox claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from typing import Any

import asyncpg

from issuer.datastore import codec
from issuer.datastore.base import AgentRecord, CaKeyRecord, EntryAlreadyExistsError, EntryChangedError
from issuer.datastore.migrations import CREATE_VERSION_TABLE, load_migrations, pending
from issuer.events.model import Event, OutboxRow, StoredEvent
from meshid.entry import Entry
from meshid.errors import AlreadyExistsError, NotFoundError
from meshid.spiffe_id import SpiffeId

# Advisory lock keys ("meshid" in the high bytes, so they won't collide with another
# application's locks on a shared database).
_MIGRATION_LOCK = 0x6D65_7368_6964_0001
_CLAIM_LOCK = 0x6D65_7368_6964_0002


def _p(i: int) -> str:
    return f"${i}"


def _placeholders(n: int, start: int = 1) -> str:
    return ", ".join(_p(i) for i in range(start, start + n))


_ENTRY_INSERT = (
    f"INSERT INTO entries ({', '.join(codec.ENTRY_COLUMNS)}) "
    f"VALUES ({_placeholders(len(codec.ENTRY_COLUMNS))}) ON CONFLICT DO NOTHING RETURNING id"
)
_ENTRY_UPDATE = (
    "UPDATE entries SET "
    + ", ".join(f"{c} = {_p(i)}" for i, c in enumerate(codec.ENTRY_COLUMNS[1:], start=1))
    + f" WHERE id = {_p(len(codec.ENTRY_COLUMNS))}"
)
_SELECTOR_INSERT = "INSERT INTO entry_selectors (entry_id, type, value) VALUES ($1, $2, $3)"
_AGENT_UPSERT = codec.upsert_sql("agents", codec.AGENT_COLUMNS, "agent_id", _p)
_AGENT_SELECT = f"SELECT {', '.join(codec.AGENT_COLUMNS)} FROM agents"
_AGENT_RENEW = codec.agent_renew_sql(_p)
_AGENT_PROMOTE = codec.agent_promote_sql(_p)
_CA_KEY_UPSERT = codec.upsert_sql("ca_keys", codec.CA_KEY_COLUMNS, "key_id", _p)
_CA_KEY_SELECT = f"SELECT {', '.join(codec.CA_KEY_COLUMNS)} FROM ca_keys"
_EVENT_INSERT = (
    f"INSERT INTO outbox ({', '.join(codec.EVENT_COLUMNS)}) "
    f"VALUES ({_placeholders(len(codec.EVENT_COLUMNS))})"
)
_META_UPSERT = codec.upsert_sql("meta", ("key", "value"), "key", _p)
_OUTBOX_COLS = "seq, " + ", ".join(codec.EVENT_COLUMNS)
# Lease and delivery state lives in the narrow outbox_state table (migration 0002), so
# the relay's bookkeeping never writes new versions of the ~2 KB event rows.
# $1 owner, $2 lease_until, $3 now, $4 limit
_CLAIM = f"""
WITH picked AS (
    SELECT o.seq FROM outbox_state AS o
    WHERE o.delivered_at IS NULL
      AND (o.claimed_by IS NULL OR o.claimed_by = $1 OR o.lease_until <= $3)
      AND NOT EXISTS (
          SELECT 1 FROM outbox_state AS p
          WHERE p.partition_key = o.partition_key AND p.seq < o.seq AND p.delivered_at IS NULL
            AND p.claimed_by <> $1 AND p.lease_until > $3)
    ORDER BY o.seq
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE outbox_state AS t SET claimed_by = $1, lease_until = $2
    FROM picked WHERE t.seq = picked.seq
    RETURNING t.seq
)
SELECT {", ".join("o." + c for c in _OUTBOX_COLS.split(", "))}
FROM outbox AS o JOIN claimed ON o.seq = claimed.seq
ORDER BY o.seq
"""
_UNDELIVERED = (
    f"SELECT {', '.join('o.' + c for c in _OUTBOX_COLS.split(', '))} FROM outbox_state AS s "
    "JOIN outbox AS o ON o.seq = s.seq WHERE s.delivered_at IS NULL AND s.seq > $1 ORDER BY s.seq LIMIT $2"
)
_PRUNE = """
WITH gone AS (DELETE FROM outbox_state WHERE delivered_at < $1 RETURNING seq)
DELETE FROM outbox WHERE seq IN (SELECT seq FROM gone)
"""

class PostgresDataStore(codec.AgentSerialWrites):
    """DataStore on a PostgreSQL database shared by every server replica."""

    agent_renew_sql = _AGENT_RENEW
    agent_promote_sql = _AGENT_PROMOTE

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        command_timeout: float | None = 30.0,
    ) -> None:
        self._dsn = dsn
        self._min = min_connections
        self._max = max_connections
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

    # --- lifecycle ------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = await asyncpg.create_pool(
            self._dsn,
            min_size=self._min,
            max_size=self._max,
            command_timeout=self._command_timeout,
            server_settings={"application_name": "meshid"},
        )
        try:
            await self._migrate(pool)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("datastore is not open")
        return self._pool

    async def _migrate(self, pool: asyncpg.Pool) -> None:
        migrations = await asyncio.to_thread(load_migrations, "postgres")
        async with pool.acquire() as conn, conn.transaction():
            # Replicas starting together queue here; the first applies, the rest find
            # nothing pending. PostgreSQL DDL is transactional, so it is all or nothing.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(CREATE_VERSION_TABLE)
            applied = {int(r["version"]) for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in pending(migrations, applied):
                await conn.execute(migration.sql)  # no arguments: simple protocol, many statements
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    time.time(),
                )

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._db.acquire() as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        # A session advisory lock on a connection kept for the block; the block's own
        # queries run on other pool connections. If this one dies the lock goes with it
        # (and the pool's reset on release unlocks all, should the unlock below fail).
        key = int.from_bytes(hashlib.sha256(f"meshid:{name}".encode()).digest()[:8], "big", signed=True)
        async with self._db.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)

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
            # DO NOTHING (not an exception) keeps the transaction usable for the lookup,
            # and waits out a concurrent insert of the same key on another replica.
            if await conn.fetchval(_ENTRY_INSERT, *params) is None:
                clash = await _entry_with_key(conn, params[3])
                if clash is not None:
                    raise EntryAlreadyExistsError(clash)
                raise AlreadyExistsError(f"entry id {stored.id!r} is already taken")
            await _insert_many(conn, _SELECTOR_INSERT, codec.selector_params(stored))
            await _insert_many(conn, _EVENT_INSERT, event_rows)
        return stored

    async def update_entry(
        self, entry: Entry, events: Sequence[Event] = (), *, expected_revision: int | None = None
    ) -> Entry:
        event_rows = [codec.event_params(e) for e in events]
        key = ""
        try:
            async with self._tx() as conn:
                row = await conn.fetchrow(
                    "SELECT revision_number, created_at FROM entries WHERE id = $1 FOR UPDATE", entry.id
                )
                if row is None:
                    raise NotFoundError(f"entry {entry.id!r} not found")
                if expected_revision is not None and int(row[0]) != expected_revision:
                    raise EntryChangedError(
                        f"entry {entry.id!r} is at revision {row[0]}, not {expected_revision}"
                    )
                stored = codec.canonical_entry(
                    entry.replace(revision_number=int(row[0]) + 1, created_at=int(row[1]))
                )
                params = codec.entry_params(stored)
                key = params[3]
                clash = await _entry_with_key(conn, key, exclude_id=stored.id)
                if clash is not None:
                    raise EntryAlreadyExistsError(clash)
                await conn.execute(_ENTRY_UPDATE, *params[1:], stored.id)
                await conn.execute("DELETE FROM entry_selectors WHERE entry_id = $1", stored.id)
                await _insert_many(conn, _SELECTOR_INSERT, codec.selector_params(stored))
                await _insert_many(conn, _EVENT_INSERT, event_rows)
        except asyncpg.UniqueViolationError:
            # Lost a race with another replica writing the same natural key after our
            # check; report it like the checked case.
            async with self._db.acquire() as conn:
                clash = await _entry_with_key(conn, key, exclude_id=entry.id)
            if clash is None:
                raise
            raise EntryAlreadyExistsError(clash) from None
        return stored

    async def delete_entry(self, entry_id: str, events: Sequence[Event] = ()) -> Entry:
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            body = await conn.fetchval("DELETE FROM entries WHERE id = $1 RETURNING body", entry_id)
            if body is None:
                raise NotFoundError(f"entry {entry_id!r} not found")
            await _insert_many(conn, _EVENT_INSERT, event_rows)
        return codec.entry_from_body(body)

    async def get_entry(self, entry_id: str) -> Entry | None:
        body = await self._db.fetchval("SELECT body FROM entries WHERE id = $1", entry_id)
        return codec.entry_from_body(body) if body is not None else None

    async def list_entries(self) -> list[Entry]:
        return _entries(await self._db.fetch("SELECT body FROM entries ORDER BY id"))

    async def entries_by_parents(self, parents: Collection[SpiffeId]) -> list[Entry]:
        if not parents:
            return []
        rows = await self._db.fetch(
            "SELECT body FROM entries WHERE parent_id = ANY($1::text[]) ORDER BY id",
            sorted({str(p) for p in parents}),
        )
        return _entries(rows)

    async def entries_by_spiffe_id(self, spiffe_id: SpiffeId) -> list[Entry]:
        rows = await self._db.fetch(
            "SELECT body FROM entries WHERE spiffe_id = $1 ORDER BY id", str(spiffe_id)
        )
        return _entries(rows)

    # --- agents ---------------------------------------------------------------------
    async def get_agent(self, agent_id: SpiffeId) -> AgentRecord | None:
        row = await self._db.fetchrow(f"{_AGENT_SELECT} WHERE agent_id = $1", str(agent_id))
        return codec.agent_from_row(row) if row is not None else None

    async def put_agent(self, record: AgentRecord, events: Sequence[Event] = ()) -> None:
        params = codec.agent_params(record)
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            await conn.execute(_AGENT_UPSERT, *params)
            await _insert_many(conn, _EVENT_INSERT, event_rows)

    async def _agent_cas(self, query: str, params: tuple[object, ...], events: Sequence[Event]) -> bool:
        """A conditional agent UPDATE ... RETURNING and its events, or nothing at all."""
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            if await conn.fetchval(query, *params) is None:
                return False
            await _insert_many(conn, _EVENT_INSERT, event_rows)
        return True

    async def list_agents(self) -> list[AgentRecord]:
        return [codec.agent_from_row(r) for r in await self._db.fetch(f"{_AGENT_SELECT} ORDER BY agent_id")]

    async def delete_agent(self, agent_id: SpiffeId, events: Sequence[Event] = ()) -> None:
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            gone = await conn.fetchval(
                "DELETE FROM agents WHERE agent_id = $1 RETURNING agent_id", str(agent_id)
            )
            if gone is None:
                raise NotFoundError(f"agent {agent_id} not found")
            await _insert_many(conn, _EVENT_INSERT, event_rows)

    # --- join tokens ------------------------------------------------------------------
    async def create_join_token(self, token_hash: str, token_id: str, expires_at: int) -> None:
        inserted = await self._db.fetchval(
            "INSERT INTO join_tokens (token_hash, token_id, expires_at) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING RETURNING token_hash",
            token_hash,
            token_id,
            expires_at,
        )
        if inserted is None:
            raise AlreadyExistsError("a join token with this hash already exists")

    async def consume_join_token(self, token_hash: str, now: int) -> str | None:
        # One DELETE: a concurrent second DELETE waits on the row lock and then finds
        # the row gone, so exactly one caller gets the token.
        row = await self._db.fetchrow(
            "DELETE FROM join_tokens WHERE token_hash = $1 RETURNING token_id, expires_at", token_hash
        )
        if row is None or now >= int(row["expires_at"]):
            return None
        return str(row["token_id"])

    # --- CA keys ------------------------------------------------------------------------
    async def put_ca_key(self, record: CaKeyRecord, events: Sequence[Event] = ()) -> None:
        params = codec.ca_key_params(record)
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            await conn.execute(_CA_KEY_UPSERT, *params)
            await _insert_many(conn, _EVENT_INSERT, event_rows)

    async def list_ca_keys(self, kind: str | None = None) -> list[CaKeyRecord]:
        if kind is None:
            rows = await self._db.fetch(f"{_CA_KEY_SELECT} ORDER BY not_before, key_id")
        else:
            rows = await self._db.fetch(f"{_CA_KEY_SELECT} WHERE kind = $1 ORDER BY not_before, key_id", kind)
        return [codec.ca_key_from_row(r) for r in rows]

    async def delete_ca_key(self, key_id: str, events: Sequence[Event] = ()) -> None:
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            gone = await conn.fetchval("DELETE FROM ca_keys WHERE key_id = $1 RETURNING key_id", key_id)
            if gone is None:
                raise NotFoundError(f"CA key {key_id!r} not found")
            await _insert_many(conn, _EVENT_INSERT, event_rows)

    async def raise_max_signed(self, key_id: str, not_after: int) -> None:
        updated = await self._db.fetchval(
            "UPDATE ca_keys SET max_signed_not_after = GREATEST(max_signed_not_after, $1) "
            "WHERE key_id = $2 RETURNING key_id",
            not_after,
            key_id,
        )
        if updated is None:
            raise NotFoundError(f"CA key {key_id!r} not found")

    # --- metadata -------------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        value = await self._db.fetchval("SELECT value FROM meta WHERE key = $1", key)
        return None if value is None else str(value)

    async def set_meta(self, key: str, value: str) -> None:
        await self._db.execute(_META_UPSERT, key, value)

    async def increment_meta(self, key: str) -> int:
        try:
            value = await self._db.fetchval(
                "INSERT INTO meta (key, value) VALUES ($1, '1') "
                "ON CONFLICT (key) DO UPDATE SET value = (meta.value::bigint + 1)::text RETURNING value",
                key,
            )
        except asyncpg.InvalidTextRepresentationError:
            raise ValueError(f"meta {key!r} does not hold an integer") from None
        return int(value)

    # --- outbox -----------------------------------------------------------------------------
    async def append_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        event_rows = [codec.event_params(e) for e in events]
        async with self._tx() as conn:
            await _insert_many(conn, _EVENT_INSERT, event_rows)

    async def fetch_outbox(self, after_seq: int, limit: int) -> list[OutboxRow]:
        rows = await self._db.fetch(_UNDELIVERED, after_seq, limit)
        return [codec.outbox_row_from_row(r) for r in rows]

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float, now: float) -> list[OutboxRow]:
        return [r.decode() for r in await self.claim_outbox_stored(owner, limit, lease_seconds, now)]

    async def claim_outbox_stored(self, owner: str, limit: int, lease_seconds: float,
                                  now: float) -> list[StoredEvent]:
        async with self._tx() as conn:
            # SKIP LOCKED alone keeps two claimers off the same row, but each would see
            # the other's fresh leases only after commit, so both could take rows of the
            # same subject and publish them out of order. Claims are short: serialize them.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _CLAIM_LOCK)
            rows = await conn.fetch(_CLAIM, owner, now + lease_seconds, now, limit)
        return [codec.stored_event_from_row(r) for r in rows]

    async def mark_delivered(self, seqs: Sequence[int], now: float) -> None:
        if not seqs:
            return
        # Only rows not yet delivered: a late duplicate mark changes nothing.
        await self._db.execute(
            "UPDATE outbox_state SET delivered_at = $1, claimed_by = NULL, lease_until = NULL "
            "WHERE delivered_at IS NULL AND seq = ANY($2::bigint[])",
            now,
            [int(s) for s in seqs],
        )

    async def release_outbox(self, owner: str) -> int:
        status = await self._db.execute(
            "UPDATE outbox_state SET claimed_by = NULL, lease_until = NULL "
            "WHERE claimed_by = $1 AND delivered_at IS NULL",
            owner,
        )
        return int(status.split()[-1])  # "UPDATE <n>"

    async def prune_outbox(self, delivered_before: float) -> int:
        status = await self._db.execute(_PRUNE, delivered_before)
        return int(status.split()[-1])  # "DELETE <n>"

    async def outbox_backlog(self) -> int:
        return int(await self._db.fetchval("SELECT COUNT(*) FROM outbox_state WHERE delivered_at IS NULL"))


# --- helpers ---------------------------------------------------------------------------------
def _entries(rows: Iterable[Any]) -> list[Entry]:
    return [codec.entry_from_body(r[0]) for r in rows]


async def _insert_many(conn: asyncpg.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    if rows:
        await conn.executemany(sql, rows)


async def _entry_with_key(conn: asyncpg.Connection, key: str, exclude_id: str = "") -> Entry | None:
    body = await conn.fetchval(
        "SELECT body FROM entries WHERE natural_key = $1 AND id <> $2", key, exclude_id
    )
    return codec.entry_from_body(body) if body is not None else None
