"""The Workload API socket's server parts (workload_api/grpc_server.py): the transport
wrapper (what grpclib writes in one event-loop turn leaves in one send, in order, and nothing
is lost on close) and the connection caps."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpclib.server
import pytest

from workload_api.caller_limits import CallerLimits
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


async def test_flush_sends_now_and_the_turns_flush_finds_nothing() -> None:
    # What a handler does once its message is written (flush_writes): a rotation that wakes
    # many streams gets each message out while the next one is built.
    real = FakeTransport()
    t = CoalescingTransport(real)  # type: ignore[arg-type]
    t.write(b"HEADERS")
    t.write(b"DATA")
    t.flush()
    assert real.sent == [b"HEADERSDATA"]
    await asyncio.sleep(0)
    assert real.sent == [b"HEADERSDATA"]


async def test_our_settings_leave_at_accept_time() -> None:
    # gRPC clients (C-core) hold their request until they have the server's SETTINGS: they
    # go out from connection_made itself, not at the end of the loop turn.
    from grpclib.config import Configuration
    from h2.config import H2Configuration

    from meshid.grpc_base import GuardedHandler
    from workload_api.grpc_server import _PeerCredProtocol

    real = FakeTransport()
    handler = GuardedHandler({}, None, None, None)  # type: ignore[arg-type]
    proto = _PeerCredProtocol(handler, Configuration().__for_server__(), H2Configuration(client_side=False))
    proto.connection_made(real)
    assert real.sent and real.sent[0][3:4] == b"\x04"  # frame type 4: SETTINGS
    proto.connection_lost(None)


async def test_close_sends_what_was_written_first() -> None:
    real = FakeTransport()
    t = CoalescingTransport(real)  # type: ignore[arg-type]
    t.write(b"GOAWAY")
    t.close()
    assert real.sent == [b"GOAWAY"] and real.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert real.sent == [b"GOAWAY"]


async def test_a_finished_stream_leaves_no_cycle_for_the_gc(tmp_path: Any) -> None:
    """A client that opens a stream and goes away must not leave the server's side of the
    connection to the cyclic GC: with 1000 streams open its collections cost milliseconds."""
    import gc

    import grpclib.const
    from grpclib.client import Channel

    from meshid.grpc_base import GuardedHandler
    from workload_api._gen import workload_pb2
    from workload_api.grpc_server import _PeerCredProtocol, serve_unix

    finished = asyncio.Event()

    async def fetch(stream: Any) -> None:
        try:
            await stream.recv_message()
            await stream.send_message(workload_pb2.X509SVIDResponse())
            await asyncio.Event().wait()  # a watch stream: held until the client leaves
        finally:
            finished.set()

    class Service:
        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            return {"/SpiffeWorkloadAPI/FetchX509SVID": grpclib.const.Handler(
                fetch, grpclib.const.Cardinality.UNARY_STREAM,
                workload_pb2.X509SVIDRequest, workload_pb2.X509SVIDResponse)}

    server = await serve_unix([Service()], tmp_path / "api.sock", 0o777)
    gc.collect()
    gc.disable()
    try:
        channel = Channel(path=str(tmp_path / "api.sock"))
        async with channel.request("/SpiffeWorkloadAPI/FetchX509SVID", grpclib.const.Cardinality.UNARY_STREAM,
                                   workload_pb2.X509SVIDRequest, workload_pb2.X509SVIDResponse) as st:
            await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
            assert await st.recv_message() is not None
            channel.close()  # the workload goes away mid-stream
        await asyncio.wait_for(finished.wait(), 5)
        for _ in range(3):
            await asyncio.sleep(0.01)  # the handler's task finishes and its callbacks run
        server.__gc_collect__()  # grpclib forgets finished connections every 10th accept
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = (_PeerCredProtocol, GuardedHandler, grpclib.server.Stream)
        left = [o for o in gc.garbage if isinstance(o, ours)]
        assert left == []
        # Nor the server side's socket transport (the client's is grpclib's business).
        transports = [o for o in gc.garbage if isinstance(o, asyncio.Transport)]
        assert [t for t in transports if t.get_extra_info("sockname") == str(tmp_path / "api.sock")] == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        server.close()
        await server.wait_closed()


def test_caller_limits_per_uid_and_in_all(caplog: pytest.LogCaptureFixture) -> None:
    limit = CallerLimits(connections_per_uid=2, streams_per_uid=2, total_connections=3)
    with caplog.at_level(logging.WARNING):
        assert limit.admit_connection(1000) and limit.admit_connection(1000)
        assert not limit.admit_connection(1000) and not limit.admit_connection(1000)  # at its cap
        assert limit.admit_connection(None)  # peer credentials unreadable: counted under None
        assert not limit.admit_connection(1001)  # the agent's budget is spent
        limit.release_connection(1000)
        assert limit.admit_connection(1001) and limit.connections.total == 3
        # Streams: per uid, across its connections.
        assert limit.stream_refusal(1000) is None and limit.stream_refusal(1000) is None
        refusal = limit.stream_refusal(1000)
        assert refusal is not None and "max_streams_per_uid" in refusal
        assert limit.stream_refusal(1001) is None
        limit.release_stream(1000)
        assert limit.stream_refusal(1000) is None
    assert limit.refused == 4
    # One warning per uid and kind per minute, not one per refusal.
    assert caplog.text.count("max_connections_per_uid") == 1
    assert caplog.text.count("file descriptor budget") == 1
    assert caplog.text.count("max_streams_per_uid") == 1


def test_a_socket_that_cannot_be_bound_is_named(short_tmp: Any) -> None:
    """An agent without write access to its socket's directory (run as another user than the
    directory's owner) stopped with "[Errno 13] Permission denied", naming no path."""
    import os
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    sock = short_tmp / "api.sock"  # short_tmp: 0755, root's; nobody may look in, not write
    script = (  # imports first: the interpreter's files may be unreadable to nobody
        "import os, sys\n"
        "from workload_api.grpc_server import bind_unix_socket\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    bind_unix_socket(sys.argv[1], 0o777)\n"
        "except OSError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(sock)], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == f"[Errno 13] Permission denied: '{sock}'", out
