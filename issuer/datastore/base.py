"""The one DataStore interface; SQLite (default) and PostgreSQL implement it.

Every mutating call takes `events`: they are written to the outbox in the same
transaction as the act, so an act is never recorded without its event or vice versa.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from issuer.events.model import Event, OutboxRow, StoredEvent
from meshid.entry import Entry
from meshid.errors import AlreadyExistsError, MeshidError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId


@dataclass(frozen=True)
class AgentRecord:
    agent_id: SpiffeId
    attestor: str
    selectors: tuple[Selector, ...]
    serial: str = ""  # hex serial of the agent's current SVID
    expires_at: int = 0
    # The SVID of a renewal the agent has not used yet (SPIRE's new_cert_serial_number):
    # the current one stays accepted until the agent first presents this one, so a reply
    # lost on its way back does not leave the agent with an SVID the server refuses.
    new_serial: str = ""
    new_expires_at: int = 0
    banned: bool = False
    can_reattest: bool = True
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True)
class CaKeyRecord:
    """One CA signing key (X509 CA or JWT key) and its slot.

    `sealed_key` is the private key encrypted at rest (AES-256-GCM), or an HSM handle
    reference for PKCS#11 keys; the datastore never sees a plaintext key.
    """

    key_id: str
    kind: str  # "x509" | "jwt"
    state: str  # "prepared" | "active" | "old"
    sealed_key: bytes
    public_key_der: bytes  # SubjectPublicKeyInfo DER
    not_before: int
    not_after: int
    cert_chain_der: tuple[bytes, ...] = ()  # x509: CA cert first, then the upstream chain
    tainted: bool = False
    server_id: str = ""  # replica that owns an x509 CA key
    max_signed_not_after: int = 0  # latest notAfter of anything this key signed
    created_at: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class EntryAlreadyExistsError(AlreadyExistsError):
    """create_entry/update_entry hit an entry with the same natural key; `existing` is it
    (SPIRE's BatchCreateEntry returns that entry alongside the AlreadyExists status)."""

    def __init__(self, existing: Entry) -> None:
        super().__init__(
            f"an entry with the same SPIFFE ID, parent ID and selectors already exists: {existing.id}"
        )
        self.existing = existing


class EntryChangedError(MeshidError):
    """update_entry with `expected_revision`: the stored entry is at another revision (someone
    else wrote it since the caller read it); nothing was written."""


class DataStore(Protocol):
    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    async def close(self) -> None: ...

    # --- registration entries -------------------------------------------------
    async def create_entry(self, entry: Entry, events: Sequence[Event] = ()) -> Entry:
        """Assign id (if empty), created_at (if 0) and revision 0. EntryAlreadyExistsError
        (an AlreadyExistsError) when an entry with the same spiffe_id, parent_id and
        selector set exists, carrying that entry; plain AlreadyExistsError when the id is
        taken. Returned entries have their selectors sorted."""

    async def update_entry(
        self, entry: Entry, events: Sequence[Event] = (), *, expected_revision: int | None = None
    ) -> Entry:
        """Replace by id, bump revision_number (created_at is kept). NotFoundError if
        absent; EntryAlreadyExistsError if the change collides with another entry;
        EntryChangedError if `expected_revision` is given and the stored entry is not at it
        (the check and the write are one transaction, across replicas too)."""

    async def delete_entry(self, entry_id: str, events: Sequence[Event] = ()) -> Entry:
        """NotFoundError if absent; returns the deleted entry."""

    async def get_entry(self, entry_id: str) -> Entry | None: ...

    async def list_entries(self) -> list[Entry]: ...

    async def entries_by_parents(self, parents: Collection[SpiffeId]) -> list[Entry]: ...

    async def entries_by_spiffe_id(self, spiffe_id: SpiffeId) -> list[Entry]: ...

    # --- agents ---------------------------------------------------------------
    async def get_agent(self, agent_id: SpiffeId) -> AgentRecord | None: ...

    async def put_agent(self, record: AgentRecord, events: Sequence[Event] = ()) -> None:
        """Insert or replace."""

    async def renew_agent(
        self, record: AgentRecord, previous: AgentRecord, events: Sequence[Event] = ()
    ) -> bool:
        """Store `record`'s new_serial, new_expires_at and update time (a renewal, pending
        until the agent uses it) only if the stored agent still has `previous`'s serial
        and new_serial and is not banned: one atomic check across every replica sharing
        the database. False (nothing written, no events) otherwise."""

    async def promote_agent(
        self, previous: AgentRecord, updated_at: int, events: Sequence[Event] = ()
    ) -> bool:
        """Make the pending SVID current (serial := new_serial, expires_at := new_expires_at,
        the pending pair cleared) only if the stored agent still has `previous`'s serial and
        (non-empty) new_serial and is not banned. False (nothing written, no events) otherwise."""

    async def list_agents(self) -> list[AgentRecord]: ...

    async def delete_agent(self, agent_id: SpiffeId, events: Sequence[Event] = ()) -> None:
        """NotFoundError if absent (and then no events are written)."""

    # --- join tokens (stored hashed, single use) -------------------------------
    async def create_join_token(self, token_hash: str, token_id: str, expires_at: int) -> None:
        """AlreadyExistsError if the hash is already stored."""

    async def consume_join_token(self, token_hash: str, now: int) -> str | None:
        """Atomically delete the token and return its token_id if it existed and had not
        expired (now < expires_at); None otherwise. Two concurrent callers: exactly one
        wins. An expired token is deleted too."""

    # --- CA keys ----------------------------------------------------------------
    async def put_ca_key(self, record: CaKeyRecord, events: Sequence[Event] = ()) -> None:
        """Insert or replace by key_id."""

    async def list_ca_keys(self, kind: str | None = None) -> list[CaKeyRecord]: ...

    async def delete_ca_key(self, key_id: str, events: Sequence[Event] = ()) -> None:
        """NotFoundError if absent (and then no events are written)."""

    async def raise_max_signed(self, key_id: str, not_after: int) -> None:
        """max_signed_not_after = max(current, not_after). NotFoundError if absent."""

    # --- small key/value metadata (bundle sequence, server id, ...) ----------------
    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    async def increment_meta(self, key: str) -> int:
        """Atomically add one to an integer value (missing = 0) and return the new value."""

    # --- coordination between server replicas ---------------------------------------
    def exclusive(self, name: str) -> AbstractAsyncContextManager[None]:
        """Hold the lock `name`, shared by every server on this datastore, for the block
        (CA key decisions: replicas share the JWT key and must not each make one)."""

    # --- outbox -------------------------------------------------------------------
    async def append_events(self, events: Sequence[Event]) -> None: ...

    async def fetch_outbox(self, after_seq: int, limit: int) -> list[OutboxRow]:
        """Undelivered rows with seq > after_seq, in seq order.

        On PostgreSQL seq is allocated at insert, not at commit, so a row can become
        visible after rows with a higher seq. A relay that keeps an after_seq cursor
        must rescan from 0 now and then; claim_outbox has no cursor and no such gap."""

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float, now: float) -> list[OutboxRow]:
        """Lease up to `limit` undelivered rows to `owner` until now + lease_seconds, in
        seq order, so relays on several replicas never publish the same row twice.

        Claimable: unleased rows, rows whose lease expired (their owner died) and rows
        already leased to `owner` (its retry after a failed publish gets them back and
        renews the lease). A row is not claimable while an earlier undelivered row with
        the same partition_key is leased to someone else, which keeps one subject's
        events in order across relays. mark_delivered ends the lease."""

    async def claim_outbox_stored(self, owner: str, limit: int, lease_seconds: float,
                                  now: float) -> list[StoredEvent]:
        """claim_outbox with each row's data left as stored JSON text (the relay's path)."""

    async def mark_delivered(self, seqs: Sequence[int], now: float) -> None:
        """Record that the broker acknowledged these rows (delivered_at = now) and end
        their leases. Rows already delivered keep their first delivery time."""

    async def release_outbox(self, owner: str) -> int:
        """End `owner`'s leases on rows not yet delivered (its relay is stopping cleanly),
        so another replica's relay takes them at once rather than when the lease runs out.
        Returns how many rows were released."""

    async def prune_outbox(self, delivered_before: float) -> int:
        """Delete delivered rows with delivered_at < delivered_before; return how many.
        Undelivered rows are never pruned."""

    async def outbox_backlog(self) -> int:
        """Number of undelivered rows."""
