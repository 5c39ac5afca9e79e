"""Issuer acceptance, tried the way a new user would: `meshid server run` with an openssl-made
upstream, the CLI, a real agent and Workload API client, openssl as the independent chain
verifier; plus the security promises (node authorization, join tokens, TLS 1.3 only, the
admin socket, keys at rest under the master secret)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestors.node.join_token import hash_token, new_token
from issuer.ca.sealing import KeySealer, SealError
from issuer.ca.slots import svid_chain
from issuer.config import ServerConfig, server_config_from_dict
from issuer.datastore.factory import open_datastore
from issuer.server import Server
from meshid.cli.admin_client import AdminClient
from meshid.errors import MeshidError, PermissionDeniedError
from meshid.spiffe_id import SpiffeId
from meshid.tls import client_context
from workload_api.agent import Agent
from workload_api.config import agent_config_from_dict
from workload_api.keys import csr_for, new_key

pytestmark = pytest.mark.integration

TD = "example.org"
WORKLOAD_ID = f"spiffe://{TD}/acceptance/web"
STEP_TIMEOUT = 20.0  # any single wait in this file
_BIN = Path(sys.executable).with_name("meshid")
MESHID = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "meshid.cli.main"]


# --------------------------------------------------------------------------- helpers
@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without MESHID_* (no stray overrides or secrets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHID_")}
    env.update(extra)
    return env


async def run_cmd(*argv: str, time_limit: float = STEP_TIMEOUT, env: dict[str, str] | None = None) -> Run:
    """Run a command without blocking the event loop (in-process servers keep serving)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def meshid(*args: str, time_limit: float = STEP_TIMEOUT, env: dict[str, str] | None = None) -> Run:
    return await run_cmd(*MESHID, *args, time_limit=time_limit, env=env)


def ok(run: Run) -> str:
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    return run.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_secret(path: Path, secret: str) -> None:
    path.write_text(secret + "\n")
    path.chmod(0o600)


@dataclass
class Pki:
    dir: Path
    root_pem: Path
    int_pem: Path
    int_key: Path
    chain_pem: Path  # intermediate, then root

    @property
    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root_pem.read_bytes())

    @property
    def intermediate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.int_pem.read_bytes())


_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[root_ext]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[int_ext]
basicConstraints = critical,CA:true,pathlen:1
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@pytest.fixture(scope="module")
def upstream_pki() -> Iterator[Pki]:
    """Offline root (P-384) → upstream intermediate (P-256), made with the openssl CLI."""
    d = Path(tempfile.mkdtemp(prefix="mi", dir="/tmp"))
    os.chmod(d, 0o755)

    def openssl(*args: str) -> None:
        r = subprocess.run(["openssl", *args], cwd=d, capture_output=True, timeout=30, check=False)
        assert r.returncode == 0, r.stderr.decode()

    try:
        (d / "ca.cnf").write_text(_OPENSSL_CNF)
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", "root.key")
        openssl("req", "-x509", "-new", "-key", "root.key", "-sha384", "-days", "30", "-config", "ca.cnf",
                "-subj", "/O=meshid acceptance/CN=offline root", "-extensions", "root_ext",
                "-out", "root.pem")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "int.key")
        openssl("req", "-new", "-key", "int.key", "-config", "ca.cnf",
                "-subj", "/O=meshid acceptance/CN=upstream intermediate", "-out", "int.csr")
        openssl("x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root.key",
                "-set_serial", "4242", "-days", "10", "-sha384", "-extfile", "ca.cnf",
                "-extensions", "int_ext", "-out", "int.pem")
        (d / "chain.pem").write_bytes((d / "int.pem").read_bytes() + (d / "root.pem").read_bytes())
        pki = Pki(d, d / "root.pem", d / "int.pem", d / "int.key", d / "chain.pem")
        assert isinstance(pki.root.public_key(), ec.EllipticCurvePublicKey)
        assert pki.root.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
        assert pki.intermediate.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
        yield pki
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def base_config(tmp: Path, **server: Any) -> dict[str, Any]:
    return {
        "trust_domain": TD,
        "data_dir": str(tmp / "srv"),
        "server": {
            "bind_address": "127.0.0.1", "agent_api_port": 0, "grpc_port": 0, "health_enabled": False,
            "admin_socket_path": str(tmp / "admin.sock"), **server,
        },
    }


@asynccontextmanager
async def running_server(cfg: ServerConfig) -> AsyncIterator[Server]:
    srv = Server(cfg)
    await asyncio.wait_for(srv.start(), STEP_TIMEOUT)
    try:
        yield srv
    finally:
        await asyncio.wait_for(srv.stop(), STEP_TIMEOUT)


@asynccontextmanager
async def running_agent(tmp: Path, name: str, port: int, root_pem: Path, token: str) -> AsyncIterator[Agent]:
    agent = Agent(agent_config_from_dict({
        "trust_domain": TD,
        "data_dir": str(tmp / f"agent-{name}"),
        "server_address": [f"127.0.0.1:{port}"],
        "trust_bundle_path": str(root_pem),
        "socket_path": str(tmp / f"{name}.sock"),
        "sync_interval": 1,
        "health": {"enabled": False},
        "workload_attestors": {"systemd": False},
        "node_attestor": {"join_token": {"token": token}},
    }, f"agent {name}"))
    await asyncio.wait_for(agent.start(), STEP_TIMEOUT)
    try:
        yield agent
    finally:
        await asyncio.wait_for(agent.stop(), STEP_TIMEOUT)


async def admin_call(srv: Server, method: str, path: str, body: Any = None) -> Any:
    async with AdminClient(srv.config.admin_socket_path) as client:
        return await asyncio.wait_for(client.call(method, path, body), STEP_TIMEOUT)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- 1. server run + openssl upstream
def read_text(path: Path) -> str:
    return path.read_text(errors="replace")


async def wait_ready(proc: asyncio.subprocess.Process, health_port: int, log: Path) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                pytest.fail(f"meshid server run exited {proc.returncode}:\n{read_text(log)}")
            with suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"http://127.0.0.1:{health_port}/ready") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    pytest.fail(f"server not ready within {STEP_TIMEOUT}s:\n{read_text(log)}")


async def test_server_run_with_openssl_upstream_issues_svids_openssl_verifies(
    short_tmp: Path, upstream_pki: Pki
) -> None:
    secret_file = short_tmp / "master.secret"
    write_secret(secret_file, "acceptance-master-secret-0123456789")
    agent_port, grpc_port, health_port = free_port(), free_port(), free_port()
    admin = short_tmp / "admin.sock"
    config = short_tmp / "server.toml"
    config.write_text(textwrap.dedent(f"""\
        trust_domain = "{TD}"
        data_dir = "{short_tmp / 'srv'}"

        [server]
        bind_address = "127.0.0.1"
        agent_api_port = {agent_port}
        grpc_port = {grpc_port}
        health_port = {health_port}
        admin_socket_path = "{admin}"
        master_secret_file = "{secret_file}"

        [upstream.disk]
        cert_file = "{upstream_pki.chain_pem}"
        key_file = "{upstream_pki.int_key}"
        bundle_file = "{upstream_pki.root_pem}"
        """))
    log = short_tmp / "server.log"
    with log.open("wb") as log_fh:
        proc = await asyncio.create_subprocess_exec(
            *MESHID, "server", "run", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=log_fh, stderr=log_fh, env=clean_env(),
        )
    try:
        await wait_ready(proc, health_port, log)

        # The trust bundle is the root alone: exactly one certificate, equal to root.pem.
        out = ok(await meshid("bundle", "show", "--format", "pem", "--server-socket", str(admin)))
        certs = x509.load_pem_x509_certificates(out.encode())
        assert len(certs) == 1
        assert der(certs[0]) == der(upstream_pki.root)
        assert out.count("BEGIN CERTIFICATE") == 1
        # The SPIFFE form agrees: one x509-svid key, the root; JWT keys alongside.
        doc = json.loads(ok(await meshid("bundle", "show", "--format", "spiffe",
                                         "--server-socket", str(admin))))
        x5c = [k["x5c"] for k in doc["keys"] if k["use"] == "x509-svid"]
        assert x5c == [[b64(der(upstream_pki.root))]]
        assert any(k["use"] == "jwt-svid" and k.get("kid") for k in doc["keys"])

        # Join token and entry via the CLI (admin socket found through MESHID_SERVER_SOCKET).
        env = clean_env(MESHID_SERVER_SOCKET=str(admin))
        token = json.loads(ok(await meshid("token", "create", env=env)))
        assert token["agent_id"].startswith(f"spiffe://{TD}/meshid/agent/join_token/")
        entry = json.loads(ok(await meshid(
            "entry", "create", "--spiffe-id", WORKLOAD_ID, "--parent-id", token["agent_id"],
            "--selector", f"unix:uid:{os.getuid()}", env=env,
        )))
        assert entry["spiffe_id"] == WORKLOAD_ID and entry["id"]

        async with running_agent(short_tmp, "a", agent_port, upstream_pki.root_pem, token["token"]) as agent:
            assert str(agent.node.agent_id) == token["agent_id"]
            out_dir = short_tmp / "svid"
            sock = f"unix://{agent.config.socket_path}"
            deadline = time.monotonic() + STEP_TIMEOUT
            while True:
                fetched = await meshid("fetch", "x509", "--socket", sock, "--write", str(out_dir))
                if fetched.returncode == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert WORKLOAD_ID in ok(fetched)

        chain = x509.load_pem_x509_certificates((out_dir / "svid.pem").read_bytes())
        # leaf + issuer CA + upstream intermediate; the root never rides in the chain
        assert len(chain) == 3
        assert der(chain[2]) == der(upstream_pki.intermediate)
        assert der(upstream_pki.root) not in [der(c) for c in chain]
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == [WORKLOAD_ID]
        bundle = x509.load_pem_x509_certificates((out_dir / "bundle.pem").read_bytes())
        assert [der(c) for c in bundle] == [der(upstream_pki.root)]
        assert stat.S_IMODE((out_dir / "svid.key").stat().st_mode) == 0o600

        (short_tmp / "leaf.pem").write_bytes(pem(chain[:1]))
        (short_tmp / "chain.pem").write_bytes(pem(chain[1:]))
        verify = await run_cmd("openssl", "verify", "-x509_strict", "-CAfile", str(upstream_pki.root_pem),
                               "-untrusted", str(short_tmp / "chain.pem"), str(short_tmp / "leaf.pem"))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "leaf.pem: OK" in verify.stdout
        # Without the intermediates the leaf does not verify: the chain is what makes it work.
        alone = await run_cmd("openssl", "verify", "-CAfile", str(upstream_pki.root_pem),
                              str(short_tmp / "leaf.pem"))
        assert alone.returncode != 0

        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), STEP_TIMEOUT)
        assert rc == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --------------------------------------------------------------------------- 3. node authorization
async def test_agent_is_refused_entries_of_another_node(short_tmp: Path, master_secret: str) -> None:
    cfg = server_config_from_dict(base_config(short_tmp), env={})
    async with running_server(cfg) as srv:
        root_pem = short_tmp / "root.pem"
        root_pem.write_bytes(srv.ca.bundle.x509_pem())
        tok_a = await admin_call(srv, "POST", "/v1/tokens", {})
        tok_b = await admin_call(srv, "POST", "/v1/tokens", {})
        uid_sel = [f"unix:uid:{os.getuid()}"]
        entry_a = await admin_call(srv, "POST", "/v1/entries", {
            "spiffe_id": f"spiffe://{TD}/node-a/web", "parent_id": tok_a["agent_id"], "selectors": uid_sel})
        entry_b = await admin_call(srv, "POST", "/v1/entries", {
            "spiffe_id": f"spiffe://{TD}/node-b/db", "parent_id": tok_b["agent_id"], "selectors": uid_sel})

        async with running_agent(short_tmp, "a", srv.agent_api_port, root_pem, tok_a["token"]) as agent_a, \
                running_agent(short_tmp, "b", srv.agent_api_port, root_pem, tok_b["token"]) as agent_b:
            assert str(agent_a.node.agent_id) == tok_a["agent_id"]
            assert str(agent_b.node.agent_id) == tok_b["agent_id"]

            csr = b64(csr_for(new_key()))
            results = await asyncio.wait_for(agent_a.client.sign_x509([
                {"entry_id": entry_b["id"], "csr": csr},
                {"entry_id": entry_a["id"], "csr": csr},
            ]), STEP_TIMEOUT)
            refused, granted = results
            assert refused["entry_id"] == entry_b["id"]
            assert refused["error"]["code"] == "permission_denied"
            assert "svid" not in refused
            assert granted["entry_id"] == entry_a["id"] and granted["svid"]  # control: own entry signs

            with pytest.raises(PermissionDeniedError):
                await asyncio.wait_for(agent_a.client.sign_jwt(entry_b["id"], ["aud"]), STEP_TIMEOUT)
            # An unknown entry id is refused the same way (no existence oracle).
            unknown = await asyncio.wait_for(agent_a.client.sign_x509(
                [{"entry_id": "no-such-entry", "csr": csr}]), STEP_TIMEOUT)
            assert "svid" not in unknown[0]

            sync_a = await asyncio.wait_for(agent_a.client.sync({}, -1), STEP_TIMEOUT)
            ids_a = {e["id"] for e in sync_a["entries"]}
            assert ids_a == {entry_a["id"]}
            sync_b = await asyncio.wait_for(agent_b.client.sync({}, -1), STEP_TIMEOUT)
            assert {e["id"] for e in sync_b["entries"]} == {entry_b["id"]}
            # Claiming to know B's entry gets it listed as removed, never sent.
            sync_a2 = await asyncio.wait_for(agent_a.client.sync({entry_b["id"]: 1}, -1), STEP_TIMEOUT)
            assert entry_b["id"] in sync_a2["removed"]
            assert entry_b["id"] not in {e["id"] for e in sync_a2["entries"]}
            # A's own cache holds its entry and never B's; B's the other way round.
            assert entry_a["id"] in agent_a.cache.entries and entry_b["id"] not in agent_a.cache.entries
            assert entry_b["id"] not in agent_a.cache.svids
            assert entry_b["id"] in agent_b.cache.entries and entry_a["id"] not in agent_b.cache.entries


# --------------------------------------------------------------------------- 4. join tokens
async def attest_raw(srv: Server, token: str) -> tuple[int, dict[str, Any]]:
    ctx = client_context(srv.ca.bundle.x509_authorities)
    body = {"attestor": "join_token", "payload": {"token": token}, "csr": b64(csr_for(new_key()))}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT)) as http:
        url = f"https://127.0.0.1:{srv.agent_api_port}/v1/agent/attest"
        async with http.post(url, json=body, ssl=ctx) as r:
            return r.status, await r.json(content_type=None)


def datastore_dump(path: str) -> str:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return "\n".join(conn.iterdump())


def raw_datastore_bytes(path: str) -> bytes:
    files = [Path(path + suffix) for suffix in ("", "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


async def test_join_token_single_use_expiring_and_stored_hashed(short_tmp: Path, master_secret: str) -> None:
    cfg = server_config_from_dict(base_config(short_tmp), env={})
    async with running_server(cfg) as srv:
        created = await admin_call(srv, "POST", "/v1/tokens", {"ttl": 600})
        token = created["token"]
        dsn = cfg.dsn

        # Stored as its SHA-256 only: the plaintext is nowhere in the datastore.
        with sqlite3.connect(f"file:{dsn}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT token_hash, token_id FROM join_tokens").fetchall()
        assert rows == [(hashlib.sha256(token.encode()).hexdigest(), created["token_id"])]
        assert token not in datastore_dump(dsn)
        assert token.encode() not in raw_datastore_bytes(dsn)

        status, body = await attest_raw(srv, token)
        assert status == 200, body
        assert body["agent_id"] == created["agent_id"] and body["svid"]

        # Reused: refused.
        status, body = await attest_raw(srv, token)
        assert status == 401
        assert body["error"]["code"] == "attestation_failed"
        reused_message = body["error"]["message"]
        assert token not in reused_message

        # Expired: refused with the same answer (no oracle telling used from expired).
        expired = new_token(60, now=time.time() - 3600)
        assert srv.ds is not None
        await srv.ds.create_join_token(expired.token_hash, expired.token_id, expired.expires_at)
        status, body = await attest_raw(srv, expired.token)
        assert status == 401 and body["error"]["code"] == "attestation_failed"
        assert body["error"]["message"] == reused_message
        # Unknown: same.
        status, body = await attest_raw(srv, "never-issued-token")
        assert status == 401 and body["error"]["message"] == reused_message

        assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
        for plain in (token, expired.token):
            assert plain not in datastore_dump(dsn)
            assert plain.encode() not in raw_datastore_bytes(dsn)


# --------------------------------------------------------------------------- 5. TLS 1.3 only
def tls_client(max_version: ssl.TLSVersion, roots: Any = None, identity: Any = None) -> ssl.SSLContext:
    if identity is not None:
        ctx = client_context(roots, *identity)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        if roots is not None:
            ctx.load_verify_locations(cadata=pem(list(roots)).decode())
        else:
            ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = min(max_version, ssl.TLSVersion.TLSv1_3)
    ctx.maximum_version = max_version
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext) -> str:
    """TLS version negotiated with 127.0.0.1:port; raises on a failed handshake."""
    connect = asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    _reader, writer = await asyncio.wait_for(connect, STEP_TIMEOUT)
    try:
        version = writer.get_extra_info("ssl_object").version()
        return str(version)
    finally:
        writer.close()
        with suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), STEP_TIMEOUT)


async def test_tls_listeners_refuse_tls12_and_accept_tls13(short_tmp: Path, master_secret: str) -> None:
    cfg = server_config_from_dict(base_config(short_tmp), env={})
    async with running_server(cfg) as srv:
        roots = srv.ca.bundle.x509_authorities
        # A client SVID, so the mutual-TLS gRPC listener has nothing else to object to.
        key = ec.generate_private_key(ec.SECP256R1())
        active = srv.ca.x509_active
        assert active.minter is not None
        leaf = active.minter.mint_from_public_key(
            key.public_key(), SpiffeId.parse(f"spiffe://{TD}/probe"), [], 600,
            dt.datetime.fromtimestamp(srv.clock(), dt.UTC),
        )
        identity = (list(svid_chain(active, leaf)), key)
        assert srv.grpc_port_bound > 0
        listeners = {"agent API": srv.agent_api_port, "gRPC Entry API": srv.grpc_port_bound}
        for name, port in listeners.items():
            for ctx in (tls_client(ssl.TLSVersion.TLSv1_2),
                        tls_client(ssl.TLSVersion.TLSv1_2, roots, identity)):
                # asyncio's TLS server closes without flushing the protocol_version alert, so the
                # client sees an SSL EOF or a reset; TLS 1.3 with the same material succeeds below.
                with pytest.raises((ssl.SSLError, ConnectionResetError)):
                    await handshake(port, ctx)
            tls13 = tls_client(ssl.TLSVersion.TLSv1_3, roots, identity)
            assert await handshake(port, tls13) == "TLSv1.3", name
        # TLS 1.3 without a client certificate also works where the agent API allows it (attestation).
        assert await handshake(srv.agent_api_port, tls_client(ssl.TLSVersion.TLSv1_3, roots)) == "TLSv1.3"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT)) as http:
            tls13 = tls_client(ssl.TLSVersion.TLSv1_3, roots)
            async with http.get(f"https://127.0.0.1:{srv.agent_api_port}/v1/bundle", ssl=tls13) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"https://127.0.0.1:{srv.agent_api_port}/v1/bundle",
                               ssl=tls_client(ssl.TLSVersion.TLSv1_2))


# --------------------------------------------------------------------------- 6. admin socket
_AS_NOBODY = r"""
import os, socket, sys
admin, control = sys.argv[1], sys.argv[2]
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert os.getuid() == 65534 and os.geteuid() == 65534
# Control: the directory is reachable for nobody (a 0666 socket next to it connects).
c = socket.socket(socket.AF_UNIX)
c.settimeout(5)
c.connect(control)
c.close()
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(admin)
except PermissionError:
    print("PermissionError")
    sys.exit(0)
# If it connected, say what it could do.
s.sendall(b"GET /v1/entries HTTP/1.1\r\nHost: meshid\r\nConnection: close\r\n\r\n")
print("CONNECTED", s.recv(200).decode(errors="replace"))
sys.exit(1)
"""

_HTTP_AS_NOBODY = r"""
import os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/entries HTTP/1.1\r\nHost: meshid\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode(errors="replace"))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
async def test_admin_socket_is_0600_and_refuses_other_uids(short_tmp: Path, master_secret: str) -> None:
    cfg = server_config_from_dict(base_config(short_tmp), env={})
    async with running_server(cfg) as srv:
        path = Path(srv.config.admin_socket_path)
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        # The owner can use it.
        assert "entries" in await admin_call(srv, "GET", "/v1/entries")

        control = socket.socket(socket.AF_UNIX)
        control_path = short_tmp / "control.sock"
        control.bind(str(control_path))
        os.chmod(control_path, 0o666)
        control.listen(1)
        try:
            run = await run_cmd(sys.executable, "-c", _AS_NOBODY, str(path), str(control_path))
        finally:
            control.close()
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.strip() == "PermissionError"

        # Defence in depth: even if the mode were loosened, SO_PEERCRED refuses another uid.
        os.chmod(path, 0o666)
        try:
            run = await run_cmd(sys.executable, "-c", _HTTP_AS_NOBODY, str(path))
        finally:
            os.chmod(path, 0o600)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("HTTP/1.1 403"), run.stdout
        assert "permission_denied" in run.stdout


# --------------------------------------------------------------------------- 7. master secret
SECRET_A = "first-master-secret-aaaaaaaaaaaaaaaa"
SECRET_B = "wrong-master-secret-bbbbbbbbbbbbbbbb"
SECRET_C = "rewrapped-master-secret-cccccccccccc"


def _server_toml(tmp: Path, data: dict[str, Any], secret_file: Path, server_lines: str = "") -> Path:
    """The server config file the CLI reads for `data`, its secret in `secret_file`."""
    toml = tmp / "server.toml"
    toml.write_text(
        f'trust_domain = "{TD}"\ndata_dir = "{data["data_dir"]}"\n[server]\n{server_lines}'
        f'admin_socket_path = "{data["server"]["admin_socket_path"]}"\n'
        f'master_secret_file = "{secret_file}"\n'
    )
    return toml


async def test_master_secret_protects_keys_and_rewrap_changes_it(short_tmp: Path) -> None:
    secret_file = short_tmp / "master.secret"
    write_secret(secret_file, SECRET_A)
    data = base_config(short_tmp, grpc_enabled=False, master_secret_file=str(secret_file))
    cfg = server_config_from_dict(data, env={})
    toml = _server_toml(short_tmp, data, secret_file, textwrap.dedent("""\
        bind_address = "127.0.0.1"
        agent_api_port = 0
        grpc_enabled = false
        health_enabled = false
        """))

    async with running_server(cfg) as srv:
        keys = {lk.key_id: lk.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()) for lk in srv.ca.keys()}
        x509_key_id = srv.ca.x509_active.key_id
        bundle_pem = srv.ca.bundle.x509_pem()
    assert len(keys) == 2

    # At rest: the sealed blobs hold no PKCS#8, open only under the right secret.
    ds = await open_datastore(cfg.dsn)
    try:
        records = await ds.list_ca_keys()
    finally:
        await ds.close()
    assert {r.key_id for r in records} == set(keys)
    raw = raw_datastore_bytes(cfg.dsn)
    for r in records:
        pkcs8 = keys[r.key_id]
        assert pkcs8 not in r.sealed_key
        assert pkcs8 not in raw
        assert KeySealer(SECRET_A.encode()).unseal(r.sealed_key, r.key_id.encode()) == pkcs8
        with pytest.raises(SealError):
            KeySealer(SECRET_B.encode()).unseal(r.sealed_key, r.key_id.encode())

    # Wrong secret: start-up fails with a named error naming the master secret, not the secret.
    write_secret(secret_file, SECRET_B)
    with pytest.raises(SealError) as info:
        await asyncio.wait_for(Server(cfg).start(), STEP_TIMEOUT)
    assert isinstance(info.value, MeshidError)
    assert "master secret" in str(info.value)
    assert SECRET_B not in str(info.value) and SECRET_A not in str(info.value)
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):  # nothing left listening
        await asyncio.wait_for(asyncio.open_unix_connection(cfg.admin_socket_path), STEP_TIMEOUT)

    run = await meshid("server", "run", "--config", str(toml))
    assert run.returncode != 0
    assert "master secret" in run.stderr
    for secret in (SECRET_A, SECRET_B):
        assert secret not in run.stdout + run.stderr

    # Rewrap with the wrong current secret changes nothing.
    new_file = short_tmp / "new.secret"
    write_secret(new_file, SECRET_C)
    run = await meshid("server", "rewrap", "--config", str(toml), "--new-secret-file", str(new_file))
    assert run.returncode != 0 and "master secret" in run.stderr

    # Rewrap with the right one re-encrypts every key under the new secret.
    write_secret(secret_file, SECRET_A)
    run = await meshid("server", "rewrap", "--config", str(toml), "--new-secret-file", str(new_file))
    assert "re-encrypted 2 CA keys" in ok(run)
    assert SECRET_A not in run.stdout + run.stderr and SECRET_C not in run.stdout + run.stderr

    # The old secret no longer opens them ...
    with pytest.raises(SealError):
        await asyncio.wait_for(Server(cfg).start(), STEP_TIMEOUT)
    # ... the new one does, and they are the same keys (nothing regenerated).
    write_secret(secret_file, SECRET_C)
    async with running_server(cfg) as srv:
        assert srv.ca.x509_active.key_id == x509_key_id
        assert srv.ca.bundle.x509_pem() == bundle_pem
        assert {lk.key_id for lk in srv.ca.keys()} == set(keys)


async def test_rewrap_refuses_while_the_server_runs(short_tmp: Path) -> None:
    """A running server seals the CA keys it makes next under the old secret: after a rewrap
    neither secret would open every key, and the server could not start again."""
    secret_file, new_file = short_tmp / "master.secret", short_tmp / "new.secret"
    write_secret(secret_file, SECRET_A)
    write_secret(new_file, SECRET_C)
    data = base_config(short_tmp, grpc_enabled=False, master_secret_file=str(secret_file))
    cfg = server_config_from_dict(data, env={})
    toml = _server_toml(short_tmp, data, secret_file)

    # No new secret given: the message names the flags (it named the config keys).
    run = await meshid("server", "rewrap", "--config", str(toml))
    assert run.returncode == 1 and "--new-secret-file or --new-secret-env" in run.stderr, run.stderr

    async with running_server(cfg):
        run = await meshid("server", "rewrap", "--config", str(toml), "--new-secret-file", str(new_file))
        assert run.returncode == 1 and "the server is running" in run.stderr, run.stderr
    ds = await open_datastore(cfg.dsn)
    try:
        records = await ds.list_ca_keys()
    finally:
        await ds.close()
    assert records
    for r in records:  # untouched: still sealed under the server's secret
        KeySealer(SECRET_A.encode()).unseal(r.sealed_key, r.key_id.encode())
