"""The API error middleware and read_json (issuer/api/errors.py): a caller that goes away
mid-body, sends an undecodable body or never finishes it is not an internal error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from aiohttp import web

from issuer.api import errors
from issuer.api.errors import error_middleware, read_json


async def _serve(app: web.Application, **runner_kw: Any) -> tuple[web.AppRunner, int]:
    """Run app on a free loopback port: the runner (to clean up) and the port."""
    runner = web.AppRunner(app, **runner_kw)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


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
    runner, port = await _serve(app)
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


async def _json_app() -> tuple[web.AppRunner, int]:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(await read_json(request))

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/x", handler)
    # No lingering: the abandoned body's connection closes at once (cleanup is quick).
    return await _serve(app, lingering_time=0)


async def test_undecodable_content_encoding_is_invalid_argument(caplog: pytest.LogCaptureFixture) -> None:
    """A body that claims gzip but is not: the caller's error, not a 500 with a traceback."""
    runner, port = await _json_app()
    try:
        with caplog.at_level(logging.INFO):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer
        assert b'"invalid_argument"' in body and b"content-encoding" in body
        assert "internal error" not in caplog.text
    finally:
        await runner.cleanup()


async def test_body_that_never_arrives_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers sent, then the body trickled (or a chunked body left unfinished): the
    handler gives up with 408 instead of waiting for as long as the caller likes."""
    monkeypatch.setattr(errors, "BODY_TIMEOUT", 0.5)
    runner, port = await _json_app()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        await writer.drain()
        start = asyncio.get_running_loop().time()
        answer = b""
        while not answer and asyncio.get_running_loop().time() - start < 5:
            writer.write(b" ")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(200), 0.2)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        await runner.cleanup()


async def test_aiohttp_own_errors_are_json_with_our_codes() -> None:
    """Unknown route, wrong method and a handler's plain HTTPNotFound: JSON like every
    other error of these APIs, with the Allow header of a 405 kept."""
    import aiohttp

    async def gone(request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text="unknown CA operation")

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/gone", gone)
    app.router.add_get("/ok", ok)
    runner, port = await _serve(app)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            cases = [("GET", "/nowhere", 404, "not_found"), ("POST", "/ok", 405, "unimplemented"),
                     ("POST", "/gone", 404, "not_found")]
            for method, path, status, code in cases:
                async with http.request(method, path) as resp:
                    assert resp.status == status
                    assert resp.content_type == "application/json"
                    body = await resp.json()
                    assert body["error"]["code"] == code and body["error"]["message"]
                    if status == 405:
                        assert resp.headers["Allow"] == "GET,HEAD"
            async with http.post("/gone") as resp:
                assert (await resp.json())["error"]["message"] == "unknown CA operation"
            async with http.get("/ok") as resp:
                assert resp.status == 200 and await resp.json() == {"ok": True}
    finally:
        await runner.cleanup()
