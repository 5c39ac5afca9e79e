"""The meshid agent: owns node identity, the SVID manager, the Workload API socket (with
SDS), the optional admin socket (Delegated Identity API) and the health listener."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from attestors.workload.base import WorkloadAttestor
from attestors.workload.systemd import SystemdAttestor
from attestors.workload.unix import UnixAttestor
from meshid import telemetry
from meshid.bundle import Bundle
from meshid.configload import make_state_dir
from meshid.errors import (
    AttestationError,
    ConfigError,
    MeshidError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from meshid.fdlimit import raise_fd_limit
from meshid.listeners import Listener, health_app, plain_listener
from meshid.spiffe_id import SpiffeId
from meshid.tasks import TaskOwner
from workload_api.attestation import WorkloadAttestation
from workload_api.cache import SvidCache
from workload_api.caller_limits import FD_RESERVE, CallerLimits
from workload_api.config import AgentConfig
from workload_api.grpc_server import PeerCredServer, serve_unix
from workload_api.manager import SvidManager
from workload_api.node_identity import BUNDLE_FILE, NodeIdentity
from workload_api.rotation import RotationPolicy
from workload_api.server_client import ServerCertificateError, ServerClient
from workload_api.workload_handler import Identity, WorkloadApiHandler

log = logging.getLogger("meshid.agent")

WORKLOAD_SOCKET_MODE = 0o777  # any local user may connect; identity comes from SO_PEERCRED
ADMIN_SOCKET_MODE = 0o600


class Agent:
    def __init__(
        self, config: AgentConfig, clock: Callable[[], float] = time.time, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.td = config.td
        self.tasks = TaskOwner("agent")
        self.policy = RotationPolicy(config.rotation.window_start, config.rotation.window_end)
        self.cache = SvidCache(self.td)
        self.client = ServerClient(config.server_address, SpiffeId(self.td, "/meshid/server"))
        self._roots_from_config = False  # set when trust_bundle_path, not a persisted bundle, is used
        self.node = NodeIdentity(config, self.client, self.policy, self.rng, clock)
        self.manager = SvidManager(
            self.cache, self.client, self.node, self.policy, self.rng, config.sync_interval, clock,
            key_type=config.workload_x509_svid_key_type,
        )
        self.grpc: list[PeerCredServer] = []
        self.attestation: WorkloadAttestation | None = None
        self.health: Listener | None = None

    def _attestors(self) -> list[WorkloadAttestor]:
        wa = self.config.workload_attestors
        out: list[WorkloadAttestor] = [
            UnixAttestor(wa.unix.discover_workload_path, wa.unix.workload_size_limit)
        ]
        if wa.systemd:
            out.append(SystemdAttestor())
        if wa.k8s is not None:
            from attestors.workload.k8s import K8sWorkloadAttestor

            out.append(K8sWorkloadAttestor.from_config(wa.k8s))
        if wa.docker is not None:
            from attestors.workload.docker import DockerWorkloadAttestor

            out.append(DockerWorkloadAttestor.from_config(wa.docker))
        return out

    def _bootstrap_roots(self) -> list[x509.Certificate]:
        state = self.config.state_dir / BUNDLE_FILE
        if state.exists():
            try:
                bundle = Bundle.from_spiffe_json(self.td, state.read_bytes())
                self.cache.set_bundle(bundle)
                self.manager.bundle_sequence = bundle.sequence
                return list(bundle.x509_authorities)
            except MeshidError:
                log.warning("persisted bundle unreadable; falling back to trust_bundle_path")
        self._roots_from_config = True
        try:
            return x509.load_pem_x509_certificates(Path(self.config.trust_bundle_path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"trust_bundle_path: cannot load root certificates: {exc}") from None

    async def start(self) -> None:
        make_state_dir(self.config.state_dir)
        self.client.set_roots(self._bootstrap_roots())
        self.attestation = attestation = WorkloadAttestation(self._attestors())
        self.node.load()
        try:
            # A first round in the foreground so a healthy start is ready at once; failures
            # are left to the background loop (cached SVIDs keep being served)...
            await asyncio.wait_for(self.manager.step(), timeout=30)
        except ConfigError:
            raise  # ...except node credentials the agent cannot read or has none of
        except ServerCertificateError as exc:
            if not self.node.valid:
                # ...or a server the agent cannot authenticate while it has no identity to
                # serve: nothing to wait for (SPIRE's agent exits here too).
                raise ConfigError(self._untrusted_server_message(exc)) from None
            log.warning("initial sync failed (%s); retrying in the background", exc)
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            if not self.node.valid:
                # ...and a server that refused to attest an agent with no identity at all:
                # retrying the same credentials cannot help (a join token is single-use).
                raise AttestationError(self._refused_message(exc)) from None
            log.warning("initial sync failed (%s); retrying in the background", exc)
        except TimeoutError:
            log.warning("initial sync did not finish within 30 s; retrying in the background")
        except Exception as exc:
            log.warning("initial sync failed (%s); retrying in the background", exc)
        self.tasks.spawn("svid-manager", self.manager.run())
        identity = Identity(self.cache, self.manager, attestation)
        cfg = self.config
        limits = CallerLimits(cfg.max_connections_per_uid, cfg.max_streams_per_uid,
                              max(1, raise_fd_limit() - FD_RESERVE),
                              cfg.jwt_svid_mint_rate_per_uid, cfg.jwt_svid_mint_burst_per_uid)
        handlers: list[Any] = [WorkloadApiHandler(identity, cfg.allow_unauthenticated_verifiers,
                                                  cfg.allowed_foreign_jwt_claims, limits)]
        sds = self._sds(identity)
        if sds is not None:
            handlers.append(sds)
        self.grpc.append(await serve_unix(handlers, cfg.socket_path, WORKLOAD_SOCKET_MODE, limits))
        if self.config.admin_socket_path:
            delegated = self._delegated(identity)
            if delegated is not None:
                self.grpc.append(
                    await serve_unix([delegated], self.config.admin_socket_path, ADMIN_SOCKET_MODE)
                )
        h = self.config.health
        if h.enabled:
            self.health = await plain_listener(
                health_app(self.ready, telemetry.metrics_handler), h.address, h.port
            )
        log.info("agent ready: Workload API on unix://%s%s", self.config.socket_path,
                 f", health on http://{self.health}" if self.health is not None else "")

    def _untrusted_server_message(self, exc: Exception) -> str:
        if self._roots_from_config:
            return (f"trust_bundle_path {self.config.trust_bundle_path}: no root in it verifies the "
                    f"certificate of the server at {', '.join(self.config.server_address)}; it must hold the "
                    f"root of the server's chain (the upstream root, or the server's own CA for a "
                    f"self-signed server): {exc}")
        return str(exc)

    def _refused_message(self, exc: Exception) -> str:
        kind = self.config.node_attestor.kind
        hint = ""
        if kind == "join_token":
            hint = " (join tokens are single-use: make a new one with `meshid token create`)"
        return f"node attestation ({kind}) refused by the server: {exc}{hint}"

    def _sds(self, identity: Identity) -> Any:
        try:
            from workload_api.sds import SdsHandler
        except ImportError:
            return None
        return SdsHandler(identity)

    def _delegated(self, identity: Identity) -> Any:
        try:
            from workload_api.delegated import DelegatedIdentityHandler
        except ImportError:
            return None
        return DelegatedIdentityHandler(
            identity, [SpiffeId.parse(s) for s in self.config.authorized_delegates]
        )

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        ok = self.node.valid and self.cache.bundle is not None
        return ok, {
            "agent_id": str(self.node.agent_id) if self.node.agent_id else None,
            "svids": len(self.cache.svids),
            "last_sync_ok": self.manager.last_sync_ok,
        }

    @property
    def health_port(self) -> int:
        return self.health.port if self.health else 0

    async def stop(self) -> None:
        await self.tasks.stop()
        for server in self.grpc:
            server.close()
            await server.wait_closed()
        self.grpc.clear()
        for path in (self.config.socket_path, self.config.admin_socket_path):
            if path:
                Path(path).unlink(missing_ok=True)  # noqa: ASYNC240 - shutdown
        if self.health is not None:
            await self.health.stop()
            self.health = None
        await self.client.close()
        if self.attestation is not None:
            await self.attestation.close()
        log.info("agent stopped")
