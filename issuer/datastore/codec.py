"""Row <-> record conversion shared by the SQLite and PostgreSQL datastores.

Both backends store the same columns (see migrations/); values that have no common
SQL type (selector lists, certificate chains, free-form maps, event data) are JSON
text, which SQLite keeps as TEXT and PostgreSQL as JSONB. Rows are read by column
name, which sqlite3.Row and asyncpg.Record both support.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import orjson

from issuer.datastore.base import AgentRecord, CaKeyRecord
from issuer.events.model import Event, OutboxRow, StoredEvent
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


def dumps(value: Any) -> str:
    # allow_nan=False: PostgreSQL's JSONB rejects NaN, so SQLite must too, or the two
    # backends would disagree about which events can be stored.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def loads(text: str | bytes) -> Any:
    return json.loads(text)


_EVENT_JSON = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def dumps_event(data: Any) -> str:
    """An event's `data` as stored: like dumps, with orjson, because this runs once per
    issued SVID and the stdlib takes ~50 µs for an OCSF event (about a third of the
    signature). orjson writes NaN/Infinity as null, on both backends alike; integers
    beyond 64 bits go through json; what neither can write (e.g. an object) is a
    ValueError, so the act is not recorded without its event. Text PostgreSQL's JSONB
    cannot hold (NUL, lone surrogates: JSON allows both, so an agent's report may carry
    them) is stored as U+FFFD on both backends."""
    try:
        text = orjson.dumps(data, option=_EVENT_JSON).decode()
    except orjson.JSONEncodeError:  # lone surrogates, integers beyond 64 bits
        return _dumps_storable(data)
    # Also matches an escaped backslash before "u0000": then merely the slower path.
    return _dumps_storable(data) if "\\u0000" in text else text


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(v) for v in value]
    return value


def _dumps_storable(data: Any) -> str:
    data = _storable(data)
    try:
        return orjson.dumps(data, option=_EVENT_JSON).decode()
    except orjson.JSONEncodeError:
        try:
            return dumps(data)  # e.g. integers beyond 64 bits, which json writes exactly
        except TypeError as exc:
            raise ValueError(f"event data is not JSON: {exc}") from None


def upsert_sql(table: str, columns: Sequence[str], key: str, param: Callable[[int], str]) -> str:
    """INSERT ... ON CONFLICT (key) DO UPDATE, valid in both dialects; `param(i)` renders
    the i-th (1-based) placeholder: `?` for SQLite, `$i` for PostgreSQL."""
    values = ", ".join(param(i) for i in range(1, len(columns) + 1))
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


# --- entries -------------------------------------------------------------------------
ENTRY_COLUMNS = (
    "id",
    "spiffe_id",
    "parent_id",
    "natural_key",
    "revision_number",
    "created_at",
    "expires_at",
    "body",
)


def natural_key(spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: Iterable[Selector]) -> str:
    """SPIRE's entry identity (spiffe_id, parent_id, selector set) as a fixed-size,
    order-independent string that a UNIQUE column can enforce."""
    canonical = [str(spiffe_id), str(parent_id), sorted({str(s) for s in selectors})]
    return hashlib.sha256(dumps(canonical).encode()).hexdigest()


def canonical_entry(entry: Entry) -> Entry:
    """The entry as it reads back from either backend: selectors sorted, no duplicates."""
    return entry.replace(selectors=tuple(sorted(set(entry.selectors))))


def entry_params(entry: Entry) -> tuple[Any, ...]:
    """Values for ENTRY_COLUMNS."""
    body = entry.to_json()
    body["extra"] = entry.extra  # not part of to_json, but callers expect it back
    return (
        entry.id,
        str(entry.spiffe_id),
        str(entry.parent_id),
        natural_key(entry.spiffe_id, entry.parent_id, entry.selectors),
        entry.revision_number,
        entry.created_at,
        entry.expires_at,
        dumps(body),
    )


def selector_params(entry: Entry) -> list[tuple[str, str, str]]:
    """(entry_id, type, value) rows for the entry_selectors table."""
    return [(entry.id, s.type, s.value) for s in sorted(set(entry.selectors))]


def entry_from_body(body: str | bytes) -> Entry:
    data = loads(body)
    extra = data.pop("extra", None) or {}
    # from_json sorts selectors, so stored entries come back in canonical order.
    return Entry.from_json(data).replace(extra=extra)


# --- agents --------------------------------------------------------------------------
AGENT_COLUMNS = (
    "agent_id",
    "attestor",
    "selectors",
    "serial",
    "expires_at",
    "banned",
    "can_reattest",
    "created_at",
    "updated_at",
    "new_serial",
    "new_expires_at",
)


def agent_renew_sql(param: Callable[[int], str]) -> str:
    """The conditional write of a renewal: the new SVID's serial and expiry as pending,
    only over the agent as the renewal read it, and never for a banned agent (see
    DataStore.renew_agent)."""
    return (
        f"UPDATE agents SET new_serial = {param(1)}, new_expires_at = {param(2)}, updated_at = {param(3)} "
        f"WHERE agent_id = {param(4)} AND serial = {param(5)} AND new_serial = {param(6)} AND NOT banned "
        "RETURNING agent_id"
    )


def agent_renew_params(record: AgentRecord, previous: AgentRecord) -> tuple[Any, ...]:
    return (
        record.new_serial,
        record.new_expires_at,
        record.updated_at,
        str(record.agent_id),
        previous.serial,
        previous.new_serial,
    )


def agent_promote_sql(param: Callable[[int], str]) -> str:
    """The conditional write that makes a pending SVID current (see DataStore.promote_agent);
    the right-hand sides read the row as it was before the update, in both dialects."""
    return (
        "UPDATE agents SET serial = new_serial, expires_at = new_expires_at, new_serial = '', "
        f"new_expires_at = 0, updated_at = {param(1)} "
        f"WHERE agent_id = {param(2)} AND serial = {param(3)} AND new_serial = {param(4)} "
        "AND new_serial <> '' AND NOT banned RETURNING agent_id"
    )


def agent_promote_params(previous: AgentRecord, updated_at: int) -> tuple[Any, ...]:
    return (updated_at, str(previous.agent_id), previous.serial, previous.new_serial)


class AgentSerialWrites:
    """renew_agent and promote_agent, alike on both backends: the conditional SQL above, run
    by the backend's _agent_cas (UPDATE ... RETURNING and the events, in one transaction)."""

    agent_renew_sql: str
    agent_promote_sql: str

    async def _agent_cas(self, query: str, params: tuple[object, ...], events: Sequence[Event]) -> bool:
        raise NotImplementedError

    async def renew_agent(
        self, record: AgentRecord, previous: AgentRecord, events: Sequence[Event] = ()
    ) -> bool:
        return await self._agent_cas(self.agent_renew_sql, agent_renew_params(record, previous), events)

    async def promote_agent(
        self, previous: AgentRecord, updated_at: int, events: Sequence[Event] = ()
    ) -> bool:
        params = agent_promote_params(previous, updated_at)
        return await self._agent_cas(self.agent_promote_sql, params, events)


def agent_params(record: AgentRecord) -> tuple[Any, ...]:
    return (
        str(record.agent_id),
        record.attestor,
        dumps([str(s) for s in record.selectors]),
        record.serial,
        record.expires_at,
        record.banned,
        record.can_reattest,
        record.created_at,
        record.updated_at,
        record.new_serial,
        record.new_expires_at,
    )


def agent_from_row(row: Row) -> AgentRecord:
    return AgentRecord(
        agent_id=SpiffeId.parse(row["agent_id"]),
        attestor=row["attestor"],
        # Keep the stored order (not parse_selectors, which sorts and dedups): an
        # agent's selectors are whatever its attestor reported.
        selectors=tuple(Selector.parse(s) for s in loads(row["selectors"])),
        serial=row["serial"],
        expires_at=int(row["expires_at"]),
        banned=bool(row["banned"]),
        can_reattest=bool(row["can_reattest"]),
        created_at=int(row["created_at"]),
        updated_at=int(row["updated_at"]),
        new_serial=row["new_serial"],
        new_expires_at=int(row["new_expires_at"]),
    )


# --- CA keys -------------------------------------------------------------------------
CA_KEY_COLUMNS = (
    "key_id",
    "kind",
    "state",
    "sealed_key",
    "public_key_der",
    "not_before",
    "not_after",
    "cert_chain",
    "tainted",
    "server_id",
    "max_signed_not_after",
    "created_at",
    "extra",
)


def ca_key_params(record: CaKeyRecord) -> tuple[Any, ...]:
    return (
        record.key_id,
        record.kind,
        record.state,
        bytes(record.sealed_key),
        bytes(record.public_key_der),
        record.not_before,
        record.not_after,
        dumps([base64.b64encode(der).decode("ascii") for der in record.cert_chain_der]),
        record.tainted,
        record.server_id,
        record.max_signed_not_after,
        record.created_at,
        dumps(record.extra),
    )


def ca_key_from_row(row: Row) -> CaKeyRecord:
    return CaKeyRecord(
        key_id=row["key_id"],
        kind=row["kind"],
        state=row["state"],
        sealed_key=bytes(row["sealed_key"]),
        public_key_der=bytes(row["public_key_der"]),
        not_before=int(row["not_before"]),
        not_after=int(row["not_after"]),
        cert_chain_der=tuple(base64.b64decode(der) for der in loads(row["cert_chain"])),
        tainted=bool(row["tainted"]),
        server_id=row["server_id"],
        max_signed_not_after=int(row["max_signed_not_after"]),
        created_at=int(row["created_at"]),
        extra=dict(loads(row["extra"])),
    )


# --- outbox --------------------------------------------------------------------------
EVENT_COLUMNS = ("type", "subject", "partition_key", "time", "data")


def event_params(event: Event) -> tuple[Any, ...]:
    return (event.type, event.subject, event.partition_key, float(event.time), dumps_event(event.data))


def stored_event_from_row(row: Row) -> StoredEvent:
    """The row with its data left as JSON text (SQLite TEXT; PostgreSQL JSONB, which
    asyncpg returns as text)."""
    data = row["data"]
    if not isinstance(data, str):  # a driver that decodes JSON itself
        data = dumps(data)
    return StoredEvent(int(row["seq"]), row["type"], row["subject"], row["partition_key"], float(row["time"]),
                       data)


def outbox_row_from_row(row: Row) -> OutboxRow:
    return OutboxRow(
        seq=int(row["seq"]),
        event=Event(
            type=row["type"],
            subject=row["subject"],
            partition_key=row["partition_key"],
            time=float(row["time"]),
            data=loads(row["data"]),
        ),
    )
