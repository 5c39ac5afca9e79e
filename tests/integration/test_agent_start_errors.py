"""`meshid agent run` with node credentials that cannot work fails at start, naming the
problem, instead of serving an empty Workload API and retrying forever (with a traceback
per retry for an unreadable token file). A server that cannot be reached is different:
the agent starts and keeps trying in the background."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pki_helpers import make_ca, write_pem

from issuer.config import server_config_from_dict
from issuer.server import Server
from meshid.cli.admin_client import AdminClient
from meshid.errors import AttestationError, ConfigError
from workload_api.agent import Agent
from workload_api.config import agent_config_from_dict

pytestmark = pytest.mark.integration

TD = "example.org"
STEP_TIMEOUT = 20.0


@asynccontextmanager
async def running_server(tmp: Path) -> AsyncIterator[Server]:
    cfg = server_config_from_dict({
        "trust_domain": TD, "data_dir": str(tmp / "srv"),
        "server": {"bind_address": "127.0.0.1", "agent_api_port": 0, "grpc_enabled": False,
                   "health_enabled": False, "admin_socket_path": str(tmp / "admin.sock")},
    }, env={})
    srv = Server(cfg)
    await asyncio.wait_for(srv.start(), STEP_TIMEOUT)
    try:
        (tmp / "root.pem").write_bytes(srv.ca.bundle.x509_pem())
        yield srv
    finally:
        await asyncio.wait_for(srv.stop(), STEP_TIMEOUT)


async def new_token(srv: Server) -> str:
    async with AdminClient(srv.config.admin_socket_path) as client:
        out = await asyncio.wait_for(client.call("POST", "/v1/tokens", {"ttl": 600}), STEP_TIMEOUT)
    return str(out["token"])


def agent_for(tmp: Path, name: str, port: int, node_attestor: dict[str, Any]) -> Agent:
    return Agent(agent_config_from_dict({
        "trust_domain": TD, "data_dir": str(tmp / f"agent-{name}"),
        "server_address": [f"127.0.0.1:{port}"], "trust_bundle_path": str(tmp / "root.pem"),
        "socket_path": str(tmp / "s" / f"{name}.sock"), "sync_interval": 1,
        "health": {"enabled": False}, "workload_attestors": {"systemd": False},
        "node_attestor": node_attestor,
    }, f"agent {name}"))


async def start_fails(agent: Agent) -> Exception:
    """Start as `meshid agent run` does: a failed start still stops what it began."""
    try:
        await asyncio.wait_for(agent.start(), STEP_TIMEOUT)
    except Exception as exc:  # the caller checks the type
        return exc
    finally:
        await asyncio.wait_for(agent.stop(), STEP_TIMEOUT)
    raise AssertionError("the agent started")


async def test_used_token_and_unreadable_credentials_fail_the_start(
    short_tmp: Path, master_secret: str
) -> None:
    async with running_server(short_tmp) as srv:
        port = srv.agent_api_port
        token = await new_token(srv)
        first = agent_for(short_tmp, "first", port, {"join_token": {"token": token}})
        await asyncio.wait_for(first.start(), STEP_TIMEOUT)
        try:
            assert first.node.valid
            # A second node given the same (now used) token.
            second = agent_for(short_tmp, "second", port, {"join_token": {"token": token}})
            exc = await start_fails(second)
            assert isinstance(exc, AttestationError)
            assert "already used" in str(exc) and "meshid token create" in str(exc)
            assert token not in str(exc)
            assert not (short_tmp / "s" / "second.sock").exists()
            assert first.node.valid  # the first agent is unaffected
        finally:
            await asyncio.wait_for(first.stop(), STEP_TIMEOUT)

        missing = short_tmp / "no-such.token"
        exc = await start_fails(
            agent_for(short_tmp, "file", port, {"join_token": {"token_file": str(missing)}}))
        assert isinstance(exc, ConfigError) and str(missing) in str(exc)

        exc = await start_fails(agent_for(short_tmp, "none", port, {}))
        assert isinstance(exc, ConfigError) and "no credentials configured" in str(exc)

        node = {"certificate_path": str(short_tmp / "node.pem"),
                "private_key_path": str(short_tmp / "node.key")}
        exc = await start_fails(agent_for(short_tmp, "x509pop", port, {"x509pop": node}))
        assert isinstance(exc, ConfigError) and "node_attestor.x509pop" in str(exc)


async def test_unreachable_server_still_starts_and_retries(short_tmp: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # closed again: nothing listens there
    write_pem(short_tmp / "root.pem", make_ca()[0])
    agent = agent_for(short_tmp, "alone", port, {"join_token": {"token": "not-checked-yet"}})
    await asyncio.wait_for(agent.start(), STEP_TIMEOUT)
    try:
        assert not agent.node.valid
        assert (short_tmp / "s" / "alone.sock").exists()
    finally:
        await asyncio.wait_for(agent.stop(), STEP_TIMEOUT)


async def test_trust_bundle_that_does_not_verify_the_server_fails_the_start(
    short_tmp: Path, master_secret: str
) -> None:
    """A new agent given the wrong root (another install's, a typo'd file) cannot
    authenticate the server and has nothing to serve: it stops at start naming
    trust_bundle_path, as SPIRE's agent does, instead of retrying forever."""
    async with running_server(short_tmp) as srv:
        port = srv.agent_api_port
        token = await new_token(srv)
        write_pem(short_tmp / "root.pem", make_ca()[0])  # not the server's root
        agent = agent_for(short_tmp, "wrong-root", port, {"join_token": {"token": token}})
        exc = await start_fails(agent)
        assert isinstance(exc, ConfigError)
        assert f"trust_bundle_path {short_tmp / 'root.pem'}" in str(exc) and "verif" in str(exc)
        assert not (short_tmp / "s" / "wrong-root.sock").exists()

        # The token was not spent on the server it could not authenticate: with the right
        # root the same token attests.
        (short_tmp / "root.pem").write_bytes(srv.ca.bundle.x509_pem())
        agent = agent_for(short_tmp, "right-root", port, {"join_token": {"token": token}})
        await asyncio.wait_for(agent.start(), STEP_TIMEOUT)
        try:
            assert agent.node.valid
        finally:
            await asyncio.wait_for(agent.stop(), STEP_TIMEOUT)
