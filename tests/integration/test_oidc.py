"""OIDC discovery on the bundle endpoint (https_web, a certificate for localhost made here):
a relying party finds the issuer and keys with PyJWT's PyJWKClient and verifies a
JWT-SVID fetched from the Workload API, `iss` included."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest
from pki_helpers import make_ca, make_leaf, write_pem
from spiffe import WorkloadApiClient

from meshid.cli.dev import start_dev

pytestmark = pytest.mark.integration

AUDIENCE = "oidc-relying-party"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, ctx: ssl.SSLContext) -> tuple[dict[str, Any], str]:
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        return json.loads(resp.read()), str(resp.headers.get("Cache-Control", ""))


async def test_jwt_svid_verifies_through_oidc_discovery(short_tmp: Path) -> None:
    ca, ca_key = make_ca("relying party's trusted root")
    leaf, leaf_key = make_leaf(ca, ca_key, dns=["localhost"], ips=["127.0.0.1"])
    cert_file = write_pem(short_tmp / "oidc.pem", leaf)
    key_file = write_pem(short_tmp / "oidc.key", leaf_key)
    ca_file = write_pem(short_tmp / "rp-ca.pem", ca)
    port = free_port()
    issuer = f"https://localhost:{port}"
    overrides = {
        "ca": {"jwt_issuer": issuer},
        "oidc": {"enabled": True},
        "federation": {"bundle_endpoint": {"enabled": True, "address": "127.0.0.1", "port": port,
                                           "profile": "https_web", "cert_file": str(cert_file),
                                           "key_file": str(key_file)}},
    }
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"),
                            server_overrides=overrides)
    try:
        assert stack.server.bundle_endpoint_port == port

        def fetch_token() -> str:
            c = WorkloadApiClient(socket_path=f"unix://{stack.socket_path}")
            try:
                return str(c.fetch_jwt_svid(audience={AUDIENCE}).token)
            finally:
                c.close()

        token = await asyncio.to_thread(fetch_token)
        ctx = ssl.create_default_context(cafile=str(ca_file))  # hostname checked: Web PKI rules

        def relying_party() -> tuple[dict[str, Any], dict[str, Any], str, dict[str, Any]]:
            conf, _ = get_json(f"{issuer}/.well-known/openid-configuration", ctx)
            keys, cache_control = get_json(conf["jwks_uri"], ctx)
            signing_key = jwt.PyJWKClient(conf["jwks_uri"], ssl_context=ctx).get_signing_key_from_jwt(token)
            claims = jwt.decode(token, signing_key.key,
                                algorithms=conf["id_token_signing_alg_values_supported"],
                                audience=AUDIENCE, issuer=conf["issuer"])
            return conf, keys, cache_control, claims

        conf, keys, cache_control, claims = await asyncio.to_thread(relying_party)
        assert conf["issuer"] == issuer == claims["iss"]
        assert conf["jwks_uri"] == f"{issuer}/keys"
        assert conf["response_types_supported"] == ["id_token"]
        assert conf["subject_types_supported"] == ["public"]
        assert claims["sub"] == str(stack.spiffe_id)
        assert "no-store" in cache_control
        bundle = stack.server.ca.bundle
        assert {k["kid"] for k in keys["keys"]} == set(bundle.jwt_authorities)
        for k in keys["keys"]:
            assert k["use"] == "sig" and k["alg"] in conf["id_token_signing_alg_values_supported"]
        assert jwt.get_unverified_header(token)["kid"] in {k["kid"] for k in keys["keys"]}

        # The same listener serves the SPIFFE bundle, and refuses TLS 1.2.
        doc, _ = await asyncio.to_thread(get_json, f"{issuer}/", ctx)
        assert "spiffe_sequence" in doc and any(k.get("use") == "x509-svid" for k in doc["keys"])
        ctx12 = ssl.create_default_context(cafile=str(ca_file))
        ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _, w = await asyncio.wait_for(asyncio.open_connection("localhost", port, ssl=ctx12), 10)
            w.close()
    finally:
        await stack.stop()
