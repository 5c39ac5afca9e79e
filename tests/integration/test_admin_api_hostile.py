"""The admin API (issuer/api/admin_api.py) against bad input from its (root) caller: a
clear 400, never an internal error with a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from issuer.api.admin_api import MAX_TOKEN_TTL
from issuer.ca.devpki import ensure_dev_upstream
from issuer.config import server_config_from_dict
from issuer.server import Server

pytestmark = pytest.mark.integration

DEEP = b"[" * 1000 + b"]" * 1000  # orjson accepts nesting up to 1024; repr() of it recurses too deep


@pytest.fixture
async def admin_server(short_tmp: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, Server]]:
    upstream = ensure_dev_upstream(short_tmp / "upstream")
    secret = short_tmp / "master.secret"
    secret.write_text("hostile-admin-master-secret-0123456789\n")
    secret.chmod(0o600)
    sock = short_tmp / "admin.sock"
    server = Server(server_config_from_dict({
        "trust_domain": "example.org",
        "data_dir": str(short_tmp / "server"),
        "server": {
            "bind_address": "127.0.0.1", "agent_api_port": 0, "grpc_port": 0, "health_port": 0,
            "admin_socket_path": str(sock), "master_secret_file": str(secret), "master_secret_env": "",
        },
        "upstream": {"disk": {"cert_file": str(upstream.cert_file), "key_file": str(upstream.key_file),
                              "bundle_file": str(upstream.bundle_file)}},
    }))
    await server.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session:
            yield session, server
    finally:
        await server.stop()


@pytest.fixture
async def admin(admin_server: tuple[aiohttp.ClientSession, Server]) -> aiohttp.ClientSession:
    return admin_server[0]


async def call(session: aiohttp.ClientSession, method: str, path: str, raw: bytes) -> tuple[int, Any]:
    async with session.request(method, f"http://meshid{path}", data=raw,
                               headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json(content_type=None)


ENTRY = (b'"spiffe_id": "spiffe://example.org/w", "parent_id": "spiffe://example.org/agent", '
         b'"selectors": ["unix:uid:1000"]')


@pytest.mark.parametrize("path", ["/v1/agents/evict", "/v1/agents/ban"])
async def test_agent_id_must_be_a_string(
    admin: aiohttp.ClientSession, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """agent_id was str()-ed whatever it was: the deep list was a 500 (RecursionError)."""
    with caplog.at_level(logging.WARNING):
        for value in (DEEP, b"5", b'{"a": 1}', b"null"):
            status, body = await call(admin, "POST", path, b'{"agent_id": %s}' % value)
            assert status == 400 and "agent_id" in body["error"]["message"], body
    assert "internal error" not in caplog.text


@pytest.mark.parametrize(("field", "value"), [
    ("id", DEEP), ("id", b"5"),
    ("admin", b'"false"'), ("admin", b"1"), ("downstream", b'"no"'), ("downstream", b"0"),
    ("store_svid", b"[]"), ("hint", DEEP), ("hint", b"5"), ("hint", b"null"),
    # a NUL no PostgreSQL column stores (a 500 there), a forged log line
    ("hint", b'"a\\u0000b"'), ("hint", b'"a\\nb"'),
])
async def test_entry_fields_have_their_type(
    admin: aiohttp.ClientSession, field: str, value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """admin/downstream/store_svid were bool()-ed ("false" made an admin entry), id and
    hint str()-ed (the deep list was a 500)."""
    with caplog.at_level(logging.WARNING):
        raw = b'{%s, "%s": %s}' % (ENTRY, field.encode(), value)
        status, body = await call(admin, "POST", "/v1/entries", raw)
        assert status == 400 and body["error"]["code"] == "invalid_argument", body
        assert field in body["error"]["message"]
        status, created = await call(admin, "POST", "/v1/entries", b"{%s}" % ENTRY)
        assert status == 201 and created["admin"] is False, created
        if field != "id":  # an update keeps the entry's id whatever the body says
            status, body = await call(admin, "PUT", f"/v1/entries/{created['id']}",
                                      b'{"%s": %s}' % (field.encode(), value))
            assert status == 400 and field in body["error"]["message"], body
    assert "internal error" not in caplog.text


async def test_join_token_ttl_is_at_least_a_second(admin: aiohttp.ClientSession) -> None:
    """A ttl of 0.0001 made a token that had expired before it was shown."""
    for ttl in (b"0.0001", b"0.999", b"0", b"-1", b"%d" % (MAX_TOKEN_TTL + 1), b'"600"', b"true"):
        status, body = await call(admin, "POST", "/v1/tokens", b'{"ttl": %s}' % ttl)
        assert status == 400 and "ttl must be between 1 and" in body["error"]["message"], (ttl, body)
    for ttl in (b"1", b"%d" % MAX_TOKEN_TTL):
        status, body = await call(admin, "POST", "/v1/tokens", b'{"ttl": %s}' % ttl)
        assert status == 201 and body["token"], body


async def test_ca_revoke_force_must_be_a_boolean(admin: aiohttp.ClientSession) -> None:
    """force was bool()-ed: "false" forced a revocation."""
    status, body = await call(admin, "POST", "/v1/ca/revoke", b'{"key_id": "k", "force": "false"}')
    assert status == 400 and "force must be a boolean" in body["error"]["message"], body


async def test_a_body_above_the_limit_is_a_json_413(admin: aiohttp.ClientSession) -> None:
    """aiohttp's own 413 is plain text; every other error of these APIs is JSON."""
    status, body = await call(admin, "POST", "/v1/entries", b'{"pad": "%s"}' % (b"a" * (1 << 20)))
    assert status == 413 and body["error"]["code"] == "resource_exhausted", body


@pytest.mark.parametrize("value", [b"%d" % (1 << 63), b"-5"])
async def test_expires_at_beyond_int64_or_negative_is_a_400(
    admin: aiohttp.ClientSession, value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """2^63 reached SQLite's INTEGER column and came back a 500 ("Python int too large");
    a negative one was stored as an already expired entry, which the Entry API refuses."""
    with caplog.at_level(logging.WARNING):
        status, body = await call(admin, "POST", "/v1/entries", b'{%s, "expires_at": %s}' % (ENTRY, value))
        assert status == 400 and "expires_at" in body["error"]["message"], body
        status, created = await call(admin, "POST", "/v1/entries", b"{%s}" % ENTRY)
        assert status == 201, created
        status, body = await call(admin, "PUT", f"/v1/entries/{created['id']}", b'{"expires_at": %s}' % value)
        assert status == 400 and "expires_at" in body["error"]["message"], body
        status, shown = await call(admin, "GET", f"/v1/entries/{created['id']}", b"")
        assert shown == created
    assert "internal error" not in caplog.text


async def test_an_update_keeps_the_additional_attributes(
    admin_server: tuple[aiohttp.ClientSession, Server],
) -> None:
    """The PUT rebuilt the entry from its JSON form, which has no additional_attributes:
    changing a hint with the CLI dropped what Cilium's operator had set over gRPC."""
    admin, server = admin_server
    attrs = {"additional_attributes": {"disable_x509_svid_prefetch": True, "jwt_svid_include_jti": True}}
    status, created = await call(admin, "POST", "/v1/entries", b"{%s}" % ENTRY)
    assert status == 201, created
    current = await server.entries.get(created["id"])
    await server.entries.update(current.replace(extra=attrs))
    status, body = await call(admin, "PUT", f"/v1/entries/{created['id']}", b'{"hint": "h"}')
    assert status == 200 and body["hint"] == "h", body
    assert (await server.entries.get(created["id"])).extra == attrs


async def test_concurrent_updates_of_different_fields_both_land(admin: aiohttp.ClientSession) -> None:
    """Each PUT read the entry, merged its body and wrote the whole entry back: of two PUTs at
    once, the second wrote the first's field back as it had read it, and that change was lost."""
    status, created = await call(admin, "POST", "/v1/entries", b"{%s}" % ENTRY)
    assert status == 201, created
    path = f"/v1/entries/{created['id']}"
    bodies = [b'{"hint": "h"}', b'{"dns_names": ["a.example.org"]}', b'{"x509_svid_ttl": 600}',
              b'{"jwt_svid_ttl": 60}', b'{"store_svid": true}', b'{"downstream": true}']
    results = await asyncio.gather(*(call(admin, "PUT", path, b) for b in bodies))
    assert all(status == 200 for status, _ in results), results
    status, shown = await call(admin, "GET", path, b"")
    assert (shown["hint"], shown["dns_names"], shown["x509_svid_ttl"], shown["jwt_svid_ttl"],
            shown["store_svid"], shown["downstream"]) == ("h", ["a.example.org"], 600, 60, True, True), shown
    assert shown["revision_number"] == len(bodies)


@pytest.mark.parametrize("entry_id", [b"..", b".", b"a/b", b"a b", b"a?b", b"\\u00e9", b"x" * 256])
async def test_an_entry_id_the_entry_routes_cannot_name_is_refused(
    admin: aiohttp.ClientSession, entry_id: bytes
) -> None:
    """The Entry API refused such ids, the admin API stored them: ".." could then never be
    shown, changed or deleted (/v1/entries/.. is normalised away), nor "a/b" by the CLI."""
    status, body = await call(admin, "POST", "/v1/entries", b'{%s, "id": "%s"}' % (ENTRY, entry_id))
    assert status == 400 and "entry ID" in body["error"]["message"], body
    status, listed = await call(admin, "GET", "/v1/entries", b"")
    assert listed["entries"] == []
    status, body = await call(admin, "POST", "/v1/entries", b'{%s, "id": "my-entry_1.a~"}' % ENTRY)
    assert status == 201 and body["id"] == "my-entry_1.a~", body
