"""The public bundle endpoint: `GET /` serves this trust domain's SPIFFE bundle to
federated peers, and (when OIDC is on) `/.well-known/openid-configuration` and `/keys`
serve OIDC discovery for relying parties that validate JWT-SVIDs as ID tokens.

Served only on a TLS 1.3 server-auth listener: profile `https_spiffe` presents the
server's own X509-SVID, `https_web` a certificate and key from files (reloaded when the
files change, e.g. by cert-manager).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from issuer.ca.keys import jwt_alg_for
from meshid.bundle import Bundle
from meshid.errors import ConfigError
from meshid.tls import SwappableServerContext

log = logging.getLogger("meshid.bundle_endpoint")

# What the JWT signer can produce, in SPIRE's oidc-discovery-provider order.
SIGNING_ALGS = ("RS256", "ES256", "ES384")
NO_CACHE = {"Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache", "Expires": "0"}


# ---------------------------------------------------------------------------- documents

def spiffe_bundle_document(bundle: Bundle, refresh_hint: int) -> dict[str, Any]:
    return dataclasses.replace(bundle, refresh_hint=refresh_hint).to_spiffe_json()


def openid_configuration(issuer: str, jwks_uri: str) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        # Required by OIDC discovery; there is no interactive flow behind it.
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": list(SIGNING_ALGS),
    }


def oidc_jwks(bundle: Bundle) -> dict[str, Any]:
    """The JWT signing keys with `use: sig` and `alg`, which many relying parties need."""
    keys = []
    for jwk in bundle.jwks()["keys"]:
        keys.append({**jwk, "use": "sig", "alg": jwt_alg_for(bundle.jwt_authorities[jwk["kid"]])})
    return {"keys": keys}


def default_jwks_uri(issuer: str) -> str:
    return issuer.rstrip("/") + "/keys"


# ---------------------------------------------------------------------------- HTTP

class BundleEndpoint:
    def __init__(
        self,
        bundle: Callable[[], Bundle],
        refresh_hint: int,
        oidc_issuer: str = "",
        jwks_uri: str = "",
    ) -> None:
        self._bundle = bundle
        self.refresh_hint = refresh_hint
        self.oidc_issuer = oidc_issuer
        self.jwks_uri = jwks_uri or (default_jwks_uri(oidc_issuer) if oidc_issuer else "")

    def app(self) -> web.Application:
        # Only GETs with no body: a small request limit keeps the public listener cheap.
        app = web.Application(client_max_size=1024)
        app.router.add_get("/", self.spiffe_bundle)
        if self.oidc_issuer:
            app.router.add_get("/.well-known/openid-configuration", self.openid_configuration)
            app.router.add_get("/keys", self.keys)
        return app

    @staticmethod
    def _json(doc: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(body=json.dumps(doc, indent=2).encode(), content_type="application/json",
                            headers=headers)

    async def spiffe_bundle(self, _: web.Request) -> web.Response:
        return self._json(spiffe_bundle_document(self._bundle(), self.refresh_hint))

    async def openid_configuration(self, _: web.Request) -> web.Response:
        return self._json(openid_configuration(self.oidc_issuer, self.jwks_uri))

    async def keys(self, _: web.Request) -> web.Response:
        # Relying parties must see a new key as soon as it is published.
        return self._json(oidc_jwks(self._bundle()), NO_CACHE)


# ---------------------------------------------------------------------------- https_web TLS

def web_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.3-only server-auth context from a certificate chain and key on disk."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"federation.bundle_endpoint: cannot load {cert_file} / {key_file}: {exc}") \
            from None
    return ctx


class ServingCertFiles:
    """Reloads the https_web certificate when its files change; a bad pair keeps the old one."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._stamp = self._mtimes()
        self.context = SwappableServerContext(web_context(cert_file, key_file))

    def _mtimes(self) -> tuple[int, int]:
        try:
            return Path(self.cert_file).stat().st_mtime_ns, Path(self.key_file).stat().st_mtime_ns
        except OSError:
            return (0, 0)

    async def check(self) -> None:
        stamp = self._mtimes()
        if stamp == self._stamp or stamp == (0, 0):
            return
        try:
            ctx = web_context(self.cert_file, self.key_file)
        except ConfigError as exc:
            # A half-written pair (cert updated, key not yet) is retried next time.
            log.warning("bundle endpoint: keeping the current certificate: %s", exc)
            return
        self._stamp = stamp
        self.context.replace(ctx)
        log.info("bundle endpoint: serving certificate reloaded from %s", self.cert_file)
