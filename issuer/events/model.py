"""An event as the server records it in the outbox, before it is wrapped as a CloudEvent.

The CloudEvent `id` is derived from the outbox sequence when relayed (deterministic,
so a re-sent event keeps its id); everything else is fixed when the act happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
