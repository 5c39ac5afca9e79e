"""The base of meshid's grpclib servers: what gRPC servers elsewhere do by default and
grpclib leaves to its users.

- **A request size limit.** grpclib reads whatever length a message's 5-byte prefix
  announces, acknowledging HTTP/2 flow control as it goes, so one caller could make the
  process buffer up to 4 GiB per stream. Like gRPC's own servers (grpc-go, C-core), a
  message above 4 MiB is refused with RESOURCE_EXHAUSTED before its body is read.
- **Clear statuses for malformed requests.** A message that does not parse is
  INVALID_ARGUMENT, a compressed one (we offer no compression) UNIMPLEMENTED; grpclib would
  answer UNKNOWN "Internal Server Error" and log a traceback for the caller's mistake.
- **Malformed HTTP/2 requests answered, not logged as our failures.** grpclib has h2's
  header validation off (for speed) and indexes `:method` and `:path` unchecked, so a
  request without them, with an undecodable `-bin` metadata value or with a non-ASCII
  header left the caller without an answer and put a traceback in our log at ERROR, once
  per request anyone could send. Such a stream is reset (PROTOCOL_ERROR, as RFC 9113 §8.1.1
  asks), a non-ASCII header block ends the connection as h2's other protocol errors do.
- **Bounded error messages.** A status message quoting the request is cut to 1 KiB
  (bounded_status_message): hpack's encoder is quadratic in a header's length.
- **No reference cycle per finished request** (GuardedHandler).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpclib.server
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.metadata import decode_bin_value
from grpclib.protocol import H2Protocol
from h2.errors import ErrorCodes
from h2.events import StreamReset
from h2.exceptions import ProtocolError

from meshid.token_bucket import TokenBucket

log = logging.getLogger("meshid.grpc")

_Request = TypeVar("_Request")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default largest received message
MAX_STATUS_MESSAGE = 1024  # characters of an error message sent back (bounded_status_message)
# Streams a client may reset per connection before it is told to calm down (GOAWAY
# ENHANCE_YOUR_CALM) and closed: a burst, refilled at RESET_RATE per second. A client that
# cancels calls now and then never comes near; HTTP/2 rapid reset (CVE-2023-44487) does at once.
MAX_RESET_BURST = 200
RESET_RATE = 20.0
# Received bytes handled per event-loop turn: one 256 KB read carried ~9,000 stream opens,
# which held the loop ~2.5 s when handled in one callback.
READ_SLICE = 4096

_COMPRESSION_REFUSED = "Compression not implemented"  # grpclib's words for a compressed message


class GuardedProtoCodec(ProtoCodec):
    """Protobuf codec that reports an undecodable request as the caller's error, and accepts
    already-encoded bytes, so one encoded response can be sent to many streams without
    re-serializing it for each."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return super().encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return super().decode(data, message_type)
        except DecodeError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"malformed {message_type.__name__} message") from exc


async def recv_request(stream: grpclib.server.Stream[_Request, Any]) -> _Request:
    """The call's request message: a call the client ended without one is its error,
    INVALID_ARGUMENT, not an assertion failure logged as ours."""
    message = await stream.recv_message()
    if message is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "missing request message")
    return message


def _bounded(recv_data: Callable[[int], Awaitable[bytes]], limit: int) -> Callable[[int], Awaitable[bytes]]:
    async def bounded(size: int) -> bytes:
        if size > limit:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED, f"request message of {size} bytes exceeds the limit of {limit}"
            )
        return await recv_data(size)

    return bounded


class GuardedHandler(grpclib.server.Handler):
    """grpclib's per-connection request handler, with the message size limit on each stream
    and no reference cycle left behind a finished request. A stream ended by its client
    leaves its termination error on the stream's Wrapper, and that error's traceback holds
    the handler's frames, which hold the Wrapper: a cycle through the whole connection (h2
    state, buffers, ~130 objects) that only the cyclic GC could free. With 1000 streams open
    those collections took 1-5 ms each and landed on other callers' new streams; cut, the
    connection is freed by reference counting when its last request ends."""

    max_message_bytes = MAX_MESSAGE_BYTES
    accepted = 0  # streams opened on this connection (GuardedProtocol's idle check)

    def accept(self, stream: Any, headers: Any, release_stream: Any) -> None:
        self.accepted += 1
        problem = malformed_request(headers)
        if problem is not None:
            # Debug only: anyone who can connect could otherwise fill the log.
            log.debug("malformed gRPC request refused: %s", problem)
            stream.reset_nowait(ErrorCodes.PROTOCOL_ERROR)
            release_stream()
            return
        # grpclib reads a message as recv_data(5) for the prefix, then recv_data(length).
        stream.recv_data = _bounded(stream.recv_data, self.max_message_bytes)
        release = _Once(release_stream)
        super().accept(stream, headers, release)
        task = self._tasks.get(stream)
        if task is not None:
            task.add_done_callback(lambda _task: _finished(stream, release))


class _Once:
    """A stream's release, done at most once: grpclib's request handler releases the stream
    in a `finally`, but a task cancelled before its first step never runs its body. A client
    resetting each stream in the same read that opened it ("rapid reset") left every one
    registered on the connection for its lifetime: 41,400 streams, +356 MB of agent memory
    in 10 s from one unprivileged client. The task's done callback releases what the
    handler did not."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], Any]) -> None:
        self._release: Callable[[], Any] | None = release

    def __call__(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


def _finished(stream: Any, release: _Once) -> None:
    _drop_error(stream)
    # The size-bounded recv_data holds the stream's own method: a cycle only the cyclic GC
    # would free (with 10,000 such streams waiting, its collections held the loop for seconds).
    stream.__dict__.pop("recv_data", None)
    release()


def _drop_error(stream: Any) -> None:
    wrapper = getattr(stream, "wrapper", None)
    if wrapper is not None:
        wrapper._error = None


def malformed_request(headers: Any) -> str | None:
    """What grpclib's request handler would fail on in these request headers, or None."""
    names = set()
    for name, value in headers:
        names.add(name)
        if name.endswith("-bin"):
            try:
                decode_bin_value(value.encode("ascii"))
            except (binascii.Error, ValueError):
                return f"undecodable binary metadata {name!r}"
    missing = {":method", ":path"} - names
    if missing:
        return f"missing {' and '.join(sorted(missing))}"
    return None


class GuardedProtocol(H2Protocol):
    """grpclib's HTTP/2 protocol, ending a connection whose header block is not ASCII (h2
    decodes it with grpclib's `header_encoding="ascii"` and lets the UnicodeDecodeError out,
    which asyncio reports as a fatal error with a traceback) as grpclib ends one with an h2
    protocol error.

    It also stops reading a connection while what we have written to it is not being read
    (the transport's write buffer is above its high-water mark). grpclib only holds back
    DATA then and goes on reading, and every request, PING and SETTINGS answered grows the
    buffer: a client sending PINGs or SETTINGS without ever reading had the agent buffer
    the answers without bound (+16 MB in 10 s, growing as fast as the agent could parse)
    with the event loop held 60-175 ms per read (other workloads' calls 4 -> 180-470 ms).
    Paused, its unread frames wait in the kernel's socket buffer at no cost to us (+1 MB,
    calls 4 ms); reading resumes once it reads.

    Reads are handled READ_SLICE bytes per loop turn (reading paused meanwhile), and a
    connection resetting streams faster than MAX_RESET_BURST / RESET_RATE is sent GOAWAY
    (ENHANCE_YOUR_CALM) and closed: HTTP/2 rapid reset."""

    _io: Any = None  # the transport given to connection_made
    idle_timeout: float | None = None  # see GuardedServer
    _idle_handle: asyncio.TimerHandle | None = None
    _idle_seen = -1  # streams accepted as of the last idle check
    _write_paused = False
    _backlog = b""  # received, handled up to _pos
    _pos = 0
    _closed = False

    def connection_made(self, transport: Any) -> None:
        self._io = transport
        self._resets = TokenBucket(RESET_RATE, MAX_RESET_BURST)
        super().connection_made(transport)
        if self.idle_timeout is not None:
            self._idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """Sent away after a whole idle_timeout with no call running and none opened."""
        self._idle_handle = None
        if self._closed or self.idle_timeout is None:
            return
        handler = self.handler
        busy = any(not task.done() for task in getattr(handler, "_tasks", {}).values())
        accepted = getattr(handler, "accepted", 0)
        if not busy and accepted == self._idle_seen:
            log.debug("gRPC connection idle for %g s; GOAWAY and closed", self.idle_timeout)
            self.go_away()
            return
        self._idle_seen = accepted
        self._idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle_check)

    def _update_reading(self) -> None:
        if self._io is None or self._io.is_closing():
            return
        if self._write_paused or self._backlog:
            self._io.pause_reading()
        else:
            self._io.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._backlog:  # a turn's slice is already pending: keep the order
            self._backlog = self._backlog[self._pos:] + data
            self._pos = 0
            return
        self._backlog, self._pos = data, 0
        self._handle_slice()

    def _handle_slice(self) -> None:
        if self._closed:
            return
        start, self._pos = self._pos, self._pos + READ_SLICE
        self._feed(self._backlog[start:self._pos])
        if self._pos >= len(self._backlog):
            self._backlog, self._pos = b"", 0
        elif not self._closed:
            asyncio.get_running_loop().call_soon(self._handle_slice)
        self._update_reading()

    def _feed(self, data: bytes) -> None:
        # grpclib's H2Protocol.data_received, event by event, counting the client's resets.
        try:
            events = self.connection.feed(data)
        except ProtocolError:
            log.debug("HTTP/2 protocol error; connection closed", exc_info=True)
            self._close("Protocol error")
            return
        except UnicodeDecodeError:
            log.debug("HTTP/2 header block is not ASCII; connection closed")
            self._close("Protocol error")
            return
        self.connection.flush()
        for event in events:
            if isinstance(event, StreamReset) and event.remote_reset and self._resets.try_take(1) > 0:
                self._calm_down(event.stream_id)
                return
            self.processor.process(event)
        self.connection.flush()

    def _calm_down(self, stream_id: int) -> None:
        log.debug("client reset streams faster than %d/s; GOAWAY and closed", RESET_RATE)
        self._go_away(ErrorCodes.ENHANCE_YOUR_CALM, "Too many stream resets", last_stream_id=stream_id)

    def go_away(self) -> None:
        """Server shutdown or an idle connection: GOAWAY (NO_ERROR), then close it."""
        if self._closed or self._io is None or self._io.is_closing():
            return
        self._go_away(ErrorCodes.NO_ERROR, "Server closed")

    def _go_away(self, code: ErrorCodes, reason: str, last_stream_id: int | None = None) -> None:
        with contextlib.suppress(ProtocolError):  # h2 already saw the connection end
            self.connection._connection.close_connection(error_code=code, last_stream_id=last_stream_id)
            self.connection.flush()
        self._close(reason)

    def _close(self, reason: str) -> None:
        self._closed = True
        self._backlog = b""
        self.processor.close(reason)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._backlog = b""
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        super().connection_lost(exc)


def bounded_status_message(message: str | None, limit: int = MAX_STATUS_MESSAGE) -> str | None:
    """At most `limit` characters of a caller-influenced message, saying how many were cut.
    For the grpc-message trailer: messages may quote the request (a name, an audience), and
    hpack's pure-Python Huffman encoder is quadratic: a 200 KB trailer held the event loop
    for 4 s, a 2 MB one for minutes, for every caller of the process."""
    if message is None or len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit} more characters)"


def _answered(func: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    """A method handler whose errors reach the caller as a clear, bounded status."""

    async def handle(stream: Any) -> None:
        try:
            await func(stream)
        except GRPCError as exc:
            message = bounded_status_message(exc.message)
            if message is exc.message:
                raise
            raise GRPCError(exc.status, message, exc.details) from None
        except NotImplementedError as exc:
            if str(exc) != _COMPRESSION_REFUSED:
                raise
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported") from None

    return handle


class GuardedServer(grpclib.server.Server):
    """grpclib's Server with GuardedHandler and GuardedProtoCodec (see the module's doc).

    `idle_timeout`: a connection with no call running or opened for that many seconds is
    sent GOAWAY and closed (grpc-go's MaxConnectionIdle; clients reconnect when they next
    call). grpclib keeps one forever, whatever it costs."""

    def __init__(
        self,
        handlers: Any,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        idle_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("codec", GuardedProtoCodec())
        super().__init__(handlers, **kwargs)
        self._max_message_bytes = max_message_bytes
        self._idle_timeout = idle_timeout
        self._connections: weakref.WeakSet[GuardedProtocol] = weakref.WeakSet()
        self._mapping = {
            name: h._replace(func=_answered(h.func)) for name, h in self._mapping.items()
        }

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own factory, with GuardedHandler in place of its Handler.
        self.__gc_step__()
        handler = GuardedHandler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        handler.max_message_bytes = self._max_message_bytes
        self._handlers.add(handler)
        protocol = self._protocol(handler)
        if isinstance(protocol, GuardedProtocol):
            protocol.idle_timeout = self._idle_timeout
            self._connections.add(protocol)
        return protocol

    def close(self) -> None:
        """grpclib's close (stop listening, cancel running calls), and every connection
        told GOAWAY and closed: grpclib leaves them open, so they outlived the server (on
        Python 3.11) or kept wait_closed() waiting until each client hung up (3.12+, where
        asyncio.Server.wait_closed waits for its connections)."""
        super().close()
        for protocol in list(self._connections):
            protocol.go_away()

    def _protocol(self, handler: GuardedHandler) -> H2Protocol:
        return GuardedProtocol(handler, self._config, self._h2_config)
