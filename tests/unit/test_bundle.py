"""SPIFFE bundle (JWKS) encoding and decoding, and refusal of malformed documents."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from issuer.ca import minting
from meshid.bundle import Bundle
from meshid.errors import InvalidBundleError
from meshid.spiffe_id import TrustDomain

TD = TrustDomain("example.org")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    roots = tuple(
        minting.self_signed_ca(k, TD, 3600, NOW)
        for k in (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1()))
    )
    jwt_keys: dict[str, PublicKeyTypes] = {
        "kid-ec256": ec.generate_private_key(ec.SECP256R1()).public_key(),
        "kid-ec384": ec.generate_private_key(ec.SECP384R1()).public_key(),
        "kid-rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
    }
    return Bundle(TD, roots, jwt_keys, sequence=42, refresh_hint=120)


def test_encoding_follows_the_spiffe_bundle_format(bundle: Bundle) -> None:
    doc = json.loads(bundle.to_spiffe_bytes())
    assert doc["spiffe_sequence"] == 42
    assert doc["spiffe_refresh_hint"] == 120
    x509_keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_keys) == 2 and len(jwt_keys) == 3
    assert len(doc["keys"]) == 5
    for k in doc["keys"]:
        assert k["kty"] in ("EC", "RSA")
        assert "d" not in k and "p" not in k  # public keys only
    for k, root in zip(x509_keys, bundle.x509_authorities, strict=True):
        assert "kid" not in k
        assert len(k["x5c"]) == 1
        assert base64.b64decode(k["x5c"][0]) == root.public_bytes(serialization.Encoding.DER)
    assert sorted(k["kid"] for k in jwt_keys) == ["kid-ec256", "kid-ec384", "kid-rsa"]
    for k in jwt_keys:
        assert "x5c" not in k
    crv = {k["kid"]: k.get("crv") for k in jwt_keys}
    assert crv == {"kid-ec256": "P-256", "kid-ec384": "P-384", "kid-rsa": None}


def test_round_trip_keeps_everything(bundle: Bundle) -> None:
    for raw in (bundle.to_spiffe_bytes(), bundle.to_spiffe_bytes().decode(), bundle.to_spiffe_json()):
        back = Bundle.from_spiffe_json(TD, raw)
        assert back.trust_domain == TD
        assert back.sequence == 42 and back.refresh_hint == 120
        assert back.x509_authorities == bundle.x509_authorities
        assert set(back.jwt_authorities) == set(bundle.jwt_authorities)
        for kid, key in bundle.jwt_authorities.items():
            assert spki(back.jwt_authorities[kid]) == spki(key)
        assert back.to_spiffe_json() == bundle.to_spiffe_json()


def test_pem_der_and_jwks_views(bundle: Bundle) -> None:
    pems = serialization.Encoding.PEM
    assert bundle.x509_pem() == b"".join(c.public_bytes(pems) for c in bundle.x509_authorities)
    jwks = json.loads(bundle.jwks_bytes())
    assert sorted(k["kid"] for k in jwks["keys"]) == ["kid-ec256", "kid-ec384", "kid-rsa"]
    only_jwt = Bundle.from_jwks(TD, bundle.jwks_bytes())
    assert only_jwt.x509_authorities == ()
    assert {k: spki(v) for k, v in only_jwt.jwt_authorities.items()} == {
        k: spki(v) for k, v in bundle.jwt_authorities.items()
    }


def test_empty_bundle_and_defaults() -> None:
    doc = Bundle(TD).to_spiffe_json()
    assert doc == {"keys": [], "spiffe_sequence": 0, "spiffe_refresh_hint": 300}
    back = Bundle.from_spiffe_json(TD, b'{"keys": []}')
    assert back.sequence == 0 and back.refresh_hint == 300
    assert back.x509_authorities == () and back.jwt_authorities == {}


def test_unknown_key_uses_are_skipped(bundle: Bundle) -> None:
    doc = bundle.to_spiffe_json()
    doc["keys"].append({"kty": "EC", "use": "something-else", "crv": "P-256", "x": "AA", "y": "AA"})
    back = Bundle.from_spiffe_json(TD, doc)
    assert len(back.x509_authorities) == 2 and len(back.jwt_authorities) == 3


def _mutate(bundle: Bundle, fn: Any) -> dict[str, Any]:
    doc = copy.deepcopy(bundle.to_spiffe_json())
    fn(doc)
    return doc


def _x509(doc: dict[str, Any]) -> dict[str, Any]:
    return next(k for k in doc["keys"] if k["use"] == "x509-svid")


def _jwt(doc: dict[str, Any]) -> dict[str, Any]:
    return next(k for k in doc["keys"] if k["use"] == "jwt-svid" and k["kty"] == "EC")


_PRIVATE_EC_JWK = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1())))

MUTATIONS = {
    "x5c missing": lambda d: _x509(d).pop("x5c"),
    "x5c empty": lambda d: _x509(d).update(x5c=[]),
    "x5c two certs": lambda d: _x509(d).update(x5c=[_x509(d)["x5c"][0], _x509(d)["x5c"][0]]),
    "x5c not a list": lambda d: _x509(d).update(x5c=_x509(d)["x5c"][0]),
    "x5c not a string": lambda d: _x509(d).update(x5c=[123]),
    "x5c not base64": lambda d: _x509(d).update(x5c=["@@not base64@@"]),
    "x5c not a certificate": lambda d: _x509(d).update(x5c=[base64.b64encode(b"garbage").decode()]),
    "jwt key without kid": lambda d: _jwt(d).pop("kid"),
    "jwt key with empty kid": lambda d: _jwt(d).update(kid=""),
    "jwt key with numeric kid": lambda d: _jwt(d).update(kid=7),
    "jwt key with unknown kty": lambda d: _jwt(d).update(kty="oct"),
    "jwt key without kty": lambda d: _jwt(d).pop("kty"),
    "jwt EC key missing x": lambda d: _jwt(d).pop("x"),
    "jwt EC key bad curve": lambda d: _jwt(d).update(crv="P-999"),
    "key not an object": lambda d: d["keys"].append("x509-svid"),
    "keys not a list": lambda d: d.update(keys={"a": 1}),
    "keys missing": lambda d: d.pop("keys"),
    "jwt EC key x a number": lambda d: _jwt(d).update(x=12345),
    "jwt RSA key n a number": lambda d: next(k for k in d["keys"] if k.get("kty") == "RSA").update(n=7),
    "jwt key with private part": lambda d: _jwt(d).update(d=_PRIVATE_EC_JWK["d"], x=_PRIVATE_EC_JWK["x"],
                                                          y=_PRIVATE_EC_JWK["y"], crv="P-256"),
    "sequence not an integer": lambda d: d.update(spiffe_sequence="42"),
    "sequence a boolean": lambda d: d.update(spiffe_sequence=True),
    "sequence negative": lambda d: d.update(spiffe_sequence=-1),
    "sequence past uint64": lambda d: d.update(spiffe_sequence=2**64),
    "refresh hint not an integer": lambda d: d.update(spiffe_refresh_hint=1.5),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_malformed_documents_are_refused(bundle: Bundle, name: str) -> None:
    doc = _mutate(bundle, MUTATIONS[name])
    with pytest.raises(InvalidBundleError):
        Bundle.from_spiffe_json(TD, doc)
    with pytest.raises(InvalidBundleError):
        Bundle.from_spiffe_json(TD, json.dumps(doc).encode())


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'"keys"', b"null", b"{", "{\"keys\": [}", b"\xff\xfe",
     b'{"keys": ' + b"[" * 100_000],  # RecursionError from json, not InvalidBundleError, before
)
def test_non_json_or_wrong_shape_is_refused(raw: bytes | str) -> None:
    with pytest.raises(InvalidBundleError):
        Bundle.from_spiffe_json(TD, raw)
    if isinstance(raw, bytes) and raw:
        with pytest.raises(InvalidBundleError):
            Bundle.from_jwks(TD, raw)


def test_oversized_document_is_refused() -> None:
    with pytest.raises(InvalidBundleError, match="too large"):
        Bundle.from_spiffe_json(TD, b'{"keys": [], "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}')


def test_plain_jwks_without_kid_is_refused() -> None:
    with pytest.raises(InvalidBundleError):
        Bundle.from_jwks(TD, b'{"keys": [{"kty": "EC"}]}')
    with pytest.raises(InvalidBundleError, match="no kid"):  # an empty kid is none (go-spiffe agrees)
        Bundle.from_jwks(TD, b'{"keys": [{"kty": "EC", "kid": ""}]}')
    with pytest.raises(InvalidBundleError):
        Bundle.from_jwks(TD, b"nope")
