"""Registration entry management: validation, datastore writes with their events, and the
in-memory index the signing path authorizes against."""

from __future__ import annotations

import asyncio
import string
import time
import uuid
from collections.abc import Callable

from issuer.authorization import EntryIndex
from issuer.datastore.base import DataStore, EntryChangedError
from issuer.events import ocsf
from meshid.entry import MIN_SVID_TTL, Entry
from meshid.errors import NotFoundError
from meshid.selector import has_control_characters
from meshid.spiffe_id import SpiffeId, TrustDomain

ENTRIES_REVISION = "entries_revision"
# expires_at is an int64 on the wire (types.Entry) and in both datastores' columns.
MAX_EXPIRES_AT = (1 << 63) - 1
MAX_ENTRY_ID_LENGTH = 255
_ENTRY_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-._~")
# Tries of one read-change-write against other replicas' writes of the same entry.
MODIFY_ATTEMPTS = 8


def check_entry_id(entry_id: str) -> str:
    """An id chosen by the caller must be one path segment of /v1/entries/{id} as it is:
    unreserved URL characters, and neither "." nor ".." (a path normalises them away)."""
    if len(entry_id) > MAX_ENTRY_ID_LENGTH:
        raise ValueError(f"entry ID is longer than {MAX_ENTRY_ID_LENGTH} characters")
    if not set(entry_id) <= _ENTRY_ID_CHARS:
        raise ValueError("entry ID may only contain letters, digits, '-', '.', '_' and '~'")
    if entry_id in (".", ".."):
        raise ValueError(f"entry ID cannot be {entry_id!r}")
    return entry_id


class EntryService:
    def __init__(
        self,
        ds: DataStore,
        trust_domain: TrustDomain,
        server_id: SpiffeId,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ds = ds
        self.td = trust_domain
        self.server_id = server_id
        self.clock = clock
        self._index: EntryIndex | None = None
        self._lock = asyncio.Lock()
        # This server's entry writes, each with its revision count, one at a time: two at once
        # could count in the other order than they wrote (PostgreSQL pool), and the index then
        # applied the older write last (an updated or deleted entry back in the signing index).
        self._write_lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, cb: Callable[[], None]) -> None:
        self._listeners.append(cb)

    def _check(self, entry: Entry) -> None:
        if entry.spiffe_id.trust_domain != self.td:
            raise ValueError(f"spiffe_id {entry.spiffe_id} is not in trust domain {self.td}")
        if entry.parent_id.trust_domain != self.td:
            raise ValueError(f"parent_id {entry.parent_id} is not in trust domain {self.td}")
        if entry.spiffe_id == self.server_id:
            raise ValueError("the server's own SPIFFE ID cannot be registered")
        # Here, not in Entry: entries stored before this rule still load.
        for name in ("x509_svid_ttl", "jwt_svid_ttl"):
            if 0 < getattr(entry, name) < MIN_SVID_TTL:
                raise ValueError(f"{name} must be 0 (the server's default) or at least {MIN_SVID_TTL}s")
        # Beyond int64 the datastore's column overflowed (an internal error); a negative one
        # (refused by the Entry API) was an entry expired from the start.
        if not 0 <= entry.expires_at <= MAX_EXPIRES_AT:
            raise ValueError(f"expires_at must be 0 (never) or a Unix time up to {MAX_EXPIRES_AT}")
        # A NUL cannot be stored (PostgreSQL: an internal error); other control characters
        # would forge lines where hints are logged.
        if has_control_characters(entry.hint):
            raise ValueError("hint must not contain control characters")

    async def create(self, entry: Entry) -> Entry:
        self._check(entry)
        if entry.id:  # here, not in _check: entries stored before this rule still update
            check_entry_id(entry.id)
        async with self._write_lock:
            now = self.clock()
            if not entry.id:
                entry = entry.replace(id=str(uuid.uuid4()))
            entry = entry.replace(created_at=int(now), revision_number=0)
            created = await self.ds.create_entry(entry, [ocsf.entry_created(entry, now)])
            await self._changed(created.id, created)
        return created

    async def update(self, entry: Entry) -> Entry:
        """Replace the entry with this id by `entry` (whatever was stored meanwhile)."""
        return await self.modify(entry.id, lambda _current: entry)

    async def modify(self, entry_id: str, change: Callable[[Entry], Entry]) -> Entry:
        """Store change(the entry as stored now). The write is refused if the entry moved
        past the revision `change` saw, and then made again from the newer one: a caller
        that changes some fields never writes back another caller's older values of the
        others (a lost update)."""
        async with self._write_lock:
            for attempt in range(MODIFY_ATTEMPTS):
                current = await self.get(entry_id)
                entry = change(current)
                if entry.id != entry_id:
                    raise ValueError("an update cannot change an entry's id")
                self._check(entry)
                now = self.clock()
                entry = entry.replace(
                    created_at=current.created_at, revision_number=current.revision_number + 1
                )
                try:
                    updated = await self.ds.update_entry(
                        entry, [ocsf.entry_updated(entry, now)], expected_revision=current.revision_number
                    )
                except EntryChangedError:
                    if attempt + 1 == MODIFY_ATTEMPTS:
                        raise
                    continue
                await self._changed(updated.id, updated)
                return updated
        raise AssertionError("unreachable")

    async def delete(self, entry_id: str) -> Entry:
        async with self._write_lock:
            current = await self.ds.get_entry(entry_id)
            if current is None:
                raise NotFoundError(f"no entry with id {entry_id!r}")
            deleted = await self.ds.delete_entry(entry_id, [ocsf.entry_deleted(current, self.clock())])
            await self._changed(entry_id, None)
        return deleted

    async def get(self, entry_id: str) -> Entry:
        e = await self.ds.get_entry(entry_id)
        if e is None:
            raise NotFoundError(f"no entry with id {entry_id!r}")
        return e

    async def list(self) -> list[Entry]:
        return await self.ds.list_entries()

    async def _changed(self, entry_id: str, after: Entry | None) -> None:
        revision = await self.ds.increment_meta(ENTRIES_REVISION)
        idx = self._index
        if idx is not None and idx.revision == revision - 1:
            # Nobody else counted a write in between: apply our one change. Another replica's
            # write shows here once it bumps the counter, as with any snapshot (the counter
            # is the point of consistency; index() reloads when it moves past ours).
            self._index = idx.with_change(entry_id, after, revision)
        else:
            self._index = None  # reloaded on next use
        for cb in self._listeners:
            cb()

    async def index(self) -> EntryIndex:
        """The current entry index; rebuilt when this or another replica changed entries."""
        revision = int(await self.ds.get_meta(ENTRIES_REVISION) or 0)
        idx = self._index
        if idx is not None and idx.revision == revision:
            return idx
        async with self._lock:
            if self._index is None or self._index.revision != revision:
                self._index = EntryIndex(await self.ds.list_entries(), self.server_id, revision)
            return self._index
