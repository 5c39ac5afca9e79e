"""An event as the server records it in the outbox, before it is wrapped as a CloudEvent.

The CloudEvent `id` is derived from the outbox sequence when relayed (deterministic,
so a re-sent event keeps its id); everything else is fixed when the act happens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # io.meshid.<noun>.<verb>
    subject: str  # SPIFFE ID, entry id or agent id
    partition_key: str  # Kafka record key: SPIFFE ID, else agent ID or CA key ID
    time: float  # unix seconds when the act happened
    data: dict[str, Any]  # OCSF-shaped payload


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    event: Event


class StoredEvent(NamedTuple):
    """An outbox row as stored, `data` still the JSON text the datastore holds: the relay
    publishes it without decoding and re-encoding it (most of its per-event cost). A
    NamedTuple rather than a frozen dataclass: it is made once per relayed event, and a
    tuple is several times cheaper to build."""

    seq: int
    type: str
    subject: str
    partition_key: str
    time: float
    data_json: str

    def decode(self) -> OutboxRow:
        data = json.loads(self.data_json)
        return OutboxRow(self.seq, Event(self.type, self.subject, self.partition_key, self.time, data))
