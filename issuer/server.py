"""The meshid server: owns the datastore, CA, services, listeners and background tasks."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from attestors.node.base import NodeAttestor
from attestors.node.join_token import JoinTokenAttestor
from attestors.node.x509pop import X509PopAttestor
from issuer.admission import Admission
from issuer.api.admin_api import AdminApi
from issuer.api.agent_api import AgentApi
from issuer.ca.keys import DiskKeyManager, KeyManager
from issuer.ca.sealing import KeySealer, load_master_secret
from issuer.ca.slots import CaManager, svid_chain
from issuer.ca.upstream import DiskUpstreamAuthority, UpstreamAuthority
from issuer.config import ServerConfig
from issuer.datastore.base import DataStore
from issuer.datastore.factory import open_datastore
from issuer.entries import EntryService
from issuer.events.cloudevents import server_source
from issuer.federation import FederationPoller, Relationship
from issuer.node_attestation import AgentService
from issuer.signing import SigningService
from issuer.signing_thread import SigningThread
from meshid import telemetry
from meshid.configload import make_state_dir
from meshid.durable_files import sync_directory, write_atomically
from meshid.errors import ConfigError, MeshidError
from meshid.fdlimit import raise_fd_limit
from meshid.listeners import Listener, health_app, plain_listener, tls_listener, unix_listener
from meshid.tasks import TaskOwner, every
from meshid.tls import SwappableServerContext, server_context

log = logging.getLogger("meshid.server")

TICK_SECONDS = 5.0
IDENTITY_RETRY_SECONDS = 60.0  # between attempts to renew the server SVID when no CA can sign
SERVER_ID_FILE = "server_id"


class ServerIdentity:
    """The server's own X509-SVID (spiffe://<td>/meshid/server), renewed at half-life."""

    def __init__(self) -> None:
        self.key: PrivateKeyTypes = ec.generate_private_key(ec.SECP256R1())
        self.chain: list[x509.Certificate] = []
        self.renew_at = 0.0


class Server:
    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.td = config.td
        self.tasks = TaskOwner("server")
        self.listeners: dict[str, Listener] = {}
        self.identity = ServerIdentity()
        self._agent_ctx: SwappableServerContext | None = None
        self._extra_ctx: list[tuple[SwappableServerContext, str, tuple[str, ...]]] = []
        self.ds: DataStore | None = None
        self.relay: Any = None
        self.grpc: Any = None
        self.grpc_port_bound = 0  # set by issuer.grpc_api once the Entry API listens
        self.federation: FederationPoller | None = None
        self._started = False

    # ------------------------------------------------------------------ start / stop
    async def start(self) -> None:
        cfg = self.config
        data_dir = Path(cfg.data_dir)
        make_state_dir(data_dir)
        raise_fd_limit()  # a connection per agent: the common soft limit of 1024 is too few
        self.key_manager = _key_manager(cfg)
        self.server_id = cfg.server.server_id or _persistent_id(data_dir / SERVER_ID_FILE)
        self.ds = ds = await open_datastore(cfg.dsn)
        try:
            await self._start_services(ds)
        except BaseException:
            await self.stop()
            raise

    async def _start_services(self, ds: DataStore) -> None:
        cfg = self.config
        upstream: UpstreamAuthority | None = None
        d = cfg.upstream.disk
        if d.cert_file:
            upstream = DiskUpstreamAuthority(d.cert_file, d.key_file, d.bundle_file)
        self.ca = CaManager(
            ds,
            self.key_manager,
            upstream,
            self.td,
            cfg.ca.ca_ttl,
            cfg.ca.key_type,
            cfg.ca.jwt_key_type,
            self.server_id,
            self.clock,
            on_change=self._bundle_changed,
        )
        await self.ca.load()
        self.entries = EntryService(ds, self.td, cfg.server_spiffe_id, self.clock)
        attestors: dict[str, NodeAttestor] = {
            "join_token": JoinTokenAttestor(ds.consume_join_token, self.clock)
        }
        if cfg.node_attestors.x509pop.ca_bundle_path:
            attestors["x509pop"] = X509PopAttestor(
                cfg.node_attestors.x509pop.ca_bundle_path,
                cfg.node_attestors.x509pop.agent_path_template,
                self.clock,
            )
        if cfg.node_attestors.k8s_psat:
            from attestors.node.k8s_psat import K8sPsatAttestor

            attestors["k8s_psat"] = K8sPsatAttestor.from_config(cfg.node_attestors.k8s_psat)
        signer = SigningThread()  # closed by self.signing.close()
        self.agents = AgentService(
            ds,
            self.ca,
            self.td,
            attestors,
            cfg.ca.agent_svid_ttl,
            cfg.server.attest_rate_per_minute,
            self.clock,
            on_events=self._events_written,
            signer=signer,
        )
        a = cfg.admission
        self.admission = Admission(
            a.max_concurrent_signing, a.agent_rate, a.agent_burst, a.global_rate, a.global_burst, a.max_queue
        )
        self.signing = SigningService(
            ds,
            self.ca,
            self.entries,
            self.admission,
            cfg.ca.x509_svid_ttl,
            cfg.ca.jwt_svid_ttl,
            cfg.ca.jwt_issuer,
            self.clock,
            on_events=self._events_written,
            signer=signer,
        )
        self.signing.taint_window = cfg.ca.taint_rotation_window
        await self._renew_identity()
        await self._start_relay(ds)
        fed = cfg.federation
        self.federation = FederationPoller(
            ds,
            [Relationship.from_config(td, c) for td, c in fed.relationships().items()],
            fed.min_refresh_interval,
            fed.max_refresh_interval,
            fed.fetch_timeout,
            self.clock,
        )
        await self.federation.load()
        await self._start_listeners()
        self.tasks.spawn("ca-tick", every(TICK_SECONDS, self.tick, "CA rotation"))
        if self.federation.polled:
            self.tasks.spawn("federation", self.federation.run())
        self._started = True
        log.info("meshid server for %s started (server id %s); listening: %s", self.td, self.server_id,
                 ", ".join(f"{name} {listener}" for name, listener in self.listeners.items()))

    async def _start_relay(self, ds: DataStore) -> None:
        k = self.config.events.kafka
        if not k.bootstrap_servers:
            return
        from issuer.events.relay import relay_config_from
        from issuer.events.relay_process import outbox_relay

        source = server_source(self.td.name, await event_source_id(ds, self.server_id))
        self.relay = outbox_relay(ds, self.config.dsn, relay_config_from(k), source=source,
                                  owner=self.server_id, child_process=k.relay_process,
                                  # Every secret the config names: the child touches no CA key.
                                  secret_env=(self.config.server.master_secret_env, k.sasl_password_env,
                                              self.config.ca.pkcs11.pin_env))
        await self.relay.start()

    def _events_written(self) -> None:
        # Issuance calls this after each outbox write: wake the relay now rather than at
        # its next poll. Never waits for Kafka.
        if self.relay is not None:
            self.relay.notify()

    async def _start_listeners(self) -> None:
        cfg = self.config.server
        self._agent_ctx = SwappableServerContext(self._agent_api_context())
        api = AgentApi(self.agents, self.signing, self.ca, reporter=self._report, federation=self.federation)
        self.listeners["agent_api"] = await tls_listener(
            api.app(cfg.max_request_bytes), cfg.bind_address, cfg.agent_api_port, self._agent_ctx.outer
        )
        assert self.ds is not None  # opened in start() before any listener
        admin = AdminApi(
            self.ds,
            self.entries,
            self.agents,
            self.ca,
            self.config.node_attestors.join_token.default_ttl,
            self.td.name,
        )
        self.listeners["admin"] = await unix_listener(admin.app(), self.config.admin_socket_path, 0o600)
        if cfg.health_enabled:
            self.listeners["health"] = await plain_listener(
                health_app(self.ready, telemetry.metrics_handler), cfg.health_address, cfg.health_port
            )
        if self.config.federation.bundle_endpoint.enabled:
            await self._start_bundle_endpoint()
        if cfg.grpc_enabled:
            await self._start_grpc()

    async def _start_bundle_endpoint(self) -> None:
        from issuer.api.bundle_endpoint import BundleEndpoint, ServingCertFiles

        be = self.config.federation.bundle_endpoint
        oidc = self.config.oidc
        if be.profile == "https_web":
            files = ServingCertFiles(be.cert_file, be.key_file)
            ctx = files.context
            self.tasks.spawn(
                "bundle-endpoint-certs",
                every(be.file_sync_interval, files.check, "bundle endpoint certificate reload"),
            )
        else:
            ctx = self.tls_context(client_cert="none")  # https_spiffe: our own SVID, kept current
        endpoint = BundleEndpoint(
            lambda: self.ca.bundle,
            int(be.refresh_hint),
            self.config.ca.jwt_issuer if oidc.enabled else "",
            oidc.jwks_uri,
        )
        self.listeners["bundle_endpoint"] = await tls_listener(endpoint.app(), be.address, be.port, ctx.outer)

    async def _start_grpc(self) -> None:
        try:
            from issuer.grpc_api import start_entry_api
        except ImportError:
            return
        self.grpc = await start_entry_api(self)

    def _agent_api_context(self) -> Any:
        return server_context(
            self.identity.chain, self.identity.key, self.ca.bundle.x509_authorities, client_cert="optional"
        )

    def tls_context(
        self, client_cert: str = "required", alpn: tuple[str, ...] = ()
    ) -> SwappableServerContext:
        """A swappable TLS 1.3 context with the server SVID, kept current on rotation."""
        roots = self.ca.bundle.x509_authorities if client_cert != "none" else None
        ctx = SwappableServerContext(
            server_context(self.identity.chain, self.identity.key, roots, client_cert, alpn or None)
        )
        self._extra_ctx.append((ctx, client_cert, alpn))
        return ctx

    def _refresh_contexts(self) -> None:
        if self._agent_ctx is not None:
            self._agent_ctx.replace(self._agent_api_context())
        for ctx, client_cert, alpn in self._extra_ctx:
            roots = self.ca.bundle.x509_authorities if client_cert != "none" else None
            ctx.replace(
                server_context(self.identity.chain, self.identity.key, roots, client_cert, alpn or None)
            )

    async def stop(self) -> None:
        await self.tasks.stop()
        if self.grpc is not None:
            self.grpc.close()
            await self.grpc.wait_closed()
            self.grpc = None
        for name in list(self.listeners):
            await self.listeners.pop(name).stop()
        # Only once the listeners are down: their graceful shutdown lets the requests in
        # flight finish, and those sign on the signing thread (agent attestation's too).
        if getattr(self, "signing", None) is not None:
            self.signing.close()
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        for attestor in getattr(getattr(self, "agents", None), "attestors", {}).values():
            close = getattr(attestor, "close", None)
            if close is not None:
                await close()
        if self.ds is not None:
            if self._started:
                try:
                    await self.ca.flush()
                except Exception:
                    log.exception("could not persist CA usage on shutdown")
            await self.ds.close()
            self.ds = None
        close_keys = getattr(getattr(self, "key_manager", None), "close", None)
        if close_keys is not None:
            await close_keys()  # e.g. log out of the PKCS#11 token
        if self._started:
            log.info("meshid server for %s stopped", self.td)
        self._started = False

    # ------------------------------------------------------------------ periodic work
    async def tick(self) -> None:
        from issuer.events import workload_failures

        await self.ca.tick()
        if self.clock() >= self.identity.renew_at:
            try:
                await self._renew_identity()
            except MeshidError as exc:
                # No CA that can sign (its upstream expired unrenewed, say): one line a
                # minute, not a traceback per tick; a new CA re-issues it at once anyway
                # (_bundle_changed), and the rest of the tick still runs.
                log.warning("cannot renew the server's own SVID: %s", exc)
                self.identity.renew_at = self.clock() + IDENTITY_RETRY_SECONDS
            else:
                self._refresh_contexts()
        # Counts held back by the rate bound go out once their window has passed, even if
        # the agent that reported them never reports again.
        await workload_failures.flush(self)
        await self.signing.flush_overload_refusals()

    async def _renew_identity(self) -> None:
        active = self.ca.x509_active
        assert active.minter is not None
        now = self.clock()
        mint = functools.partial(
            active.minter.mint_from_public_key,
            self.identity.key.public_key(),
            self.config.server_spiffe_id,
            [],
            int(self.config.ca.agent_svid_ttl),
            dt.datetime.fromtimestamp(now, dt.UTC),
        )
        # On the signing thread when the CA key is on a device, as every other signature.
        leaf = await self.signing.signer.run(mint, self.ca.key_manager.signs_on_device)
        self.identity.chain = list(svid_chain(active, leaf))
        not_after = leaf.not_valid_after_utc.timestamp()
        self.identity.renew_at = now + (not_after - now) / 2
        self.ca.note_signed(active.key_id, int(not_after))

    async def _bundle_changed(self) -> None:
        if self.identity.chain:
            # The active CA may have changed: re-issue our SVID from it, then swap contexts.
            try:
                await self._renew_identity()
            except MeshidError as exc:
                # The JWT key rotated while no X509 CA can sign: the bundle still changed.
                log.warning("cannot renew the server's own SVID: %s", exc)
        self._refresh_contexts()

    async def _report(self, agent: Any, failures: list[Any]) -> None:
        from issuer.events import workload_failures

        await workload_failures.record(self, agent, failures)

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {"trust_domain": self.td.name}
        ok = self._started
        if self.relay is not None:
            detail["events"] = self.relay.status()
        if self.federation is not None and self.federation.status():
            # Informational: a foreign endpoint being down does not make this server unready.
            detail["federation"] = self.federation.status()
        return ok, detail

    @property
    def agent_api_port(self) -> int:
        return self.listeners["agent_api"].port

    @property
    def bundle_endpoint_port(self) -> int:
        return self.listeners["bundle_endpoint"].port if "bundle_endpoint" in self.listeners else 0

    @property
    def health_port(self) -> int:
        return self.listeners["health"].port if "health" in self.listeners else 0

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await stop.wait()


EVENT_SOURCE_KEY = "event_source_id"


async def event_source_id(ds: DataStore, first_server_id: str) -> str:
    """The id in every CloudEvent `source`, shared by all replicas on one datastore: the
    outbox is shared, so whichever replica relays a row must give it the same source + id
    (consumers dedup on them). The first server to start picks it (its own server id)."""
    current = await ds.get_meta(EVENT_SOURCE_KEY)
    if current:
        return current
    async with ds.exclusive(EVENT_SOURCE_KEY):
        current = await ds.get_meta(EVENT_SOURCE_KEY)
        if not current:
            current = first_server_id
            await ds.set_meta(EVENT_SOURCE_KEY, current)
    return current


def read_server_id(config: ServerConfig) -> str | None:
    """The server id used in event sources (configured, else the one the server keeps in
    data_dir), without creating one; None if the server never ran with this data_dir."""
    if config.server.server_id:
        return config.server.server_id
    try:
        return (Path(config.data_dir) / SERVER_ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def _persistent_id(path: Path) -> str:
    try:
        sid = path.read_text().strip()
    except FileNotFoundError:
        sid = ""
    if sid:
        return sid
    # Missing, or empty as a crash soon after creating it leaves the file: a new id, made
    # durable before use (written whole, synced, renamed into place).
    sid = str(uuid.uuid4())
    write_atomically(path, (sid + "\n").encode(), 0o600)
    sync_directory(path.parent)
    return sid


def _key_manager(cfg: ServerConfig) -> KeyManager:
    """The configured CA key manager: keys sealed under the master secret, or kept in an HSM."""
    if cfg.ca.key_manager == "pkcs11":
        # Imported only when configured: disk-only servers never load a PKCS#11 module.
        from issuer.ca.pkcs11 import Pkcs11KeyManager

        p = cfg.ca.pkcs11
        return Pkcs11KeyManager.from_env(p.module_path, p.token_label, p.pin_env, p.key_label_prefix)
    secret = load_master_secret(cfg.server.master_secret_file or None, cfg.server.master_secret_env or None)
    return DiskKeyManager(KeySealer(secret))


async def rewrap(config: ServerConfig, new_secret: bytes) -> int:
    """Re-encrypt every CA key under a new master secret; returns the number of keys."""
    from dataclasses import replace

    if config.ca.key_manager != "disk":
        raise ConfigError("rewrap re-encrypts keys of key_manager disk; PKCS#11 keys never leave the token")
    old = KeySealer(
        load_master_secret(config.server.master_secret_file or None, config.server.master_secret_env or None)
    )
    new = KeySealer(new_secret)
    ds = await open_datastore(config.dsn)
    try:
        records = await ds.list_ca_keys()
        # Decrypt everything first so a wrong old secret changes nothing.
        plain = [(r, old.unseal(r.sealed_key, r.key_id.encode())) for r in records]
        for r, pt in plain:
            await ds.put_ca_key(replace(r, sealed_key=new.seal(pt, r.key_id.encode())))
        return len(plain)
    finally:
        await ds.close()
