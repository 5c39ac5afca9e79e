"""meshid's grpclib servers (meshid/grpc_base.py): a request above the size limit is refused
before its body is read, a malformed or compressed one gets a clear status, and the server
keeps serving. Over a real socket with grpclib's client writing raw frames."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpclib.const
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from h2.exceptions import StreamClosedError
from h2_client import client_connection, events_until_closed, terminated

from meshid.grpc_base import MAX_MESSAGE_BYTES, GuardedServer
from workload_api._gen import workload_pb2

METHOD = "/SpiffeWorkloadAPI/ValidateJWTSVID"
Req, Reply = workload_pb2.ValidateJWTSVIDRequest, workload_pb2.ValidateJWTSVIDResponse
UNARY = grpclib.const.Cardinality.UNARY_UNARY


class Echo:
    """Answers each request with its audience as the SPIFFE ID."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def validate(self, stream: Any) -> None:
        req = await stream.recv_message()
        self.seen.append(req)
        await stream.send_message(Reply(spiffe_id=req.audience))

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {METHOD: grpclib.const.Handler(self.validate, UNARY, Req, Reply)}


@asynccontextmanager
async def serving(tmp: Path, **kwargs: Any) -> AsyncIterator[tuple[Echo, Channel]]:
    echo = Echo()
    server = GuardedServer([echo], **kwargs)
    await server.start(path=str(tmp / "g.sock"))
    ch = Channel(path=str(tmp / "g.sock"))
    try:
        yield echo, ch
    finally:
        ch.close()
        server.close()
        await server.wait_closed()


async def call(ch: Channel, audience: str) -> Any:
    async with ch.request(METHOD, UNARY, Req, Reply, timeout=10) as st:
        await st.send_message(Req(audience=audience), end=True)
        return await st.recv_message()


async def raw_call(ch: Channel, frame: bytes, body: bytes = b"") -> GRPCError:
    """Send `frame` (a message prefix, maybe with a body) as the request's first bytes and
    return the status the server ends the call with."""
    with pytest.raises(GRPCError) as err:
        async with ch.request(METHOD, UNARY, Req, Reply, timeout=10) as st:
            await st.send_request()
            await st._stream.send_data(frame + body)
            await st.recv_message()
    return err.value


async def test_a_message_above_the_limit_is_refused_before_its_body(short_tmp: Path) -> None:
    async with serving(short_tmp) as (echo, ch):
        # Only the prefix: had the server waited for the announced body, this would time out.
        err = await raw_call(ch, b"\x00" + struct.pack(">I", MAX_MESSAGE_BYTES + 1))
        assert err.status is Status.RESOURCE_EXHAUSTED
        assert f"{MAX_MESSAGE_BYTES + 1} bytes exceeds the limit of {MAX_MESSAGE_BYTES}" in str(err.message)
        assert echo.seen == []
        assert (await call(ch, "still-serving")).spiffe_id == "still-serving"


async def test_the_limit_is_inclusive_and_configurable(short_tmp: Path) -> None:
    async with serving(short_tmp, max_message_bytes=1024) as (echo, ch):
        at_limit = Req(audience="a" * 1021)  # field tag + 2-byte length + 1021 = 1024 bytes
        assert at_limit.ByteSize() == 1024
        assert (await call(ch, at_limit.audience)).spiffe_id == at_limit.audience
        err = await raw_call(ch, b"\x00" + struct.pack(">I", 1025))
        assert err.status is Status.RESOURCE_EXHAUSTED


async def test_a_caller_pushing_a_huge_body_is_cut_off_not_buffered(short_tmp: Path) -> None:
    # 16 MiB announced and sent: the server answers at the prefix and acknowledges no more
    # flow control, so the sender is stopped within a window (4 MiB), not taken in whole.
    async with serving(short_tmp) as (echo, ch):
        size, chunk, sent = 16 * 1024 * 1024, b"A" * (1 << 20), 0
        with pytest.raises((GRPCError, StreamClosedError, StreamTerminatedError, asyncio.TimeoutError)):
            async with ch.request(METHOD, UNARY, Req, Reply, timeout=10) as st:
                await st.send_request()
                await st._stream.send_data(b"\x00" + struct.pack(">I", size))
                for _ in range(size // len(chunk)):
                    await asyncio.wait_for(st._stream.send_data(chunk), 2)
                    sent += len(chunk)
                await st.recv_message()
        assert sent <= 8 * 1024 * 1024
        assert echo.seen == []
        assert (await call(ch, "after")).spiffe_id == "after"


async def test_a_malformed_message_is_invalid_argument_and_logs_no_traceback(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(short_tmp) as (echo, ch):
        junk = b"\xff\xff\xff"
        err = await raw_call(ch, b"\x00" + struct.pack(">I", len(junk)), junk)
        assert err.status is Status.INVALID_ARGUMENT
        assert err.message == "malformed ValidateJWTSVIDRequest message"
        assert (await call(ch, "ok")).spiffe_id == "ok"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_compressed_message_is_unimplemented(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(short_tmp) as (echo, ch):
        body = Req(audience="x").SerializeToString()
        err = await raw_call(ch, b"\x01" + struct.pack(">I", len(body)), body)
        assert err.status is Status.UNIMPLEMENTED
        assert err.message == "compressed messages are not supported"
        assert echo.seen == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_an_error_quoting_a_huge_request_is_cut_short(short_tmp: Path) -> None:
    # hpack's encoder is quadratic: a 2 MB grpc-message took minutes of the event loop.
    class Quoting(Echo):
        async def validate(self, stream: Any) -> None:
            req = await stream.recv_message()
            raise GRPCError(Status.INVALID_ARGUMENT, f"audience {req.audience!r} is not ours")

    server = GuardedServer([Quoting()])
    await server.start(path=str(short_tmp / "q.sock"))
    ch = Channel(path=str(short_tmp / "q.sock"))
    try:
        with pytest.raises(GRPCError) as err:
            await asyncio.wait_for(call(ch, "a" * 2_000_000), 10)
        assert err.value.status is Status.INVALID_ARGUMENT
        message = str(err.value.message)
        assert message.startswith("audience 'aaa") and message.endswith(" more characters)")
        assert len(message) < 1100
        with pytest.raises(GRPCError) as err:
            await call(ch, "short")
        assert err.value.message == "audience 'short' is not ours"  # short ones are untouched
    finally:
        ch.close()
        server.close()
        await server.wait_closed()


async def test_other_not_implemented_errors_stay_errors(short_tmp: Path) -> None:
    class Unfinished(Echo):
        async def validate(self, stream: Any) -> None:
            await stream.recv_message()
            raise NotImplementedError("todo")

    server = GuardedServer([Unfinished()])
    await server.start(path=str(short_tmp / "u.sock"))
    ch = Channel(path=str(short_tmp / "u.sock"))
    try:
        with pytest.raises(GRPCError) as err:
            await call(ch, "x")
        assert err.value.status is Status.UNKNOWN  # grpclib's answer to an application error
    finally:
        ch.close()
        server.close()
        await server.wait_closed()


# ----------------------------------------------------------------------------- malformed HTTP/2
async def raw_h2(sock: str, headers: list[tuple[Any, Any]]) -> list[Any]:
    """Send one request with exactly these headers (h2's own checks off, as a hostile client
    would) and return what the server answered: h2 events, or "closed"."""
    import h2.config
    import h2.connection
    import h2.events

    reader, writer = await asyncio.open_unix_connection(sock)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers)
    conn.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    writer.write(conn.data_to_send())
    seen: list[Any] = []
    try:
        while not seen:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                seen.append("closed")
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.StreamReset | h2.events.ResponseReceived):
                    seen.append(ev)
            writer.write(conn.data_to_send())
    except (BrokenPipeError, ConnectionResetError):
        seen.append("closed")
    finally:
        writer.close()
    return seen


GOOD = [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
        ("content-type", "application/grpc"), ("te", "trailers")]


@pytest.mark.parametrize("headers", [
    [h for h in GOOD if h[0] != ":method"],
    [h for h in GOOD if h[0] != ":path"],
    [*GOOD, ("trace-bin", "!!!not base64")],
], ids=["no-method", "no-path", "bad-bin-metadata"])
async def test_a_malformed_request_is_reset_quietly(
    short_tmp: Path, caplog: pytest.LogCaptureFixture, headers: list[tuple[str, str]]
) -> None:
    import h2.errors
    import h2.events

    caplog.set_level(logging.INFO)
    async with serving(short_tmp) as (echo, ch):
        (answer,) = await raw_h2(str(short_tmp / "g.sock"), headers)
        assert isinstance(answer, h2.events.StreamReset)
        assert answer.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert echo.seen == []
        assert (await call(ch, "ok")).spiffe_id == "ok"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("extra", [("x-note", "café".encode()), ("x-café".encode(), b"1")],
                         ids=["value", "name"])
async def test_a_non_ascii_header_ends_the_connection_quietly(
    short_tmp: Path, caplog: pytest.LogCaptureFixture, extra: tuple[Any, Any]
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(short_tmp) as (echo, ch):
        assert await raw_h2(str(short_tmp / "g.sock"), [*GOOD, extra]) == ["closed"]
        assert (await call(ch, "ok")).spiffe_id == "ok"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_well_formed_headers_pass() -> None:
    from grpclib.metadata import encode_bin_value

    from meshid.grpc_base import malformed_request

    assert malformed_request([*GOOD, ("trace-bin", encode_bin_value(b"\x01\x02").decode())]) is None


# ----------------------------------------------------------------------------- unread answers
async def test_a_client_that_never_reads_is_not_read_either(short_tmp: Path) -> None:
    """Every PING is answered: a client sending PINGs without reading made the server buffer
    the answers without bound. The server stops reading such a connection once its answers
    back up, and resumes when they are read."""
    import socket

    from hyperframe.frame import PingFrame

    async with serving(short_tmp) as (_echo, ch):
        sock = socket.socket(socket.AF_UNIX)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(short_tmp / "g.sock"))
        sock.setblocking(False)
        conn = client_connection()
        ping = PingFrame(0)
        ping.opaque_data = b"floodfld"
        sock.sendall(conn.data_to_send())
        pings = ping.serialize() * 4096  # 68 KB of PINGs; sent whole frames at a time
        sent, budget, pos = 0, 16 * 1024 * 1024, 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while sent < budget and loop.time() < deadline:
            try:
                n = sock.send(pings[pos:])
                sent += n
                pos = (pos + n) % len(pings)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        # The kernel's socket buffers and the server's 64 KB high-water mark (0.6 MB in all
        # here), not what the server can parse in 3 s (4.8 MB, all of it answered and buffered).
        assert sent < 2 * 1024 * 1024, f"the server read {sent} bytes from a client that reads nothing"
        # Once the client reads, the server reads again: the last PING is answered.
        sock.setblocking(True)
        sock.settimeout(10)
        conn = client_connection()
        conn.ping(b"lastping")
        rest = pings[pos:pos + (-pos) % len(ping.serialize())]  # end the frame cut short

        def read_until_last_ack() -> int:
            seen = b""
            while b"lastping" not in seen[-64:]:
                data = sock.recv(1 << 20)
                assert data, "connection closed"
                seen = seen[-64:] + data
            return 1

        reader = asyncio.create_task(asyncio.to_thread(read_until_last_ack))
        await asyncio.to_thread(sock.sendall, rest + conn.data_to_send()[24:])  # no second preface
        acks = await asyncio.wait_for(reader, 20)
        sock.close()
        assert acks > 0
        assert (await call(ch, "ok")).spiffe_id == "ok"


# ----------------------------------------------------------------------------- rapid reset
def _grpclib_streams() -> int:
    import gc

    import grpclib.protocol

    return sum(1 for o in gc.get_objects() if type(o) is grpclib.protocol.Stream)


def _registered_streams() -> int:
    """Streams the server's connections still hold as open."""
    import gc

    import grpclib.protocol

    return sum(len(o.streams) for o in gc.get_objects() if type(o) is grpclib.protocol.EventsProcessor)


async def test_streams_reset_at_once_and_finished_ones_are_freed(short_tmp: Path) -> None:
    """A stream its client resets in the same read that opened it was cancelled before its
    handler ran, which alone releases it: it stayed registered on the connection (41,400
    streams, +356 MB in 10 s from one client). And a finished stream must be freed by
    reference counting, not left in a cycle for the cyclic GC."""
    import gc

    async with serving(short_tmp) as (echo, ch):
        reader, writer = await asyncio.open_unix_connection(str(short_tmp / "g.sock"))
        conn = client_connection()
        for sid in range(1, 1001, 2):
            conn.send_headers(sid, GOOD)
            conn.reset_stream(sid)
        writer.write(conn.data_to_send())
        await writer.drain()
        assert (await call(ch, "ok")).spiffe_id == "ok"  # the server has read the resets by now
        await asyncio.sleep(0.1)
        assert _registered_streams() == 0, "streams reset at once are still registered"
        writer.close()
        await asyncio.sleep(0.1)
        gc.collect()

        before = _grpclib_streams()
        gc.disable()
        try:
            for i in range(20):
                assert (await call(ch, str(i))).spiffe_id == str(i)
            await asyncio.sleep(0.05)
            left = _grpclib_streams() - before
        finally:
            gc.enable()
        assert left <= 2, f"{left} finished streams wait for the cyclic GC"


async def test_rapid_reset_is_cut_off_and_does_not_hold_the_loop(short_tmp: Path) -> None:
    """HTTP/2 rapid reset (CVE-2023-44487): a client opening and at once resetting streams.
    One 256 KB read carried ~9,000 stream opens, all handled in one callback: the event loop
    stalled ~2.5 s per read, for every other caller. Now a connection may reset at most
    MAX_RESET_BURST streams (refilled at RESET_RATE/s) before it is sent GOAWAY
    (ENHANCE_YOUR_CALM) and closed, and a large read is handled a slice per loop turn."""
    import h2.errors
    import h2.events

    from meshid.grpc_base import MAX_RESET_BURST

    async with serving(short_tmp) as (echo, ch):
        assert (await call(ch, "warm")).spiffe_id == "warm"
        stalls: list[float] = []

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while True:
                t0 = loop.time()
                await asyncio.sleep(0.005)
                stalls.append(loop.time() - t0 - 0.005)

        conn = client_connection()
        for sid in range(1, 2 * 6000, 2):
            conn.send_headers(sid, GOOD)
            conn.reset_stream(sid)
        flood = conn.data_to_send()  # built before the clock starts: the client's own work
        tick = asyncio.create_task(ticker())
        reader, writer = await asyncio.open_unix_connection(str(short_tmp / "g.sock"))
        writer.write(flood)
        await writer.drain()
        goaway = None
        while goaway is None:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    goaway = event
        assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        last = goaway.last_stream_id
        assert last is not None and last <= 2 * (MAX_RESET_BURST + 200), last
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
        writer.close()
        # Everyone else is served, and was not held up meanwhile.
        assert (await call(ch, "after")).spiffe_id == "after"
        tick.cancel()
        assert max(stalls) < 0.5, f"event loop held {max(stalls) * 1000:.0f} ms"


# ----------------------------------------------------------------------------- shutdown
@asynccontextmanager
async def raw_beside_grpc(
    server: GuardedServer, tmp: Path
) -> AsyncIterator[tuple[Channel, asyncio.StreamReader, Any]]:
    """`server` started on a socket under `tmp`, with a gRPC channel to it and a bare HTTP/2
    connection past its preface; all closed, the server too, on leaving."""
    path = str(tmp / "g.sock")
    await server.start(path=path)
    ch = Channel(path=path)
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        conn = client_connection()
        writer.write(conn.data_to_send())
        await writer.drain()
        yield ch, reader, conn
    finally:
        writer.close()
        ch.close()
        server.close()
        await server.wait_closed()


async def test_closing_the_server_closes_its_connections(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """grpclib's close() stops listening and cancels running calls but leaves every client
    connection open: on Python 3.11 they outlived the server (sockets left open, clients
    never told), on 3.12+ wait_closed() waits for clients to hang up, so a SIGTERM'd server
    with a connected client never finished stopping. They are sent GOAWAY and closed."""

    caplog.set_level(logging.INFO)
    entered = asyncio.Event()

    class Slow(Echo):
        async def validate(self, stream: Any) -> None:
            await stream.recv_message()
            entered.set()
            await asyncio.sleep(3600)

    server = GuardedServer([Slow()])
    async with raw_beside_grpc(server, short_tmp) as (ch, reader, conn):
        # One idle connection past its preface, one with a call in flight.
        in_flight = asyncio.create_task(call(ch, "slow"))
        await asyncio.wait_for(entered.wait(), 5)

        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)

        assert terminated(await events_until_closed(reader, conn))  # EOF, not a timeout
        with pytest.raises((GRPCError, StreamTerminatedError)):
            await asyncio.wait_for(in_flight, 5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_an_idle_connection_is_sent_away_when_asked(short_tmp: Path) -> None:
    """idle_timeout (the Entry API's, on TCP): a connection with no call for that long is
    sent GOAWAY and closed, as the HTTP listeners close idle ones; grpclib kept it forever,
    ~270 KB of TLS buffers each for anyone holding an SVID. Calls keep it open, and a
    long call is not cut."""

    class Slow(Echo):
        async def validate(self, stream: Any) -> None:
            req = await stream.recv_message()
            await asyncio.sleep(float(req.audience))
            await stream.send_message(Reply(spiffe_id=req.audience))

    server = GuardedServer([Slow()], idle_timeout=0.3)
    async with raw_beside_grpc(server, short_tmp) as (ch, reader, conn):
        # Past its preface, silent: sent away.
        assert terminated(await events_until_closed(reader, conn, 3))

        # A call longer than the timeout, then calls more often than it: one connection.
        assert (await call(ch, "1.0")).spiffe_id == "1.0"
        protocol = ch._protocol
        assert protocol is not None
        client: Any = protocol.handler
        for _ in range(10):
            assert (await call(ch, "0")).spiffe_id == "0"
            await asyncio.sleep(0.1)
        assert ch._protocol is protocol and not client.connection_lost
        await asyncio.sleep(1.0)
        assert client.connection_lost  # then idle: sent away
        assert (await call(ch, "0")).spiffe_id == "0"  # and the client simply reconnects
