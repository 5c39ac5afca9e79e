"""The core end-to-end flow on both datastores, SQLite and a real PostgreSQL: server + agent,
py-spiffe fetching from the Workload API, entry create/update/delete reaching the
workload, join tokens single use, CA prepare/activate through the admin socket, and the
server's periodic paths (CA tick, bundle refresh, entry index revision) on each backend."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from spiffe import WorkloadApiClient
from waiting import wait_for

from issuer.ca.keys import DiskKeyManager
from issuer.ca.sealing import KeySealer
from issuer.ca.slots import ACTIVE, JWT, OLD, PREPARED, X509, CaManager
from issuer.datastore.factory import open_datastore
from meshid.cli.admin_client import AdminClient, AdminError
from meshid.cli.dev import DevStack, start_dev
from meshid.entry import Entry
from meshid.errors import MeshidError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api.keys import csr_for, new_key
from workload_api.server_client import ServerClient

pytestmark = pytest.mark.integration

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def dsn(request: pytest.FixtureRequest) -> str:
    """"" = the default SQLite file under the server's data_dir; else a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("postgres_db"))


@pytest.fixture
async def stack(dsn: str, short_tmp: Path) -> AsyncIterator[DevStack]:
    s = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=3600,
                        server_overrides={"datastore": {"dsn": dsn}})
    try:
        yield s
    finally:
        await s.stop()


def fetch_ids(sock: str) -> dict[str, x509.Certificate]:
    """SPIFFE ID → leaf of every X509-SVID py-spiffe gets for this process."""
    client = WorkloadApiClient(socket_path=f"unix://{sock}")
    try:
        ctx = client.fetch_x509_context()
        return {str(s.spiffe_id): s.leaf for s in ctx.x509_svids}
    finally:
        client.close()


def fetch_jwt_kid(sock: str, audience: str) -> str:
    import jwt

    client = WorkloadApiClient(socket_path=f"unix://{sock}")
    try:
        token = client.fetch_jwt_svid(audience={audience}).token
        client.validate_jwt_svid(token, audience)
        return str(jwt.get_unverified_header(token)["kid"])
    finally:
        client.close()


def aki(cert: x509.Certificate) -> bytes:
    ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return bytes(ext.key_identifier or b"")


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


async def test_end_to_end(stack: DevStack, dsn: str) -> None:
    server, agent, sock = stack.server, stack.agent, stack.socket_path
    assert (dsn.startswith("postgresql://")) == (type(server.ds).__name__ == "PostgresDataStore")
    td = server.td
    uid_sel = stack.spiffe_id  # the invoking user's entry, made by start_dev
    got = await asyncio.to_thread(fetch_ids, sock)
    assert list(got) == [str(uid_sel)]

    # --- entries: create, update, delete reach the workload --------------------------
    agent_id = agent.node.agent_id
    assert agent_id is not None
    selectors = (Selector("unix", f"uid:{os.getuid()}"),)
    extra = await server.entries.create(Entry("", SpiffeId(td, "/matrix/extra"), agent_id, selectors))
    poke = agent.manager.poke

    async def ids() -> set[str]:
        return set(await asyncio.to_thread(fetch_ids, sock))

    async def has(*want: str) -> bool:
        return await ids() == {str(uid_sel), *want}

    await wait_for(lambda: has("spiffe://example.org/matrix/extra"), 20, "created entry served", poke)
    await server.entries.update(extra.replace(spiffe_id=SpiffeId(td, "/matrix/renamed")))
    await wait_for(lambda: has("spiffe://example.org/matrix/renamed"), 20, "updated entry served", poke)
    await server.entries.delete(extra.id)
    await wait_for(lambda: has(), 20, "deleted entry gone", poke)

    # --- join tokens: single use over the agent API ------------------------------------
    admin_sock = server.config.admin_socket_path
    async with AdminClient(admin_sock) as admin:
        tok = await admin.call("POST", "/v1/tokens", {"ttl": 60})
    client = ServerClient([f"127.0.0.1:{server.agent_api_port}"], SpiffeId(td, "/meshid/server"))
    client.set_roots(server.ca.bundle.x509_authorities)
    try:
        first = await client.attest("join_token", {"token": tok["token"]}, csr_for(new_key()))
        assert first["agent_id"] == tok["agent_id"]
        with pytest.raises(MeshidError):
            await client.attest("join_token", {"token": tok["token"]}, csr_for(new_key()))
    finally:
        await client.close()
    assert {str(a.agent_id) for a in await server.agents.list()} >= {tok["agent_id"], str(agent_id)}

    # --- CA prepare/activate: X509 and JWT; new SVIDs come from the new keys ------------
    old_x509 = server.ca.x509_active.key_id
    old_jwt_kid = await asyncio.to_thread(fetch_jwt_kid, sock, "before")
    async with AdminClient(admin_sock) as admin:
        prepared = await admin.call("POST", "/v1/ca/prepare", {"kind": "x509"})
        with pytest.raises(AdminError):
            await admin.call("POST", "/v1/ca/taint", {"key_id": server.ca.x509_active.key_id})  # active
        await admin.call("POST", "/v1/ca/activate", {"kind": "x509"})
        await admin.call("POST", "/v1/ca/prepare", {"kind": "jwt"})
        await admin.call("POST", "/v1/ca/activate", {"kind": "jwt"})
        shown = await admin.call("GET", "/v1/ca")
    states = {k["key_id"]: k["state"] for k in shown["keys"]}
    assert states[prepared["key_id"]] == ACTIVE and states[old_x509] == OLD
    new_ca = server.ca.x509_active
    assert new_ca.key_id == prepared["key_id"] and new_ca.cert is not None
    # An entry change makes the agent re-sign: the new SVID chains to the new CA key.
    main_entry = (await server.ds.entries_by_spiffe_id(uid_sel))[0]  # type: ignore[union-attr]
    await server.entries.update(main_entry.replace(hint="bumped"))

    async def signed_by_new() -> bool:
        leaf = (await asyncio.to_thread(fetch_ids, sock)).get(str(uid_sel))
        return leaf is not None and aki(leaf) == ski(new_ca.cert)  # type: ignore[arg-type]

    await wait_for(signed_by_new, 20, "SVID from the activated CA", poke)
    # The agent caches JWT-SVIDs per audience: a new audience is signed now, by the new key,
    # and validates against the bundle the agent synced.
    new_kid = await asyncio.to_thread(fetch_jwt_kid, sock, "after")
    assert new_kid != old_jwt_kid and new_kid == server.ca.jwt_active.key_id

    # --- periodic paths: CA tick (with identity renewal), bundle refresh, entry index --
    seq = server.ca.bundle.sequence
    server.identity.renew_at = 0  # force the server SVID renewal branch too
    await server.tick()
    await server.ca.refresh_from_datastore()
    assert server.ca.bundle.sequence == seq
    assert server.identity.renew_at > time.time()
    revision = int(await server.ds.get_meta("entries_revision") or 0)  # type: ignore[union-attr]
    assert (await server.entries.index()).revision == revision
    assert server.ds is not None
    assert await server.ds.outbox_backlog() > 0  # no relay configured: events wait in the outbox


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("kind", [X509, JWT])
async def test_ca_rotation_schedule(dsn: str, short_tmp: Path, kind: str) -> None:
    """The CA tick's whole schedule on the datastore: prepare, activate, retire the old key
    once what it signed expired (raise_max_signed, delete, bundle sequence)."""
    store = await open_datastore(dsn or str(short_tmp / "ca.sqlite3"))
    try:
        t0 = time.time()
        clock = FakeClock(t0)
        ca = CaManager(store, DiskKeyManager(KeySealer(b"matrix-secret-0123456789abcdef!!")), None,
                       TrustDomain("example.org"), 600, server_id="r1", clock=clock)
        await ca.load()
        first = ca.active(kind)
        assert first is not None
        signed_until = first.record.not_after - 50  # outlives the activation below
        ca.note_signed(first.key_id, signed_until)
        seq0 = ca.bundle.sequence
        clock.t = first.record.not_after - 300  # half the lifetime left: prepare
        assert await ca.tick()
        assert sorted(k.record.state for k in ca.keys() if k.record.kind == kind) == [ACTIVE, PREPARED]
        clock.t = first.record.not_after - 100  # a sixth left: activate
        assert await ca.tick()
        assert ca.get(first.key_id).record.state == OLD
        assert max(r.max_signed_not_after for r in await store.list_ca_keys(kind)) == signed_until
        clock.t = first.record.not_after + 1  # expired and nothing it signed is valid: gone
        assert await ca.tick()
        assert first.key_id not in {r.key_id for r in await store.list_ca_keys(kind)}
        assert ca.bundle.sequence > seq0
        assert int(await store.get_meta("bundle_sequence") or 0) == ca.bundle.sequence
    finally:
        await store.close()


async def test_replicas_share_jwt_key_and_retire_a_gone_replicas_ca(dsn: str, short_tmp: Path) -> None:
    """Two CA managers (replicas) on one datastore: the second loads the JWT key the first
    made; each has its own X509 CA and, after a tick, both roots in its bundle; a replica
    that stopped for good leaves a CA key that the other retires once it has expired."""
    store = await open_datastore(dsn or str(short_tmp / "ca.sqlite3"))
    try:
        clock = FakeClock(time.time())
        km = DiskKeyManager(KeySealer(b"matrix-secret-0123456789abcdef!!"))
        td = TrustDomain("example.org")
        r1 = CaManager(store, km, None, td, 600, server_id="r1", clock=clock)
        r2 = CaManager(store, km, None, td, 600, server_id="r2", clock=clock)
        await r1.load()
        await r2.load()
        assert [r.key_id for r in await store.list_ca_keys(JWT)] == [r1.jwt_active.key_id]
        assert r2.jwt_active.key_id == r1.jwt_active.key_id
        assert r1.x509_active.key_id != r2.x509_active.key_id
        await r1.tick()
        assert set(r1.bundle.x509_authorities) == set(r2.bundle.x509_authorities)
        assert len(r1.bundle.x509_authorities) == 2
        gone = r2.x509_active
        clock.t = gone.record.not_after + 1  # r2 never ticks again
        await r1.tick()
        assert gone.key_id not in {r.key_id for r in await store.list_ca_keys(X509)}
        assert gone.cert not in r1.bundle.x509_authorities
        assert len([r for r in await store.list_ca_keys(JWT) if r.state == ACTIVE]) == 1
    finally:
        await store.close()
