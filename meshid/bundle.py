"""SPIFFE trust bundles: X.509 roots + JWT signing keys, encoded as a SPIFFE JWKS document."""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from meshid.errors import InvalidBundleError
from meshid.spiffe_id import TrustDomain

DEFAULT_REFRESH_HINT = 300
MAX_BUNDLE_DOCUMENT = 4 * 1024 * 1024


@dataclass(frozen=True)
class Bundle:
    """Immutable trust bundle of one trust domain."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: dict[str, PublicKeyTypes] = field(default_factory=dict)
    sequence: int = 0
    refresh_hint: int = DEFAULT_REFRESH_HINT

    @functools.cached_property
    def _x509_der(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.x509_authorities)

    def x509_der(self) -> bytes:
        """DER roots concatenated, as the Workload API's `bundle` fields carry them (computed once)."""
        return self._x509_der

    def x509_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities)

    def jwks(self) -> dict[str, Any]:
        """JWKS of the JWT keys only (Workload API FetchJWTBundles, OIDC /keys)."""
        return {"keys": [_jwk(kid, key, use=None) for kid, key in sorted(self.jwt_authorities.items())]}

    def jwks_bytes(self) -> bytes:
        return json.dumps(self.jwks(), separators=(",", ":")).encode()

    def to_spiffe_json(self) -> dict[str, Any]:
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            jwk = _jwk(None, cert.public_key(), use="x509-svid")
            jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
            keys.append(jwk)
        for kid, key in sorted(self.jwt_authorities.items()):
            keys.append(_jwk(kid, key, use="jwt-svid"))
        return {"keys": keys, "spiffe_sequence": self.sequence, "spiffe_refresh_hint": self.refresh_hint}

    def to_spiffe_bytes(self) -> bytes:
        return json.dumps(self.to_spiffe_json(), indent=2).encode()

    @classmethod
    def from_spiffe_json(cls, trust_domain: TrustDomain, doc: bytes | str | dict[str, Any]) -> Bundle:
        if isinstance(doc, (bytes, str)):
            if len(doc) > MAX_BUNDLE_DOCUMENT:
                raise InvalidBundleError("bundle document is too large")
            try:
                doc = json.loads(doc)
            except (ValueError, RecursionError) as exc:
                # RecursionError: arrays nested past the interpreter's limit, well within 4 MB.
                raise InvalidBundleError(f"bundle is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise InvalidBundleError("bundle must be a JSON object with a 'keys' list")
        roots: list[x509.Certificate] = []
        jwt_keys: dict[str, PublicKeyTypes] = {}
        for i, key in enumerate(doc["keys"]):
            if not isinstance(key, dict):
                raise InvalidBundleError(f"key {i} is not an object")
            use = key.get("use")
            if use == "x509-svid":
                x5c = key.get("x5c")
                if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                    raise InvalidBundleError(f"x509-svid key {i} must carry exactly one certificate in x5c")
                try:
                    roots.append(x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True)))
                except ValueError as exc:
                    raise InvalidBundleError(f"x509-svid key {i}: bad certificate: {exc}") from None
            elif use == "jwt-svid":
                kid = key.get("kid")
                if not isinstance(kid, str) or not kid:
                    raise InvalidBundleError(f"jwt-svid key {i} has no kid")
                jwt_keys[kid] = _public_key_from_jwk(key, i)
            else:
                # Unknown uses are skipped, as the SPIFFE bundle format asks.
                continue
        seq = doc.get("spiffe_sequence", 0)
        hint = doc.get("spiffe_refresh_hint", DEFAULT_REFRESH_HINT)
        # bool is an int to Python, not to JSON; the sequence is a uint64 in go-spiffe.
        if not isinstance(seq, int) or not isinstance(hint, int) or isinstance(seq, bool) \
                or isinstance(hint, bool):
            raise InvalidBundleError("spiffe_sequence and spiffe_refresh_hint must be integers")
        if not 0 <= seq < 2**64:
            raise InvalidBundleError(f"spiffe_sequence {seq} is out of range")
        return cls(trust_domain, tuple(roots), jwt_keys, seq, hint)

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain, doc: bytes) -> Bundle:
        """Parse a plain JWKS (as FetchJWTBundles returns) into a bundle of JWT keys."""
        try:
            data = json.loads(doc)
        except (ValueError, RecursionError) as exc:
            raise InvalidBundleError(f"JWKS is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise InvalidBundleError("JWKS must have a 'keys' list")
        keys: dict[str, PublicKeyTypes] = {}
        for i, key in enumerate(data["keys"]):
            if not isinstance(key, dict) or not isinstance(key.get("kid"), str) or not key["kid"]:
                raise InvalidBundleError(f"JWKS key {i} has no kid")
            keys[key["kid"]] = _public_key_from_jwk(key, i)
        return cls(trust_domain, (), keys)


def _jwk(kid: str | None, key: PublicKeyTypes, use: str | None) -> dict[str, Any]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    elif isinstance(key, rsa.RSAPublicKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    else:
        raise InvalidBundleError(f"unsupported key type {type(key).__name__}")
    if use:
        data["use"] = use
    if kid:
        data["kid"] = kid
    return data


def _public_key_from_jwk(key: dict[str, Any], index: int) -> PublicKeyTypes:
    kty = key.get("kty")
    if kty not in ("EC", "RSA"):
        raise InvalidBundleError(f"key {index}: unsupported kty {kty!r}")
    # A bundle is public: with "d" PyJWT would hand back a private key, which the bundle
    # cannot re-encode (nor should it carry one onward to agents).
    if "d" in key:
        raise InvalidBundleError(f"key {index}: JWK carries private key material")
    try:
        if kty == "EC":
            return jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(key))  # type: ignore[return-value]
        return jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(key))  # type: ignore[return-value]
    except (ValueError, TypeError, jwt.InvalidKeyError) as exc:
        # TypeError: a coordinate or modulus that is not a string (e.g. a JSON number).
        raise InvalidBundleError(f"key {index}: bad JWK: {exc}") from None


def load_pem_certs(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidBundleError(f"not a PEM certificate list: {exc}") from None
