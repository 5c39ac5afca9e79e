"""The server over CA lifecycle edges, on an injected clock: a restart after an outage
longer than the CA TTL, and ticks once the upstream intermediate and the CA built on it
have expired unrenewed (warnings, not a traceback per tick)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pki_helpers import ca_cert
from waiting import wait_for

from issuer.config import ServerConfig, server_config_from_dict
from issuer.server import Server

pytestmark = pytest.mark.integration
TD = "example.org"
DAY = 86400.0


class OffsetClock:
    """Real time plus an offset the test moves: an outage, or a clock step."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def config(tmp: Path, **extra: Any) -> ServerConfig:
    return server_config_from_dict({
        "trust_domain": TD,
        "data_dir": str(tmp / "srv"),
        "server": {
            "bind_address": "127.0.0.1", "agent_api_port": 0, "grpc_port": 0, "health_enabled": False,
            "admin_socket_path": str(tmp / "admin.sock"),
        },
        **extra,
    }, env={})  # fmt: skip


@asynccontextmanager
async def running(cfg: ServerConfig, clock: OffsetClock) -> AsyncIterator[Server]:
    srv = Server(cfg, clock=clock)
    await asyncio.wait_for(srv.start(), 30)
    try:
        yield srv
    finally:
        await asyncio.wait_for(srv.stop(), 30)


def assert_identity_valid(srv: Server) -> None:
    leaf = srv.identity.chain[0]
    now = srv.clock()
    assert leaf.not_valid_before_utc.timestamp() <= now < leaf.not_valid_after_utc.timestamp()


async def test_server_starts_after_an_outage_longer_than_the_ca_ttl(
    short_tmp: Path, master_secret: str
) -> None:
    cfg = config(short_tmp)
    clock = OffsetClock()
    async with running(cfg, clock) as srv:
        first = srv.ca.x509_active.key_id
    clock.offset = 3 * DAY  # down for three CA lifetimes (24 h by default)
    async with running(cfg, clock) as srv:  # minted its own SVID from an expired CA before
        assert srv.ca.x509_active.key_id != first
        assert_identity_valid(srv)


def write_upstream(d: Path, int_not_after: float) -> dict[str, str]:
    now = time.time()
    root_key, int_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = ca_cert("root", root_key, root_key, None, now - DAY, now + 30 * DAY)
    intermediate = ca_cert("upstream", int_key, root_key, root, now - 3600, int_not_after)
    files = {"cert_file": d / "int.pem", "key_file": d / "int.key", "bundle_file": d / "root.pem"}
    files["cert_file"].write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    files["bundle_file"].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    files["key_file"].write_bytes(
        int_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files["key_file"].chmod(0o600)
    return {k: str(v) for k, v in files.items()}


async def test_ticks_once_the_upstream_and_its_ca_expired_warn_without_tracebacks(
    short_tmp: Path, master_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    disk = write_upstream(short_tmp, time.time() + 4 * 3600)
    cfg = config(short_tmp, upstream={"disk": disk})
    clock = OffsetClock()
    async with running(cfg, clock) as srv:
        clock.offset = 5 * 3600  # the upstream, and the CA clamped to it, have expired
        with caplog.at_level(logging.WARNING):
            for _ in range(4):
                await srv.tick()  # before: ConfigError out of every tick, logged with a traceback
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert warned and not any(r.exc_info for r in warned)
        text = "\n".join(r.getMessage() for r in warned)
        assert "int.pem" in text and "expired" in text and "server's own SVID" in text
        assert len(warned) <= 4  # once each, not once per tick
        assert srv.ca.jwt_active.record.not_after > clock()  # the JWT key still rotated


async def test_signing_requests_in_flight_at_stop_are_answered(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """stop() closed the signing executor before the agent API's graceful shutdown had let
    the requests in flight finish: each then failed with a 500 and an ERROR traceback
    ("cannot schedule new futures after shutdown"), on every restart of a busy server."""
    import base64
    import random

    from meshid.cli.admin_client import AdminClient
    from meshid.cli.dev import start_dev
    from meshid.entry import Entry
    from meshid.selector import Selector
    from meshid.spiffe_id import SpiffeId
    from workload_api.config import agent_config_from_dict
    from workload_api.keys import csr_for, new_key
    from workload_api.node_identity import NodeIdentity
    from workload_api.rotation import RotationPolicy
    from workload_api.server_client import ServerClient

    limits = {"max_concurrent_signing": 1, "max_queue": 10, "agent_rate": 10_000.0, "agent_burst": 10_000}
    stack = await start_dev(short_tmp / "d", TD, str(short_tmp / "s" / "api.sock"),
                            server_overrides={"admission": limits})
    server = stack.server
    addr = f"127.0.0.1:{server.agent_api_port}"
    client = ServerClient([addr], SpiffeId(server.td, "/meshid/server"))
    try:
        async with AdminClient(server.config.admin_socket_path) as admin:
            token = await admin.call("POST", "/v1/tokens", {"ttl": 600})
        (short_tmp / "agent").mkdir()
        agent_cfg = agent_config_from_dict({
            "trust_domain": TD, "data_dir": str(short_tmp / "agent"), "server_address": [addr],
            "trust_bundle_path": stack.agent.config.trust_bundle_path,
            "node_attestor": {"join_token": {"token": token["token"]}},
        })  # fmt: skip
        client.set_roots(list(server.ca.bundle.x509_authorities))
        node = NodeIdentity(agent_cfg, client, RotationPolicy(), random.Random(1))
        await node.attest()
        assert node.agent_id is not None
        requests = []
        for j in range(200):  # a batch large enough for the signing executor
            selectors = (Selector("unix", f"uid:{5000 + j}"),)
            entry = Entry("", SpiffeId(server.td, f"/w/{j}"), node.agent_id, selectors)
            entry = await server.entries.create(entry)
            requests.append({"entry_id": entry.id, "csr": base64.b64encode(csr_for(new_key())).decode()})
        calls = [asyncio.create_task(client.sign_x509(requests)) for _ in range(3)]
        admission = server.admission
        # Polled often: the state lasts only as long as one batch signs.
        await wait_for(lambda: admission._running == 1 and admission._waiting == 2, 5,
                       "one batch signing, the others queued behind it", interval=0.01)
        with caplog.at_level(logging.WARNING):
            await asyncio.wait_for(stack.stop(), 30)
        for call in calls:
            assert len(await call) == 200
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await client.close()
        await stack.stop()


async def test_an_empty_server_id_file_gets_a_new_id_that_then_sticks(
    short_tmp: Path, master_secret: str
) -> None:
    # What a crash soon after the first start can leave (the file created, its data never
    # written back): the server ran on as server id "", shared with any replica in the same
    # state, in its CA keys' ownership and its events' source.
    from issuer.server import SERVER_ID_FILE, read_server_id

    cfg = config(short_tmp)
    (short_tmp / "srv").mkdir(mode=0o700)
    (short_tmp / "srv" / SERVER_ID_FILE).write_text("\n")
    async with running(cfg, OffsetClock()) as srv:
        first = srv.server_id
    assert first and read_server_id(cfg) == first
    async with running(cfg, OffsetClock()) as srv:
        assert srv.server_id == first
    assert (short_tmp / "srv" / SERVER_ID_FILE).stat().st_mode & 0o777 == 0o600
