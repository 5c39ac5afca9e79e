"""The server's gRPC listener: SPIRE's Entry API over mutual TLS 1.3 (for Cilium's operator).

The Server owns the returned grpclib server and closes it on shutdown; the TLS context
comes from `Server.tls_context`, so a rotated server SVID or bundle applies to new
connections without restarting the listener.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpclib.server

from issuer.entry_api import EntryApi
from meshid.grpc_base import GuardedServer
from meshid.spiffe_id import SpiffeId

if TYPE_CHECKING:
    from issuer.server import Server

log = logging.getLogger("meshid.grpc")

# A connection with no call for this long is sent GOAWAY and closed; its client reconnects
# when it next calls. grpclib otherwise keeps every connection forever, one whose client
# vanished without a FIN (its node gone) included: grpc-go's keepalive would find those.
IDLE_TIMEOUT = 300.0


async def start_entry_api(server: Server) -> grpclib.server.Server:
    cfg = server.config.server
    admin_ids = [SpiffeId.parse(s) for s in cfg.admin_ids]  # config validated them already
    api = EntryApi(server.entries, server.td, admin_ids, known_ca=server.ca.issued_by_known_ca)
    # client_cert="required": only callers with an X509-SVID from our bundle get a handshake;
    # "h2" ALPN because gRPC clients (Go's included) insist on it over TLS.
    tls = server.tls_context(client_cert="required", alpn=("h2",))
    grpc = GuardedServer([api], idle_timeout=IDLE_TIMEOUT)
    await grpc.start(cfg.bind_address, cfg.grpc_port, ssl=tls.outer)
    server.grpc_port_bound = bound_port(grpc)
    log.info("Entry API listening on %s:%d (mutual TLS)", cfg.bind_address, server.grpc_port_bound)
    return grpc


def bound_port(grpc: grpclib.server.Server) -> int:
    """The port actually bound (grpc_port 0 asks the kernel for a free one)."""
    # grpclib keeps its asyncio.Server private and offers no accessor for the address.
    listener = grpc._server
    if not isinstance(listener, asyncio.Server) or not listener.sockets:
        raise RuntimeError("the gRPC server is not listening")
    port: int = listener.sockets[0].getsockname()[1]
    return port
