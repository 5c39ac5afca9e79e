"""DataStore conformance: the same tests against SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

# tests/conftest.py puts tests/ on sys.path, where the shared PostgreSQL fixtures live.
from pg import PostgresCluster

from issuer.datastore import codec
from issuer.datastore.base import (
    AgentRecord,
    CaKeyRecord,
    DataStore,
    EntryAlreadyExistsError,
    EntryChangedError,
)
from issuer.datastore.factory import datastore_for, open_datastore
from issuer.datastore.migrations import (
    CREATE_VERSION_TABLE,
    SchemaTooNewError,
    load_migrations,
    split_statements,
)
from issuer.datastore.postgres import PostgresDataStore
from issuer.datastore.sqlite import SqliteDataStore
from issuer.events.model import Event, OutboxRow
from meshid.entry import Entry
from meshid.errors import AlreadyExistsError, ConfigError, NotFoundError
from meshid.selector import Selector, parse_selectors
from meshid.spiffe_id import SpiffeId, TrustDomain


def _conforms(a: SqliteDataStore, b: PostgresDataStore) -> list[DataStore]:
    """mypy checks here that both backends implement the Protocol."""
    return [a, b]


# --- fixtures and helpers ---------------------------------------------------------------
_TABLES = "entries, entry_selectors, agents, join_tokens, ca_keys, meta, outbox, outbox_state"


@pytest.fixture(scope="session")
def shared_pg_db(postgres_cluster: PostgresCluster) -> str:
    # One database for the suite, emptied before each test: creating and migrating a
    # database per test would cost ~0.3 s each.
    return postgres_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fresh_dsn(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database no store has opened yet."""
    if backend == "sqlite":
        return f"sqlite://{tmp_path}/meshid.db"
    return str(request.getfixturevalue("postgres_db"))


@pytest.fixture
def dsn(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database for one test (on PostgreSQL: migrated already, emptied by `store`)."""
    if backend == "sqlite":
        return f"sqlite://{tmp_path}/meshid.db"
    return str(request.getfixturevalue("shared_pg_db"))


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[DataStore]:
    s = await open_datastore(dsn)
    try:
        if isinstance(s, PostgresDataStore):
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f"TRUNCATE {_TABLES}")
            finally:
                await conn.close()
        yield s
    finally:
        await s.close()


@pytest.fixture
async def twin(store: DataStore, dsn: str) -> AsyncIterator[DataStore]:
    """A second store on the same database: another process or server replica."""
    s = await open_datastore(dsn)
    try:
        yield s
    finally:
        await s.close()


def sid(path: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://example.org{path}")


def make_entry(
    path: str = "/web",
    parent: str = "/agent/n1",
    selectors: tuple[str, ...] = ("unix:uid:1000",),
    **kw: Any,
) -> Entry:
    return Entry(
        id="", spiffe_id=sid(path), parent_id=sid(parent), selectors=parse_selectors(selectors), **kw
    )


def ev(n: int, key: str = "k") -> Event:
    return Event(
        type="io.meshid.test.happened",
        subject=f"spiffe://example.org/s{n}",
        partition_key=key,
        time=1_700_000_000.25 + n,
        data={"n": n, "unmapped": {"spiffe_id": f"s{n}", "list": [1, 2.5, "é"]}},
    )


async def all_rows(store: DataStore) -> list[OutboxRow]:
    return await store.fetch_outbox(0, 100_000)


async def outbox_events(store: DataStore) -> list[Event]:
    return [r.event for r in await all_rows(store)]


def agent(path: str = "/agent/n1", **kw: Any) -> AgentRecord:
    base: dict[str, Any] = {
        "agent_id": sid(path),
        "attestor": "join_token",
        "selectors": (Selector("jt", "b"), Selector("jt", "a")),
        "serial": "0a1b",
        "expires_at": 2_000,
        "created_at": 100,
        "updated_at": 200,
    }
    base.update(kw)
    return AgentRecord(**base)


def ca_key(key_id: str = "k1", kind: str = "x509", **kw: Any) -> CaKeyRecord:
    base: dict[str, Any] = {
        "key_id": key_id,
        "kind": kind,
        "state": "prepared",
        "sealed_key": b"\x00sealed\xff",
        "public_key_der": b"\x30\x59spki",
        "not_before": 1_000,
        "not_after": 90_000,
        "cert_chain_der": (b"\x30ca", b"\x30upstream"),
        "server_id": "server-a",
        "extra": {"upstream": "files"},
    }
    base.update(kw)
    return CaKeyRecord(**base)


def dialect(store: DataStore) -> str:
    return "sqlite" if isinstance(store, SqliteDataStore) else "postgres"


async def sql(store: DataStore, dsn: str, query: str) -> list[tuple[object, ...]]:
    """Run raw SQL beside the store (for schema checks)."""
    if isinstance(store, SqliteDataStore):

        def run() -> list[tuple[object, ...]]:
            with sqlite3.connect(store.path) as conn:
                return [tuple(r) for r in conn.execute(query).fetchall()]

        return await asyncio.to_thread(run)
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(query)]
    finally:
        await conn.close()


# --- migrations -------------------------------------------------------------------------------
def test_both_dialects_share_migration_numbers() -> None:
    lite, pg = load_migrations("sqlite"), load_migrations("postgres")
    assert [(m.version, m.name) for m in lite] == [(m.version, m.name) for m in pg]
    assert lite[0].version == 1


async def test_migrations_are_idempotent_on_reopen(store: DataStore, dsn: str) -> None:
    created = await store.create_entry(make_entry())
    await store.close()
    for _ in range(2):
        await store.open()
        await store.close()
    await store.open()
    assert await store.get_entry(created.id) == created
    versions = await sql(store, dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert [v[0] for v in versions] == [m.version for m in load_migrations(dialect(store))]


async def test_concurrent_first_open_migrates_once(fresh_dsn: str) -> None:
    stores = [datastore_for(fresh_dsn) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[0].create_entry(make_entry())
        assert len(await stores[2].list_entries()) == 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_refuses_schema_from_newer_meshid(fresh_dsn: str) -> None:
    store = await open_datastore(fresh_dsn)
    await sql(
        store, fresh_dsn, "INSERT INTO schema_migrations (version, name, applied_at) VALUES (9999, 'x', 0)"
    )
    await store.close()
    with pytest.raises(SchemaTooNewError):
        await store.open()


async def test_entry_lookups_are_indexed(store: DataStore, dsn: str) -> None:
    if isinstance(store, SqliteDataStore):
        names = await sql(store, dsn, "SELECT name FROM sqlite_master WHERE type = 'index'")
        plan = await sql(
            store,
            dsn,
            "EXPLAIN QUERY PLAN SELECT body FROM entries WHERE parent_id IN "
            '(SELECT value FROM json_each(\'["a","b"]\')) ORDER BY id',
        )
        assert any("entries_by_parent_id" in str(row) for row in plan), plan
    else:
        names = await sql(store, dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'entries'")
    found = {str(n[0]) for n in names}
    assert {"entries_by_spiffe_id", "entries_by_parent_id"} <= found


# --- entries ------------------------------------------------------------------------------------
async def test_create_assigns_id_created_at_and_revision(store: DataStore) -> None:
    created = await store.create_entry(make_entry(revision_number=7))
    assert created.id and created.created_at > 0 and created.revision_number == 0
    assert await store.get_entry(created.id) == created
    assert await store.list_entries() == [created]
    assert await store.get_entry("nope") is None


async def test_create_keeps_given_id_and_round_trips_every_field(store: DataStore) -> None:
    entry = make_entry(
        selectors=("k8s:ns:prod", "k8s:sa:web", "unix:uid:0"),
        x509_svid_ttl=3600,
        jwt_svid_ttl=300,
        dns_names=("web.example.org", "*.web.example.org"),
        federates_with=(TrustDomain("partner.org"),),
        admin=True,
        downstream=True,
        hint="external",
        created_at=12345,
        expires_at=99999,
        store_svid=True,
        extra={"disable_x509_svid_prefetch": True, "n": [1, 2]},
    ).replace(id="entry-1")
    created = await store.create_entry(entry)
    got = await store.get_entry("entry-1")
    assert got == created == entry
    assert got is not None and got.extra == {"disable_x509_svid_prefetch": True, "n": [1, 2]}
    assert got.created_at == 12345


async def test_same_natural_key_is_already_exists_carrying_the_entry(store: DataStore) -> None:
    first = await store.create_entry(make_entry(selectors=("a:1", "b:2")), [ev(1)])
    with pytest.raises(EntryAlreadyExistsError) as info:
        await store.create_entry(make_entry(selectors=("b:2", "a:1"), hint="other"), [ev(2)])
    assert isinstance(info.value, AlreadyExistsError)
    assert info.value.existing == first
    # A different selector set, parent or SPIFFE ID is a different entry.
    await store.create_entry(make_entry(selectors=("a:1",)))
    await store.create_entry(make_entry(selectors=("a:1", "b:2"), parent="/agent/n2"))
    await store.create_entry(make_entry(path="/api", selectors=("a:1", "b:2")))
    assert len(await store.list_entries()) == 4
    assert [e.subject for e in await outbox_events(store)] == [ev(1).subject]


async def test_taken_id_is_already_exists(store: DataStore) -> None:
    await store.create_entry(make_entry().replace(id="same"))
    with pytest.raises(AlreadyExistsError) as info:
        await store.create_entry(make_entry(path="/other").replace(id="same"))
    assert not isinstance(info.value, EntryAlreadyExistsError)


async def test_update_bumps_revision_and_keeps_created_at(store: DataStore) -> None:
    created = await store.create_entry(make_entry(created_at=500))
    changed = created.replace(selectors=parse_selectors(["unix:uid:2000", "unix:gid:10"]), x509_svid_ttl=60)
    updated = await store.update_entry(changed.replace(created_at=1, revision_number=0), [ev(1)])
    assert updated.revision_number == 1 and updated.created_at == 500
    assert await store.get_entry(created.id) == updated == changed.replace(revision_number=1)
    again = await store.update_entry(updated.replace(hint="h"))
    assert again.revision_number == 2
    assert [e.subject for e in await outbox_events(store)] == [ev(1).subject]


async def test_update_missing_or_clashing_changes_nothing(store: DataStore) -> None:
    a = await store.create_entry(make_entry(selectors=("a:1",)))
    b = await store.create_entry(make_entry(selectors=("b:1",)))
    with pytest.raises(NotFoundError):
        await store.update_entry(make_entry(path="/x").replace(id="missing"), [ev(1)])
    with pytest.raises(EntryAlreadyExistsError) as info:
        await store.update_entry(b.replace(selectors=a.selectors), [ev(2)])
    assert info.value.existing == a
    assert await store.get_entry(b.id) == b
    assert await outbox_events(store) == []


async def test_update_at_an_expected_revision_refuses_a_moved_entry(store: DataStore) -> None:
    created = await store.create_entry(make_entry())
    moved = await store.update_entry(created.replace(hint="theirs"))
    with pytest.raises(EntryChangedError):
        await store.update_entry(created.replace(x509_svid_ttl=60), [ev(1)], expected_revision=0)
    assert await store.get_entry(created.id) == moved
    assert await outbox_events(store) == []
    ours = await store.update_entry(moved.replace(x509_svid_ttl=60), [ev(2)], expected_revision=1)
    assert ours.revision_number == 2 and ours.hint == "theirs" and ours.x509_svid_ttl == 60


async def test_concurrent_entry_changes_on_two_replicas_lose_nothing(
    store: DataStore, twin: DataStore
) -> None:
    """Each replica read the entry, changed its field and wrote the whole entry back: the
    later write put the other replica's field back as it had read it."""
    from issuer.entries import EntryService

    td, server_id = TrustDomain("example.org"), sid("/meshid/server")
    replicas = [EntryService(store, td, server_id), EntryService(twin, td, server_id)]
    created = await replicas[0].create(make_entry())
    changes: list[dict[str, Any]] = [
        {"hint": "h"}, {"x509_svid_ttl": 600}, {"jwt_svid_ttl": 60}, {"store_svid": True},
        {"downstream": True}, {"dns_names": ("a.example.org",)},
    ]

    async def change(i: int, fields: dict[str, Any]) -> Entry:
        return await replicas[i % 2].modify(created.id, lambda current: current.replace(**fields))

    await asyncio.gather(*(change(i, c) for i, c in enumerate(changes)))
    stored = await store.get_entry(created.id)
    assert stored is not None and stored.revision_number == len(changes)
    expected = {k: v for c in changes for k, v in c.items()}
    assert stored == created.replace(revision_number=len(changes), **expected)


async def test_racing_update_and_delete_leave_the_index_as_stored(
    store: DataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update and a delete of one entry at once could count their writes (the revision
    counter) in the other order than they made them, as a PostgreSQL pool may: the index
    applied the update last and kept signing for the deleted entry. Here the update's count
    is held back until the delete is done, or for 0.5 s if the delete waits for the update."""
    from issuer.authorization import EntryIndex
    from issuer.entries import EntryService

    server_id = sid("/meshid/server")
    svc = EntryService(store, TrustDomain("example.org"), server_id)
    created = await svc.create(make_entry())
    await svc.index()
    real_increment = store.increment_meta
    deleting: list[asyncio.Task[Entry]] = []

    async def held_back_increment(key: str) -> int:
        if not deleting:  # the update's count: its write is done
            deleting.append(asyncio.create_task(svc.delete(created.id)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(deleting[0]), 0.5)
        return await real_increment(key)

    monkeypatch.setattr(store, "increment_meta", held_back_increment)
    await svc.update(created.replace(hint="h"))
    await deleting[0]
    idx = await svc.index()
    assert await store.get_entry(created.id) is None
    assert set(idx.by_id) == set(EntryIndex(await store.list_entries(), server_id).by_id) == set()


async def test_delete_returns_the_entry(store: DataStore) -> None:
    created = await store.create_entry(make_entry())
    assert await store.delete_entry(created.id, [ev(1)]) == created
    assert await store.get_entry(created.id) is None
    with pytest.raises(NotFoundError):
        await store.delete_entry(created.id, [ev(2)])
    assert [e.subject for e in await outbox_events(store)] == [ev(1).subject]
    # The natural key is free again.
    await store.create_entry(make_entry())


async def test_entries_by_parents_and_by_spiffe_id(store: DataStore) -> None:
    e1 = await store.create_entry(make_entry("/a", "/agent/n1"))
    e2 = await store.create_entry(make_entry("/b", "/agent/n2"))
    e3 = await store.create_entry(make_entry("/a", "/agent/n3"))
    await store.create_entry(make_entry("/c", "/agent/n4"))
    got = await store.entries_by_parents(
        [sid("/agent/n1"), sid("/agent/n2"), sid("/agent/n3"), sid("/nobody")]
    )
    assert sorted(e.id for e in got) == sorted([e1.id, e2.id, e3.id])
    assert await store.entries_by_parents([]) == []
    assert sorted(e.id for e in await store.entries_by_spiffe_id(sid("/a"))) == sorted([e1.id, e3.id])
    assert await store.entries_by_spiffe_id(sid("/none")) == []


@functools.cache
def _many_parents() -> tuple[SpiffeId, ...]:
    return tuple(sid(f"/agent/n{i}") for i in range(33_000))  # past SQLite's bound-variable limit


async def test_many_parents_in_one_lookup(store: DataStore) -> None:
    await store.create_entry(make_entry("/a", "/agent/n7"))
    parents = _many_parents()
    assert [e.spiffe_id for e in await store.entries_by_parents(parents)] == [sid("/a")]


# --- atomicity of act + events ------------------------------------------------------------------
async def test_act_and_events_are_written_together(store: DataStore) -> None:
    entry = await store.create_entry(make_entry(), [ev(1), ev(2)])
    await store.put_agent(agent(), [ev(3)])
    await store.put_ca_key(ca_key(), [ev(4)])
    await store.delete_entry(entry.id, [ev(5)])
    assert await outbox_events(store) == [ev(1), ev(2), ev(3), ev(4), ev(5)]


async def test_events_with_text_jsonb_cannot_hold_are_stored_alike(store: DataStore) -> None:
    """A NUL or a lone surrogate (JSON allows both, so an agent's report can carry them)
    was refused by PostgreSQL's JSONB: the act failed, or its events were retried forever.
    Both backends store U+FFFD in their place."""
    hostile = "a\x00b\ud800c"
    event = Event("io.meshid.test.happened", "spiffe://example.org/s", "k", 1_700_000_000.0,
                  {"reason": hostile, hostile: [hostile], "ok": "\\u0000 stays text"})
    await store.append_events([event])
    (row,) = await store.fetch_outbox(0, 10)
    want = "a\ufffdb\ufffdc"
    assert row.event.data == {"reason": want, want: [want], "ok": "\\u0000 stays text"}


async def test_failing_act_writes_no_events(store: DataStore) -> None:
    await store.create_entry(make_entry())
    failing = [
        store.create_entry(make_entry(), [ev(1)]),
        store.update_entry(make_entry(path="/x").replace(id="missing"), [ev(2)]),
        store.delete_entry("missing", [ev(3)]),
        store.delete_agent(sid("/agent/missing"), [ev(4)]),
        store.delete_ca_key("missing", [ev(5)]),
    ]
    for call in failing:
        with pytest.raises((AlreadyExistsError, NotFoundError)):
            await call
    assert await outbox_events(store) == []
    assert await store.outbox_backlog() == 0


def test_event_json_matches_the_stdlib_encoding() -> None:
    """Event data goes through orjson (speed); it must read back as the stdlib writes it,
    big integers included, and NaN is stored as null (PostgreSQL's JSONB has no NaN)."""
    import json

    data = {"b": [1, 2.5, "é", None, True], "a": {"z": "\tx", "y": 2**70}, "n": {"1": -0.0}}
    assert json.loads(codec.dumps_event(data)) == json.loads(codec.dumps(data))
    # except text JSONB cannot hold (test_events_with_text_jsonb_cannot_hold_are_stored_alike)
    assert json.loads(codec.dumps_event({"z": "\u0000x", "y": 2**70})) == {"z": "\ufffdx", "y": 2**70}
    assert codec.dumps_event({"x": float("nan")}) == '{"x":null}'
    with pytest.raises(ValueError):
        codec.dumps_event({"x": object()})


async def test_event_that_cannot_be_stored_cancels_the_act(store: DataStore) -> None:
    bad = Event("io.meshid.test", "s", "k", 1.0, {"x": object()})
    with pytest.raises(ValueError):
        await store.create_entry(make_entry(), [ev(1), bad])
    with pytest.raises(ValueError):
        await store.put_agent(agent(), [bad])
    assert await store.list_entries() == []
    assert await store.list_agents() == []
    assert await outbox_events(store) == []


async def test_cancelled_calls_leave_the_store_usable(store: DataStore) -> None:
    # Server handlers get cancelled (client gone, timeouts) in the middle of a write.
    for i in range(40):
        task = asyncio.create_task(store.create_entry(make_entry(f"/c{i}"), [ev(i)]))
        for _ in range(i % 8):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await store.create_entry(make_entry("/after"), [ev(99)])
    entries = await store.list_entries()
    assert sid("/after") in {e.spiffe_id for e in entries}
    assert len(await all_rows(store)) == len(entries)  # all or nothing, each time


async def test_cancelled_relay_calls_lose_nothing(store: DataStore, dsn: str) -> None:
    # The relay is cancelled on shutdown, possibly mid-claim or mid-mark, while acts commit.
    for i in range(40):
        act = asyncio.create_task(store.create_entry(make_entry(f"/r{i}"), [ev(i)]))
        claim = asyncio.create_task(store.claim_outbox("a", limit=5, lease_seconds=30, now=1_000))
        for _ in range(i % 8):
            await asyncio.sleep(0)
        claim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            rows = await claim
            mark = asyncio.create_task(store.mark_delivered([r.seq for r in rows], now=1_001))
            for _ in range(i % 5):
                await asyncio.sleep(0)
            mark.cancel()
            await mark
        await act
    assert len(await store.list_entries()) == 40
    assert await sql(store, dsn, "SELECT COUNT(*) FROM outbox") == [(40,)]  # every act kept its event
    # Whatever was not marked delivered is still there for the relay: a claim by the same
    # owner (or any owner once leases lapse) gets every remaining row, in order.
    remaining = [r.seq for r in await all_rows(store)]
    assert [r.seq for r in await store.claim_outbox("b", limit=100, lease_seconds=30, now=2_000)] == remaining
    assert await sql(store, dsn, _STATE_MISMATCHES) == [(0,)]
    await store.create_entry(make_entry("/after"), [ev(99)])


# --- agents -------------------------------------------------------------------------------------
async def test_agents_put_get_list_delete(store: DataStore) -> None:
    a1 = agent("/agent/n1")
    a2 = agent("/agent/n2", banned=True, can_reattest=False, selectors=(Selector("x509pop", "cn:n2"),))
    await store.put_agent(a1)
    await store.put_agent(a2)
    assert await store.get_agent(sid("/agent/n1")) == a1  # selector order kept
    assert await store.list_agents() == [a1, a2]
    renewed = agent("/agent/n1", serial="ff", expires_at=9_000, updated_at=300)
    await store.put_agent(renewed, [ev(1)])
    assert await store.get_agent(sid("/agent/n1")) == renewed
    await store.delete_agent(sid("/agent/n1"), [ev(2)])
    assert await store.get_agent(sid("/agent/n1")) is None
    with pytest.raises(NotFoundError):
        await store.delete_agent(sid("/agent/n1"))
    assert await store.list_agents() == [a2]
    assert [e.subject for e in await outbox_events(store)] == [ev(1).subject, ev(2).subject]


async def test_renewal_is_written_only_over_the_agent_as_read(
    store: DataStore, twin: DataStore
) -> None:
    """Replicas sharing the database: of renewals made from one reading of the agent, one
    is stored, as pending (the current serial is untouched); the others write nothing,
    events included. Never over a banned or missing agent."""
    read = agent("/agent/n1", serial="aa", expires_at=1_000, updated_at=10)
    await store.put_agent(read)
    renewals = [replace(read, new_serial=f"b{i}", new_expires_at=2_000 + i, updated_at=20) for i in range(10)]
    won = await asyncio.gather(
        *((store, twin)[i % 2].renew_agent(r, read, [ev(i)]) for i, r in enumerate(renewals))
    )
    assert won.count(True) == 1
    winner = renewals[won.index(True)]
    stored = await store.get_agent(sid("/agent/n1"))
    assert stored == winner and stored.serial == "aa" and stored.expires_at == 1_000
    assert [e.subject for e in await outbox_events(store)] == [ev(won.index(True)).subject]

    # The reply was lost: a renewal from the current SVID, reading the pending one,
    # replaces it; one that read the agent before (nothing pending) does not.
    again = replace(winner, new_serial="c0", new_expires_at=3_000, updated_at=30)
    assert not await twin.renew_agent(again, read, [ev(40)])
    assert await twin.renew_agent(again, winner, [ev(41)])
    assert await store.get_agent(sid("/agent/n1")) == again

    next_one = replace(again, new_serial="dd", new_expires_at=4_000)
    assert not await twin.renew_agent(next_one, replace(again, serial="zz"), [ev(50)])  # superseded
    await store.put_agent(replace(again, banned=True))
    assert not await store.renew_agent(next_one, replace(again, banned=True), [ev(51)])  # banned
    gone = agent("/agent/gone", serial="dd")
    assert not await store.renew_agent(replace(gone, new_serial="ee"), gone, [ev(52)])  # no such agent
    assert (await store.get_agent(sid("/agent/n1"))).new_serial == "c0"  # type: ignore[union-attr]
    assert len(await outbox_events(store)) == 2


async def test_pending_serial_is_promoted_once_across_replicas(store: DataStore, twin: DataStore) -> None:
    """The first call made with the pending SVID makes it current; racing promotions on
    two replicas write once; nothing is promoted over an agent that changed since it was
    read, has nothing pending, or is banned."""
    read = agent("/agent/n1", serial="aa", expires_at=1_000, new_serial="bb", new_expires_at=2_000)
    await store.put_agent(read)
    assert await store.get_agent(sid("/agent/n1")) == read  # the pending pair round-trips
    won = await asyncio.gather(*((store, twin)[i % 2].promote_agent(read, 300, [ev(i)]) for i in range(6)))
    assert won.count(True) == 1
    promoted = replace(read, serial="bb", expires_at=2_000, new_serial="", new_expires_at=0, updated_at=300)
    assert await store.get_agent(sid("/agent/n1")) == promoted
    assert len(await outbox_events(store)) == 1
    assert not await store.promote_agent(promoted, 400)  # nothing pending
    assert not await store.promote_agent(read, 400)  # as read before: already promoted

    pending = replace(promoted, new_serial="cc", new_expires_at=3_000)
    await store.put_agent(replace(pending, banned=True, serial=""))
    assert not await store.promote_agent(replace(pending, serial=""), 500)  # banned
    assert (await store.get_agent(sid("/agent/n1"))).serial == ""  # type: ignore[union-attr]


async def test_upgrade_keeps_agents_with_nothing_pending(fresh_dsn: str) -> None:
    """Agents stored before migration 0003 come back with no pending SVID."""
    store = datastore_for(fresh_dsn)
    await _schema_1_database(store, fresh_dsn)
    before = agent("/agent/old", serial="aa", expires_at=1_000)
    columns = codec.AGENT_COLUMNS[: codec.AGENT_COLUMNS.index("new_serial")]
    params = codec.agent_params(before)[: len(columns)]
    if isinstance(store, SqliteDataStore):

        def run() -> None:
            with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
                holders = ", ".join("?" * len(columns))
                conn.execute(f"INSERT INTO agents ({', '.join(columns)}) VALUES ({holders})", params)

        await asyncio.to_thread(run)
    else:
        conn = await asyncpg.connect(fresh_dsn)
        try:
            holders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
            await conn.execute(f"INSERT INTO agents ({', '.join(columns)}) VALUES ({holders})", *params)
        finally:
            await conn.close()
    await store.open()
    try:
        assert await store.get_agent(before.agent_id) == before
    finally:
        await store.close()


# --- join tokens ------------------------------------------------------------------------------------
async def test_join_token_is_single_use(store: DataStore) -> None:
    await store.create_join_token("h1", "tok-1", expires_at=1_000)
    with pytest.raises(AlreadyExistsError):
        await store.create_join_token("h1", "tok-2", expires_at=1_000)
    assert await store.consume_join_token("h1", now=999) == "tok-1"
    assert await store.consume_join_token("h1", now=999) is None
    assert await store.consume_join_token("unknown", now=0) is None


async def test_expired_join_token_is_refused_and_removed(store: DataStore) -> None:
    await store.create_join_token("h2", "tok-2", expires_at=1_000)
    assert await store.consume_join_token("h2", now=1_000) is None
    await store.create_join_token("h2", "tok-3", expires_at=5_000)  # the hash is free again
    assert await store.consume_join_token("h2", now=1_000) == "tok-3"


async def test_concurrent_consume_has_exactly_one_winner(store: DataStore, twin: DataStore) -> None:
    await store.create_join_token("race", "tok-race", expires_at=10_000)
    results = await asyncio.gather(
        *(s.consume_join_token("race", now=1) for s in [store, twin] * 10)  # 20 tasks, two "replicas"
    )
    assert results.count("tok-race") == 1 and results.count(None) == 19


# --- CA keys ---------------------------------------------------------------------------------------
async def test_ca_keys_put_list_delete(store: DataStore) -> None:
    x1 = ca_key("x1", not_before=10)
    x2 = ca_key("x2", not_before=20, state="active", tainted=True)
    j1 = ca_key("j1", kind="jwt", cert_chain_der=(), extra={})
    for k in (x2, j1, x1):
        await store.put_ca_key(k)
    assert await store.list_ca_keys() == [x1, x2, j1]  # by not_before, then key_id
    assert await store.list_ca_keys("x509") == [x1, x2]
    assert await store.list_ca_keys("jwt") == [j1]
    activated = ca_key("x1", not_before=10, state="active")
    await store.put_ca_key(activated, [ev(1)])
    assert await store.list_ca_keys("x509") == [activated, x2]
    await store.delete_ca_key("x2", [ev(2)])
    with pytest.raises(NotFoundError):
        await store.delete_ca_key("x2")
    assert await store.list_ca_keys("x509") == [activated]
    assert len(await outbox_events(store)) == 2


async def test_raise_max_signed_only_raises(store: DataStore) -> None:
    await store.put_ca_key(ca_key("x1"))
    await store.raise_max_signed("x1", 5_000)
    await store.raise_max_signed("x1", 4_000)
    assert (await store.list_ca_keys())[0].max_signed_not_after == 5_000
    await asyncio.gather(*(store.raise_max_signed("x1", n) for n in range(6_000, 6_050)))
    assert (await store.list_ca_keys())[0].max_signed_not_after == 6_049
    with pytest.raises(NotFoundError):
        await store.raise_max_signed("missing", 1)


# --- meta ---------------------------------------------------------------------------------------------
async def test_meta_get_set(store: DataStore) -> None:
    assert await store.get_meta("server_id") is None
    await store.set_meta("server_id", "a")
    await store.set_meta("server_id", "b")
    assert await store.get_meta("server_id") == "b"


async def test_increment_meta_is_atomic(store: DataStore, twin: DataStore) -> None:
    assert await store.increment_meta("bundle_seq") == 1
    values = await asyncio.gather(*(s.increment_meta("bundle_seq") for s in [store, twin] * 15))
    assert sorted(values) == list(range(2, 32))
    assert await store.get_meta("bundle_seq") == "31"
    await store.set_meta("word", "abc")
    with pytest.raises(ValueError):
        await store.increment_meta("word")


# --- outbox --------------------------------------------------------------------------------------------
async def test_outbox_keeps_order_and_content(store: DataStore) -> None:
    await store.append_events([ev(1), ev(2)])
    await store.create_entry(make_entry(), [ev(3)])
    await store.append_events([])
    await store.append_events([ev(4), ev(5), ev(6)])
    rows = await all_rows(store)
    assert [r.event for r in rows] == [ev(n) for n in range(1, 7)]
    seqs = [r.seq for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert await store.fetch_outbox(seqs[1], 2) == rows[2:4]
    assert await store.outbox_backlog() == 6


async def test_concurrent_appends_share_transactions_and_keep_each_call_whole(store: DataStore) -> None:
    """Group commit (SQLite): calls arriving while the writer is busy share one
    transaction; every call's events land, in call order."""
    calls = [[ev(10 * c + k) for k in range(1, 4)] for c in range(1, 21)]
    commits = 0
    if isinstance(store, SqliteDataStore):
        original = store._tx

        @contextlib.asynccontextmanager
        async def counting_tx() -> AsyncIterator[Any]:
            nonlocal commits
            async with original() as conn:
                yield conn
            commits += 1

        store._tx = counting_tx  # type: ignore[method-assign]
    await asyncio.gather(*(store.append_events(c) for c in calls))
    rows = [r.event for r in await all_rows(store)]
    by_subject = lambda e: e.subject  # noqa: E731
    assert sorted(rows, key=by_subject) == sorted((e for c in calls for e in c), key=by_subject)
    for c in calls:  # each call's events in its order (SQLite: adjacent too, one group)
        positions = [rows.index(e) for e in c]
        assert positions == sorted(positions)
        if isinstance(store, SqliteDataStore):
            assert positions == list(range(positions[0], positions[0] + 3))
    if isinstance(store, SqliteDataStore):
        assert 1 <= commits < len(calls)


async def test_a_caller_cancelled_while_waiting_loses_nobody_elses_events(store: DataStore) -> None:
    first = asyncio.create_task(store.append_events([ev(1)]))
    second = asyncio.create_task(store.append_events([ev(2)]))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    await asyncio.sleep(0.05)
    events = [r.event for r in await all_rows(store)]
    assert ev(2) in events
    assert len(events) == len(set(e.subject for e in events))  # nothing written twice


async def test_a_failed_group_commit_fails_its_callers_and_the_next_one_works(tmp_path: Path) -> None:
    store = SqliteDataStore(tmp_path / "g.sqlite3")
    await store.open()
    try:
        original = store._tx

        @contextlib.asynccontextmanager
        async def failing_tx() -> AsyncIterator[Any]:
            raise sqlite3.OperationalError("disk I/O error")
            yield  # pragma: no cover

        store._tx = failing_tx  # type: ignore[method-assign]
        results = await asyncio.gather(store.append_events([ev(1)]), store.append_events([ev(2)]),
                                       return_exceptions=True)
        assert all(isinstance(r, sqlite3.OperationalError) for r in results)
        store._tx = original  # type: ignore[method-assign]
        await store.append_events([ev(3)])
        assert [r.event for r in await all_rows(store)] == [ev(3)]
    finally:
        await store.close()


async def test_delivery_backlog_and_prune(store: DataStore) -> None:
    await store.append_events([ev(n) for n in range(1, 7)])
    seqs = [r.seq for r in await all_rows(store)]
    await store.mark_delivered(seqs[:2], now=100.0)
    await store.mark_delivered(seqs[2:4], now=200.0)
    await store.mark_delivered([], now=300.0)
    assert [r.seq for r in await all_rows(store)] == seqs[4:]
    assert await store.outbox_backlog() == 2
    assert await store.prune_outbox(delivered_before=100.0) == 0
    assert await store.prune_outbox(delivered_before=150.0) == 2
    assert await store.prune_outbox(delivered_before=1e12) == 2  # undelivered rows stay
    assert [r.seq for r in await all_rows(store)] == seqs[4:]
    # A delivered row is not delivered again by a late duplicate mark.
    await store.mark_delivered(seqs[:4], now=999.0)
    assert await store.outbox_backlog() == 2


async def test_sequence_numbers_are_never_reused(store: DataStore) -> None:
    await store.append_events([ev(1), ev(2)])
    old = [r.seq for r in await all_rows(store)]
    await store.mark_delivered(old, now=1.0)
    assert await store.prune_outbox(delivered_before=2.0) == 2
    await store.close()
    await store.open()
    await store.append_events([ev(3)])
    assert (await all_rows(store))[0].seq > max(old)


# --- outbox claims ---------------------------------------------------------------------------------------
async def test_claim_leases_rows_to_one_owner(store: DataStore) -> None:
    await store.append_events([ev(n, key=f"k{n}") for n in range(1, 6)])
    seqs = [r.seq for r in await all_rows(store)]
    a = await store.claim_outbox("a", limit=2, lease_seconds=30, now=1_000)
    assert [r.seq for r in a] == seqs[:2] and a[0].event == ev(1, "k1")
    b = await store.claim_outbox("b", limit=10, lease_seconds=30, now=1_000)
    assert [r.seq for r in b] == seqs[2:]
    assert await store.claim_outbox("c", limit=10, lease_seconds=30, now=1_010) == []
    # The owner gets its own rows back (a retry after a failed publish).
    assert [r.seq for r in await store.claim_outbox("a", limit=10, lease_seconds=30, now=1_010)] == seqs[:2]
    await store.mark_delivered(seqs[:1], now=1_011)
    # When a lease lapses (its relay died), another relay takes the rows over:
    # b's lease ended at 1030, a's renewed one ends at 1040.
    taken = await store.claim_outbox("c", limit=10, lease_seconds=30, now=1_035)
    assert [r.seq for r in taken] == seqs[2:]
    taken = await store.claim_outbox("d", limit=10, lease_seconds=30, now=1_041)
    assert [r.seq for r in taken] == seqs[1:2]


async def test_release_hands_an_owners_undelivered_rows_back_at_once(store: DataStore) -> None:
    await store.append_events([ev(n, key=f"k{n}") for n in range(1, 5)])
    seqs = [r.seq for r in await all_rows(store)]
    assert [r.seq for r in await store.claim_outbox("a", limit=3, lease_seconds=30, now=1_000)] == seqs[:3]
    assert [r.seq for r in await store.claim_outbox("b", limit=10, lease_seconds=30, now=1_000)] == seqs[3:]
    await store.mark_delivered(seqs[:1], now=1_001)
    # a stops cleanly: its two undelivered rows are free now, not at 1030; b's lease and
    # the delivered row are untouched.
    assert await store.release_outbox("a") == 2
    assert await store.release_outbox("a") == 0
    taken = await store.claim_outbox("c", limit=10, lease_seconds=30, now=1_002)
    assert [r.seq for r in taken] == seqs[1:3]
    assert await store.outbox_backlog() == 3


async def test_claim_keeps_one_subject_with_one_relay(store: DataStore) -> None:
    await store.append_events([ev(1, "k1"), ev(2, "k2"), ev(3, "k1"), ev(4, "k2"), ev(5, "k3")])
    seqs = [r.seq for r in await all_rows(store)]
    a = await store.claim_outbox("a", limit=1, lease_seconds=30, now=0)
    assert [r.seq for r in a] == seqs[:1]
    # k1's later row must wait for a's delivery, or k1 could be published out of order.
    b = await store.claim_outbox("b", limit=10, lease_seconds=30, now=0)
    assert [r.seq for r in b] == [seqs[1], seqs[3], seqs[4]]
    await store.mark_delivered(seqs[:1], now=1)
    assert [r.seq for r in await store.claim_outbox("b", limit=10, lease_seconds=30, now=1)] == [
        seqs[1],
        seqs[2],
        seqs[3],
        seqs[4],
    ]


async def test_concurrent_claimers_never_share_a_row(store: DataStore, twin: DataStore) -> None:
    await store.append_events([ev(n, key=f"k{n % 13}") for n in range(200)])
    expected = {r.seq for r in await all_rows(store)}
    claimed: dict[str, list[int]] = {}

    async def relay(s: DataStore, owner: str) -> None:
        got = claimed.setdefault(owner, [])
        while True:
            rows = await s.claim_outbox(owner, limit=5, lease_seconds=300, now=0)
            if not rows:
                if await s.outbox_backlog() == 0:
                    return
                await asyncio.sleep(0.001)  # the rest is leased to a peer: wait for it
                continue
            got.extend(r.seq for r in rows)
            await s.mark_delivered([r.seq for r in rows], now=1)

    await asyncio.gather(relay(store, "r1"), relay(twin, "r2"), relay(store, "r3"), relay(twin, "r4"))
    everything = [seq for seqs in claimed.values() for seq in seqs]
    assert len(everything) == len(set(everything)) == len(expected)
    assert set(everything) == expected
    assert sum(1 for seqs in claimed.values() if seqs) >= 2  # really concurrent


async def test_delivery_state_is_kept_beside_the_event_rows(store: DataStore, dsn: str) -> None:
    await store.append_events([ev(n, key=f"k{n % 2}") for n in range(1, 7)])
    seqs = [r.seq for r in await all_rows(store)]
    # Each event got its state row in the same transaction: undelivered, unleased.
    assert await sql(store, dsn, _STATE) == [(s, None, None, None) for s in seqs]
    claimed = await store.claim_outbox("a", limit=4, lease_seconds=30, now=1_000)
    assert [r.seq for r in claimed] == seqs[:4]
    await store.mark_delivered(seqs[:4], now=1_001)
    # A relay whose lease had lapsed marks again after its late ack: nothing moves.
    await store.mark_delivered(seqs[:2], now=1_500)
    assert await sql(store, dsn, _STATE) == [
        *((s, None, None, 1_001.0) for s in seqs[:4]),
        *((s, None, None, None) for s in seqs[4:]),
    ]
    assert [r.seq for r in await store.claim_outbox("b", limit=10, lease_seconds=30, now=1_002)] == seqs[4:]
    assert await sql(store, dsn, _STATE_MISMATCHES) == [(0,)]
    # Pruning takes the event rows and their state together.
    assert await store.prune_outbox(delivered_before=1_002.0) == 4
    assert [r[0] for r in await sql(store, dsn, "SELECT seq FROM outbox ORDER BY seq")] == seqs[4:]
    assert await sql(store, dsn, _STATE_MISMATCHES) == [(0,)]


_STATE = "SELECT seq, claimed_by, lease_until, delivered_at FROM outbox_state ORDER BY seq"
# Event rows without exactly one state row, plus state rows whose event row is gone.
_STATE_MISMATCHES = """
SELECT (SELECT COUNT(*) FROM outbox AS o
        WHERE (SELECT COUNT(*) FROM outbox_state AS s WHERE s.seq = o.seq) <> 1)
     + (SELECT COUNT(*) FROM outbox_state AS s
        WHERE NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.seq = s.seq))
"""


# --- upgrade from schema 1 (delivery state in the event rows) -----------------------------------
# (partition key, delivered_at, claimed_by, lease_until) of ev(1..5) in a schema-1 outbox.
_V1_OUTBOX = [
    ("k1", 100.0, None, None),  # delivered long ago
    ("k1", None, "old-relay", 2_000.0),  # being published when the server stopped for the upgrade
    ("k2", None, None, None),
    ("k1", None, None, None),  # must stay behind the leased k1 row
    ("k3", 300.0, None, None),
]


async def _schema_1_database(store: DataStore, dsn: str) -> None:
    """What meshid with only migration 0001 left behind, outbox rows in every state."""
    first = load_migrations(dialect(store))[0]
    assert first.version == 1
    columns = "type, subject, partition_key, time, data, delivered_at, claimed_by, lease_until"
    rows = [
        (*codec.event_params(ev(n, key)), delivered, owner, until)
        for n, (key, delivered, owner, until) in enumerate(_V1_OUTBOX, start=1)
    ]
    if isinstance(store, SqliteDataStore):

        def run() -> None:
            with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
                conn.execute(CREATE_VERSION_TABLE)
                for statement in split_statements(first.sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (1, ?, 0)", (first.name,))
                conn.executemany(f"INSERT INTO outbox ({columns}) VALUES ({', '.join('?' * 8)})", rows)

        await asyncio.to_thread(run)
        return
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(CREATE_VERSION_TABLE)
            await conn.execute(first.sql)
            await conn.execute("INSERT INTO schema_migrations VALUES (1, $1, 0)", first.name)
            await conn.executemany(
                f"INSERT INTO outbox ({columns}) VALUES ({', '.join(f'${i}' for i in range(1, 9))})", rows
            )
    finally:
        await conn.close()


async def test_upgrade_keeps_every_outbox_row_and_its_delivery_state(fresh_dsn: str) -> None:
    store = datastore_for(fresh_dsn)
    await _schema_1_database(store, fresh_dsn)
    await store.open()  # applies 0002
    try:
        versions = await sql(store, fresh_dsn, "SELECT version FROM schema_migrations ORDER BY version")
        assert [v[0] for v in versions] == [m.version for m in load_migrations(dialect(store))]
        # Undelivered rows are still there, intact, in order; delivered ones are not pending.
        pending = await all_rows(store)
        assert [r.event for r in pending] == [ev(2, "k1"), ev(3, "k2"), ev(4, "k1")]
        assert await store.outbox_backlog() == 3
        seqs = [r.seq for r in pending]
        # The lease taken before the upgrade still holds, and k1 stays in order behind it.
        got = await store.claim_outbox("new-relay", limit=10, lease_seconds=30, now=1_000)
        assert [r.seq for r in got] == [seqs[1]]
        await store.mark_delivered([seqs[1]], now=1_001)
        # Once it lapses, another relay takes k1's rows over; then nothing is left.
        got = await store.claim_outbox("new-relay", limit=10, lease_seconds=30, now=2_001)
        assert [r.seq for r in got] == [seqs[0], seqs[2]]
        await store.mark_delivered([seqs[0], seqs[2]], now=2_002)
        assert await store.outbox_backlog() == 0 and await all_rows(store) == []
        # Rows delivered before the upgrade keep their delivery time for pruning.
        assert await store.prune_outbox(delivered_before=200.0) == 1
        assert await store.prune_outbox(delivered_before=1_500.0) == 2
        assert await store.prune_outbox(delivered_before=1e12) == 2
        assert await sql(store, fresh_dsn, _STATE_MISMATCHES) == [(0,)]
        # New events continue the sequence and start pending.
        await store.append_events([ev(6)])
        (row,) = await all_rows(store)
        assert row.seq > seqs[-1] and row.event == ev(6)
        # The event rows no longer carry relay state.
        if isinstance(store, SqliteDataStore):
            query = "SELECT name FROM pragma_table_info('outbox') ORDER BY cid"
        else:
            query = (
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'outbox' "
                "ORDER BY ordinal_position"
            )
        assert [c[0] for c in await sql(store, fresh_dsn, query)] == ["seq", *codec.EVENT_COLUMNS]
    finally:
        await store.close()


# --- SQLite specifics -------------------------------------------------------------------------------------
async def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    store = SqliteDataStore(tmp_path / "sub" / "meshid.db")
    await store.open()
    try:
        assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()


async def test_sqlite_backup_is_consistent_while_writing(tmp_path: Path) -> None:
    store = SqliteDataStore(tmp_path / "meshid.db")
    await store.open()
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            await store.create_entry(make_entry(f"/w{n}"), [ev(n)])
            n += 1

    try:
        await store.create_entry(make_entry("/first"), [ev(-1)])
        task = asyncio.create_task(writer())
        await asyncio.sleep(0.05)
        await store.backup(tmp_path / "backup.db")
        stop.set()
        await task
    finally:
        await store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "backup.db").st_mode) == 0o600
    copy = SqliteDataStore(tmp_path / "backup.db")
    await copy.open()
    try:
        entries = await copy.list_entries()
        assert sid("/first") in {e.spiffe_id for e in entries}
        # Every entry in the copy has its event, and no event lacks its entry.
        assert len(await all_rows(copy)) == len(entries)
    finally:
        await copy.close()
    with sqlite3.connect(tmp_path / "backup.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_sqlite_in_memory_works() -> None:
    store = await open_datastore("sqlite::memory:")
    try:
        created = await store.create_entry(make_entry(), [ev(1)])
        assert await store.list_entries() == [created]
        assert await store.consume_join_token("x", 0) is None
        # The relay's bookkeeping shares the one connection there.
        (row,) = await store.claim_outbox("a", limit=10, lease_seconds=30, now=1_000)
        await store.mark_delivered([row.seq], now=1_001)
        assert await store.outbox_backlog() == 0
        assert await store.prune_outbox(delivered_before=1_002) == 1
    finally:
        await store.close()


# --- factory ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "kind", "path"),
    [
        ("sqlite:///var/lib/meshid/ds.db", SqliteDataStore, "/var/lib/meshid/ds.db"),
        ("sqlite:rel/ds.db", SqliteDataStore, "rel/ds.db"),
        ("sqlite::memory:", SqliteDataStore, ":memory:"),
        ("/var/lib/meshid/ds.db", SqliteDataStore, "/var/lib/meshid/ds.db"),
        ("ds.db", SqliteDataStore, "ds.db"),
        ("postgresql://meshid@db:5432/meshid", PostgresDataStore, None),
        ("postgres://meshid@db/meshid?sslmode=verify-full", PostgresDataStore, None),
    ],
)
def test_factory_picks_the_backend(text: str, kind: type, path: str | None) -> None:
    store = datastore_for(text)
    assert isinstance(store, kind)
    if path is not None:
        assert isinstance(store, SqliteDataStore) and store.path == path


@pytest.mark.parametrize("text", ["", "mysql://db/x", "sqlite://host/x.db", "sqlite://", "sqlite:"])
def test_factory_rejects_bad_dsns(text: str) -> None:
    with pytest.raises(ConfigError):
        datastore_for(text)


def test_codec_natural_key_ignores_selector_order() -> None:
    a = codec.natural_key(sid("/a"), sid("/p"), parse_selectors(["x:1", "y:2"]))
    b = codec.natural_key(sid("/a"), sid("/p"), [Selector("y", "2"), Selector("x", "1"), Selector("x", "1")])
    assert a == b != codec.natural_key(sid("/a"), sid("/q"), parse_selectors(["x:1", "y:2"]))


async def test_claim_stored_leaves_data_as_stored_json(store: DataStore) -> None:
    await store.append_events([ev(n, key=f"k{n}") for n in range(1, 4)])
    rows = await store.claim_outbox_stored("a", limit=10, lease_seconds=30, now=1_000)
    assert [r.seq for r in rows] == [r.seq for r in await all_rows(store)]
    assert [r.decode().event for r in rows] == [ev(n, key=f"k{n}") for n in range(1, 4)]
    for r in rows:
        assert isinstance(r.data_json, str) and r.decode().event.data == ev(r.decode().event.data["n"]).data
    # The same leases as claim_outbox: nothing left for another owner.
    assert await store.claim_outbox("b", limit=10, lease_seconds=30, now=1_000) == []
