"""Two meshid trust domains (one.org, two.org) federating over https_spiffe bundle
endpoints on loopback. A workload in one.org verifies two.org's X509-SVID (openssl, with
only the federated bundle its Workload API gave it) and JWT-SVID (one.org's
ValidateJWTSVID and py-spiffe); the last good foreign bundle survives the foreign
endpoint going down and a restart while it is down."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from spiffe import WorkloadApiClient
from waiting import wait_for

from issuer.ca.devpki import ensure_dev_upstream
from meshid.bundle import Bundle
from meshid.cli.dev import DevStack, start_dev
from meshid.der import load_der_certificates
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api._gen import workload_grpc, workload_pb2

pytestmark = pytest.mark.integration

HEADER = {"workload.spiffe.io": "true"}
ONE, TWO = TrustDomain("one.org"), TrustDomain("two.org")
TIMEOUT = 30.0
WORKLOAD_PROC = Path(__file__).resolve().parent / "workload_proc.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def federation_overrides(port: int, peer: TrustDomain, peer_port: int, peer_root: Path) -> dict[str, Any]:
    return {"federation": {
        "bundle_endpoint": {"enabled": True, "address": "127.0.0.1", "port": port, "refresh_hint": 1},
        # Tight polling bounds so the test sees changes (and failures) within a second.
        "min_refresh_interval": 0.2, "max_refresh_interval": 1, "fetch_timeout": 5,
        "trust_domains": {peer.name: {
            "bundle_endpoint_url": f"https://127.0.0.1:{peer_port}/",
            "endpoint_spiffe_id": f"spiffe://{peer.name}/meshid/server",
            "trust_bundle_path": str(peer_root),
        }},
    }}


@dataclass
class Pair:
    tmp: Path
    one: DevStack
    two: DevStack
    one_port: int
    roots: dict[TrustDomain, Path]

    async def start_one(self) -> DevStack:
        two_port = self.two.server.bundle_endpoint_port
        self.one = await start_dev(
            self.tmp / "1", ONE.name, str(self.tmp / "s1" / "api.sock"),
            server_overrides=federation_overrides(self.one_port, TWO, two_port, self.roots[TWO]))
        return self.one


@pytest.fixture
async def pair(short_tmp: Path) -> AsyncIterator[Pair]:
    # Both upstream roots exist before either server starts: each is the other's
    # bootstrap bundle. one.org's port is reserved so two.org can be told its URL first.
    roots = {ONE: ensure_dev_upstream(short_tmp / "1" / "upstream").bundle_file,
             TWO: ensure_dev_upstream(short_tmp / "2" / "upstream").bundle_file}
    one_port = free_port()
    two = await start_dev(short_tmp / "2", TWO.name, str(short_tmp / "s2" / "api.sock"),
                          server_overrides=federation_overrides(0, ONE, one_port, roots[ONE]))
    p = Pair(short_tmp, None, two, one_port, roots)  # type: ignore[arg-type]
    try:
        await p.start_one()
        yield p
    finally:
        for stack in (p.one, p.two):
            if stack is not None:
                await stack.stop()


async def add_federated_entry(stack: DevStack, path: str, peer: TrustDomain | None,
                              uid: int | None = None) -> Entry:
    agent_id = stack.agent.node.agent_id
    assert agent_id is not None
    entry = await stack.server.entries.create(Entry(
        "", SpiffeId(stack.server.td, path), agent_id,
        (Selector("unix", f"uid:{os.getuid() if uid is None else uid}"),),
        federates_with=(peer,) if peer else ()))
    stack.agent.manager.poke()
    return entry


async def run_as(uid: int, sock: str, mode: str, *args: str) -> dict[str, Any]:
    """A workload of another uid (workload_proc.py) calling the Workload API; its JSON verdict."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKLOAD_PROC), str(uid), sock, mode, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert lines, f"workload process printed nothing (rc={proc.returncode}): {err.decode()[-2000:]}"
    return dict(json.loads(lines[-1]))


async def fetch_x509(sock: str) -> workload_pb2.X509SVIDResponse:
    ch = Channel(path=sock)
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(ch)
        async with stub.FetchX509SVID.open(metadata=HEADER, timeout=TIMEOUT) as st:
            await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
            msg = await st.recv_message()
            await st.cancel()
        assert msg is not None
        return msg
    finally:
        ch.close()


async def first_message(sock: str, method: str, request: Any) -> Any:
    ch = Channel(path=sock)
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(ch)
        async with getattr(stub, method).open(metadata=HEADER, timeout=TIMEOUT) as st:
            await st.send_message(request, end=True)
            msg = await st.recv_message()
            await st.cancel()
        return msg
    finally:
        ch.close()


async def jwt_svid(sock: str, spiffe_id: SpiffeId, audience: str) -> str:
    ch = Channel(path=sock)
    try:
        resp = await workload_grpc.SpiffeWorkloadAPIStub(ch).FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=[audience], spiffe_id=str(spiffe_id)), metadata=HEADER,
            timeout=TIMEOUT)
        return str(resp.svids[0].svid)
    finally:
        ch.close()


async def validate(sock: str, token: str, audience: str) -> workload_pb2.ValidateJWTSVIDResponse:
    ch = Channel(path=sock)
    try:
        return await workload_grpc.SpiffeWorkloadAPIStub(ch).ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token), metadata=HEADER,
            timeout=TIMEOUT)
    finally:
        ch.close()


def openssl_verify(tmp: Path, chain_der: bytes, roots_der: bytes) -> subprocess.CompletedProcess[str]:
    pem = lambda cs: b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)  # noqa: E731
    chain = load_der_certificates(chain_der)
    (tmp / "leaf.pem").write_bytes(pem(chain[:1]))
    (tmp / "chain.pem").write_bytes(pem(chain[1:]))
    (tmp / "roots.pem").write_bytes(pem(load_der_certificates(roots_der)))
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp / "roots.pem"), "-untrusted", str(tmp / "chain.pem"),
         str(tmp / "leaf.pem")], capture_output=True, text=True, timeout=30)


def svid_of(resp: workload_pb2.X509SVIDResponse, spiffe_id: SpiffeId) -> workload_pb2.X509SVID:
    return next(s for s in resp.svids if s.spiffe_id == str(spiffe_id))


async def federate(p: Pair) -> tuple[Entry, Entry]:
    client = await add_federated_entry(p.one, "/fed/client", TWO)
    server = await add_federated_entry(p.two, "/fed/server", ONE)
    for stack, peer, entry in ((p.one, TWO, client), (p.two, ONE, server)):
        cache = stack.agent.cache
        def holds(c: Any = cache, t: TrustDomain = peer, e: Entry = entry) -> bool:
            return t in c.federated and e.id in c.svids

        what = f"{stack.server.td} agent to hold {peer}'s bundle and the federated SVID"
        await wait_for(holds, TIMEOUT, what)
    return client, server


async def test_workloads_verify_each_others_svids_across_trust_domains(pair: Pair) -> None:
    client, server = await federate(pair)
    one_sock, two_sock = pair.one.socket_path, pair.two.socket_path
    two_bundle = pair.two.server.ca.bundle

    # X509: the federated bundle one.org's workload got is two.org's root, and it verifies
    # two.org's SVID chain; one.org's own bundle does not.
    mine = await fetch_x509(one_sock)
    assert set(mine.federated_bundles) == {"spiffe://two.org"}
    assert mine.federated_bundles["spiffe://two.org"] == two_bundle.x509_der()
    theirs = svid_of(await fetch_x509(two_sock), server.spiffe_id)
    assert "spiffe://one.org" in (await fetch_x509(two_sock)).federated_bundles
    ok = openssl_verify(pair.tmp, theirs.x509_svid, mine.federated_bundles["spiffe://two.org"])
    assert ok.returncode == 0, ok.stderr
    own = svid_of(mine, client.spiffe_id).bundle
    assert openssl_verify(pair.tmp, theirs.x509_svid, own).returncode != 0

    # Bundle streams carry the federated trust domain too (this caller's entry federates with it).
    x509_bundles = await first_message(one_sock, "FetchX509Bundles", workload_pb2.X509BundlesRequest())
    assert set(x509_bundles.bundles) == {"spiffe://one.org", "spiffe://two.org"}
    assert x509_bundles.bundles["spiffe://two.org"] == two_bundle.x509_der()
    jwt_bundles = await first_message(one_sock, "FetchJWTBundles", workload_pb2.JWTBundlesRequest())
    assert set(jwt_bundles.bundles) == {"spiffe://one.org", "spiffe://two.org"}
    got = Bundle.from_jwks(TWO, jwt_bundles.bundles["spiffe://two.org"])
    assert set(got.jwt_authorities) == set(two_bundle.jwt_authorities) and got.jwt_authorities

    # JWT: a two.org JWT-SVID validates through one.org's Workload API (federated JWT keys).
    token = await jwt_svid(two_sock, server.spiffe_id, str(client.spiffe_id))
    res = await validate(one_sock, token, str(client.spiffe_id))
    assert res.spiffe_id == str(server.spiffe_id)
    assert res.claims["sub"] == str(server.spiffe_id)

    # ... and through py-spiffe, an independent Workload API client.
    def with_py_spiffe() -> tuple[str, set[str], set[str]]:
        c = WorkloadApiClient(socket_path=f"unix://{one_sock}")
        try:
            v = c.validate_jwt_svid(token, str(client.spiffe_id))
            x509_tds = {str(b.trust_domain) for b in c.fetch_x509_bundles().bundles}
            jwt_tds = {str(b.trust_domain) for b in c.fetch_jwt_bundles().bundles}
            return str(v.spiffe_id), x509_tds, jwt_tds
        finally:
            c.close()

    sid, x509_tds, jwt_tds = await asyncio.to_thread(with_py_spiffe)
    assert sid == str(server.spiffe_id)
    assert {"one.org", "two.org"} <= x509_tds and {"one.org", "two.org"} <= jwt_tds


async def test_workloads_see_only_the_bundles_their_entries_federate_with(pair: Pair) -> None:
    """As SPIRE's agent: one.org's agent holds two.org's bundle, but only workloads whose
    entries federate with two.org get it or can validate two.org JWT-SVIDs with it."""
    client, server = await federate(pair)
    one_sock = pair.one.socket_path
    await add_federated_entry(pair.one, "/local-only", None, uid=1)
    cache = pair.one.agent.cache
    await wait_for(lambda: any(e.spiffe_id.path == "/local-only" for e in cache.entries.values()),
        TIMEOUT, "the agent to receive the uid 1 entry")
    local = await run_as(1, one_sock, "bundles")
    assert local == {"uid": 1, "x509": ["spiffe://one.org"], "jwt": ["spiffe://one.org"]}, local
    nobody = await run_as(65534, one_sock, "bundles")
    assert nobody == {"uid": 65534, "x509": "PERMISSION_DENIED", "jwt": "PERMISSION_DENIED"}, nobody

    # ValidateJWTSVID checks against the caller's bundles: a two.org token fails for uid 1 and
    # for the unregistered uid (not refused as such: one.org tokens still validate for it).
    foreign = await jwt_svid(pair.two.socket_path, server.spiffe_id, "aud")
    own = await jwt_svid(one_sock, client.spiffe_id, "aud")
    for uid in (1, 65534):
        got = await run_as(uid, one_sock, "validate", "aud", foreign)
        assert got["status"] == "INVALID_ARGUMENT" and "two.org" in got["message"], got
        assert (await run_as(uid, one_sock, "validate", "aud", own))["spiffe_id"] == str(client.spiffe_id)
    assert (await validate(one_sock, foreign, "aud")).spiffe_id == str(server.spiffe_id)


async def test_bundle_endpoint_serves_spiffe_bundle_over_tls13_only(pair: Pair) -> None:
    port = pair.two.server.bundle_endpoint_port
    ctx12 = ssl.create_default_context()
    ctx12.check_hostname = False
    ctx12.verify_mode = ssl.CERT_NONE
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx12), 10)
        w.close()
    # The https_spiffe endpoint presents two.org's server SVID, chaining to two.org's root.
    ctx = ssl.create_default_context(cafile=str(pair.roots[TWO]))
    ctx.check_hostname = False  # SPIFFE IDs, not host names
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10)
    try:
        from meshid.tls import peer_spiffe_id

        assert peer_spiffe_id(w.get_extra_info("ssl_object")) == SpiffeId(TWO, "/meshid/server")
        w.write(b"GET / HTTP/1.1\r\nHost: two\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    doc = Bundle.from_spiffe_json(TWO, body)
    assert doc.x509_authorities == pair.two.server.ca.bundle.x509_authorities
    assert b'"spiffe_refresh_hint": 1' in body and b'"spiffe_sequence"' in body


async def test_last_good_bundle_kept_when_foreign_endpoint_is_down_and_across_restart(pair: Pair) -> None:
    client, server = await federate(pair)
    fed = pair.one.server.federation
    assert fed is not None
    poller = fed  # narrowed, for the lambdas below
    before = fed.bundles[TWO]
    assert before.jwt_authorities  # fetched from the endpoint, not the bootstrap PEM
    token = await jwt_svid(pair.two.socket_path, server.spiffe_id, str(client.spiffe_id))

    await pair.two.stop()
    pair.two = None  # type: ignore[assignment]
    failures = poller.failures(TWO)
    await wait_for(lambda: poller.failures(TWO) >= failures + 2,
        TIMEOUT, "one.org to fail polling two.org twice")
    assert fed.bundles[TWO] == before
    assert pair.one.agent.cache.federated[TWO] == before
    mine = await fetch_x509(pair.one.socket_path)
    assert mine.federated_bundles["spiffe://two.org"] == before.x509_der()
    res = await validate(pair.one.socket_path, token, str(client.spiffe_id))
    assert res.spiffe_id == str(server.spiffe_id)

    # Restart one.org while two.org is still down: the bundle comes back from the datastore
    # (JWT keys included, which the bootstrap PEM does not have) and reaches workloads.
    await pair.one.stop()
    pair.one = await start_dev(
        pair.tmp / "1", ONE.name, str(pair.tmp / "s1" / "api.sock"),
        server_overrides=federation_overrides(pair.one_port, TWO, free_port(), pair.roots[TWO]))
    fed = pair.one.server.federation
    assert fed is not None and fed.bundles[TWO] == before
    cache = pair.one.agent.cache
    await wait_for(lambda: TWO in cache.federated and client.id in cache.svids,
        TIMEOUT, "the restarted agent")
    res = await validate(pair.one.socket_path, token, str(client.spiffe_id))
    assert res.spiffe_id == str(server.spiffe_id)
