"""Server replicas on one PostgreSQL: each with its own X509 CA key under the upstream, one
shared JWT key however they start, one agent failing over between them without losing
SVIDs, relays on both replicas publishing every outbox row once to a real Kafka-protocol
broker (Tansu), join tokens single use when two replicas race for one, and a replica
following the bundle and JWT key another replica publishes (its periodic tick)."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cryptography import x509
from spiffe import WorkloadApiClient
from tansu import TansuBroker, tansu_broker  # noqa: F401  (registers the `tansu` fixture)
from waiting import wait_for

import issuer.server
from attestors.node.join_token import new_token
from issuer.ca.devpki import ensure_dev_upstream
from issuer.ca.slots import ACTIVE, JWT, X509
from issuer.config import server_config_from_dict
from issuer.events.cloudevents import event_id, from_kafka, server_source
from issuer.server import Server
from meshid.entry import Entry
from meshid.errors import MeshidError, PermissionDeniedError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from workload_api.agent import Agent
from workload_api.config import agent_config_from_dict
from workload_api.keys import csr_for, new_key
from workload_api.server_client import ServerClient, certs_from_json

pytestmark = pytest.mark.integration

TD = "example.org"
TOPIC = "meshid.events"
PARTITIONS = 3


@dataclass
class Site:
    """What replicas share: the database, the upstream CA files and the master secret."""

    base: Path
    dsn: str
    upstream: bool = True
    kafka: str = ""

    def __post_init__(self) -> None:
        self.up = ensure_dev_upstream(self.base / "upstream")
        self.secret = self.base / "master.secret"
        if not self.secret.exists():
            self.secret.write_text(secrets.token_hex(32))
            self.secret.chmod(0o600)

    def server(self, name: str) -> Server:
        kafka: dict[str, Any] = {}
        if self.kafka:
            kafka = {"bootstrap_servers": [self.kafka], "enable_idempotence": False}
        upstream = {"cert_file": str(self.up.cert_file), "key_file": str(self.up.key_file),
                    "bundle_file": str(self.up.bundle_file)} if self.upstream else {}
        cfg = server_config_from_dict({
            "trust_domain": TD,
            "data_dir": str(self.base / name),
            "datastore": {"dsn": self.dsn},
            "server": {"server_id": name, "bind_address": "127.0.0.1", "agent_api_port": 0, "grpc_port": 0,
                       "health_port": 0, "master_secret_file": str(self.secret), "master_secret_env": ""},
            "ca": {"x509_svid_ttl": 3600, "agent_svid_ttl": 3600, "ca_ttl": 24 * 3600},
            "upstream": {"disk": upstream},
            "events": {"kafka": kafka},
        }, source=f"replica {name}")
        return Server(cfg)

    def trust_roots(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.up.bundle_file.read_bytes())


async def start_replicas(site: Site, *names: str) -> list[Server]:
    servers = [site.server(n) for n in names]
    results = await asyncio.gather(*(s.start() for s in servers), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for s in servers:
            await s.stop()
        raise errors[0]
    return servers


def address(server: Server) -> str:
    return f"127.0.0.1:{server.agent_api_port}"


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def aki(cert: x509.Certificate) -> bytes:
    ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return bytes(ext.key_identifier or b"")


def fetch_svid(sock: str) -> tuple[x509.Certificate, list[x509.Certificate], str]:
    """(leaf, chain, kid of a fresh JWT-SVID that validated) from py-spiffe."""
    import jwt

    client = WorkloadApiClient(socket_path=f"unix://{sock}")
    try:
        svid = client.fetch_x509_svid()
        audience = f"aud-{time.monotonic_ns()}"  # a new audience: signed now, not from the agent's cache
        token = client.fetch_jwt_svid(audience={audience}).token
        client.validate_jwt_svid(token, audience)
        return svid.leaf, list(svid.cert_chain), str(jwt.get_unverified_header(token)["kid"])
    finally:
        client.close()


@pytest.fixture
async def kafka_topic(tansu: TansuBroker) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()
    return tansu.bootstrap


async def consume_all(bootstrap: str, want: int, within: float) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, request_timeout_ms=5000, retry_backoff_ms=50)
    await consumer.start()
    records: list[Any] = []
    try:
        consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
        deadline = time.monotonic() + within
        # Read until the expected count and then a little longer, so a duplicate would show.
        quiet_until = None
        while time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(from_kafka(r.value, r.headers) for r in recs)
            if len(records) >= want:
                quiet_until = quiet_until or time.monotonic() + 1.0
                if time.monotonic() >= quiet_until:
                    break
    finally:
        await consumer.stop()
    return records


async def test_two_replicas_one_agent_failover_and_events_once(
    postgres_db: str, kafka_topic: str, short_tmp: Path,
) -> None:
    site = Site(short_tmp, postgres_db, kafka=kafka_topic)
    a, b = await start_replicas(site, "ra", "rb")  # at once: both find no JWT key
    stopped_a = False
    agent: Agent | None = None
    try:
        assert a.ds is not None
        # --- CA keys: one X509 CA per replica under the upstream, one shared JWT key ------
        records = await a.ds.list_ca_keys()
        x509_recs = [r for r in records if r.kind == X509]
        jwt_recs = [r for r in records if r.kind == JWT]
        assert sorted(r.server_id for r in x509_recs) == ["ra", "rb"]
        assert all(r.state == ACTIVE for r in x509_recs)
        assert [r.state for r in jwt_recs] == [ACTIVE], "replicas starting together made two JWT keys"
        assert a.ca.jwt_active.key_id == b.ca.jwt_active.key_id == jwt_recs[0].key_id
        intermediate = x509.load_pem_x509_certificates(site.up.cert_file.read_bytes())[0]
        ca_a, ca_b = a.ca.x509_active.cert, b.ca.x509_active.cert
        assert ca_a is not None and ca_b is not None and ski(ca_a) != ski(ca_b)
        for ca in (ca_a, ca_b):
            ca.verify_directly_issued_by(intermediate)
        for s in (a, b):  # the tick adopts the other replica's key: one shared bundle
            await s.tick()
        assert a.ca.bundle.sequence == b.ca.bundle.sequence
        assert a.ca.bundle.x509_authorities == b.ca.bundle.x509_authorities == tuple(site.trust_roots())
        assert a.ca.bundle.jwt_authorities.keys() == b.ca.bundle.jwt_authorities.keys() == {
            jwt_recs[0].extra.get("kid", jwt_recs[0].key_id)}

        # --- one agent, both addresses; it talks to the first --------------------------------
        tok = new_token(600)
        await a.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
        sock = str(short_tmp / "s" / "api.sock")
        agent = Agent(agent_config_from_dict({
            "trust_domain": TD, "data_dir": str(short_tmp / "agent"),
            "server_address": [address(a), address(b)], "trust_bundle_path": str(site.up.bundle_file),
            "socket_path": sock, "sync_interval": 0.5, "health": {"port": 0},
            "node_attestor": {"join_token": {"token": tok.token}},
        }, "test"))
        await agent.start()
        agent_id = agent.node.agent_id
        assert agent_id is not None and aki(agent.node.chain[0]) == ski(ca_a)
        entry = await b.entries.create(Entry("", SpiffeId.parse(f"spiffe://{TD}/replicated"), agent_id,
                                             (Selector("unix", f"uid:{os.getuid()}"),)))  # made on B
        agent.manager.poke()

        async def served() -> Any:
            try:
                return await asyncio.to_thread(fetch_svid, sock)
            except Exception:
                return None

        leaf1, _, kid1 = await wait_for(served, 20, "the workload SVID", agent.manager.poke)
        assert aki(leaf1) == ski(ca_a)  # signed by the replica the agent uses
        assert kid1 == a.ca.jwt_active.key_id

        # --- kill the replica the agent uses ------------------------------------------------
        await wait_for(_delivered(a), 20, "relays to drain the outbox before the stop")
        await a.stop()
        stopped_a = True
        leaf, _, _ = await asyncio.to_thread(fetch_svid, sock)
        assert leaf.serial_number == leaf1.serial_number  # the cache keeps serving

        # The next rotation (an entry change) goes through the other replica.
        await b.entries.update(entry.replace(hint="after-failover"))

        async def rotated() -> Any:
            got = await served()
            return got if got is not None and got[0].serial_number != leaf1.serial_number else None

        leaf2, chain2, kid2 = await wait_for(rotated, 20, "rotation through replica B", agent.manager.poke)
        assert aki(leaf2) == ski(ca_b)
        chain2[1].verify_directly_issued_by(intermediate)
        assert kid2 == kid1  # the shared JWT key
        # The agent's own SVID renews through B as well.
        before = agent.node.chain[0].serial_number
        await agent.node.renew()
        assert agent.node.chain[0].serial_number != before and aki(agent.node.chain[0]) == ski(ca_b)

        # --- events: every outbox row reached Kafka exactly once --------------------------
        assert b.ds is not None
        await wait_for(_delivered(b), 20, "relay B to drain the outbox")
        rows = await b.ds.fetch_outbox(0, 10_000)
        assert rows == []  # nothing undelivered
        seqs = await _all_seqs(b)
        by_id = {event_id(server_source(TD, name), seq): seq for seq in seqs for name in ("ra", "rb")}
        consumed = await consume_all(kafka_topic, len(seqs), 20)
        ids = [ce.id for ce in consumed]
        assert len(ids) == len(set(ids)), "an event id was published twice"
        published = Counter(by_id[i] for i in ids)
        assert sorted(published) == sorted(seqs), "an outbox row was not published"
        assert max(published.values()) == 1, "an outbox row was published by both replicas"
        assert {ce.source for ce in consumed} <= {server_source(TD, "ra"), server_source(TD, "rb")}
    finally:
        if agent is not None:
            await agent.stop()
        await b.stop()
        if not stopped_a:
            await a.stop()


def _delivered(server: Server) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        assert server.ds is not None
        return await server.ds.outbox_backlog() == 0
    return check


async def _all_seqs(server: Server) -> list[int]:
    """Every outbox seq, delivered or not (delivered rows are kept for the retention time)."""
    from issuer.datastore.postgres import PostgresDataStore

    assert isinstance(server.ds, PostgresDataStore)
    async with server.ds._db.acquire() as conn:
        return [int(r[0]) for r in await conn.fetch("SELECT seq FROM outbox ORDER BY seq")]


@pytest.fixture
async def replicas(postgres_db: str, short_tmp: Path) -> AsyncIterator[tuple[Site, Server, Server]]:
    site = Site(short_tmp, postgres_db)
    a, b = await start_replicas(site, "ra", "rb")
    try:
        yield site, a, b
    finally:
        await a.stop()
        await b.stop()


async def test_join_token_race_between_replicas(replicas: tuple[Site, Server, Server]) -> None:
    site, a, b = replicas
    assert a.ds is not None
    server_id = SpiffeId.parse(f"spiffe://{TD}/meshid/server")
    clients = [ServerClient([address(s)], server_id) for s in (a, b)]
    for c in clients:
        c.set_roots(site.trust_roots())
    rounds = 8
    winners: list[str] = []
    try:
        for _ in range(rounds):
            tok = new_token(600)
            await a.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
            results = await asyncio.gather(
                *(c.attest("join_token", {"token": tok.token}, csr_for(new_key())) for c in clients),
                return_exceptions=True)
            ok = [r for r in results if isinstance(r, dict)]
            refused = [r for r in results if isinstance(r, MeshidError)]
            assert len(ok) == 1 and len(refused) == 1, results
            assert ok[0]["agent_id"] == f"spiffe://{TD}/meshid/agent/join_token/{tok.token_id}"
            certs_from_json(ok[0]["svid"])
            winners.append(ok[0]["agent_id"])
    finally:
        for c in clients:
            await c.close()
    assert sorted(str(r.agent_id) for r in await a.ds.list_agents()) == sorted(winners)


async def test_renewals_from_one_svid_through_both_replicas_store_one(
    replicas: tuple[Site, Server, Server],
) -> None:
    """Each replica serializes an agent's renewals only among its own requests; the write
    is conditional on the agent as read (current and pending serial), so across replicas
    overlapping renewals store one, the others are told to retry (the SVID presented is
    still accepted), and the pending SVID stored is one returned, which the server accepts."""
    site, a, b = replicas
    assert a.ds is not None
    server_id = SpiffeId.parse(f"spiffe://{TD}/meshid/server")
    clients = [ServerClient([address(s)], server_id) for s in (a, b)]
    try:
        for c in clients:
            c.set_roots(site.trust_roots())
        tok = new_token(600)
        await a.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
        key = new_key()
        attested = await clients[0].attest("join_token", {"token": tok.token}, csr_for(key))
        chain = certs_from_json(attested["svid"])
        for c in clients:
            c.set_identity(chain, key)
        results = await asyncio.gather(
            *(c.renew(csr_for(key)) for c in clients for _ in range(3)), return_exceptions=True
        )
        ok = [r for r in results if isinstance(r, list)]
        assert ok, results
        assert all(isinstance(r, MeshidError) for r in results if not isinstance(r, list)), results
        # None refused as superseded (that sends the agent to re-attest): the SVID presented
        # is still current.
        assert not any(isinstance(r, PermissionDeniedError) for r in results), results
        (record,) = await a.ds.list_agents()
        # The SVID stored is pending until used.
        (i,) = [i for i, r in enumerate(results)
                if isinstance(r, list) and f"{r[0].serial_number:x}" == record.new_serial]
        stored = results[i]
        assert isinstance(stored, list)
        # To the replica that signed it: both just started, and one trusts the other's CA key
        # only from its next tick on (the test failed 1 in 3 runs going to replica A).
        issuer_client = clients[i // 3]
        issuer_client.set_identity(stored, key)
        await issuer_client.sync({}, -1)
        (record,) = await a.ds.list_agents()
        assert (record.serial, record.new_serial) == (f"{stored[0].serial_number:x}", "")
    finally:
        for c in clients:
            await c.close()


async def test_replica_follows_keys_published_by_another(
    postgres_db: str, short_tmp: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Self-signed CAs (no upstream): each replica's CA is a root of its own, so A trusts an
    agent whose SVID B signed only once A's periodic tick put B's root in A's bundle and A's
    TLS contexts. A JWT key rotated on A is then used by B too."""
    monkeypatch.setattr(issuer.server, "TICK_SECONDS", 0.2)
    site = Site(short_tmp, postgres_db, upstream=False)
    (a,) = await start_replicas(site, "ra")
    (b,) = await start_replicas(site, "rb")
    server_id = SpiffeId.parse(f"spiffe://{TD}/meshid/server")
    client = ServerClient([address(b)], server_id)
    try:
        assert b.ca.x509_active.cert is not None
        await wait_for(lambda: len(a.ca.bundle.x509_authorities) == 2, 10, "A to adopt B's root")
        assert set(a.ca.bundle.x509_authorities) == set(b.ca.bundle.x509_authorities)
        assert a.ca.bundle.sequence == b.ca.bundle.sequence

        # An agent attested by B (SVID from B's CA) is accepted by A's agent API.
        assert b.ds is not None
        tok = new_token(600)
        await b.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
        client.set_roots(b.ca.bundle.x509_authorities)
        key = new_key()
        resp = await client.attest("join_token", {"token": tok.token}, csr_for(key))
        chain = certs_from_json(resp["svid"])
        assert aki(chain[0]) == ski(b.ca.x509_active.cert)
        client.addresses = [address(a)]
        client.set_identity(chain, key)
        synced = await client.sync({}, -1)
        assert synced["bundle_sequence"] == a.ca.bundle.sequence

        # A rotates the shared JWT key; B's tick adopts it and signs with it.
        await a.ca.prepare(JWT)
        new = await a.ca.activate(JWT)
        # B's tick takes the key (its slots) and then, after a datastore read, its bundle: wait for both.
        await wait_for(lambda: b.ca.jwt_active.key_id == new.key_id
                       and b.ca.bundle.jwt_authorities.keys() == a.ca.bundle.jwt_authorities.keys(),
                       10, "B to adopt the new JWT key and publish it")
        assert b.ca.bundle.jwt_authorities.keys() == a.ca.bundle.jwt_authorities.keys()
        assert len(a.ca.bundle.jwt_authorities) == 2  # the old key stays until its JWTs expire
    finally:
        await client.close()
        await a.stop()
        await b.stop()
