"""ServerClient against a faulty server on loopback (real TLS 1.3, mutual): every bad HTTP
answer ends in a named error the sync loop backs off on (ServerRejectedError,
ServerUnavailableError, OverloadedError with a sane delay), never a stray exception, an
unbounded read or a wait without end."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pki_helpers import make_ca, make_leaf
from tansu import free_port

from meshid.errors import OverloadedError
from meshid.spiffe_id import SpiffeId, TrustDomain
from meshid.tls import server_context
from workload_api import server_client
from workload_api.server_client import ServerClient, ServerRejectedError, ServerUnavailableError

TD = TrustDomain.parse("example.org")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[ServerClient]]]:
    """serve(handler): a TLS server answering every path with `handler`, and an agent
    client (with an SVID) pointed at it."""
    ca, ca_key = make_ca()
    srv_cert, srv_key = make_leaf(ca, ca_key, "spiffe://example.org/meshid/server")
    agent_cert, agent_key = make_leaf(ca, ca_key, "spiffe://example.org/meshid/agent/test")
    runners: list[web.AppRunner] = []
    clients: list[ServerClient] = []

    async def start(handler: Handler) -> ServerClient:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        ctx = server_context([srv_cert], srv_key, [ca], client_cert="optional")
        await web.SockSite(runner, sock, ssl_context=ctx).start()
        client = ServerClient([f"127.0.0.1:{sock.getsockname()[1]}"], SpiffeId(TD, "/meshid/server"))
        client.set_roots([ca])
        client.set_identity([agent_cert], agent_key)
        clients.append(client)
        return client

    yield start
    for c in clients:
        await c.close()
    for r in runners:
        await r.cleanup()


def answer(body: bytes | str, status: int = 200, content_type: str = "application/json",
           headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        data = body.encode() if isinstance(body, str) else body
        return web.Response(body=data, status=status, content_type=content_type, headers=headers)
    return handler


@pytest.mark.parametrize("body,status,ctype", [
    ("<html><body>502 Bad Gateway</body></html>", 502, "text/html"),
    ("<html>ok</html>", 200, "text/html"),
    ("", 200, "application/json"),
    ('{"entries": NaN}', 200, "application/json"),  # not JSON (Python's json accepts it)
    ('{"n": ' + "9" * 5000 + "}", 200, "application/json"),  # past int's 4300-digit limit
    ("[" * 100_000 + "]" * 100_000, 200, "application/json"),  # RecursionError
    ("[1, 2]", 200, "application/json"),
    ('{"error": "boom"}', 500, "application/json"),  # error not an object: AttributeError
    ('{"error": {"message": ' + "[" * 900 + "]" * 900 + "}}", 500, "application/json"),
])
async def test_unusable_answers_are_a_named_error(serve: Any, body: str, status: int, ctype: str) -> None:
    client = await serve(answer(body, status, ctype))
    with pytest.raises(ServerRejectedError) as info:
        await client.sync({}, -1)
    assert info.value.status == status


@pytest.mark.parametrize("declared", [True, False])
async def test_a_body_beyond_the_bound_is_not_read_whole(
    serve: Any, monkeypatch: pytest.MonkeyPatch, declared: bool
) -> None:
    monkeypatch.setattr(server_client, "MAX_RESPONSE_BYTES", 1 << 20)
    filler = b"a" * (64 * 1024)
    chunks = 128  # 8 MiB of otherwise valid JSON

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared:
            resp.content_length = len(filler) * chunks + len(b'{"x":""}')
        await resp.prepare(request)
        await resp.write(b'{"x":"')
        try:
            for _ in range(chunks):
                await resp.write(filler)
            await resp.write(b'"}')
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return resp

    client = await serve(handler)
    with pytest.raises(ServerRejectedError, match="larger than 1048576 bytes"):
        await client.sync({}, -1)


async def test_a_server_that_never_answers_is_bounded_by_the_timeout(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_client, "TIMEOUT", aiohttp.ClientTimeout(total=0.5, connect=0.5))

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    client = await serve(handler)
    async with asyncio.timeout(5):
        with pytest.raises(ServerUnavailableError):
            await client.sync({}, -1)


async def test_a_body_cut_short_is_an_outage_not_a_stray_exception(serve: Any) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"entries": [')
        assert request.transport is not None
        request.transport.close()
        return resp

    client = await serve(handler)
    with pytest.raises(ServerUnavailableError):  # was aiohttp.ClientPayloadError
        await client.sync({}, -1)


@pytest.mark.parametrize("body,header,expected", [
    ('{"retry_after": 1e999}', None, server_client.MAX_RETRY_AFTER),  # inf ended the sync loop
    ('{"retry_after": 1e12}', None, server_client.MAX_RETRY_AFTER),  # parked it for good
    ('{"retry_after": -5}', None, 0.0),
    ("{}", "inf", server_client.MAX_RETRY_AFTER),
    ("{}", "nan", 1.0),
    ("{}", "Wed, 21 Oct 2015 07:28:00 GMT", 1.0),  # an HTTP-date raised ValueError
    ("<html>slow down</html>", "7", 7.0),  # a proxy's page: its header still counts
])
async def test_retry_after_hints_are_bounded(
    serve: Any, body: str, header: str | None, expected: float
) -> None:
    client = await serve(answer(body, 429, headers={"Retry-After": header} if header else None))
    with pytest.raises(OverloadedError) as info:
        await client.sync({}, -1)
    assert info.value.retry_after == expected


@pytest.mark.parametrize("body", [
    '{"expires_at": 1700000000}',
    '{"token": 12345, "expires_at": 1700000000}',  # was str()-ed into a token
    '{"token": "", "expires_at": 1700000000}',
    '{"token": "a.b.c"}',
    '{"token": "a.b.c", "expires_at": "soon"}',
    '{"token": "a.b.c", "expires_at": 1e999}',  # int(inf): OverflowError
    '{"token": "a.b.c", "expires_at": true}',
])
async def test_sign_jwt_garbage_is_a_named_error(serve: Any, body: str) -> None:
    client = await serve(answer(body))
    with pytest.raises(ServerRejectedError, match="bad_response"):
        await client.sign_jwt("e1", ["aud"])


@pytest.mark.parametrize("body", [
    "{}",  # was KeyError
    '{"svid": []}',
    '{"svid": ["!!!not base64"]}',
    '{"svid": [42]}',
    '{"svid": ["' + base64.b64encode(b"not DER").decode() + '"]}',
])
async def test_renew_garbage_is_a_named_error(serve: Any, body: str) -> None:
    client = await serve(answer(body))
    with pytest.raises(ServerRejectedError, match="bad_response"):
        await client.renew(b"csr")


async def test_a_probe_answered_with_no_roots_is_no_proof_the_svid_is_refused() -> None:
    """An empty bundle from the anonymous probe is an outage, not a reason to re-attest."""
    ca, ca_key = make_ca()
    agent_cert, agent_key = make_leaf(ca, ca_key, "spiffe://example.org/meshid/agent/test")
    client = ServerClient(["127.0.0.1:1"], SpiffeId(TD, "/meshid/server"))
    client.set_identity([agent_cert], agent_key)

    async def empty_bundle() -> dict[str, Any]:
        return {"keys": [], "spiffe_sequence": 9}

    client.fetch_bundle = empty_bundle  # type: ignore[method-assign]
    await client._check_identity_rejected(None)  # raised IdentityRejectedError
    await client.close()


async def test_a_gateway_failure_moves_on_to_the_next_address(serve: Any) -> None:
    """With several server addresses, a 502/503/504 (a proxy in front of a down replica)
    tries the next one instead of failing the whole sync; from the last address it is the
    answer."""
    down = await serve(answer("<html>503 Service Unavailable</html>", 503, "text/html"))
    up = await serve(answer('{"ok": true}'))
    down.addresses = [*down.addresses, *up.addresses]
    assert await down.sync({}, -1) == {"ok": True}
    down.addresses = down.addresses[:1]
    with pytest.raises(ServerRejectedError, match="503"):
        await down.sync({}, -1)


async def test_a_request_in_flight_survives_a_change_of_tls_material(serve: Any) -> None:
    """New roots (a synced bundle) or a renewed agent SVID replace the client's session; the
    next request closed the old one at once, under a request still using it (a workload's
    JWT-SVID signing, say): cut off, and with a second address configured the retry on the
    closed session raised RuntimeError("Session is closed") past every handler."""
    started = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/agent/sign/jwt":
            started.set()
            await asyncio.sleep(0.5)
            return web.json_response({"token": "t", "expires_at": 1})
        return web.json_response({})

    client = await serve(handler)
    client.addresses.append(f"127.0.0.1:{free_port()}")  # a second address nothing listens on
    slow = asyncio.create_task(client.sign_jwt("e", ["a"]))
    await started.wait()
    client.set_roots(list(client._roots))  # same roots: nothing to replace
    client.set_identity(*client._identity)  # a renewed SVID: a new session
    assert await client.sync({}, -1) == {}
    assert await slow == ("t", 1)
    await client.sync({}, -1)  # and the superseded session is closed once it is idle
    assert client._closing == []
