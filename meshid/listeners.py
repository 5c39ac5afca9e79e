"""The three kinds of listener meshid opens (and no others) plus Unix sockets.

mTLS / server-auth TLS listeners always get a TLS 1.3-only context from meshid.tls;
plain HTTP is only for health and metrics and binds loopback unless told otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

# A connection with no complete request (idle after its last response, fresh out of the TLS
# handshake, or still trickling headers) is closed after this. aiohttp's default is an
# hour: anyone who could connect held ~270 KB (asyncio's TLS buffers) per connection for it.
IDLE_TIMEOUT = 60.0
# How long stop() lets requests in flight finish before cancelling them. aiohttp's default is
# 60 s: one caller sending headers and then no body held a stopping server that long, past
# systemd's TimeoutStopSec and Kubernetes' grace period (30 s), which then SIGKILL it.
SHUTDOWN_TIMEOUT = 10.0


class Listener:
    """One aiohttp site; owns its runner and closes it on stop."""

    def __init__(self, runner: web.AppRunner, site: web.BaseSite, address: Any) -> None:
        self.runner = runner
        self.site = site
        self.address = address

    @property
    def port(self) -> int:
        return int(self.address[1]) if isinstance(self.address, tuple) else 0

    def __str__(self) -> str:
        """Where it listens, for the start-up log: unix:///path or host:port."""
        if isinstance(self.address, str):
            return f"unix://{self.address}"
        host = self.address[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        if isinstance(self.address, str):
            Path(self.address).unlink(missing_ok=True)  # noqa: ASYNC240 - shutdown; no stale socket


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's connection-level log: a request aiohttp refuses as malformed HTTP (request
    line or header too long, bad header, bad chunked framing, undecodable Content-Encoding)
    is answered 400 and logged at debug, so callers cannot fill the log with ERROR
    tracebacks; anything else stays at ERROR. (A body that fails to decode is raised again,
    as RequestPayloadError, when aiohttp drains what the handler left unread.)"""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        caller = isinstance(exc, (HttpProcessingError, web.RequestPayloadError))
        level = logging.DEBUG if caller else logging.ERROR
        self.log(level, msg, *args, exc_info=exc_info, **kwargs)


_SERVER_LOG = cast(logging.Logger, _ServerLog(logging.getLogger("aiohttp.server"), {}))


async def _runner(app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, keepalive_timeout=IDLE_TIMEOUT, logger=_SERVER_LOG,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    return runner


async def tls_listener(app: web.Application, host: str, port: int, ctx: ssl.SSLContext) -> Listener:
    if ctx.minimum_version != ssl.TLSVersion.TLSv1_3:
        raise ValueError("TLS listeners must be TLS 1.3 only")
    runner = await _runner(app)
    site = web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True)
    await site.start()
    return Listener(runner, site, runner.addresses[0])


async def plain_listener(app: web.Application, host: str, port: int) -> Listener:
    runner = await _runner(app)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return Listener(runner, site, runner.addresses[0])


def prepare_socket_path(path: str | Path, dir_mode: int = 0o755) -> Path:
    """Create the socket's directory (not group/world writable, so nobody else can replace
    the socket) and remove a stale socket file."""
    p = Path(path)
    # Under umask 022 whatever the process's: the missing parents were made 0777 & ~umask,
    # so under umask 0 anyone could rename one and put their own socket in its place.
    with umask(0o022):
        p.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    if p.is_socket() or p.exists():
        if not p.is_socket():
            raise ValueError(f"{p} exists and is not a socket")
        p.unlink()
    return p


@contextlib.contextmanager
def umask(mask: int) -> Any:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def unix_listener(app: web.Application, path: str | Path, mode: int) -> Listener:
    p = prepare_socket_path(path)
    runner = await _runner(app)
    site = web.UnixSite(runner, str(p))
    # The umask closes the window between bind() and chmod().
    with umask(0o777 & ~mode):
        await site.start()
    os.chmod(p, mode)
    return Listener(runner, site, str(p))


def health_app(
    ready: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
    metrics: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
) -> web.Application:
    app = web.Application(client_max_size=1024)

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready_handler(_: web.Request) -> web.Response:
        ok, detail = await ready()
        return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)

    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready_handler)
    if metrics is not None:
        app.router.add_get("/metrics", metrics)
    return app
