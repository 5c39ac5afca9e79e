"""meshid/listeners.py against hostile HTTP callers: a caller that trickles its headers (or
sends nothing) is disconnected, and a malformed request is answered 400 without an ERROR
traceback in the log."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from aiohttp import web

from meshid import listeners


async def _ready() -> tuple[bool, dict[str, object]]:
    return True, {}


async def test_trickled_headers_are_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listeners, "IDLE_TIMEOUT", 0.5)
    listener = await listeners.plain_listener(listeners.health_app(_ready), "127.0.0.1", 0)
    try:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", listener.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 5:
            writer.write(b"X-Slow: 1\r\n")  # never the blank line that ends the headers
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed, "a caller trickling headers was never disconnected"
        assert await asyncio.wait_for(idle_r.read(1), 2) == b""  # nothing sent at all
        writer.close()
        idle_w.close()
    finally:
        await listener.stop()


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /live HTTP/1.1\r\nHost: x\r\nBad Name: a\r\n\r\n",
    b"GET /live HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /live HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
])
async def test_malformed_http_is_a_400_without_error_traceback(
    request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    listener = await listeners.plain_listener(listeners.health_app(_ready), "127.0.0.1", 0)
    try:
        with caplog.at_level(logging.INFO):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(request_bytes)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await asyncio.sleep(0.05)
        assert answer.split(b"\r\n", 1)[0].endswith(b"400 Bad Request")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        await listener.stop()


async def test_undecodable_body_is_not_an_error_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A body claiming gzip that is not: the handler answers 400; aiohttp meets the same
    decoding error again when it drains the unread body, which is the caller's fault too."""

    async def handler(request: web.Request) -> web.Response:
        try:
            await request.read()
        except web.RequestPayloadError:
            return web.Response(status=400, text="bad body")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/x", handler)
    listener = await listeners.plain_listener(app, "127.0.0.1", 0)
    try:
        with caplog.at_level(logging.INFO):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                         b"Content-Length: 4\r\n\r\nabcd")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await asyncio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        await listener.stop()


async def test_stop_does_not_wait_long_for_a_request_without_its_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stop() lets requests in flight finish, but for at most SHUTDOWN_TIMEOUT: aiohttp's
    default is 60 s, so one caller sending headers and no body (nobody needs a client
    certificate to do that on the agent API) kept a SIGTERM'd server stopping for a minute,
    past systemd's TimeoutStopSec and Kubernetes' grace period, which then SIGKILL it."""
    monkeypatch.setattr(listeners, "SHUTDOWN_TIMEOUT", 0.5)
    started = asyncio.Event()

    async def wants_body(request: web.Request) -> web.Response:
        started.set()
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/x", wants_body)
    listener = await listeners.plain_listener(app, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    try:
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        began = time.monotonic()
        await asyncio.wait_for(listener.stop(), 10)
        assert time.monotonic() - began < 3
    finally:
        writer.close()


def test_socket_directories_made_are_not_writable_by_others_whatever_the_umask(tmp_path: Path) -> None:
    from meshid.listeners import prepare_socket_path, umask

    with umask(0):
        prepare_socket_path(tmp_path / "a" / "b" / "c" / "api.sock")
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert d.stat().st_mode & 0o777 == 0o755, d
