"""A bare HTTP/2 client for tests that speak to a server below gRPC: floods, resets, and
watching what the server sends on its own (GOAWAY)."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.events


def client_connection() -> h2.connection.H2Connection:
    """A client-side connection with its preface queued (data_to_send())."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


async def events_until_closed(
    reader: asyncio.StreamReader, conn: h2.connection.H2Connection, within: float = 5.0
) -> list[Any]:
    """Every event the server sends until it closes the connection; TimeoutError if it
    sends nothing for `within` seconds."""
    events: list[Any] = []
    while data := await asyncio.wait_for(reader.read(65536), within):
        events.extend(conn.receive_data(data))
    return events


def terminated(events: list[Any]) -> bool:
    """Whether the server sent GOAWAY."""
    return any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
