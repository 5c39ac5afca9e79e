"""The SPIRE Entry API over mutual TLS, driven exactly as Cilium's operator drives it,
against a real `issuer.server.Server` on ephemeral ports."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import ssl
import tempfile
import uuid
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf.wrappers_pb2 import BytesValue
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from h2_client import client_connection, events_until_closed, terminated

from issuer._gen.spire.api.server.entry.v1 import entry_grpc, entry_pb2
from issuer.ca.slots import svid_chain
from issuer.config import server_config_from_dict
from issuer.server import Server
from meshid._gen.spire.api.types import entry_pb2 as types_entry_pb2
from meshid._gen.spire.api.types import selector_pb2, spiffeid_pb2
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from meshid.tls import check_server_id, client_context, peer_spiffe_id

pytestmark = pytest.mark.integration

TD = "example.org"
OPERATOR = f"spiffe://{TD}/cilium-operator"
CILIUM_SELECTOR = selector_pb2.Selector(type="cilium", value="mutual-auth")
TIMEOUT = 10
EXACT, SUBSET = selector_pb2.SelectorMatch.MATCH_EXACT, selector_pb2.SelectorMatch.MATCH_SUBSET
ListReq, CountReq = entry_pb2.ListEntriesRequest, entry_pb2.CountEntriesRequest
CreateReq, UpdateReq = entry_pb2.BatchCreateEntryRequest, entry_pb2.BatchUpdateEntryRequest


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Server]:
    monkeypatch.setenv("MESHID_MASTER_SECRET", "entry-api-test-master-secret-0123456789")
    # Short path: the admin Unix socket lives in data_dir and sun_path is 108 bytes.
    data_dir = tempfile.mkdtemp(prefix="meshid-")
    cfg = server_config_from_dict(
        {
            "trust_domain": TD,
            "data_dir": data_dir,
            "server": {
                "agent_api_port": 0,
                "grpc_port": 0,
                "health_enabled": False,
                "bind_address": "127.0.0.1",
                "admin_ids": [OPERATOR],
            },
        }
    )
    srv = Server(cfg)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def svid_context(server: Server, spiffe_id: str) -> ssl.SSLContext:
    """A client TLS context holding an X509-SVID minted straight from the server's CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    active = server.ca.x509_active
    assert active.minter is not None
    now = dt.datetime.fromtimestamp(server.clock(), dt.UTC)
    leaf = active.minter.mint_from_public_key(key.public_key(), SpiffeId.parse(spiffe_id), [], 3600, now)
    return client_context(server.ca.bundle.x509_authorities, svid_chain(active, leaf), key, alpn=["h2"])


def foreign_svid_context(server: Server, spiffe_id: str) -> ssl.SSLContext:
    """An SVID naming another trust domain but chaining to our CA (the minter refuses to
    make one, so build it by hand): only the API's own trust-domain check can stop it."""
    active = server.ca.x509_active
    assert active.minter is not None and active.cert is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
    usage = x509.KeyUsage(True, False, True, False, True, False, False, False, False)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(active.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(minutes=30))
        .add_extension(san, critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(active.minter.ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return client_context(server.ca.bundle.x509_authorities, svid_chain(active, leaf), key, alpn=["h2"])


@pytest.fixture
async def channels(server: Server) -> AsyncIterator[list[Channel]]:
    opened: list[Channel] = []
    yield opened
    for ch in opened:
        ch.close()


def open_channel(server: Server, channels: list[Channel], ctx: ssl.SSLContext) -> entry_grpc.EntryStub:
    ch = Channel("127.0.0.1", server.grpc_port_bound, ssl=ctx)
    channels.append(ch)
    return entry_grpc.EntryStub(ch)


async def operator_stub(server: Server, channels: list[Channel]) -> entry_grpc.EntryStub:
    """Cilium's operator client: its own SVID, and it checks the server's SVID is in our
    trust domain (done here on the channel's real connection, then reused by every call)."""
    stub = open_channel(server, channels, svid_context(server, OPERATOR))
    async with stub.CountEntries.open(timeout=TIMEOUT) as stream:
        await stream.send_message(entry_pb2.CountEntriesRequest(), end=True)
        assert stream.peer is not None
        ssl_object = stream.peer._transport.get_extra_info("ssl_object")
        check_server_id(ssl_object, server.td)
        assert peer_spiffe_id(ssl_object) == server.config.server_spiffe_id
        assert ssl_object.version() == "TLSv1.3"
        await stream.recv_message()
    return stub


def sid(path: str) -> spiffeid_pb2.SPIFFEID:
    return spiffeid_pb2.SPIFFEID(trust_domain=TD, path=path)


def cilium_entry(n: int) -> types_entry_pb2.Entry:
    """What Cilium's operator sends for numeric identity n (no id)."""
    return types_entry_pb2.Entry(
        spiffe_id=sid(f"/identity/{n}"), parent_id=sid("/cilium-operator"), selectors=[CILIUM_SELECTOR]
    )


def cilium_list(n: int | None = None) -> entry_pb2.ListEntriesRequest:
    f = entry_pb2.ListEntriesRequest.Filter(
        by_parent_id=sid("/cilium-operator"),
        by_selectors=selector_pb2.SelectorMatch(selectors=[CILIUM_SELECTOR], match=EXACT),
    )
    if n is not None:
        f.by_spiffe_id.CopyFrom(sid(f"/identity/{n}"))
    return entry_pb2.ListEntriesRequest(filter=f)


async def test_cilium_operator_flow(server: Server, channels: list[Channel]) -> None:
    stub = await operator_stub(server, channels)

    assert list((await stub.ListEntries(cilium_list(1000), timeout=TIMEOUT)).entries) == []

    created = await stub.BatchCreateEntry(
        entry_pb2.BatchCreateEntryRequest(entries=[cilium_entry(1000)]), timeout=TIMEOUT
    )
    [result] = created.results
    assert result.status.code == Status.OK.value
    entry_id = result.entry.id
    uuid.UUID(entry_id)  # ours are UUIDs
    assert result.entry.spiffe_id == sid("/identity/1000")
    assert list(result.entry.selectors) == [CILIUM_SELECTOR]

    listed = await stub.ListEntries(cilium_list(1000), timeout=TIMEOUT)
    assert [e.id for e in listed.entries] == [entry_id]
    assert listed.next_page_token == ""

    # Cilium re-creates on every resync: AlreadyExists, with the entry that holds the identity.
    again = await stub.BatchCreateEntry(
        entry_pb2.BatchCreateEntryRequest(entries=[cilium_entry(1000)]), timeout=TIMEOUT
    )
    assert again.results[0].status.code == Status.ALREADY_EXISTS.value
    assert again.results[0].entry.id == entry_id

    updated = await stub.BatchUpdateEntry(
        entry_pb2.BatchUpdateEntryRequest(entries=[cilium_entry(1000)]), timeout=TIMEOUT
    )
    assert updated.results[0].status.code == Status.OK.value
    assert updated.results[0].entry.id == entry_id
    assert updated.results[0].entry.revision_number == 1

    # The CLI (and the signing path) see the same entries.
    [stored] = [e for e in await server.entries.list() if e.id == entry_id]
    assert stored.spiffe_id == SpiffeId.parse(f"spiffe://{TD}/identity/1000")
    assert stored.parent_id == SpiffeId.parse(OPERATOR)
    assert stored.selectors == (Selector("cilium", "mutual-auth"),)

    ids = [e.id for e in (await stub.ListEntries(cilium_list(), timeout=TIMEOUT)).entries]
    deleted = await stub.BatchDeleteEntry(entry_pb2.BatchDeleteEntryRequest(ids=ids), timeout=TIMEOUT)
    assert [(r.id, r.status.code) for r in deleted.results] == [(entry_id, Status.OK.value)]
    gone = await stub.BatchDeleteEntry(entry_pb2.BatchDeleteEntryRequest(ids=ids), timeout=TIMEOUT)
    assert gone.results[0].status.code == Status.NOT_FOUND.value

    with pytest.raises(GRPCError) as err:
        await stub.GetEntry(entry_pb2.GetEntryRequest(id=entry_id), timeout=TIMEOUT)
    assert err.value.status is Status.NOT_FOUND
    assert "not found" in (err.value.message or "").lower()  # Cilium looks for "NotFound"/"not found"
    assert entry_id not in {e.id for e in await server.entries.list()}


async def test_update_paths(server: Server, channels: list[Channel]) -> None:
    stub = await operator_stub(server, channels)
    res = await stub.BatchCreateEntry(CreateReq(entries=[cilium_entry(7)]), timeout=TIMEOUT)
    entry_id = res.results[0].entry.id

    # By id, with an input mask: only the masked field changes.
    change = types_entry_pb2.Entry(id=entry_id, hint="web", x509_svid_ttl=999)
    masked = await stub.BatchUpdateEntry(
        UpdateReq(
            entries=[change],
            input_mask=types_entry_pb2.EntryMask(hint=True),
            output_mask=types_entry_pb2.EntryMask(hint=True, x509_svid_ttl=True),
        ),
        timeout=TIMEOUT,
    )
    r = masked.results[0]
    assert r.status.code == Status.OK.value
    assert (r.entry.id, r.entry.hint, r.entry.x509_svid_ttl) == (entry_id, "web", 0)
    assert not r.entry.HasField("spiffe_id")  # output mask applied
    got = await stub.GetEntry(entry_pb2.GetEntryRequest(id=entry_id), timeout=TIMEOUT)
    assert got.hint == "web" and got.spiffe_id == sid("/identity/7")

    missing = await stub.BatchUpdateEntry(
        entry_pb2.BatchUpdateEntryRequest(
            entries=[
                types_entry_pb2.Entry(id="no-such-entry", hint="x"),
                cilium_entry(8),  # no id, and nothing has this identity
                types_entry_pb2.Entry(hint="neither id nor key"),
            ]
        ),
        timeout=TIMEOUT,
    )
    assert [x.status.code for x in missing.results] == [
        Status.NOT_FOUND.value,
        Status.NOT_FOUND.value,
        Status.INVALID_ARGUMENT.value,
    ]


async def test_concurrent_masked_updates_keep_each_others_fields(
    server: Server, channels: list[Channel]
) -> None:
    """Each BatchUpdateEntry read the entry, set its masked field and wrote the whole entry
    back: two at once, the later one put the other's field back as it had read it."""
    stub = await operator_stub(server, channels)
    res = await stub.BatchCreateEntry(CreateReq(entries=[cilium_entry(9)]), timeout=TIMEOUT)
    entry_id = res.results[0].entry.id
    Pb, Mask = types_entry_pb2.Entry, types_entry_pb2.EntryMask
    changes = [
        (Pb(id=entry_id, hint="web"), Mask(hint=True)),
        (Pb(id=entry_id, x509_svid_ttl=600), Mask(x509_svid_ttl=True)),
        (Pb(id=entry_id, jwt_svid_ttl=60), Mask(jwt_svid_ttl=True)),
        (Pb(id=entry_id, dns_names=["a.example.org"]), Mask(dns_names=True)),
    ]
    results = await asyncio.gather(*(
        stub.BatchUpdateEntry(UpdateReq(entries=[pb], input_mask=mask), timeout=TIMEOUT)
        for pb, mask in changes
    ))
    assert all(r.results[0].status.code == Status.OK.value for r in results), results
    got = await stub.GetEntry(entry_pb2.GetEntryRequest(id=entry_id), timeout=TIMEOUT)
    assert (got.hint, got.x509_svid_ttl, got.jwt_svid_ttl, list(got.dns_names)) == (
        "web", 600, 60, ["a.example.org"]), got
    assert got.revision_number == len(changes)


async def test_bad_input_gets_per_entry_status(server: Server, channels: list[Channel]) -> None:
    stub = await operator_stub(server, channels)
    no_selectors = cilium_entry(2)
    del no_selectors.selectors[:]
    foreign = cilium_entry(3)
    foreign.spiffe_id.trust_domain = "evil.org"
    bad_path = cilium_entry(4)
    bad_path.spiffe_id.path = "identity/4"
    server_own = cilium_entry(5)
    server_own.spiffe_id.path = "/meshid/server"
    res = await stub.BatchCreateEntry(
        entry_pb2.BatchCreateEntryRequest(
            entries=[cilium_entry(1), no_selectors, foreign, bad_path, types_entry_pb2.Entry(), server_own]
        ),
        timeout=TIMEOUT,
    )
    codes = [r.status.code for r in res.results]
    assert codes == [Status.OK.value] + [Status.INVALID_ARGUMENT.value] * 5
    assert all(r.status.message for r in res.results[1:])

    with pytest.raises(GRPCError) as err:
        empty = ListReq.Filter(by_selectors=selector_pb2.SelectorMatch())
        await stub.ListEntries(ListReq(filter=empty), timeout=TIMEOUT)
    assert err.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(GRPCError) as err:
        await stub.ListEntries(ListReq(page_size=1, page_token="garbage"), timeout=TIMEOUT)
    assert err.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(GRPCError) as err:
        await stub.GetEntry(entry_pb2.GetEntryRequest(), timeout=TIMEOUT)
    assert err.value.status is Status.INVALID_ARGUMENT
    res_del = await stub.BatchDeleteEntry(entry_pb2.BatchDeleteEntryRequest(ids=[""]), timeout=TIMEOUT)
    assert res_del.results[0].status.code == Status.INVALID_ARGUMENT.value


async def test_paging_count_and_filters_over_the_wire(server: Server, channels: list[Channel]) -> None:
    stub = await operator_stub(server, channels)
    await stub.BatchCreateEntry(CreateReq(entries=[cilium_entry(n) for n in range(5)]), timeout=TIMEOUT)
    other = Entry(
        id="",
        spiffe_id=SpiffeId.parse(f"spiffe://{TD}/web"),
        parent_id=SpiffeId.parse(f"spiffe://{TD}/node"),
        selectors=(Selector("unix", "uid:1"),),
        downstream=True,
    )
    await server.entries.create(other)

    assert (await stub.CountEntries(entry_pb2.CountEntriesRequest(), timeout=TIMEOUT)).count == 6
    # SUBSET: entries whose selectors all lie within the given set.
    given = [CILIUM_SELECTOR, selector_pb2.Selector(type="x", value="y")]
    count_cilium = CountReq(
        filter=CountReq.Filter(by_selectors=selector_pb2.SelectorMatch(selectors=given, match=SUBSET))
    )
    assert (await stub.CountEntries(count_cilium, timeout=TIMEOUT)).count == 5
    downstream = CountReq(filter=CountReq.Filter(by_downstream={"value": True}))
    assert (await stub.CountEntries(downstream, timeout=TIMEOUT)).count == 1

    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListEntries(ListReq(page_size=2, page_token=token), timeout=TIMEOUT)
        assert len(page.entries) <= 2
        seen += [e.id for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(e.id for e in await server.entries.list())
    assert len(seen) == len(set(seen)) == 6


async def test_non_admin_is_denied_every_call(server: Server, channels: list[Channel]) -> None:
    stub = open_channel(server, channels, svid_context(server, f"spiffe://{TD}/some-workload"))
    calls = [
        (stub.ListEntries, cilium_list()),
        (stub.CountEntries, entry_pb2.CountEntriesRequest()),
        (stub.GetEntry, entry_pb2.GetEntryRequest(id="x")),
        (stub.BatchCreateEntry, entry_pb2.BatchCreateEntryRequest(entries=[cilium_entry(1)])),
        (stub.BatchUpdateEntry, entry_pb2.BatchUpdateEntryRequest(entries=[cilium_entry(1)])),
        (stub.BatchDeleteEntry, entry_pb2.BatchDeleteEntryRequest(ids=["x"])),
    ]
    for method, request in calls:
        with pytest.raises(GRPCError) as err:
            await method(request, timeout=TIMEOUT)  # type: ignore[operator]
        assert err.value.status is Status.PERMISSION_DENIED, method
    assert await server.entries.list() == []


async def test_admin_entry_grants_access(server: Server, channels: list[Channel]) -> None:
    ops = f"spiffe://{TD}/ops"
    stub = open_channel(server, channels, svid_context(server, ops))
    with pytest.raises(GRPCError) as err:
        await stub.CountEntries(entry_pb2.CountEntriesRequest(), timeout=TIMEOUT)
    assert err.value.status is Status.PERMISSION_DENIED
    await server.entries.create(
        Entry(
            id="",
            spiffe_id=SpiffeId.parse(ops),
            parent_id=SpiffeId.parse(f"spiffe://{TD}/node"),
            selectors=(Selector("unix", "uid:0"),),
            admin=True,
        )
    )
    assert (await stub.CountEntries(entry_pb2.CountEntriesRequest(), timeout=TIMEOUT)).count == 1


async def test_other_trust_domain_is_denied(server: Server, channels: list[Channel]) -> None:
    stub = open_channel(server, channels, foreign_svid_context(server, "spiffe://other.org/cilium-operator"))
    with pytest.raises(GRPCError) as err:
        await stub.ListEntries(cilium_list(), timeout=TIMEOUT)
    assert err.value.status is Status.PERMISSION_DENIED
    assert "trust domain" in (err.value.message or "")


async def test_expired_caller_svid_is_refused_on_a_kept_alive_connection(
    server: Server, channels: list[Channel]
) -> None:
    """The TLS handshake checks the caller SVID's validity once, and a gRPC client (Cilium's
    operator) keeps its HTTP/2 connection for every later call: once the SVID has expired
    those calls are refused (they were served for as long as the connection lived)."""
    stub = await operator_stub(server, channels)  # the connection is open, the SVID valid
    assert (await stub.CountEntries(CountReq(), timeout=TIMEOUT)).count == 0
    monkey_clock = server.entries.clock() + 3600 + 1  # svid_context's SVIDs live an hour
    server.entries.clock = lambda: monkey_clock
    with pytest.raises(GRPCError) as err:
        await stub.CountEntries(CountReq(), timeout=TIMEOUT)
    assert err.value.status is Status.UNAUTHENTICATED
    assert "expired" in (err.value.message or "")


async def test_tls12_client_is_refused(server: Server) -> None:
    ctx = svid_context(server, OPERATOR)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    # The server aborts the handshake: an alert (SSLError) or a reset, depending on timing.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.grpc_port_bound, ssl=ctx), TIMEOUT)


async def test_client_without_svid_is_refused(server: Server, channels: list[Channel]) -> None:
    ctx = client_context(server.ca.bundle.x509_authorities, alpn=["h2"])
    stub = open_channel(server, channels, ctx)
    # TLS 1.3 reports the missing client certificate after the client's handshake ends,
    # so the refusal surfaces on the first read rather than in connect().
    with pytest.raises((ssl.SSLError, ConnectionError, StreamTerminatedError)):
        await stub.CountEntries(CountReq(), timeout=TIMEOUT)


async def test_undecodable_request_is_an_error_not_a_crash(server: Server, channels: list[Channel]) -> None:
    stub = await operator_stub(server, channels)
    ch = channels[0]
    # Field 1 of ListEntriesRequest is the filter message: a bytes payload there is garbage.
    raw = UnaryUnaryMethod(
        ch, "/spire.api.server.entry.v1.Entry/ListEntries", BytesValue, entry_pb2.ListEntriesResponse
    )
    with pytest.raises(GRPCError) as err:
        await raw(BytesValue(value=b"\xff\xff\xff"), timeout=TIMEOUT)
    assert err.value.status is Status.INVALID_ARGUMENT
    assert (await stub.CountEntries(CountReq(), timeout=TIMEOUT)).count == 0


async def test_an_oversized_request_is_resource_exhausted(server: Server, channels: list[Channel]) -> None:
    import struct

    stub = await operator_stub(server, channels)
    with pytest.raises(GRPCError) as err:
        async with stub.ListEntries.open(timeout=TIMEOUT) as st:
            await st.send_request()
            await st._stream.send_data(b"\x00" + struct.pack(">I", 64 * 1024 * 1024))
            await st.recv_message()
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    assert (await stub.CountEntries(CountReq(), timeout=TIMEOUT)).count == 0


async def _workload_svids(
    sock: str,
) -> dict[str, tuple[list[x509.Certificate], object, list[x509.Certificate]]]:
    """X509-SVIDs (chain, key, bundle roots) by SPIFFE ID, fetched from the Workload API."""
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    from meshid.der import load_der_certificates
    from workload_api._gen import workload_grpc, workload_pb2

    ch = Channel(path=sock)
    try:
        async with workload_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID.open(
            metadata={"workload.spiffe.io": "true"}, timeout=TIMEOUT
        ) as st:
            await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
            msg = await st.recv_message()
            await st.cancel()
    finally:
        ch.close()
    assert msg is not None
    return {
        s.spiffe_id: (
            load_der_certificates(s.x509_svid),
            load_der_private_key(s.x509_svid_key, None),
            load_der_certificates(s.bundle),
        )
        for s in msg.svids
    }


async def test_operator_uses_svid_from_workload_api(short_tmp: object) -> None:
    """Cilium's operator exactly: its SVID comes from the agent's Workload API, it dials the
    server's gRPC port with mTLS and checks the server is in the trust domain."""
    from pathlib import Path

    from meshid.cli.dev import start_dev

    tmp = Path(str(short_tmp))
    stack = await start_dev(
        tmp / "d",
        TD,
        str(tmp / "s" / "api.sock"),
        server_overrides={"server": {"grpc_port": 0, "admin_ids": [OPERATOR]}},
    )
    opened: list[Channel] = []
    try:
        agent_id = stack.agent.node.agent_id
        assert agent_id is not None
        await stack.server.entries.create(
            Entry("", SpiffeId.parse(OPERATOR), agent_id, (Selector("unix", "uid:0"),))
        )
        stack.agent.manager.poke()
        for _ in range(100):
            svids = await _workload_svids(stack.socket_path)
            if OPERATOR in svids:
                break
            await asyncio.sleep(0.1)
        chain, key, roots = svids[OPERATOR]

        def stub_for(chain: list[x509.Certificate], key: object) -> entry_grpc.EntryStub:
            ctx = client_context(roots, chain, key, alpn=["h2"])  # type: ignore[arg-type]
            ch = Channel("127.0.0.1", stack.server.grpc_port_bound, ssl=ctx)
            opened.append(ch)
            return entry_grpc.EntryStub(ch)

        stub = stub_for(chain, key)
        async with stub.CountEntries.open(timeout=TIMEOUT) as stream:
            await stream.send_message(entry_pb2.CountEntriesRequest(), end=True)
            assert stream.peer is not None
            check_server_id(
                stream.peer._transport.get_extra_info("ssl_object"),
                SpiffeId.parse(f"spiffe://{TD}").trust_domain,
            )
            await stream.recv_message()
        created = await stub.BatchCreateEntry(
            entry_pb2.BatchCreateEntryRequest(entries=[cilium_entry(7)]), timeout=TIMEOUT
        )
        assert created.results[0].status.code == Status.OK.value
        assert [
            e.spiffe_id.path for e in (await stub.ListEntries(cilium_list(7), timeout=TIMEOUT)).entries
        ] == ["/identity/7"]
        updated = await stub.BatchUpdateEntry(
            entry_pb2.BatchUpdateEntryRequest(entries=[cilium_entry(7)]), timeout=TIMEOUT
        )
        assert updated.results[0].status.code == Status.OK.value
        deleted = await stub.BatchDeleteEntry(
            entry_pb2.BatchDeleteEntryRequest(ids=[created.results[0].entry.id]), timeout=TIMEOUT
        )
        assert deleted.results[0].status.code == Status.OK.value
        # The same workload's other (non-admin) SVID is refused.
        user_chain, user_key, _ = svids[str(stack.spiffe_id)]
        with pytest.raises(GRPCError) as err:
            await stub_for(user_chain, user_key).ListEntries(cilium_list(), timeout=TIMEOUT)
        assert err.value.status is Status.PERMISSION_DENIED
    finally:
        for ch in opened:
            ch.close()
        await stack.stop()


async def test_an_idle_connection_is_closed(server: Server) -> None:
    """Any SVID of the trust domain passes the handshake; a connection then left without a
    call (or whose client vanished without a FIN) was kept forever. Sent away now, after
    IDLE_TIMEOUT (shortened here) with no call."""

    from issuer.grpc_api import IDLE_TIMEOUT

    assert server.grpc._idle_timeout == IDLE_TIMEOUT
    server.grpc._idle_timeout = 0.3  # for connections from now on
    ctx = svid_context(server, f"spiffe://{TD}/some/workload")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.grpc_port_bound, ssl=ctx)
    try:
        conn = client_connection()
        writer.write(conn.data_to_send())
        assert terminated(await events_until_closed(reader, conn, 5))
    finally:
        writer.close()
