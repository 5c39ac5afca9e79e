"""Reading a grpclib server stream in the background, so a test can wait for the message
it expects, skip others, or assert that nothing arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

TIMEOUT = 20.0


class StreamReader:
    def __init__(self, stream: Any) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: Any) -> None:
        try:
            while (msg := await stream.recv_message()) is not None:
                await self.queue.put(msg)
            await stream.recv_trailing_metadata()  # raises GRPCError for a non-OK status
            await self.queue.put(EOFError("stream ended"))
        except Exception as exc:
            await self.queue.put(exc)

    async def next(self, within: float = TIMEOUT) -> Any:
        """The next message; the stream's error (or EOFError at its end) is raised."""
        item = await asyncio.wait_for(self.queue.get(), within)
        if isinstance(item, Exception):
            raise item
        return item

    async def until(self, check: Callable[[Any], bool], within: float = TIMEOUT) -> Any:
        """The first message `check` accepts, skipping the others."""
        async with asyncio.timeout(within):
            while True:
                msg = await self.next()
                if check(msg):
                    return msg

    async def quiet(self, seconds: float) -> None:
        """Assert that nothing arrives for `seconds`."""
        try:
            item = await asyncio.wait_for(self.queue.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no message, got {item!r}")

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
