"""The Workload API socket's transport wrapper (workload_api/grpc_server.py): what grpclib
writes in one event-loop turn leaves in one send, in order, and nothing is lost on close."""

from __future__ import annotations

import asyncio
from typing import Any

from workload_api.grpc_server import CoalescingTransport


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.sent.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": "peer"}.get(name, default)


async def test_writes_of_one_turn_leave_together_and_in_order() -> None:
    real = FakeTransport()
    t = CoalescingTransport(real)  # type: ignore[arg-type]
    t.write(b"HEADERS")
    t.write(b"")
    t.write(b"DATA")
    assert real.sent == []
    await asyncio.sleep(0)
    assert real.sent == [b"HEADERSDATA"]
    t.write(b"NEXT")
    await asyncio.sleep(0)
    assert real.sent == [b"HEADERSDATA", b"NEXT"]
    assert t.get_extra_info("peername") == "peer"  # everything else is the real transport's


async def test_close_sends_what_was_written_first() -> None:
    real = FakeTransport()
    t = CoalescingTransport(real)  # type: ignore[arg-type]
    t.write(b"GOAWAY")
    t.close()
    assert real.sent == [b"GOAWAY"] and real.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert real.sent == [b"GOAWAY"]
