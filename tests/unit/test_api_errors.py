"""The API error middleware (issuer/api/errors.py): a caller that goes away mid-body is
not an internal error."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from issuer.api.errors import error_middleware, read_json


async def test_connection_lost_mid_body_is_not_an_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            await read_json(request)
        except BaseException as exc:
            seen.append(type(exc).__name__)
            raise
        return web.json_response({})

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/x", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        with caplog.at_level(logging.INFO):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"a\":")
            await writer.drain()
            await asyncio.sleep(0.05)  # the handler is now waiting for the rest of the body
            writer.close()
            for _ in range(200):
                if "connection lost" in caplog.text:
                    break
                await asyncio.sleep(0.01)
        assert seen == ["ConnectionResetError"]
        assert "connection lost before the request was read" in caplog.text
        assert "internal error" not in caplog.text and "Error handling request" not in caplog.text
    finally:
        await runner.cleanup()
