"""Events as written and as relayed: OCSF builders, the CloudEvents envelope (both Kafka
modes), workload failure aggregation, and the metrics exposition."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from issuer.ca import minting
from issuer.events import cloudevents as ce
from issuer.events import ocsf
from issuer.events.model import Event, OutboxRow
from issuer.events.workload_failures import OVERFLOW_REASON, WorkloadFailureAggregator, parse_report, record
from meshid import telemetry
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain

NOW = 1_760_000_000.25
SID = "spiffe://example.org/ns/prod/sa/web"
AGENT = "spiffe://example.org/spire/agent/join_token/abc"
SOURCE = ce.server_source("example.org", "srv-1")


def _leaf(not_before: float = NOW - 10, lifetime: float = 3600) -> x509.Certificate:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    nb = dt.datetime.fromtimestamp(not_before, dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshid CA")]))
        .public_key(leaf_key.public_key())
        .serial_number(0x1234ABCD)
        .not_valid_before(nb)
        .not_valid_after(nb + dt.timedelta(seconds=lifetime))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SID)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _issued(renew: bool = False, reason: str = "scheduled") -> Event:
    return ocsf.x509_issued(
        _leaf(), SpiffeId.parse(SID), "entry-1", 3, AGENT, AGENT,
        [Selector("unix", "uid:1000"), "k8s:ns:prod"], "ca-key-1", reason, NOW + 2000, NOW, renew)


# --- OCSF builders ------------------------------------------------------------------------------


def _base_ok(data: dict[str, Any], class_uid: int, activity: int) -> None:
    assert data["class_uid"] == class_uid
    assert data["activity_id"] == activity
    assert data["type_uid"] == class_uid * 100 + activity
    assert data["category_uid"] == 3
    assert data["time"] == round(NOW * 1000)
    assert data["metadata"]["product"]["name"] == "meshid"
    assert data["metadata"]["product"]["version"]
    uuid.UUID(data["metadata"]["uid"])
    assert data["severity_id"] in (1, 2, 3, 4, 5)
    assert data["status_id"] in (1, 2)
    json.dumps(data)  # JSON all the way down


def test_x509_issued_from_mint_facts_equals_from_the_certificate() -> None:
    """Issuance builds the certificate object from what the CA knows (LeafFacts) rather
    than parsing the leaf: it must be the same object the parsed certificate gives."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = minting.self_signed_ca(ca_key, TrustDomain("example.org"), 24 * 3600,
                                     dt.datetime.fromtimestamp(NOW - 60, dt.UTC))
    minter = minting.X509Minter(ca_key, ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    for dns in ((), ("a.example", "b.example")):
        (leaf,) = minter.mint_batch_leaves(
            [minting.LeafRequest(csr.public_bytes(Encoding.DER), SID, dns, 600)],
            dt.datetime.fromtimestamp(NOW, dt.UTC))
        assert not isinstance(leaf, Exception)
        facts = ocsf.LeafFacts(leaf.der, leaf.serial, leaf.not_before, leaf.not_after,
                               minter.issuer_rfc4514, SID, dns)
        args = (SID, "entry-1", 3, AGENT, AGENT, ["unix:uid:1000"], "ca-key-1", "initial", None, NOW, False)
        from_facts = ocsf.x509_issued(facts, *args).data
        from_cert = ocsf.x509_issued(x509.load_der_x509_certificate(leaf.der), *args).data
        for d in (from_facts, from_cert):
            d["metadata"].pop("uid")  # random per event
        assert from_facts == from_cert


def test_x509_issued_shape() -> None:
    cert = _leaf()
    ev = ocsf.x509_issued(cert, SID, "entry-1", 3, AGENT, AGENT, ["unix:uid:1000"], "ca-key-1", "initial",
                          None, NOW, False, node_id="node-a")
    assert (ev.type, ev.subject, ev.partition_key, ev.time) == (ocsf.X509_ISSUED, SID, SID, NOW)
    _base_ok(ev.data, 3002, 4)
    c = ev.data["certificate"]
    assert c["serial_number"] == "1234abcd"
    assert c["issuer"] == "CN=meshid CA" and c["subject"] == "O=SPIRE"
    assert c["sans"] == [{"name": SID, "type": "URI"}]
    assert c["fingerprints"][0]["algorithm_id"] == 3
    assert len(c["fingerprints"][0]["value"]) == 64
    assert c["expiration_time"] - c["created_time"] == 3600 * 1000
    u = ev.data["unmapped"]
    assert u["spiffe_id"] == SID and u["trust_domain"] == "example.org"
    assert (u["entry_id"], u["entry_revision"], u["parent_id"], u["agent_id"]) == ("entry-1", 3, AGENT, AGENT)
    assert u["ca_key_id"] == "ca-key-1" and u["rotation_reason"] == "initial" and u["node_id"] == "node-a"
    assert "scheduled_rotation_at" not in u
    assert ce.parse_rfc3339(u["not_before"]) == pytest.approx(NOW - 10, abs=1)
    # DER in, same object out
    assert ocsf.certificate_object(cert.public_bytes(Encoding.DER)) == c


def test_x509_renewed_and_reason_checked() -> None:
    ev = _issued(renew=True)
    assert ev.data["activity_id"] == 5 and ev.data["type_uid"] == 300205
    assert ev.data["unmapped"]["selectors"] == ["k8s:ns:prod", "unix:uid:1000"]
    assert ce.parse_rfc3339(ev.data["unmapped"]["scheduled_rotation_at"]) == pytest.approx(NOW + 2000)
    with pytest.raises(ValueError):
        _issued(reason="because")


def test_jwt_and_refusals() -> None:
    ev = ocsf.jwt_issued(SID, ["b", "a"], "e1", 0, AGENT, AGENT, ["unix:uid:1"], "kid-1", NOW, NOW + 300, NOW)
    _base_ok(ev.data, 3002, 4)
    assert ev.type == ocsf.JWT_ISSUED and ev.data["unmapped"]["audience"] == ["a", "b"]
    assert ev.data["unmapped"]["ca_key_id"] == "kid-1"

    ref = ocsf.svid_refused("not_authorized", AGENT, NOW, spiffe_id=SID, entry_id="e1", detail="no entry")
    _base_ok(ref.data, 3002, 4)
    assert ref.type == ocsf.SVID_REFUSED and ref.data["status_id"] == 2 and ref.data["status"] == "Failure"
    assert ref.data["unmapped"]["reason"] == "not_authorized" and ref.partition_key == SID
    # Without a SPIFFE ID the agent is the subject and the key.
    ref2 = ocsf.svid_refused("overloaded", AGENT, NOW)
    assert ref2.partition_key == AGENT and ref2.data["severity_id"] == 2


def test_node_and_workload_attestation() -> None:
    ok = ocsf.node_attested(AGENT, "join_token", ["join_token:abc"], NOW, cert=_leaf(), src_ip="10.0.0.1")
    _base_ok(ok.data, 3002, 1)
    assert ok.partition_key == AGENT and ok.data["certificate"]["serial_number"] == "1234abcd"
    bad = ocsf.node_attestation_failed("x509pop", "bad signature", NOW, trust_domain="example.org",
                                       src_ip="10.0.0.9")
    _base_ok(bad.data, 3002, 1)
    assert bad.data["status_id"] == 2
    assert bad.partition_key == "node-attestation:x509pop:10.0.0.9"
    assert bad.data["unmapped"]["reason"] == "bad signature"
    wl = ocsf.workload_attestation_failed(AGENT, "no matching entry", 12, NOW - 30, NOW - 1, NOW,
                                          caller_pid=42, caller_uid=1000, caller_gid=100)
    _base_ok(wl.data, 3002, 1)
    u = wl.data["unmapped"]
    assert (u["caller_pid"], u["caller_uid"], u["caller_gid"], u["count"]) == (42, 1000, 100, 12)
    assert wl.partition_key == AGENT and wl.type == ocsf.WORKLOAD_ATTESTATION_FAILED


def test_entry_agent_and_ca_events() -> None:
    entry = Entry(id="e1", spiffe_id=SpiffeId.parse(SID), parent_id=SpiffeId.parse(AGENT),
                  selectors=(Selector("unix", "uid:1000"),), revision_number=2)
    for builder, activity in ((ocsf.entry_created, 1), (ocsf.entry_updated, 3), (ocsf.entry_deleted, 4)):
        ev = builder(entry, NOW)
        _base_ok(ev.data, 3004, activity)
        assert ev.partition_key == SID and ev.data["entity"]["uid"] == "e1"
        assert ev.data["unmapped"]["entry_revision"] == 2
    upd = ocsf.entry_updated(entry, NOW, previous=entry.replace(revision_number=1), actor="admin")
    assert upd.data["entity"]["version"] == "1" and upd.data["entity_result"]["version"] == "2"
    assert upd.data["actor"]["user"]["name"] == "admin"

    ev = ocsf.agent_evicted(AGENT, NOW)
    _base_ok(ev.data, 3004, 4)
    ev = ocsf.agent_banned(AGENT, NOW, reason="stolen")
    _base_ok(ev.data, 3004, 9)
    assert ev.type == ocsf.AGENT_BANNED and ev.partition_key == AGENT

    cert = _leaf()
    expected: list[tuple[Callable[..., Event], int, int]] = [
        (ocsf.ca_prepared, 1, 1), (ocsf.ca_activated, 10, 1), (ocsf.ca_tainted, 99, 4),
        (ocsf.ca_revoked, 4, 3)]
    for ca_builder, activity, severity in expected:
        ev = ca_builder("ca-key-1", "x509", NOW, "example.org", cert=cert, upstream=True, server_id="srv-1")
        _base_ok(ev.data, 3004, activity)
        assert ev.partition_key == "ca-key-1" and ev.data["severity_id"] == severity
        assert ev.data["unmapped"]["upstream_signed"] is True
        assert "certificate" in ev.data and "not_after" in ev.data["unmapped"]
    assert ocsf.ca_tainted("k", "jwt", NOW, "example.org").data["activity_name"] == "Tainted"


# --- CloudEvents envelope -----------------------------------------------------------------------------


def test_event_id_is_deterministic() -> None:
    a = ce.event_id(SOURCE, 7)
    assert a == ce.event_id(SOURCE, 7)
    assert uuid.UUID(a).version == 5
    assert a != ce.event_id(SOURCE, 8) and a != ce.event_id(ce.server_source("example.org", "srv-2"), 7)


def test_rfc3339() -> None:
    assert ce.rfc3339(0) == "1970-01-01T00:00:00.000000Z"
    assert ce.parse_rfc3339(ce.rfc3339(NOW)) == pytest.approx(NOW)
    assert ce.parse_rfc3339("2025-01-01T00:00:00+01:00") == ce.parse_rfc3339("2024-12-31T23:00:00Z")
    with pytest.raises(ce.CloudEventError):
        ce.parse_rfc3339("yesterday")


def test_structured_mode_roundtrip() -> None:
    row = OutboxRow(41, _issued())
    event = ce.from_outbox(row, SOURCE)
    key, value, headers = ce.to_kafka(event, "structured")
    assert key == SID.encode()
    assert headers == [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    doc = json.loads(value)
    assert doc["specversion"] == "1.0" and doc["id"] == ce.event_id(SOURCE, 41)
    assert doc["source"] == SOURCE and doc["type"] == ocsf.X509_ISSUED and doc["subject"] == SID
    assert doc["partitionkey"] == SID and doc["datacontenttype"] == "application/json"
    assert ce.parse_rfc3339(doc["time"]) == pytest.approx(NOW)
    assert doc["data"]["class_uid"] == 3002
    # A re-sent row is byte-identical, so its id and content both match.
    assert ce.to_kafka(ce.from_outbox(row, SOURCE))[1] == value
    assert ce.from_kafka(value, headers) == event


def test_binary_mode_roundtrip() -> None:
    event = ce.from_outbox(OutboxRow(5, _issued()), SOURCE)
    _, value, headers = ce.to_kafka(event, "binary")
    hdr = dict(headers)
    assert hdr["ce_specversion"] == b"1.0" and hdr["ce_id"] == event.id.encode()
    assert hdr["ce_type"] == ocsf.X509_ISSUED.encode() and hdr["ce_partitionkey"] == SID.encode()
    assert hdr["content-type"] == b"application/json"
    assert json.loads(value) == event.data
    assert ce.from_kafka(value, headers) == event


def test_from_kafka_rejects_garbage() -> None:
    for value, headers in ((b"not json", []), (b"[]", []), (b'{"specversion": "0.3", "id": "x"}', []),
                           (b"{}", [("ce_specversion", b"1.0")]),
                           # Kafka allows null header values and 1 MB of nesting: CloudEventError,
                           # not AttributeError / RecursionError, so the detector skips the record.
                           (b"{}", [("ce_specversion", b"1.0"), ("ce_id", None)]),
                           (b"{}", [("ce_specversion", b"1.0"), ("content-type", None)]),
                           (b"[" * 100_000, []),
                           (b"[" * 100_000, [("ce_specversion", b"1.0")])):
        with pytest.raises(ce.CloudEventError):
            ce.from_kafka(value, headers)


# --- workload failure aggregation ------------------------------------------------------------------


def test_workload_failures_bounded_and_counted() -> None:
    agg = WorkloadFailureAggregator(window=60, max_events_per_window=5, max_groups=8)
    for i in range(10_000):
        agg.add(AGENT, f"reason-{i % 50}", NOW + i / 1000, uid=1000 + i % 3, pid=i)
    agg.add("spiffe://example.org/agent/b", "no entry", NOW, uid=1)
    first = agg.flush(NOW + 10)
    by_agent = [e for e in first if e.subject == AGENT]
    assert len(by_agent) == 5  # the per-window budget
    assert sum(e.data["unmapped"]["count"] for e in by_agent) == 10_000  # nothing dropped
    overflow = [e for e in by_agent if e.data["unmapped"]["reason"] == OVERFLOW_REASON]
    assert len(overflow) == 1 and overflow[0].data["unmapped"]["suppressed"] > 0
    assert [e.data["unmapped"]["count"] for e in first if e.subject != AGENT] == [1]
    # Budget spent: more failures wait for the next window, then come out, counted.
    for _ in range(7):
        agg.add(AGENT, "late", NOW + 20, uid=5)
    for i in range(10):
        agg.add(AGENT, f"other-{i}", NOW + 20)
    assert agg.flush(NOW + 30) == [] and agg.pending() == 17
    later = agg.flush(NOW + 71)
    assert len(later) <= 5 and sum(e.data["unmapped"]["count"] for e in later) == 17
    assert agg.pending() == 0 and agg.total_failures == 10_018


def test_parse_report_validates() -> None:
    assert parse_report([{"reason": "x", "uid": 1, "count": 3}]) == [("x", 1, None, None, 3)]
    for bad in ([1], [{"reason": ""}], [{"reason": "x", "count": 0}], [{"reason": "x", "uid": -1}],
                [{"reason": "x", "count": True}]):
        with pytest.raises(ValueError):
            parse_report(bad)


async def test_record_writes_events() -> None:
    class Ds:
        def __init__(self) -> None:
            self.events: list[Event] = []

        async def append_events(self, events: list[Event]) -> None:
            self.events += events

    class Relay:
        notified = 0

        def notify(self) -> None:
            self.notified += 1

    class Server:
        def __init__(self) -> None:
            self.ds, self.relay = Ds(), Relay()

        def clock(self) -> float:
            return NOW

    class Agent:
        agent_id = SpiffeId.parse(AGENT)

    server = Server()
    await record(server, Agent(), [{"reason": "no entry", "uid": 1000, "count": 4}, {"reason": "denied"}])
    assert [e.data["unmapped"]["count"] for e in server.ds.events] == [4, 1]
    assert server.relay.notified == 1


async def test_failure_counts_survive_a_datastore_error(tmp_path: Any) -> None:
    # flush() cleared every agent's groups before the outbox write: when that write failed
    # (a database restart), the counts of every agent in it were gone for good, and the
    # reporting agent got the error and re-sent its own, which would count those twice.
    from issuer.datastore.sqlite import SqliteDataStore
    from issuer.events import workload_failures

    class FlakyStore(SqliteDataStore):
        failures = 1

        async def append_events(self, events: Any) -> None:
            if self.failures:
                self.failures -= 1
                raise OSError("database is restarting")
            await super().append_events(events)

    ds = FlakyStore(tmp_path / "meshid.db")
    await ds.open()

    class Server:
        relay = None

        def __init__(self) -> None:
            self.ds = ds

        def clock(self) -> float:
            return NOW

    class Agent:
        def __init__(self, aid: str) -> None:
            self.agent_id = SpiffeId.parse(aid)

    server = Server()
    other = "spiffe://example.org/spire/agent/join_token/other"
    try:
        workload_failures.aggregator_for(server).add(other, "no entry", NOW, uid=7, count=5)
        await record(server, Agent(AGENT), [{"reason": "denied", "uid": 1000, "count": 3}])  # no error
        assert [r.event.subject for r in await ds.fetch_outbox(0, 10)] == []
        assert await workload_failures.flush(server) == 2  # the next tick
        rows = await ds.fetch_outbox(0, 10)
        assert sorted((r.event.subject, r.event.data["unmapped"]["count"]) for r in rows) == [
            (AGENT, 3), (other, 5)]
        assert await workload_failures.flush(server) == 0  # once
    finally:
        await ds.close()


# --- telemetry ------------------------------------------------------------------------------------


async def test_metrics_exposition() -> None:
    tel = telemetry.Telemetry()
    tel.record_issued("x509", "scheduled", n=3)
    tel.record_refused("jwt", 'quote"d')
    tel.outbox_backlog.set(17)
    tel.relay_lag.record(0.3)
    tel.relay_lag.record(42.0)
    text = tel.render_prometheus()
    assert "# TYPE meshid_svid_issued counter" in text
    assert 'meshid_svid_issued_total{kind="x509",reason="scheduled"} 3' in text
    assert 'reason="quote\\"d"' in text
    assert "meshid_events_outbox_backlog 17" in text
    assert "# TYPE meshid_events_relay_lag_seconds histogram" in text
    assert 'meshid_events_relay_lag_seconds_bucket{le="0.5"} 1' in text
    assert 'meshid_events_relay_lag_seconds_bucket{le="+Inf"} 2' in text
    assert "meshid_events_relay_lag_seconds_count 2" in text

    app = web.Application()
    app[telemetry.TELEMETRY_KEY] = tel
    app.router.add_get("/metrics", telemetry.metrics_handler)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "meshid_svid_issued_total" in await resp.text()
    tel.shutdown()


def test_tracing_off_by_default_and_configurable() -> None:
    with telemetry.span("noop", a=1) as s:
        assert not s.is_recording()
    exporter = telemetry.configure_tracing("memory")
    try:
        with telemetry.span("sign", agent=AGENT):
            pass
        assert [s.name for s in exporter.get_finished_spans()] == ["sign"]
    finally:
        telemetry.shutdown_tracing()
    with pytest.raises(telemetry.ConfigError):
        telemetry.configure_tracing("carrier-pigeon")


# --- the relay's encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_stored_encoder_matches_the_reference_encoding(mode: ce.Mode) -> None:
    from issuer.datastore import codec
    from issuer.events.model import StoredEvent

    plain = _issued()
    other = Event("io.meshid.test.happened", 'entry "7"', "k\\ey", NOW,
                  {"note": "héllo\u2028", "n": [1, 2.5]})
    enc = ce.StoredEncoder(SOURCE, mode)
    for seq, event in ((7, plain), (8, other), (123456789, plain)):
        stored = StoredEvent(seq, event.type, event.subject, event.partition_key, event.time,
                             codec.dumps(event.data))
        key, value, headers = enc.encode(stored)
        ref_key, ref_value, ref_headers = ce.to_kafka(ce.from_outbox(stored.decode(), SOURCE), mode)
        assert (key, headers) == (ref_key, ref_headers)
        assert json.loads(value) == json.loads(ref_value)
        if event is plain:
            assert value == ref_value  # ASCII data: byte-identical to the canonical form
        assert enc.event_id(seq) == ce.event_id(SOURCE, seq)
    # Enough ids to meet every value of the digest nibble the UUID variant replaces.
    assert [enc.event_id(seq) for seq in range(300)] == [ce.event_id(SOURCE, seq) for seq in range(300)]


def test_counted_histogram_counts_each_observation() -> None:
    tel = telemetry.Telemetry()
    tel.relay_lag.record(0.01, 500)  # one signing batch: 500 events acked with the same lag
    tel.relay_lag.record(0.5)  # on a bound: (0.25, 0.5]
    tel.relay_lag.record(7200.0, 2)
    text = tel.render_prometheus()
    assert 'meshid_events_relay_lag_seconds_bucket{le="0.01"} 500' in text
    assert 'meshid_events_relay_lag_seconds_bucket{le="0.25"} 500' in text
    assert 'meshid_events_relay_lag_seconds_bucket{le="0.5"} 501' in text
    assert 'meshid_events_relay_lag_seconds_bucket{le="3600.0"} 501' in text
    assert 'meshid_events_relay_lag_seconds_bucket{le="+Inf"} 503' in text
    assert "meshid_events_relay_lag_seconds_count 503" in text
    assert "meshid_events_relay_lag_seconds_sum 14405.5" in text


def test_event_uids_are_distinct_random_uuids_across_pool_refills() -> None:
    uids = [_issued().data["metadata"]["uid"] for _ in range(3 * ocsf._UID_BATCH + 5)]
    assert len(set(uids)) == len(uids)
    assert all(uuid.UUID(u).version == 4 for u in uids)


# --- SPEC-EVENTS.md, pinned literally ----------------------------------------------------------------
# The tests above use ocsf's constants; these fail if a constant itself drifts from the spec.


def test_event_types_and_ocsf_classes_match_the_spec_table() -> None:
    entry = Entry(id="e1", spiffe_id=SpiffeId.parse(SID), parent_id=SpiffeId.parse(AGENT),
                  selectors=(Selector("unix", "uid:1000"),))
    built: list[tuple[str, Event, int, int | None, int]] = [  # type, event, class, activity, status
        ("io.meshid.svid.x509.issued", _issued(), 3002, 4, 1),
        ("io.meshid.svid.x509.issued", _issued(renew=True), 3002, 5, 1),
        ("io.meshid.svid.jwt.issued",
         ocsf.jwt_issued(SID, ["a"], "e1", 0, AGENT, AGENT, [], "kid", NOW, NOW + 300, NOW), 3002, 4, 1),
        ("io.meshid.svid.refused", ocsf.svid_refused("overloaded", AGENT, NOW), 3002, None, 2),
        ("io.meshid.node.attested", ocsf.node_attested(AGENT, "join_token", [], NOW), 3002, 1, 1),
        ("io.meshid.node.attestation_failed", ocsf.node_attestation_failed("join_token", "no", NOW),
         3002, 1, 2),
        ("io.meshid.workload.attestation_failed",
         ocsf.workload_attestation_failed(AGENT, "no", 1, NOW, NOW, NOW), 3002, None, 2),
        ("io.meshid.entry.created", ocsf.entry_created(entry, NOW), 3004, 1, 1),
        ("io.meshid.entry.updated", ocsf.entry_updated(entry, NOW), 3004, 3, 1),
        ("io.meshid.entry.deleted", ocsf.entry_deleted(entry, NOW), 3004, 4, 1),
        ("io.meshid.agent.evicted", ocsf.agent_evicted(AGENT, NOW), 3004, None, 1),
        ("io.meshid.agent.banned", ocsf.agent_banned(AGENT, NOW), 3004, None, 1),
        ("io.meshid.ca.prepared", ocsf.ca_prepared("k", "x509", NOW, "example.org"), 3004, None, 1),
        ("io.meshid.ca.activated", ocsf.ca_activated("k", "x509", NOW, "example.org"), 3004, None, 1),
        ("io.meshid.ca.tainted", ocsf.ca_tainted("k", "x509", NOW, "example.org"), 3004, None, 1),
        ("io.meshid.ca.revoked", ocsf.ca_revoked("k", "x509", NOW, "example.org"), 3004, None, 1),
    ]
    for type_, ev, class_uid, activity, status in built:
        assert ev.type == type_
        assert ev.time == NOW  # when the act happened
        d = ev.data
        assert (d["class_uid"], d["status_id"], d["category_uid"]) == (class_uid, status, 3), type_
        if activity is not None:
            assert d["activity_id"] == activity, type_
        assert d["type_uid"] == class_uid * 100 + d["activity_id"]
        assert d["metadata"]["product"]["name"] == "meshid" and d["metadata"]["product"]["version"]
        # partitionkey: the SPIFFE ID; else the agent ID (node events) or the CA key ID.
        expected_key = d["unmapped"].get("spiffe_id") or d["unmapped"].get("agent_id") \
            or d["unmapped"].get("ca_key_id")
        if type_ != "io.meshid.node.attestation_failed":  # agent unknown: keyed by attestor and source
            assert ev.partition_key == expected_key, type_
    assert {t for t, *_ in built} == {v for k, v in vars(ocsf).items() if k.isupper() and
                                      isinstance(v, str) and v.startswith("io.meshid.")}


def test_rotation_reasons_source_and_topics_match_the_spec() -> None:
    from issuer.events.detector import DEFAULT_ALERTS_TOPIC
    from issuer.events.relay import KafkaConfig
    from issuer.signing import ROTATION_REASONS

    spec = {"initial", "scheduled", "forced", "tainted", "expired", "entry_changed"}
    assert ocsf.ROTATION_REASONS == spec and set(ROTATION_REASONS) == spec
    for reason in spec:
        assert _issued(reason=reason).data["unmapped"]["rotation_reason"] == reason
    assert ce.server_source("example.org", "srv-1") == "meshid://example.org/server/srv-1"
    assert ce.STRUCTURED_CONTENT_TYPE == "application/cloudevents+json; charset=UTF-8"
    cfg = KafkaConfig("k:9092")
    assert (cfg.topic, DEFAULT_ALERTS_TOPIC) == ("meshid.events", "meshid.alerts")
    assert (cfg.acks, cfg.enable_idempotence) == ("all", True)


async def test_relay_producer_is_idempotent_with_acks_all_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka.errors import KafkaConnectionError

    from issuer.events import relay

    made: list[dict[str, Any]] = []

    class Producer:
        def __init__(self, **kw: Any) -> None:
            made.append(kw)

        async def start(self) -> None:
            raise KafkaConnectionError("no broker here")

        async def stop(self) -> None:
            pass

    monkeypatch.setattr(relay, "AIOKafkaProducer", Producer)
    r = relay.OutboxRelay(cast(Any, None), relay.KafkaConfig("k:9092"), source=SOURCE)
    with pytest.raises(KafkaConnectionError):
        await r._connect(relay.KafkaConfig("k:9092"))
    with pytest.raises(KafkaConnectionError):
        await r._connect(relay.KafkaConfig("k:9092", enable_idempotence=False))  # the switch
    assert [(kw["acks"], kw["enable_idempotence"]) for kw in made] == [(-1, True), (-1, False)]
