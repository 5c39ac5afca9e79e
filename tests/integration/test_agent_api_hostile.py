"""The agent API (issuer/api/agent_api.py) against hostile input from a legitimately
attested agent and from unauthenticated callers: bad input is a 4xx JSON error, never an
internal error with a traceback."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from attestors.node.join_token import new_token
from issuer.api.agent_api import MAX_ATTEST_BODY
from issuer.ca.devpki import ensure_dev_upstream
from issuer.config import server_config_from_dict
from issuer.events import ocsf
from issuer.server import Server
from meshid.entry import Entry
from meshid.jwtsvid import MAX_AUDIENCE_LENGTH, MAX_AUDIENCES
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from meshid.tls import client_context
from workload_api.keys import csr_for, new_key

pytestmark = pytest.mark.integration


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Attested:
    server: Server
    url: str
    session: aiohttp.ClientSession  # presents the agent SVID
    anonymous: aiohttp.ClientSession  # no client certificate
    agent_id: SpiffeId
    entry: Entry


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        if resp.content_type != "application/json":
            return resp.status, await resp.text()
        return resp.status, await resp.json()


@pytest.fixture
async def attested(short_tmp: Path) -> AsyncIterator[Attested]:
    """A server alone (SQLite, dev upstream) and one agent attested with a join token."""
    upstream = ensure_dev_upstream(short_tmp / "upstream")
    secret = short_tmp / "master.secret"
    secret.write_text("hostile-test-master-secret-0123456789\n")
    secret.chmod(0o600)
    server = Server(server_config_from_dict({
        "trust_domain": "example.org",
        "data_dir": str(short_tmp / "server"),
        "server": {
            "bind_address": "127.0.0.1", "agent_api_port": 0, "grpc_port": 0, "health_port": 0,
            "admin_socket_path": str(short_tmp / "admin.sock"),
            "master_secret_file": str(secret), "master_secret_env": "",
        },
        "upstream": {"disk": {"cert_file": str(upstream.cert_file), "key_file": str(upstream.key_file),
                              "bundle_file": str(upstream.bundle_file)}},
    }))
    await server.start()
    sessions: list[aiohttp.ClientSession] = []
    try:
        assert server.ds is not None
        roots = list(server.ca.bundle.x509_authorities)
        url = f"https://127.0.0.1:{server.agent_api_port}/v1"
        anonymous = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(roots)))
        sessions.append(anonymous)
        tok = new_token(600)
        await server.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
        key = new_key()
        status, body = await _post(anonymous, f"{url}/agent/attest", {
            "attestor": "join_token", "payload": {"token": tok.token}, "csr": b64(csr_for(key))})
        assert status == 200, body
        chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in body["svid"]]
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(roots, chain, key)))
        sessions.append(session)
        agent_id = SpiffeId.parse(body["agent_id"])
        entry = await server.entries.create(Entry(
            "", SpiffeId(server.td, "/hostile/w"), agent_id, (Selector("unix", "uid:1000"),)))
        yield Attested(server, url, session, anonymous, agent_id, entry)
    finally:
        for s in sessions:
            await s.close()
        await server.stop()


@pytest.mark.parametrize("when", [1e308, -1e308, 2**63, 2**64 + 5, 1e13])
async def test_sign_x509_scheduled_rotation_out_of_range_is_invalid_argument(
    attested: Attested, when: float, caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduled_rotation_at no clock can show is the caller's error (it went into the
    issuance event's timestamp: OverflowError / ValueError after the leaf was minted)."""
    csr = b64(csr_for(ec.generate_private_key(ec.SECP256R1())))
    with caplog.at_level(logging.WARNING):
        status, body = await _post(attested.session, f"{attested.url}/agent/sign/x509", {
            "requests": [{"entry_id": attested.entry.id, "csr": csr, "scheduled_rotation_at": when}]})
    assert status == 400, body
    assert body["error"]["code"] == "invalid_argument"
    assert "scheduled_rotation_at" in body["error"]["message"]
    assert "internal error" not in caplog.text
    # A real schedule is still accepted.
    status, body = await _post(attested.session, f"{attested.url}/agent/sign/x509", {
        "requests": [{"entry_id": attested.entry.id, "csr": csr, "scheduled_rotation_at": 1.8e9}]})
    assert status == 200 and "svid" in body["results"][0], body


async def test_bad_csr_does_not_use_up_the_join_token(attested: Attested) -> None:
    """A CSR the server would refuse to sign is refused before attestation: the join token
    (single use) is not spent on an attempt that cannot succeed."""
    assert attested.server.ds is not None
    tok = new_token(600)
    await attested.server.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
    url = f"{attested.url}/agent/attest"
    bad = csr_for(new_key())
    bad = bad[:-3] + bytes([bad[-3] ^ 1]) + bad[-2:]  # signature no longer matches
    for csr in (b"\0\0\0", bad):
        status, body = await _post(attested.anonymous, url, {
            "attestor": "join_token", "payload": {"token": tok.token}, "csr": b64(csr)})
        assert status == 400 and body["error"]["code"] == "invalid_argument", body
    status, body = await _post(attested.anonymous, url, {
        "attestor": "join_token", "payload": {"token": tok.token}, "csr": b64(csr_for(new_key()))})
    assert status == 200, body


@pytest.mark.parametrize("path", ["attest", "attest/answer"])
async def test_unauthenticated_bodies_are_small(attested: Attested, path: str) -> None:
    """Without an SVID a caller may send MAX_ATTEST_BODY, not the 4 MiB sync and sign
    batches need: 4 MiB of '[],' parses into ~100 MB of lists, held per request."""
    pad = MAX_ATTEST_BODY
    status, body = await _post(attested.anonymous, f"{attested.url}/agent/{path}", {"pad": [[]] * (pad // 3)})
    # JSON like every other error of the API (aiohttp's own 413 is plain text).
    assert status == 413 and body["error"]["code"] == "resource_exhausted", body
    assert f"Maximum request body size {pad} exceeded" in body["error"]["message"]
    # The limit is only on these two: an agent's call takes the app-wide limit.
    status, body = await _post(attested.session, f"{attested.url}/agent/report",
                               {"pad": [[]] * (pad // 3), "workload_attestation_failures": []})
    assert status == 200, body


async def test_sign_x509_rotation_reason_must_be_a_string(
    attested: Attested, caplog: pytest.LogCaptureFixture
) -> None:
    """rotation_reason was str()-ed whatever it was: a list nested 1000 deep (orjson allows
    1024) made repr() raise RecursionError, a 500 with a traceback at ERROR."""
    csr = b64(csr_for(new_key()))
    url = f"{attested.url}/agent/sign/x509"
    headers = {"Content-Type": "application/json"}
    with caplog.at_level(logging.WARNING):
        for reason in (b"[" * 1000 + b"]" * 1000, b"5", b'{"a": 1}'):
            raw = (b'{"requests": [{"entry_id": "%s", "csr": "%s", "rotation_reason": %s}]}'
                   % (attested.entry.id.encode(), csr.encode(), reason))
            async with attested.session.post(url, data=raw, headers=headers) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 400 and "rotation_reason" in body["error"]["message"], body
    assert "internal error" not in caplog.text


async def test_a_csr_that_is_not_base64_fails_its_own_item_only(attested: Attested) -> None:
    """One undecodable CSR in a batch used to refuse the whole batch with a 400: the other
    workloads' CSRs were lost with it. Now it fails alone, in its place, as a CSR that
    decodes but is not a CSR does."""
    good = b64(csr_for(new_key()))
    entry_id = attested.entry.id
    status, body = await _post(attested.session, f"{attested.url}/agent/sign/x509", {"requests": [
        {"entry_id": entry_id, "csr": good},
        {"entry_id": entry_id, "csr": "not base64!"},
        {"entry_id": entry_id, "csr": b64(b"not a CSR")},
        {"entry_id": entry_id, "csr": good},
    ]})
    assert status == 200, body
    results = body["results"]
    assert [r["entry_id"] for r in results] == [entry_id] * 4
    assert "svid" in results[0] and "svid" in results[3], results
    assert results[1]["error"]["code"] == "invalid_argument"
    assert "requests[1].csr is not valid base64" in results[1]["error"]["message"]
    assert results[2]["error"]["code"] == "invalid_argument"
    # A batch of nothing but undecodable CSRs is answered the same way, item by item.
    status, body = await _post(attested.session, f"{attested.url}/agent/sign/x509", {
        "requests": [{"entry_id": entry_id, "csr": ""}]})
    assert status == 200 and body["results"][0]["error"]["code"] == "invalid_argument", body


async def test_sign_jwt_audience_is_bounded(attested: Attested) -> None:
    """A 4 MB audience made a 5.5 MB token and a 4 MB issuance event."""
    url = f"{attested.url}/agent/sign/jwt"
    eid = attested.entry.id
    for audience, limit in (
        (["a" * (MAX_AUDIENCE_LENGTH + 1)], f"at most {MAX_AUDIENCE_LENGTH} characters"),
        ([f"aud{i}" for i in range(MAX_AUDIENCES + 1)], f"at most {MAX_AUDIENCES} audience values"),
    ):
        status, body = await _post(attested.session, url, {"entry_id": eid, "audience": audience})
        assert status == 400 and body["error"]["code"] == "invalid_argument", body
        assert limit in body["error"]["message"]
    at_limit = [f"{i:02d}".ljust(MAX_AUDIENCE_LENGTH, "a") for i in range(MAX_AUDIENCES)]
    status, body = await _post(attested.session, url, {"entry_id": eid, "audience": at_limit})
    assert status == 200 and body["token"], body


def _agent_session(attested: Attested, chain: list[x509.Certificate], key: Any) -> aiohttp.ClientSession:
    ctx = client_context(list(attested.server.ca.bundle.x509_authorities), chain, key)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def test_concurrent_renewals_with_one_svid_sign_once(attested: Attested) -> None:
    """Renewals presenting the same SVID at once all passed authentication, and each one
    minted and stored a new SVID (the last write won, so the agent could keep an SVID the
    server no longer accepts). Now those that overlap are told to retry (429: the SVID
    presented is still accepted, a 403 would send the agent to re-attest); the stored
    renewal, pending until used, is the one the last success returned, and it works."""
    assert attested.server.ds is not None
    url = f"{attested.url}/agent/renew"
    key = new_key()
    csr = {"csr": b64(csr_for(key))}
    results = await asyncio.gather(*(_post(attested.session, url, csr) for _ in range(8)))
    ok = [body for status, body in results if status == 200]
    assert ok, results
    refused = {(status, body["error"]["code"]) for status, body in results if status != 200}
    assert refused <= {(429, "resource_exhausted")}, refused
    record = await attested.server.ds.get_agent(attested.agent_id)
    assert record is not None
    (chain,) = [c for c in map(_chain, ok) if f"{c[0].serial_number:x}" == record.new_serial]
    async with _agent_session(attested, chain, key) as renewed:
        status, body = await _post(renewed, f"{attested.url}/agent/sync", {"known": {}})
        assert status == 200, body
    record = await attested.server.ds.get_agent(attested.agent_id)
    assert record is not None and record.serial == f"{chain[0].serial_number:x}"


def _chain(body: dict[str, Any]) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(base64.b64decode(c)) for c in body["svid"]]


async def test_a_lost_renewal_reply_leaves_the_agent_svid_accepted(attested: Attested) -> None:
    """The server stored a renewed SVID's serial as the only one it accepted, so when the
    reply never reached the agent (timeout, reset, agent killed before saving it), the SVID
    the agent still held was refused as superseded, and a join-token agent could never
    attest again. As SPIRE: the renewed SVID is pending, the held one stays accepted until
    the agent first presents the new one, and only then is the old one refused."""
    ds = attested.server.ds
    assert ds is not None
    held = await ds.get_agent(attested.agent_id)
    assert held is not None
    renew, sync = f"{attested.url}/agent/renew", f"{attested.url}/agent/sync"

    lost_key = new_key()
    status, lost = await _post(attested.session, renew, {"csr": b64(csr_for(lost_key))})
    assert status == 200, lost  # ... and the agent never gets this answer
    status, body = await _post(attested.session, sync, {"known": {}})
    assert status == 200, body  # the SVID it holds still works

    key = new_key()
    status, body = await _post(attested.session, renew, {"csr": b64(csr_for(key))})
    assert status == 200, body  # renewed again from the held SVID: replaces the lost one
    chain = _chain(body)
    record = await ds.get_agent(attested.agent_id)
    assert record is not None
    assert (record.serial, record.expires_at) == (held.serial, held.expires_at)
    assert record.new_serial == f"{chain[0].serial_number:x}"
    assert record.new_expires_at == int(chain[0].not_valid_after_utc.timestamp())

    async with _agent_session(attested, chain, key) as renewed:
        status, body = await _post(renewed, sync, {"known": {}})
        assert status == 200, body
        record = await ds.get_agent(attested.agent_id)
        assert record is not None
        assert (record.serial, record.new_serial) == (f"{chain[0].serial_number:x}", "")
        assert record.expires_at == int(chain[0].not_valid_after_utc.timestamp())
        # Now the new SVID is the agent's: the one it held before is refused, and so is the
        # lost one; the new one goes on working (and renewing).
        status, body = await _post(attested.session, sync, {"known": {}})
        assert status == 403 and "superseded" in body["error"]["message"], body
        status, body = await _post(renewed, sync, {"known": {}})
        assert status == 200, body
        status, body = await _post(renewed, renew, {"csr": b64(csr_for(new_key()))})
        assert status == 200, body
    async with _agent_session(attested, _chain(lost), lost_key) as replaced:
        status, body = await _post(replaced, sync, {"known": {}})
        assert status == 403 and "superseded" in body["error"]["message"], body


async def test_a_banned_agent_is_refused_with_a_renewal_pending(attested: Attested) -> None:
    """Banning clears the pending SVID as well as the current one."""
    ds = attested.server.ds
    assert ds is not None
    key = new_key()
    status, body = await _post(attested.session, f"{attested.url}/agent/renew", {"csr": b64(csr_for(key))})
    assert status == 200, body
    await attested.server.agents.ban(attested.agent_id)
    record = await ds.get_agent(attested.agent_id)
    assert record is not None and record.banned and (record.serial, record.new_serial) == ("", "")
    async with _agent_session(attested, _chain(body), key) as renewed:
        status, body = await _post(renewed, f"{attested.url}/agent/sync", {"known": {}})
        assert status == 403 and "banned" in body["error"]["message"], body


async def test_renewal_is_a_signing_under_admission(attested: Attested) -> None:
    """A renewal takes from the agent's signing bucket like any CSR it sends, so an agent
    looping on renew is held to the signing rate the operator set."""
    bucket = attested.server.admission._bucket(str(attested.agent_id))
    bucket.tokens, bucket.rate = 0.0, 1e-6
    csr = {"csr": b64(csr_for(new_key()))}
    status, body = await _post(attested.session, f"{attested.url}/agent/renew", csr)
    assert status == 429 and body["error"]["code"] == "resource_exhausted", body
    assert "agent signing rate exceeded" in body["error"]["message"]


async def test_refusals_are_svid_refused_events_with_short_reason_codes(attested: Attested) -> None:
    """SOC pipelines group refusals by `unmapped.reason`: a short code (as the metrics'
    `reason` label), with the human text in `detail`."""
    server, ds = attested.server, attested.server.ds
    assert ds is not None
    elsewhere = await server.entries.create(Entry(
        "", SpiffeId(server.td, "/hostile/other"), SpiffeId(server.td, "/some/other/agent"),
        (Selector("unix", "uid:1001"),)))
    good = csr_for(new_key())
    bad_signature = good[:-1] + bytes([good[-1] ^ 1])  # parses; its signature does not verify
    status, body = await _post(attested.session, f"{attested.url}/agent/sign/x509", {"requests": [
        {"entry_id": elsewhere.id, "csr": b64(good)},
        {"entry_id": attested.entry.id, "csr": b64(bad_signature)},
    ]})
    assert status == 200 and all("error" in r for r in body["results"]), body
    status, body = await _post(attested.session, f"{attested.url}/agent/sign/jwt",
                               {"entry_id": elsewhere.id, "audience": ["a"]})
    assert status == 403, body
    refused = [r.event for r in await ds.fetch_outbox(0, 100_000) if r.event.type == ocsf.SVID_REFUSED]
    unmapped = [e.data["unmapped"] for e in refused]
    got = sorted((u["svid_kind"], u["reason"], u["entry_id"]) for u in unmapped)
    assert got == sorted([("x509", "not_authorized", elsewhere.id), ("x509", "bad_csr", attested.entry.id),
                          ("jwt", "not_authorized", elsewhere.id)])
    assert all(u["detail"] for u in unmapped)


async def test_expired_entry_is_neither_signed_nor_synced(attested: Attested) -> None:
    """An entry past its expires_at is gone for the agent, as SPIRE prunes it: each of its
    sign params is refused permission_denied while the others in the batch are signed, a
    JWT-SVID is refused, and sync lists it as removed. It was signed and synced forever."""
    server = attested.server
    expired = await server.entries.create(Entry(
        "", SpiffeId(server.td, "/hostile/expired"), attested.agent_id, (Selector("unix", "uid:1002"),),
        expires_at=int(time.time()) - 1))
    csr = b64(csr_for(new_key()))
    status, body = await _post(attested.session, f"{attested.url}/agent/sign/x509", {"requests": [
        {"entry_id": expired.id, "csr": csr}, {"entry_id": attested.entry.id, "csr": csr}]})
    assert status == 200, body
    first, second = body["results"]
    assert first["entry_id"] == expired.id and first["error"]["code"] == "permission_denied", body
    assert second["entry_id"] == attested.entry.id and "svid" in second, body
    status, body = await _post(attested.session, f"{attested.url}/agent/sign/jwt",
                               {"entry_id": expired.id, "audience": ["a"]})
    assert status == 403 and body["error"]["code"] == "permission_denied", body
    status, body = await _post(attested.session, f"{attested.url}/agent/sync",
                               {"known": {expired.id: 0, attested.entry.id: 0}})
    assert status == 200, body
    assert body["removed"] == [expired.id]
    assert [e["id"] for e in body["entries"]] == []


async def test_expired_agent_svid_is_refused_on_a_kept_alive_connection(attested: Attested) -> None:
    """The TLS handshake checks the SVID's validity once; the agent's keep-alive connection
    then carries every later call. Once the SVID has expired the calls are refused (they
    were served for as long as the connection lived)."""
    url = f"{attested.url}/agent/sync"
    status, body = await _post(attested.session, url, {"known": {}})
    assert status == 200, body  # the connection is open, the SVID valid
    assert attested.server.ds is not None
    record = await attested.server.ds.get_agent(attested.agent_id)
    assert record is not None
    agents = attested.server.agents
    agents.clock = lambda: record.expires_at + 1.0
    status, body = await _post(attested.session, url, {"known": {}})
    assert status == 401 and body["error"]["code"] == "unauthenticated", body
    assert "expired" in body["error"]["message"]


async def test_a_renewal_beaten_by_another_replica_is_retried_not_refused(
    attested: Attested, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica stores a renewal of the same SVID between this one's read and its
    write (the agent retried one whose answer it did not get, on the next address). The
    SVID presented is still the current one: the answer is 429 retry, not 403 superseded,
    which would send the agent to re-attest (for a join-token agent, for good)."""
    ds = attested.server.ds
    assert ds is not None
    real = ds.renew_agent

    async def beaten(record: Any, previous: Any, events: Any = ()) -> bool:
        other = dataclasses.replace(previous, new_serial="0b0e", new_expires_at=previous.expires_at)
        assert await real(other, previous)  # the other replica's write lands first
        return await real(record, previous, events)

    monkeypatch.setattr(ds, "renew_agent", beaten)
    url = f"{attested.url}/agent/renew"
    status, body = await _post(attested.session, url, {"csr": b64(csr_for(new_key()))})
    assert status == 429 and body["error"]["code"] == "resource_exhausted", body
    monkeypatch.setattr(ds, "renew_agent", real)
    status, body = await _post(attested.session, url, {"csr": b64(csr_for(new_key()))})
    assert status == 200, body  # the retry replaces the other replica's pending SVID
