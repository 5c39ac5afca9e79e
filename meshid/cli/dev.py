"""`meshid dev`: server + agent in one process on SQLite, with a generated upstream root
and intermediate, the invoking user registered as a workload, and a ready Workload API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestors.node.join_token import new_token
from issuer.ca.devpki import ensure_dev_upstream
from issuer.config import server_config_from_dict
from issuer.server import Server
from meshid.configload import parse_duration
from meshid.entry import Entry
from meshid.errors import AlreadyExistsError, ConfigError
from meshid.heap import freeze_startup_heap
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api.agent import Agent
from workload_api.config import agent_config_from_dict

log = logging.getLogger("meshid.dev")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meshid" / "dev"


def _master_secret(path: Path) -> None:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
        finally:
            os.close(fd)


@dataclass
class DevStack:
    server: Server
    agent: Agent
    socket_path: str
    spiffe_id: SpiffeId

    async def stop(self) -> None:
        await self.agent.stop()
        await self.server.stop()


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested tables merge key by key, so overriding one setting keeps its siblings."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


async def start_dev(
    data_dir: Path,
    trust_domain: str = "example.org",
    socket: str | None = None,
    svid_ttl: float = 3600,
    uid: int | None = None,
    agent_overrides: dict[str, Any] | None = None,
    server_overrides: dict[str, Any] | None = None,
) -> DevStack:
    """Start the whole stack; the same function `meshid dev` and the tests use.

    `agent_overrides` is merged (shallowly) into the agent config, e.g. to turn on the
    admin socket with `admin_socket_path` and `authorized_delegates`.
    `server_overrides` is merged table by table into the server config, e.g.
    `{"ca": {"taint_rotation_window": 6}}`; empty `upstream.disk` paths give a self-signed
    CA, and the agent then bootstraps from the server's own bundle."""
    td = TrustDomain.parse(trust_domain)
    # Relative paths (`meshid dev --data-dir dev`) are made absolute: the agent takes only an
    # absolute socket_path, and SPIFFE_ENDPOINT_SOCKET=unix://<relative> names a host.
    data_dir = data_dir.absolute()  # noqa: ASYNC240 - once, at start-up
    if socket is not None:
        socket = os.path.abspath(socket)  # noqa: ASYNC240
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    upstream = ensure_dev_upstream(data_dir / "upstream")
    _master_secret(data_dir / "master.secret")
    ttl = int(svid_ttl)
    server_cfg = server_config_from_dict(
        _merged(
            {
                "trust_domain": td.name,
                "data_dir": str(data_dir / "server"),
                "server": {
                    "bind_address": "127.0.0.1",
                    "agent_api_port": 0,
                    "grpc_port": 0,
                    "health_port": 0,
                    "master_secret_file": str(data_dir / "master.secret"),
                    "master_secret_env": "",
                },
                "ca": {
                    "x509_svid_ttl": ttl,
                    "agent_svid_ttl": max(ttl, 120),
                    "ca_ttl": max(24 * 3600, 6 * ttl),
                },
                "upstream": {
                    "disk": {
                        "cert_file": str(upstream.cert_file),
                        "key_file": str(upstream.key_file),
                        "bundle_file": str(upstream.bundle_file),
                    }
                },
            },
            server_overrides or {},
        ),
        source="meshid dev",
    )
    server = Server(server_cfg)
    await server.start()
    try:
        socket_path = socket or str(data_dir / "agent" / "public" / "api.sock")
        trust_bundle = upstream.bundle_file
        if server.ca.upstream is None:
            # Self-signed CA: the dev root is not in the chain, the server's bundle is.
            trust_bundle = data_dir / "bootstrap_bundle.pem"
            trust_bundle.write_bytes(server.ca.bundle.x509_pem())
        agent_cfg = {
            "trust_domain": td.name,
            "data_dir": str(data_dir / "agent" / "state"),
            "server_address": [f"127.0.0.1:{server.agent_api_port}"],
            "trust_bundle_path": str(trust_bundle),
            "socket_path": socket_path,
            "sync_interval": 1,
            "health": {"port": 0},
            **(agent_overrides or {}),
        }
        probe = Agent(agent_config_from_dict(agent_cfg, "meshid dev"))
        if probe.node.load():
            agent_id = probe.node.agent_id
        else:
            tok = new_token(600)
            assert server.ds is not None
            await server.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
            agent_cfg["node_attestor"] = {"join_token": {"token": tok.token}}
            agent_id = SpiffeId(td, f"/meshid/agent/join_token/{tok.token_id}")
        await probe.client.close()
        uid = os.getuid() if uid is None else uid
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = f"uid{uid}"
        spiffe_id = SpiffeId(td, f"/user/{user}")
        assert agent_id is not None
        try:
            await server.entries.create(Entry("", spiffe_id, agent_id, (Selector("unix", f"uid:{uid}"),)))
        except AlreadyExistsError:
            pass
        agent = Agent(agent_config_from_dict(agent_cfg, "meshid dev"))
        await agent.start()
    except BaseException:
        await server.stop()
        raise
    return DevStack(server, agent, socket_path, spiffe_id)


async def run_dev(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.svid_ttl)
    except ValueError as exc:
        raise ConfigError(f"--svid-ttl: {exc}") from None
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    stack = await start_dev(data_dir, args.trust_domain, args.socket, ttl)
    freeze_startup_heap()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    print(
        f"meshid dev: trust domain {args.trust_domain}, workload {stack.spiffe_id} (unix uid {os.getuid()})"
    )
    print(f"meshid dev: admin socket {stack.server.config.admin_socket_path} (export MESHID_SERVER_SOCKET)")
    print(f"SPIFFE_ENDPOINT_SOCKET=unix://{stack.socket_path}", flush=True)
    try:
        await done.wait()
    finally:
        print("meshid dev: shutting down", file=sys.stderr)
        await stack.stop()
    return 0
