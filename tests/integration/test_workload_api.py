"""The SPIFFE Workload API served by a real agent to real clients: py-spiffe, spiffe-tls,
processes running as other uids, openssl as the independent chain verifier."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from spiffe import SpiffeId as PySpiffeId
from spiffe import WorkloadApiClient, X509Source
from waiting import wait_for

from meshid.cli.dev import DevStack
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from workload_api._gen import workload_grpc, workload_pb2

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
HEADER = {"workload.spiffe.io": "true"}


async def run_as(uid: int, sock: str, mode: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "workload_proc.py"),
        str(uid),
        sock,
        mode,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert lines, f"workload process printed nothing (rc={proc.returncode}): {err.decode()[-2000:]}"
    return json.loads(lines[-1])


async def add_entry(stack: DevStack, path: str, uid: int) -> Entry:
    agent_id = stack.agent.node.agent_id
    assert agent_id is not None
    entry = await stack.server.entries.create(
        Entry("", SpiffeId(stack.server.td, path), agent_id, (Selector("unix", f"uid:{uid}"),))
    )
    stack.agent.manager.poke()
    # A workload asking before the agent's next sync would be refused (PERMISSION_DENIED).
    await wait_for(lambda: entry.id in stack.agent.cache.svids, 20, f"the agent to hold an SVID for {path}")
    return entry


def openssl_verify(tmp: Path, chain_der: bytes, bundle_der: bytes) -> subprocess.CompletedProcess[str]:
    from meshid.der import load_der_certificates

    chain = load_der_certificates(chain_der)
    roots = load_der_certificates(bundle_der)
    pem = lambda cs: b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)  # noqa: E731
    (tmp / "leaf.pem").write_bytes(pem(chain[:1]))
    (tmp / "chain.pem").write_bytes(pem(chain[1:]))
    (tmp / "root.pem").write_bytes(pem(roots))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp / "root.pem"),
            "-untrusted",
            str(tmp / "chain.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_py_spiffe_client_gets_verified_identity(dev_stack: DevStack, short_tmp: Path) -> None:
    sock = f"unix://{dev_stack.socket_path}"

    def client_calls() -> dict[str, Any]:
        client = WorkloadApiClient(socket_path=sock)
        try:
            svid = client.fetch_x509_svid()
            ctx = client.fetch_x509_context()
            jwt_svid = client.fetch_jwt_svid(audience={"svc-a"})
            validated = client.validate_jwt_svid(jwt_svid.token, "svc-a")
            jwt_bundles = client.fetch_jwt_bundles()
            return {
                "svid": svid,
                "ctx": ctx,
                "jwt": jwt_svid,
                "validated": validated,
                "jwt_bundles": jwt_bundles,
            }
        finally:
            client.close()

    got = await asyncio.to_thread(client_calls)
    svid = got["svid"]
    assert str(svid.spiffe_id) == str(dev_stack.spiffe_id)
    assert len(svid.cert_chain) == 3  # leaf, meshid CA, upstream intermediate
    bundle = got["ctx"].x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    roots = list(bundle.x509_authorities)
    assert len(roots) == 1 and roots[0].subject == roots[0].issuer  # roots only
    chain_der = b"".join(c.public_bytes(serialization.Encoding.DER) for c in svid.cert_chain)
    res = openssl_verify(short_tmp, chain_der, roots[0].public_bytes(serialization.Encoding.DER))
    assert res.returncode == 0, res.stderr
    assert str(got["jwt"].spiffe_id) == str(dev_stack.spiffe_id)
    assert str(got["validated"].spiffe_id) == str(dev_stack.spiffe_id)
    assert got["jwt_bundles"].get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) is not None


@pytest.mark.parametrize("key_type", ["rsa-2048", "ec-p384"])
async def test_workload_key_type_is_the_configured_one(short_tmp: Path, key_type: str) -> None:
    """`workload_x509_svid_key_type` (SPIRE's option): py-spiffe gets an SVID over a key of
    that type, its own, and openssl verifies the chain."""
    from meshid.cli.dev import start_dev

    stack = await start_dev(short_tmp / "d", socket=str(short_tmp / "s" / "api.sock"),
                            agent_overrides={"workload_x509_svid_key_type": key_type})
    try:
        def fetch() -> Any:
            client = WorkloadApiClient(socket_path=f"unix://{stack.socket_path}")
            try:
                return client.fetch_x509_context()
            finally:
                client.close()

        ctx = await asyncio.to_thread(fetch)
    finally:
        await stack.stop()
    svid = ctx.default_svid
    key = svid.private_key
    if key_type == "rsa-2048":
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert svid.leaf.public_key().public_numbers() == key.public_key().public_numbers()
    roots = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain).x509_authorities
    chain_der = b"".join(c.public_bytes(serialization.Encoding.DER) for c in svid.cert_chain)
    res = openssl_verify(short_tmp, chain_der, next(iter(roots)).public_bytes(serialization.Encoding.DER))
    assert res.returncode == 0, res.stderr


async def _status(sock: str, metadata: Any) -> Status:
    ch = Channel(path=sock)
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(ch)
        async with stub.FetchX509SVID.open(metadata=metadata, timeout=10) as st:
            await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
            await st.recv_message()
            await st.cancel()
        return Status.OK
    except GRPCError as exc:
        return exc.status
    finally:
        ch.close()


async def test_security_header_and_permission(dev_stack: DevStack) -> None:
    sock = dev_stack.socket_path
    assert await _status(sock, None) == Status.INVALID_ARGUMENT
    assert await _status(sock, {"workload.spiffe.io": "false"}) == Status.INVALID_ARGUMENT
    assert (
        await _status(sock, [("workload.spiffe.io", "true"), ("workload.spiffe.io", "true")])
        == Status.INVALID_ARGUMENT
    )
    assert await _status(sock, HEADER) == Status.OK
    # A process of another uid with no entry: PermissionDenied, bundles included (as SPIRE).
    res = await run_as(65534, sock, "status")
    assert res == {"uid": 65534, "status": "PERMISSION_DENIED"}
    res = await run_as(65534, sock, "bundles")
    assert res == {"uid": 65534, "x509": "PERMISSION_DENIED", "jwt": "PERMISSION_DENIED"}


async def test_allow_unauthenticated_verifiers_releases_the_own_bundle(short_tmp: Path) -> None:
    from meshid.cli.dev import start_dev

    stack = await start_dev(
        short_tmp / "d",
        "example.org",
        str(short_tmp / "s" / "api.sock"),
        svid_ttl=3600,
        agent_overrides={"allow_unauthenticated_verifiers": True},
    )
    try:
        sock = stack.socket_path
        res = await run_as(65534, sock, "bundles")
        own = ["spiffe://example.org"]
        assert res == {"uid": 65534, "x509": own, "jwt": own}, res
        # Bundles only: there is still no SVID for it.
        assert await run_as(65534, sock, "status") == {"uid": 65534, "status": "PERMISSION_DENIED"}
    finally:
        await stack.stop()


async def test_socket_mode_lets_any_user_connect_but_not_replace(dev_stack: DevStack) -> None:
    p = Path(dev_stack.socket_path)
    assert p.stat().st_mode & 0o777 == 0o777
    assert p.parent.stat().st_mode & 0o022 == 0  # nobody else can replace the socket


def _jwt_for(
    key: Any, kid: str | None, alg: str, sub: str, aud: str, exp_delta: int = 300, typ: str | None = "JWT"
) -> str:
    headers: dict[str, Any] = {}
    if kid is not None:
        headers["kid"] = kid
    if typ is not None:
        headers["typ"] = typ
    now = int(time.time())
    return jwt.encode(
        {"sub": sub, "aud": [aud], "exp": now + exp_delta, "iat": now}, key, algorithm=alg, headers=headers
    )


async def test_validate_jwt_svid_refuses_bad_tokens(dev_stack: DevStack) -> None:
    sock = dev_stack.socket_path
    ch = Channel(path=sock)
    stub = workload_grpc.SpiffeWorkloadAPIStub(ch)
    try:
        good = (
            (await stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["aud1"]), metadata=HEADER))
            .svids[0]
            .svid
        )
        header = jwt.get_unverified_header(good)
        sub = str(dev_stack.spiffe_id)
        other = ec.generate_private_key(ec.SECP256R1())
        h, p, s = good.split(".")
        tampered_sig = base64.urlsafe_b64encode(bytes(64)).rstrip(b"=").decode()
        none_token = (
            base64.urlsafe_b64encode(b'{"alg":"none","kid":"' + header["kid"].encode() + b'"}')
            .rstrip(b"=")
            .decode()
            + "."
            + p
            + "."
        )
        bad = {
            "none": none_token,
            "hmac": _jwt_for(b"secret" * 8, header["kid"], "HS256", sub, "aud1"),
            "unknown kid": _jwt_for(other, "nope", "ES256", sub, "aud1"),
            "bad signature": f"{h}.{p}.{tampered_sig}",
            "wrong key same kid": _jwt_for(other, header["kid"], "ES256", sub, "aud1"),
            "wrong audience": good,
            "bad typ": _jwt_for(other, header["kid"], "ES256", sub, "aud1", typ="XYZ"),
            "garbage": "not.a.jwt",
        }
        for name, token in bad.items():
            aud = "other-aud" if name == "wrong audience" else "aud1"
            with pytest.raises(GRPCError) as exc:
                await stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience=aud, svid=token), metadata=HEADER
                )
            assert exc.value.status == Status.INVALID_ARGUMENT, name
        with pytest.raises(GRPCError) as exc:
            await stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="", svid=good), metadata=HEADER
            )
        assert exc.value.status == Status.INVALID_ARGUMENT
        # The agent keeps serving afterwards.
        ok = await stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="aud1", svid=good), metadata=HEADER
        )
        assert ok.spiffe_id == sub
        assert ok.claims.fields["sub"].string_value == sub
    finally:
        ch.close()


async def test_expired_jwt_refused(dev_stack: DevStack) -> None:
    """An expired token signed by the real JWT key (same kid) is refused."""
    active = dev_stack.server.ca.jwt_active
    from issuer.ca.slots import jwt_kid

    token = _jwt_for(active.key, jwt_kid(active), "ES256", str(dev_stack.spiffe_id), "aud1", exp_delta=-5)
    ch = Channel(path=dev_stack.socket_path)
    try:
        with pytest.raises(GRPCError) as exc:
            await workload_grpc.SpiffeWorkloadAPIStub(ch).ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="aud1", svid=token), metadata=HEADER
            )
        assert exc.value.status == Status.INVALID_ARGUMENT
        assert "expired" in (exc.value.message or "")
    finally:
        ch.close()


async def test_validate_cli_prints_a_valid_token_that_expires_past_year_9999(dev_stack: DevStack) -> None:
    active = dev_stack.server.ca.jwt_active
    from issuer.ca.slots import jwt_kid

    token = _jwt_for(active.key, jwt_kid(active), "ES256", str(dev_stack.spiffe_id), "aud1",
                     exp_delta=10**12)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshid.cli.main", "validate", "jwt", "--audience", "aud1", "--token", token,
        "--socket", f"unix://{dev_stack.socket_path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()  # was a traceback: the date is past datetime's range
    assert f"SPIFFE ID:  {dev_stack.spiffe_id}" in out.decode()
    assert "expires:    1" in out.decode()


async def test_x509_source_watches_rotation(short_tmp: Path) -> None:
    from meshid.cli.dev import start_dev

    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=20)
    try:
        source = await asyncio.to_thread(
            X509Source, socket_path=f"unix://{stack.socket_path}", timeout_in_seconds=20
        )
        try:
            first = source.get_x509_context().default_svid.leaf.serial_number
            deadline = time.monotonic() + 40
            while source.get_x509_context().default_svid.leaf.serial_number == first:
                assert time.monotonic() < deadline, "no rotation pushed to the X509Source"
                await asyncio.sleep(0.25)
            svid = source.get_x509_context().default_svid
            assert str(svid.spiffe_id) == str(stack.spiffe_id)
            assert svid.leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)
        finally:
            await asyncio.to_thread(source.close)
    finally:
        await stack.stop()


async def test_mtls_echo_between_workloads_of_different_uids(dev_stack: DevStack) -> None:
    server_e = await add_entry(dev_stack, "/echo-server", 1)
    client_e = await add_entry(dev_stack, "/echo-client", 2)
    rogue_e = await add_entry(dev_stack, "/rogue", 65534)
    sock = dev_stack.socket_path
    for uid, e in ((1, server_e), (2, client_e), (65534, rogue_e)):
        got = await run_as(uid, sock, "fetch")
        assert got["spiffe_id"] == str(e.spiffe_id), got

    async def session(client_uid: int) -> tuple[dict[str, Any], dict[str, Any]]:
        import socket as _s

        with _s.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "workload_proc.py"),
            "1",
            sock,
            "echo-server",
            str(port),
            str(client_e.spiffe_id),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            ready = json.loads(await asyncio.wait_for(server.stdout.readline(), 30))
            assert ready == {"listening": port}
            client = await run_as(client_uid, sock, "echo-client", str(port), str(server_e.spiffe_id))
            out, _ = await asyncio.wait_for(server.communicate(), 30)
            return json.loads(out.decode().strip().splitlines()[-1]), client
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()

    srv, cli = await session(2)
    assert cli.get("reply") == "echo:ping", (srv, cli)
    assert srv.get("served") == "ping", srv
    # A workload whose SPIFFE ID the server does not authorize is refused.
    srv, cli = await session(65534)
    assert "reply" not in cli, cli
    assert "refused" in srv, srv


async def test_fetch_cli_prints_id_and_expiry(dev_stack: DevStack) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshid.cli.main",
        "fetch",
        "x509",
        "--socket",
        f"unix://{dev_stack.socket_path}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert f"SPIFFE ID:  {dev_stack.spiffe_id}" in text
    assert "expires:" in text



async def test_fetch_cli_write_gives_the_key_0600_and_replaces_what_was_there(
    dev_stack: DevStack, short_tmp: Path
) -> None:
    out = short_tmp / "out"
    out.mkdir()
    old_key = out / "svid.key"
    old_key.write_text("an old key")
    old_key.chmod(0o644)  # written in place, the new key kept this mode: world-readable
    victim = short_tmp / "victim"
    victim.write_text("not a bundle")
    (out / "bundle.pem").symlink_to(victim)  # was followed
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshid.cli.main", "fetch", "x509",
        "--socket", f"unix://{dev_stack.socket_path}", "--write", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem", "svid.key", "svid.pem"]  # no temp files
    assert old_key.stat().st_mode & 0o777 == 0o600
    assert (out / "svid.pem").stat().st_mode & 0o777 == 0o644
    assert not (out / "bundle.pem").is_symlink() and victim.read_text() == "not a bundle"
    from cryptography import x509

    key = serialization.load_pem_private_key(old_key.read_bytes(), None)
    leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
    assert x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())


_ = (hashes, os, PySpiffeId)


async def test_dev_takes_a_relative_data_dir_and_socket(short_tmp: Path) -> None:
    """`meshid dev --data-dir dev` failed with "socket_path: must be an absolute path", a key
    the user never gave; the socket it prints is absolute and serves."""
    from meshid.cli.dev import start_dev

    cwd = os.getcwd()
    os.chdir(short_tmp)
    try:
        stack = await start_dev(Path("d"), "example.org", None, svid_ttl=3600)
        try:
            assert stack.socket_path == str(short_tmp / "d" / "agent" / "public" / "api.sock")
        finally:
            await stack.stop()
        stack = await start_dev(Path("d"), "example.org", "s/api.sock", svid_ttl=3600)
    finally:
        os.chdir(cwd)
    try:
        assert stack.socket_path == str(short_tmp / "s" / "api.sock")
        assert await _status(stack.socket_path, HEADER) == Status.OK
    finally:
        await stack.stop()
