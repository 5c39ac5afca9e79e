"""CA rotation after a compromise, on a real stack: prepare, activate, taint, revoke while
workloads stream FetchX509SVID; an agent that was offline through the rotation recovers
by re-attesting; an upstream intermediate replaced on disk is used at the next prepare.

Self-signed stacks (no upstream) are used where the bundle must change: there each CA is
its own root, so revoking the tainted key takes its root out of the bundle. With an
upstream authority the bundle holds only the upstream root, which stays.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpclib.client import Channel
from waiting import wait_for

from issuer.ca.minting import random_serial
from meshid.cli.admin_client import AdminClient, AdminError
from meshid.cli.dev import DevStack, start_dev
from meshid.der import load_der_certificates
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from meshid.tls import pem_chain, pem_key, spiffe_id_of_cert
from workload_api._gen import workload_grpc, workload_pb2
from workload_api.agent import Agent
from workload_api.config import agent_config_from_dict
from workload_api.keys import authority_key_id, subject_key_id
from workload_api.server_client import chain_verifies

pytestmark = pytest.mark.integration

HEADER = {"workload.spiffe.io": "true"}
WINDOW = 6.0
NO_UPSTREAM = {"upstream": {"disk": {"cert_file": "", "key_file": "", "bundle_file": ""}}}
EXTRA_WORKLOADS = 30


async def admin(stack: DevStack, method: str, path: str, body: Any = None) -> Any:
    async with AdminClient(stack.server.config.admin_socket_path) as client:
        return await client.call(method, path, body)


async def active_x509(stack: DevStack) -> str:
    keys = (await admin(stack, "GET", "/v1/ca"))["keys"]
    (key_id,) = [k["key_id"] for k in keys if k["kind"] == "x509" and k["state"] == "active"]
    return str(key_id)


def ca_cert(stack: DevStack, key_id: str) -> x509.Certificate:
    cert = stack.server.ca.get(key_id).cert
    assert cert is not None
    return cert


async def cli(stack: DevStack, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshid.cli.main", *args,
        "--server-socket", stack.server.config.admin_socket_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Message:
    at: float
    svids: list[list[x509.Certificate]]  # chains, leaf first
    bundle: list[x509.Certificate]


@dataclass
class Stream:
    """One workload's FetchX509SVID stream, recording every message it is sent."""

    socket: str
    messages: list[Message] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        channel = Channel(path=self.socket)
        try:
            stub = workload_grpc.SpiffeWorkloadAPIStub(channel)
            async with stub.FetchX509SVID.open(metadata=HEADER) as st:
                await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
                while True:
                    msg = await st.recv_message()
                    if msg is None:
                        return
                    bundle = load_der_certificates(msg.svids[0].bundle) if msg.svids else []
                    self.messages.append(Message(time.time(), [load_der_certificates(s.x509_svid)
                                                               for s in msg.svids], bundle))
        finally:
            channel.close()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    @property
    def last(self) -> Message | None:
        return self.messages[-1] if self.messages else None

    def all_from(self, ski: str, count: int) -> bool:
        last = self.last
        return last is not None and len(last.svids) == count and all(
            authority_key_id(chain[0]) == ski for chain in last.svids)


def check_always_valid(stream: Stream) -> None:
    """Every message carried SVIDs that were valid when received and chain to its bundle."""
    assert stream.messages
    for m in stream.messages:
        assert m.svids, "a message without any SVID"
        for chain in m.svids:
            assert chain[0].not_valid_after_utc.timestamp() > m.at
            assert chain_verifies(chain, m.bundle, m.at), "an SVID that does not verify with its bundle"


async def test_taint_flow_while_workloads_stream(short_tmp: Path) -> None:
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=3600,
                            server_overrides={**NO_UPSTREAM, "ca": {"taint_rotation_window": WINDOW}})
    streams = [Stream(stack.socket_path) for _ in range(4)]
    try:
        agent = stack.agent
        agent_id = agent.node.agent_id
        assert agent_id is not None
        uid = os.getuid()
        for i in range(EXTRA_WORKLOADS):  # more SVIDs for the same workloads: the spread is visible
            sid = SpiffeId(stack.server.td, f"/svc/{i}")
            await stack.server.entries.create(Entry("", sid, agent_id, (Selector("unix", f"uid:{uid}"),)))
        count = EXTRA_WORKLOADS + 1
        agent.manager.poke()
        await wait_for(lambda: len(agent.cache.svids) == count, 30, "all workload SVIDs")
        for s in streams:
            s.start()
        old = await active_x509(stack)
        old_ski = subject_key_id(ca_cert(stack, old))
        await wait_for(lambda: all(s.all_from(old_ski, count) for s in streams), 20, "streams to start")

        # The active key cannot be tainted: that would leave nothing valid to re-issue from.
        with pytest.raises(AdminError, match="active x509 key and cannot be tainted"):
            await admin(stack, "POST", "/v1/ca/taint", {"key_id": old})

        # Prepare: published in the bundle (streams see it) before it signs anything.
        new = (await admin(stack, "POST", "/v1/ca/prepare", {"kind": "x509"}))["key_id"]
        new_cert = ca_cert(stack, new)
        new_ski = subject_key_id(new_cert)
        await wait_for(lambda: all(s.last is not None and new_cert in s.last.bundle for s in streams), 10,
                       "the prepared CA in every stream's bundle")
        await admin(stack, "POST", "/v1/ca/activate", {"kind": "x509"})
        assert await active_x509(stack) == new

        t_taint = time.time()
        await admin(stack, "POST", "/v1/ca/taint", {"key_id": old})
        await wait_for(lambda: all(s.all_from(new_ski, count) for s in streams), WINDOW + 5,
                       "every stream to hold SVIDs from the new key only")
        done = time.time() - t_taint
        assert done <= WINDOW + 3, f"re-issuance took {done:.1f}s for a {WINDOW}s window"

        # Re-issuance was spread over the window, not done at once.
        first_new: dict[str, float] = {}
        for m in streams[0].messages:
            for chain in m.svids:
                if authority_key_id(chain[0]) == new_ski:
                    first_new.setdefault(str(spiffe_id_of_cert(chain[0])), m.at)
        offsets = sorted(t - t_taint for t in first_new.values())
        assert len(offsets) == count
        assert offsets[-1] - offsets[0] >= 0.4 * WINDOW, offsets
        per_second: dict[int, int] = {}
        for off in offsets:
            per_second[int(off)] = per_second.get(int(off), 0) + 1
        assert max(per_second.values()) <= count / 2, per_second
        # The agent's own SVID was tainted as well and is re-issued from the new key.
        await wait_for(lambda: agent.node.authority_key_id == new_ski, WINDOW + 5, "the agent SVID re-issue")

        # Revoke: refused while SVIDs it signed are valid (the old server SVID still is)...
        with pytest.raises(AdminError, match="valid until"):
            await admin(stack, "POST", "/v1/ca/revoke", {"key_id": old})
        # ...unless forced. The self-signed old CA is its own root: it leaves the bundle.
        await admin(stack, "POST", "/v1/ca/revoke", {"key_id": old, "force": True})
        keys = (await admin(stack, "GET", "/v1/ca"))["keys"]
        assert old not in {k["key_id"] for k in keys}
        assert stack.server.ca.bundle.x509_authorities == (new_cert,)
        await wait_for(lambda: all(s.last is not None and s.last.bundle == [new_cert] for s in streams), 10,
                       "the bundle without the revoked root in every stream")
        for s in streams:
            check_always_valid(s)
        # The agent keeps talking to the server with its re-issued SVID.
        synced = agent.manager.last_sync_ok
        agent.manager.poke()
        await wait_for(lambda: agent.manager.last_sync_ok > synced, 10, "a sync after the revocation")
    finally:
        for s in streams:
            if s.task is not None:
                await s.stop()
        await stack.stop()


async def test_taint_and_revoke_with_upstream_from_the_cli(short_tmp: Path) -> None:
    """With an upstream authority every CA key chains to the same upstream root, and the
    bundle holds only that root. Revoking the tainted key drops the key (and its CA
    certificate) from the server; the root stays, so the bundle's roots do not change."""
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=3600,
                            server_overrides={"ca": {"taint_rotation_window": 3}})
    try:
        agent = stack.agent
        await wait_for(lambda: len(agent.cache.svids) == 1, 20, "the workload SVID")
        roots = stack.server.ca.bundle.x509_authorities
        old = await active_x509(stack)

        rc, _, err = await cli(stack, "ca", "taint", old)
        assert rc != 0
        assert "is the active x509 key and cannot be tainted" in err

        assert (await cli(stack, "ca", "prepare"))[0] == 0
        assert (await cli(stack, "ca", "activate"))[0] == 0
        new = await active_x509(stack)
        assert new != old
        new_ski = subject_key_id(ca_cert(stack, new))
        rc, _, err = await cli(stack, "ca", "taint", old)
        assert rc == 0, err
        await wait_for(lambda: all(authority_key_id(s.leaf) == new_ski for s in agent.cache.svids.values())
                       and agent.node.authority_key_id == new_ski, 10, "re-issue from the new key")

        rc, _, err = await cli(stack, "ca", "revoke", old)
        assert rc != 0 and "valid until" in err
        rc, _, err = await cli(stack, "ca", "revoke", old, "--force")
        assert rc == 0, err
        assert old not in {k.key_id for k in stack.server.ca.keys()}
        assert stack.server.ca.bundle.x509_authorities == roots  # the upstream root stays
        (svid,) = agent.cache.svids.values()
        assert chain_verifies(list(svid.chain), list(roots), time.time())
    finally:
        await stack.stop()


# ---------------------------------------------------------------------------- offline agent


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_node_pki(directory: Path, nodes: int) -> tuple[Path, list[tuple[Path, Path, x509.Certificate]]]:
    """A node CA (what the server's x509pop attestor trusts) and `nodes` node certificates."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("node ca")).issuer_name(_name("node ca"))
        .public_key(ca_key.public_key()).serial_number(random_serial())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "node-ca.pem"
    ca_path.write_bytes(pem_chain([ca]))
    out = []
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(_name(f"node-{i}")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(random_serial())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"node-{i}.pem", directory / f"node-{i}.key"
        cert_path.write_bytes(pem_chain([cert, ca]))
        key_path.write_bytes(pem_key(key))
        key_path.chmod(0o600)
        out.append((cert_path, key_path, cert))
    return ca_path, out


def x509pop_agent_config(stack: DevStack, base: Path, name: str, cert: Path, key: Path) -> dict[str, Any]:
    return {
        "trust_domain": stack.server.td.name,
        "data_dir": str(base / name / "state"),
        "server_address": [f"127.0.0.1:{stack.server.agent_api_port}"],
        "trust_bundle_path": stack.agent.config.trust_bundle_path,
        "socket_path": str(base / name / "api.sock"),
        "sync_interval": 1,
        "health": {"enabled": False},
        "node_attestor": {"x509pop": {"certificate_path": str(cert), "private_key_path": str(key)}},
    }


async def fetch_one(socket: str) -> Message:
    channel = Channel(path=socket)
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(channel)
        async with stub.FetchX509SVID.open(metadata=HEADER, timeout=10) as st:
            await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
            msg = await st.recv_message()
            await st.cancel()
        assert msg is not None
        return Message(time.time(), [load_der_certificates(s.x509_svid) for s in msg.svids],
                       load_der_certificates(msg.svids[0].bundle))
    finally:
        channel.close()


async def test_agent_offline_through_rotation_reattests(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Agent A was down while the server activated a new self-signed CA, tainted and
    force-revoked the old one: its persisted SVID no longer verifies, the server drops the
    TLS handshake, and A re-attests with x509pop and serves SVIDs from the new CA.

    Agent B went down before the new CA was even prepared, so it never received the new
    root and cannot authenticate the server: that needs re-bootstrapping (new root in
    trust_bundle_path, persisted bundle.json removed), after which B recovers the same way.
    """
    node_ca, nodes = make_node_pki(short_tmp / "pki", 2)
    overrides = {**NO_UPSTREAM, "node_attestors": {"x509pop": {"ca_bundle_path": str(node_ca)}}}
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=3600,
                            server_overrides=overrides)
    agents: list[Agent] = []
    try:
        await stack.agent.stop()  # only the x509pop agents below run
        td = stack.server.td
        configs = []
        for name, (cert_path, key_path, cert) in zip(("a", "b"), nodes, strict=True):
            # The server's default agent path: the SHA-1 fingerprint of the node certificate.
            aid = SpiffeId(td, f"/meshid/agent/x509pop/{cert.fingerprint(hashes.SHA1()).hex()}")
            await stack.server.entries.create(
                Entry("", SpiffeId(td, f"/offline/{name}"), aid, (Selector("unix", f"uid:{os.getuid()}"),)))
            cfg = x509pop_agent_config(stack, short_tmp, name, cert_path, key_path)
            configs.append(agent_config_from_dict(cfg))
        a, b = Agent(configs[0]), Agent(configs[1])
        agents += [a, b]
        for agent in (a, b):
            await agent.start()
            await wait_for(lambda agent=agent: len(agent.cache.svids) == 1, 20, "the first SVID")  # type: ignore[misc]
        old = await active_x509(stack)
        old_ski = subject_key_id(ca_cert(stack, old))
        a_serial = a.node.chain[0].serial_number
        assert a.node.authority_key_id == old_ski

        await b.stop()  # B goes down before the new CA is published
        new = (await admin(stack, "POST", "/v1/ca/prepare", {"kind": "x509"}))["key_id"]
        new_cert = ca_cert(stack, new)
        new_ski = subject_key_id(new_cert)
        await wait_for(lambda: a.cache.bundle is not None and new_cert in a.cache.bundle.x509_authorities, 10,
                       "agent A to learn the prepared CA")
        await a.stop()
        agents.clear()
        await admin(stack, "POST", "/v1/ca/activate", {"kind": "x509"})
        await admin(stack, "POST", "/v1/ca/taint", {"key_id": old})
        await admin(stack, "POST", "/v1/ca/revoke", {"key_id": old, "force": True})

        # A comes back with its persisted (time-valid, no longer trusted) SVID.
        a = Agent(configs[0])
        agents.append(a)
        await a.start()
        await wait_for(lambda: a.node.authority_key_id == new_ski, 20, "agent A to re-attest")
        assert a.node.chain[0].serial_number != a_serial
        await wait_for(lambda: all(authority_key_id(s.leaf) == new_ski for s in a.cache.svids.values())
                       and len(a.cache.svids) == 1, 20, "agent A's workload SVID from the new CA")
        got = await fetch_one(a.config.socket_path)
        assert got.bundle == [new_cert]
        assert [authority_key_id(c[0]) for c in got.svids] == [new_ski]
        assert chain_verifies(got.svids[0], got.bundle, time.time())
        assert "no longer trusts the agent SVID" in caplog.text

        # B cannot authenticate the server: it says so, and keeps serving nothing new.
        caplog.clear()
        b = Agent(configs[1])
        agents.append(b)
        await b.start()
        await wait_for(lambda: "re-bootstrap the agent" in caplog.text, 10, "B's re-bootstrap message")
        assert b.node.authority_key_id == old_ski
        await b.stop()
        agents.remove(b)
        # Re-bootstrap as documented: the new root in trust_bundle_path, bundle.json removed.
        bootstrap = short_tmp / "b" / "new-root.pem"
        bootstrap.write_bytes(stack.server.ca.bundle.x509_pem())
        (configs[1].state_dir / "bundle.json").unlink()
        configs[1].trust_bundle_path = str(bootstrap)
        b = Agent(configs[1])
        agents.append(b)
        await b.start()
        await wait_for(lambda: b.node.authority_key_id == new_ski and len(b.cache.svids) == 1
                       and all(authority_key_id(s.leaf) == new_ski for s in b.cache.svids.values()), 20,
                       "agent B to recover after re-bootstrapping")
    finally:
        for agent in agents:
            await agent.stop()
        await stack.server.stop()


# ---------------------------------------------------------------------------- upstream rotation


def new_intermediate(upstream_dir: Path, cn: str) -> x509.Certificate:
    """Replace the dev upstream intermediate on disk with a new one under the same root."""
    root = x509.load_pem_x509_certificates((upstream_dir / "root.pem").read_bytes())[0]
    root_key = serialization.load_pem_private_key((upstream_dir / "root.key").read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(root.subject)
        .public_key(key.public_key()).serial_number(random_serial())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                       critical=False)
        .sign(root_key, hashes.SHA384())
    )
    # Key first then certificate, each replaced atomically, as an operator's tooling would.
    for name, data in (("intermediate.key", pem_key(key)), ("intermediate.pem", pem_chain([cert, root]))):
        tmp = upstream_dir / (name + ".new")
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        tmp.replace(upstream_dir / name)
    return cert


async def test_upstream_intermediate_replaced_on_disk_is_used_at_next_prepare(short_tmp: Path) -> None:
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=3600)
    try:
        ca = stack.server.ca
        before = ca.x509_active
        assert before.chain
        assert before.chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
            "meshid dev intermediate"
        inter = new_intermediate(short_tmp / "d" / "upstream", "meshid dev intermediate 2")

        prepared = await ca.prepare("x509")  # no restart: the files are read at each CA signing
        assert prepared.cert is not None
        assert prepared.cert.issuer == inter.subject
        prepared.cert.verify_directly_issued_by(inter)
        assert prepared.chain == [inter]
        assert list(ca.bundle.x509_authorities) == before.roots  # same root: the bundle is unchanged

        # Once active, new SVIDs carry the new intermediate and still verify to the same root.
        await ca.activate("x509")
        agent_id = stack.agent.node.agent_id
        assert agent_id is not None
        await stack.server.entries.create(
            Entry("", SpiffeId(stack.server.td, "/after-upstream-rotation"), agent_id,
                  (Selector("unix", "uid:31337"),)))
        stack.agent.manager.poke()
        await wait_for(lambda: len(stack.agent.cache.svids) == 2, 20, "the new SVID")
        svids = stack.agent.cache.svids.values()
        fresh = [s for s in svids if s.spiffe_id.path == "/after-upstream-rotation"]
        assert fresh and list(fresh[0].chain[1:]) == [prepared.cert, inter]
        assert chain_verifies(list(fresh[0].chain), list(ca.bundle.x509_authorities), time.time())
    finally:
        await stack.stop()
