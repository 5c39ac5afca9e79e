"""The Delegated Identity API on the agent's admin socket, called exactly as Cilium's agent
calls it (SubscribeToX509SVIDs with cilium:mutual-auth, SubscribeToX509Bundles), against a
real server + agent; other uids are played by subprocesses that drop to `nobody`.

Entry layout: Cilium's operator parents `spiffe://<td>/identity/N` to
`spiffe://<td>/cilium-operator`, itself a workload entry under the agents' node alias. A
join-token dev agent has no node selectors, so no node alias can match it (an entry needs
at least one selector); the identity entries are parented to the agent ID directly, which
is what the operator's layout amounts to for this agent. The operator's exact nesting
(/identity/N under /cilium-operator) is covered by `test_identities_nested_under_cilium_operator`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2.exceptions import StreamClosedError
from stream_reader import StreamReader
from waiting import wait_for

from meshid._gen.spire.api.types import selector_pb2
from meshid.cli.dev import DevStack, start_dev
from meshid.der import load_der_certificates
from meshid.entry import Entry
from meshid.jwtsvid import MAX_AUDIENCE_LENGTH
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from workload_api._gen.spire.api.agent.delegatedidentity.v1 import delegatedidentity_grpc
from workload_api._gen.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb

pytestmark = pytest.mark.integration

TD = "example.org"
TIMEOUT = 20
NOBODY = 65534
CILIUM = Selector("cilium", "mutual-auth")
CILIUM_PB = selector_pb2.Selector(type="cilium", value="mutual-auth")
ME = f"spiffe://{TD}/user/{pwd.getpwuid(os.getuid()).pw_name}"  # start_dev registers the test's uid

# A delegate that is not authorized: imports as root, then drops to `uid` (the venv's
# interpreter lives under /root, which other uids cannot read) and subscribes like Cilium.
CLIENT = """
import asyncio, json, os, sys
import grpclib.client
from grpclib.exceptions import GRPCError
from h2.exceptions import StreamClosedError
from meshid._gen.spire.api.types import selector_pb2
from workload_api._gen.spire.api.agent.delegatedidentity.v1 import delegatedidentity_grpc
from workload_api._gen.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb

uid, sock = int(sys.argv[1]), sys.argv[2]
os.setgroups([]); os.setgid(uid); os.setuid(uid)

async def main():
    ch = grpclib.client.Channel(path=sock)
    try:
        stub = delegatedidentity_grpc.DelegatedIdentityStub(ch)
        cilium = selector_pb2.Selector(type="cilium", value="mutual-auth")
        req = pb.SubscribeToX509SVIDsRequest(selectors=[cilium])
        async with stub.SubscribeToX509SVIDs.open(timeout=20) as st:
            await st.send_message(req, end=True)
            await st.recv_message()
            await st.cancel()
        return {"status": "OK", "uid": os.getuid()}
    except GRPCError as exc:
        return {"status": exc.status.name, "message": exc.message, "uid": os.getuid()}
    finally:
        ch.close()

print(json.dumps(asyncio.run(main())), flush=True)
"""


@pytest.fixture
async def stack(short_tmp: Path) -> AsyncIterator[DevStack]:
    overrides = {
        "admin_socket_path": str(short_tmp / "a" / "admin.sock"),
        "authorized_delegates": [ME],  # this test process plays cilium-agent
    }
    s = await start_dev(short_tmp / "d", TD, str(short_tmp / "s" / "api.sock"), svid_ttl=3600,
                        agent_overrides=overrides)
    try:
        yield s
    finally:
        await s.stop()


def admin_socket(stack: DevStack) -> str:
    return stack.agent.config.admin_socket_path


async def add(stack: DevStack, path: str, selectors: tuple[Selector, ...] = (CILIUM,),
              parent: str | None = None, **kw: Any) -> Entry:
    agent_id = stack.agent.node.agent_id
    assert agent_id is not None
    entry = await stack.server.entries.create(Entry(
        "", SpiffeId(stack.server.td, path), SpiffeId.parse(parent) if parent else agent_id, selectors, **kw))
    stack.agent.manager.poke()
    return entry


@contextlib.asynccontextmanager
async def delegated(stack: DevStack) -> AsyncIterator[delegatedidentity_grpc.DelegatedIdentityStub]:
    ch = Channel(path=admin_socket(stack))
    try:
        yield delegatedidentity_grpc.DelegatedIdentityStub(ch)
    finally:
        ch.close()


@contextlib.asynccontextmanager
async def subscribe(method: Any, req: Any) -> AsyncIterator[StreamReader]:
    finished = False
    try:
        async with method.open(timeout=120) as st:
            await st.send_message(req, end=True)
            messages = StreamReader(st)
            try:
                yield messages
                finished = True
            finally:
                await messages.close()
                with contextlib.suppress(StreamClosedError):  # the server may have ended it already
                    await st.cancel()
    except GRPCError:
        # A status the test already read through `messages` is raised again on exit.
        if not finished:
            raise


def by_path(msg: pb.SubscribeToX509SVIDsResponse) -> dict[str, pb.X509SVIDWithKey]:
    return {s.x509_svid.id.path: s for s in msg.x509_svids}


def leaf_of(svid: pb.X509SVIDWithKey) -> x509.Certificate:
    """What Cilium does: the first non-CA certificate of cert_chain is the leaf."""
    certs = [x509.load_der_x509_certificate(c) for c in svid.x509_svid.cert_chain]  # one DER each
    return next(c for c in certs if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)


def check_svid(
    svid: pb.X509SVIDWithKey, path: str, roots: list[x509.Certificate], tmp: Path
) -> x509.Certificate:
    assert svid.x509_svid.id.trust_domain == TD and svid.x509_svid.id.path == path
    leaf = leaf_of(svid)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}{path}"]
    assert svid.x509_svid.expires_at == int(leaf.not_valid_after_utc.timestamp())
    key = serialization.load_der_private_key(svid.x509_svid_key, None)  # PKCS#8 DER, as Cilium parses it
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == \
        leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
    pem = lambda cs: b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)  # noqa: E731
    chain = [x509.load_der_x509_certificate(c) for c in svid.x509_svid.cert_chain]
    (tmp / "root.pem").write_bytes(pem(roots))
    (tmp / "chain.pem").write_bytes(pem(chain[1:]))
    (tmp / "leaf.pem").write_bytes(pem(chain[:1]))
    res = subprocess.run(["openssl", "verify", "-CAfile", str(tmp / "root.pem"), "-untrusted",
                          str(tmp / "chain.pem"), str(tmp / "leaf.pem")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return leaf


async def force_reissue(stack: DevStack, entry: Entry) -> None:
    current = await stack.server.entries.get(entry.id)
    await stack.server.entries.update(current.replace(x509_svid_ttl=current.x509_svid_ttl + 1800))
    stack.agent.manager.poke()


async def expect_status(call: Awaitable[Any], status: Status) -> str:
    with pytest.raises(GRPCError) as err:
        await call
    assert err.value.status == status, err.value
    return err.value.message or ""


async def test_cilium_agent_subscribes_sees_rotation_and_deletion(stack: DevStack, short_tmp: Path) -> None:
    one = await add(stack, "/identity/1001")
    two = await add(stack, "/identity/1002")
    # Never handed out: admin and downstream entries, and an entry needing more selectors.
    await add(stack, "/identity/9001", admin=True)
    await add(stack, "/identity/9002", downstream=True)
    await add(stack, "/identity/9003", selectors=(CILIUM, Selector("k8s", "ns:other")))
    wanted = {"/identity/1001", "/identity/1002"}

    async with delegated(stack) as stub:
        async with subscribe(stub.SubscribeToX509Bundles, pb.SubscribeToX509BundlesRequest()) as bundles:
            first = await bundles.next()  # sent at once
            assert set(first.ca_certificates) == {f"spiffe://{TD}"}
            roots = load_der_certificates(first.ca_certificates[f"spiffe://{TD}"])  # concatenated DER
            assert roots and all(r.subject == r.issuer for r in roots)

        req = pb.SubscribeToX509SVIDsRequest(selectors=[CILIUM_PB])
        async with subscribe(stub.SubscribeToX509SVIDs, req) as svids:
            msg = await svids.until(lambda m: set(by_path(m)) >= wanted)
            got = by_path(msg)
            assert set(got) == wanted
            leaf1 = check_svid(got["/identity/1001"], "/identity/1001", roots, short_tmp)
            leaf2 = check_svid(got["/identity/1002"], "/identity/1002", roots, short_tmp)

            await force_reissue(stack, one)
            def rotated(m: pb.SubscribeToX509SVIDsResponse) -> bool:
                svid = by_path(m).get("/identity/1001")
                return svid is not None and leaf_of(svid).serial_number != leaf1.serial_number

            msg = await svids.until(rotated)
            got = by_path(msg)
            assert set(got) == wanted
            check_svid(got["/identity/1001"], "/identity/1001", roots, short_tmp)
            assert leaf_of(got["/identity/1002"]).serial_number == leaf2.serial_number

            await stack.server.entries.delete(two.id)
            stack.agent.manager.poke()
            msg = await svids.until(lambda m: "/identity/1002" not in by_path(m))
            assert set(by_path(msg)) == {"/identity/1001"}

        jwts = await stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(audience=["peer"], selectors=[CILIUM_PB]))
        assert [s.id.path for s in jwts.svids] == ["/identity/1001"]
        claims = jwt.decode(jwts.svids[0].token, options={"verify_signature": False})
        assert claims["sub"] == f"spiffe://{TD}/identity/1001" and claims["aud"] in ("peer", ["peer"])
        assert jwts.svids[0].issued_at == claims["iat"] and jwts.svids[0].expires_at == claims["exp"]

        async with subscribe(stub.SubscribeToJWTBundles, pb.SubscribeToJWTBundlesRequest()) as jwt_bundles:
            jwks = json.loads((await jwt_bundles.next()).bundles[f"spiffe://{TD}"])
            assert jwks["keys"] and all("kid" in k for k in jwks["keys"])


async def test_the_first_message_waits_for_every_svid(stack: DevStack) -> None:
    """As SPIRE's agent: a subscriber's first message has all its SVIDs (Cilium takes an
    identity missing from it as removed), not those of the first signing batch."""
    one = await add(stack, "/identity/1001")
    two = await add(stack, "/identity/1002")
    await wait_for(lambda: {one.id, two.id} <= stack.agent.cache.svids.keys(), 30, "both SVIDs")
    held = stack.agent.cache.svids.pop(two.id)  # as if not signed yet
    async with delegated(stack) as stub:
        req = pb.SubscribeToX509SVIDsRequest(selectors=[CILIUM_PB])
        async with subscribe(stub.SubscribeToX509SVIDs, req) as svids:
            await svids.quiet(0.3)
            stack.agent.cache.put_svids([held])
            assert set(by_path(await svids.next())) == {"/identity/1001", "/identity/1002"}


async def test_bundle_streams_push_a_bundle_change(stack: DevStack) -> None:
    """Cilium's bundle subscriptions get the whole new bundle when it changes (a CA
    rotation adds a root or a JWT key), not only the first one."""
    from dataclasses import replace

    from pki_helpers import make_ca

    cache = stack.agent.cache
    async with delegated(stack) as stub:
        async with subscribe(stub.SubscribeToX509Bundles, pb.SubscribeToX509BundlesRequest()) as x509s, \
                subscribe(stub.SubscribeToJWTBundles, pb.SubscribeToJWTBundlesRequest()) as jwts:
            first = load_der_certificates((await x509s.next()).ca_certificates[f"spiffe://{TD}"])
            first_jwks = json.loads((await jwts.next()).bundles[f"spiffe://{TD}"])
            held = cache.bundle
            assert held is not None
            extra_root, extra_key = make_ca("rotated root")
            jwt_keys = {**held.jwt_authorities, "rotated": extra_key.public_key()}
            cache.set_bundle(replace(held, x509_authorities=(*held.x509_authorities, extra_root),
                                     jwt_authorities=jwt_keys, sequence=held.sequence + 1))
            pushed = await x509s.until(
                lambda m: len(load_der_certificates(m.ca_certificates[f"spiffe://{TD}"])) == len(first) + 1)
            assert extra_root in load_der_certificates(pushed.ca_certificates[f"spiffe://{TD}"])
            pushed_jwks = await jwts.until(lambda m: "rotated" in m.bundles[f"spiffe://{TD}"].decode())
            kids = {k["kid"] for k in json.loads(pushed_jwks.bundles[f"spiffe://{TD}"])["keys"]}
            assert kids == {k["kid"] for k in first_jwks["keys"]} | {"rotated"}


async def test_authorization_is_rechecked_on_every_update(stack: DevStack) -> None:
    await add(stack, "/identity/1001")
    mine = next(e for e in await stack.server.entries.list() if str(e.spiffe_id) == ME)
    async with delegated(stack) as stub:
        req = pb.SubscribeToX509SVIDsRequest(selectors=[CILIUM_PB])
        async with subscribe(stub.SubscribeToX509SVIDs, req) as svids, \
                subscribe(stub.SubscribeToX509Bundles, pb.SubscribeToX509BundlesRequest()) as bundles:
            await svids.until(lambda m: "/identity/1001" in by_path(m))
            await bundles.next()
            # The delegate loses its own entry: both streams end at the next update.
            await stack.server.entries.delete(mine.id)
            stack.agent.manager.poke()
            for stream in (svids, bundles):
                message = await expect_status(stream.until(lambda m: False), Status.PERMISSION_DENIED)
                assert message == "no identity issued"


async def test_request_validation(stack: DevStack) -> None:
    async with delegated(stack) as stub:
        both = pb.SubscribeToX509SVIDsRequest(selectors=[CILIUM_PB], pid=os.getpid())
        for req in (both, pb.SubscribeToX509SVIDsRequest()):
            async with subscribe(stub.SubscribeToX509SVIDs, req) as svids:
                await expect_status(svids.next(), Status.INVALID_ARGUMENT)
        bad_selector = pb.SubscribeToX509SVIDsRequest(selectors=[selector_pb2.Selector(type="", value="x")])
        async with subscribe(stub.SubscribeToX509SVIDs, bad_selector) as svids:
            await expect_status(svids.next(), Status.INVALID_ARGUMENT)
        no_such_pid = pb.SubscribeToX509SVIDsRequest(pid=2**22 + 12345)  # above the kernel's pid_max
        async with subscribe(stub.SubscribeToX509SVIDs, no_such_pid) as svids:
            await expect_status(svids.next(), Status.INVALID_ARGUMENT)
        await expect_status(stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(selectors=[CILIUM_PB])),
                            Status.INVALID_ARGUMENT)  # no audience
        # Audience bounds come first (without them: PERMISSION_DENIED, nothing is registered).
        too_long = pb.FetchJWTSVIDsRequest(audience=["a" * (MAX_AUDIENCE_LENGTH + 1)], selectors=[CILIUM_PB])
        message = await expect_status(stub.FetchJWTSVIDs(too_long), Status.INVALID_ARGUMENT)
        assert f"at most {MAX_AUDIENCE_LENGTH} characters" in message
        # Nothing is registered for these selectors yet.
        cilium_jwt = pb.FetchJWTSVIDsRequest(audience=["a"], selectors=[CILIUM_PB])
        await expect_status(stub.FetchJWTSVIDs(cilium_jwt), Status.PERMISSION_DENIED)
        # An unknown workload is not an error for a subscription: Cilium subscribes first.
        cilium = pb.SubscribeToX509SVIDsRequest(selectors=[CILIUM_PB])
        async with subscribe(stub.SubscribeToX509SVIDs, cilium) as s:
            assert list((await s.next()).x509_svids) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as nobody")
async def test_pid_is_attested_as_a_workload(stack: DevStack, short_tmp: Path) -> None:
    await add(stack, "/user/nobody", selectors=(Selector("unix", f"uid:{NOBODY}"),))
    nobody_id = SpiffeId.parse(f"spiffe://{TD}/user/nobody")
    await wait_for(lambda: any(s.spiffe_id == nobody_id for s in stack.agent.cache.svids.values()),
        TIMEOUT, "the nobody SVID")
    proc = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sleep", "60", cwd="/")
    try:
        # setpriv execs sleep in the same pid once the uid is dropped.
        comm = Path(f"/proc/{proc.pid}/comm")
        await wait_for(lambda: comm.read_text().strip() == "sleep", TIMEOUT, "setpriv to exec sleep")
        async with delegated(stack) as stub:
            req = pb.SubscribeToX509SVIDsRequest(pid=proc.pid)
            async with subscribe(stub.SubscribeToX509SVIDs, req) as svids:
                msg = await svids.until(lambda m: bool(m.x509_svids))
                assert set(by_path(msg)) == {"/user/nobody"}  # the pid's identity, not the delegate's
            jwts = await stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(audience=["a"], pid=proc.pid))
            assert [s.id.path for s in jwts.svids] == ["/user/nobody"]
    finally:
        proc.kill()
        await proc.wait()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as nobody")
async def test_caller_not_authorized(stack: DevStack) -> None:
    # The admin socket is 0600; open it up so the test can show the API's own refusal.
    os.chmod(admin_socket(stack), 0o666)

    async def as_nobody() -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(NOBODY), admin_socket(stack), cwd="/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
        assert lines, f"client printed nothing (rc={proc.returncode}): {err.decode()[-2000:]}"
        return dict(json.loads(lines[-1]))

    got = await as_nobody()
    assert got == {"status": "PERMISSION_DENIED", "message": "no identity issued", "uid": NOBODY}
    await add(stack, "/user/nobody", selectors=(Selector("unix", f"uid:{NOBODY}"),))
    nobody_id = SpiffeId.parse(f"spiffe://{TD}/user/nobody")
    await wait_for(lambda: any(e.spiffe_id == nobody_id for e in stack.agent.cache.entries.values()),
        TIMEOUT, "the nobody entry at the agent")
    got = await as_nobody()
    not_delegate = "caller not configured as an authorized delegate"
    assert got == {"status": "PERMISSION_DENIED", "message": not_delegate, "uid": NOBODY}


async def test_identities_nested_under_cilium_operator(stack: DevStack) -> None:
    operator = f"spiffe://{TD}/cilium-operator"
    await add(stack, "/cilium-operator", selectors=(Selector("k8s", "sa:cilium-operator"),))
    await add(stack, "/identity/77", parent=operator)
    async with delegated(stack) as stub:
        req = pb.SubscribeToX509SVIDsRequest(selectors=[CILIUM_PB])
        async with subscribe(stub.SubscribeToX509SVIDs, req) as svids:
            msg = await svids.until(lambda m: "/identity/77" in by_path(m), within=8)
            assert set(by_path(msg)) == {"/identity/77"}
