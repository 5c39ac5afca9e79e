"""Reading an HTTP response body from another service with a size bound."""

from __future__ import annotations

import aiohttp


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body of `resp`, or None once it is known to exceed `limit` bytes (from its
    Content-Length, or while it streams in): aiohttp's own read() keeps any size in memory."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body.extend(chunk)
        if len(body) > limit:
            return None
    return bytes(body)
