"""JWT-SVID validation (meshid/jwtsvid.py), per the SPIFFE JWT-SVID spec."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.bundle import Bundle
from meshid.jwtsvid import (
    MAX_AUDIENCE_LENGTH,
    MAX_AUDIENCES,
    InvalidJwtSvidError,
    check_audience_bounds,
    validate_jwt_svid,
)
from meshid.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
SUB = "spiffe://example.org/web"
AUD = "spiffe://example.org/db"
NOW = 1_900_000_000.0

EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEYS: dict[str, Any] = {"ec": EC_KEY, "ec384": EC384_KEY, "rsa": RSA_KEY}
BUNDLES = {TD: Bundle(TD, (), {kid: k.public_key() for kid, k in KEYS.items()})}


def claims(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"sub": SUB, "aud": [AUD], "exp": int(NOW) + 300, "iat": int(NOW)}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def mint(kid: str = "ec", alg: str = "ES256", key: Any = None, headers: dict[str, Any] | None = None,
         **over: Any) -> str:
    h: dict[str, Any] = {"kid": kid, "typ": "JWT"}
    h.update(headers or {})
    return jwt.encode(claims(**over), key if key is not None else KEYS[kid], algorithm=alg, headers=h)


def validate(token: str, audience: str = AUD, now: float | None = NOW) -> tuple[SpiffeId, dict[str, Any]]:
    return validate_jwt_svid(token, audience, BUNDLES, now=now)


def refused(token: str, match: str, audience: str = AUD, now: float | None = NOW) -> None:
    with pytest.raises(InvalidJwtSvidError, match=match):
        validate(token, audience, now)


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def header_of(token: str) -> dict[str, Any]:
    return jwt.get_unverified_header(token)


# --------------------------------------------------------------------------- accepted
@pytest.mark.parametrize("typ", [None, "JWT", "JOSE"])
def test_typ_is_optional_and_may_be_jwt_or_jose(typ: str | None) -> None:
    token = mint(headers={"typ": typ})
    if typ is None:
        assert "typ" not in header_of(token)
    else:
        assert header_of(token)["typ"] == typ
    sid, c = validate(token)
    assert sid == SpiffeId.parse(SUB)
    assert c["sub"] == SUB and c["aud"] == [AUD]


@pytest.mark.parametrize(
    ("kid", "alg"),
    [("ec", "ES256"), ("ec384", "ES384"), ("rsa", "RS256"), ("rsa", "RS512"), ("rsa", "PS256"),
     ("rsa", "PS384")],
)
def test_asymmetric_algorithms_are_accepted(kid: str, alg: str) -> None:
    sid, _ = validate(mint(kid=kid, alg=alg))
    assert str(sid) == SUB


def test_audience_may_be_a_string_or_one_of_several() -> None:
    assert validate(mint(aud=AUD))[0] == SpiffeId.parse(SUB)
    assert validate(mint(aud=["other", AUD, "third"]))[0] == SpiffeId.parse(SUB)


def test_without_injected_time_the_real_clock_is_used() -> None:
    now = time.time()
    token = mint(exp=int(now) + 60, iat=int(now))
    assert validate(token, now=None)[0] == SpiffeId.parse(SUB)
    refused(mint(exp=int(now) - 60, iat=int(now) - 120), "expired", now=None)


# --------------------------------------------------------------------------- refused
def test_alg_none_is_refused() -> None:
    token = f"{b64url({'alg': 'none', 'kid': 'ec', 'typ': 'JWT'})}.{b64url(claims())}."
    refused(token, "algorithm")
    # also with the 'None' spelling some libraries accept
    token = f"{b64url({'alg': 'None', 'kid': 'ec', 'typ': 'JWT'})}.{b64url(claims())}."
    refused(token, "algorithm")


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_is_refused_even_keyed_with_the_public_key(alg: str) -> None:
    # The classic confusion attack: HMAC keyed with the bundle's public key bytes.
    public_pem = EC_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = f"{b64url({'alg': alg, 'kid': 'ec', 'typ': 'JWT'})}.{b64url(claims())}"
    import hashlib
    import hmac

    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    sig = hmac.new(public_pem, token.encode(), digest).digest()
    token += "." + base64.urlsafe_b64encode(sig).decode().rstrip("=")
    refused(token, "algorithm")
    refused(mint(alg=alg, key=b"k" * 64), "algorithm")


def test_unknown_kid_is_refused() -> None:
    refused(mint(headers={"kid": "no-such-key"}), "not found")


def test_missing_kid_is_refused() -> None:
    token = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"typ": "JWT"})
    refused(token, "key id")


def test_bad_signature_is_refused() -> None:
    # Signed by another key but claiming the bundle's kid.
    refused(mint(key=ec.generate_private_key(ec.SECP256R1())), "invalid")
    # A valid token with its payload swapped keeps the old signature.
    good = mint()
    h, _, s = good.split(".")
    refused(f"{h}.{b64url(claims(sub='spiffe://example.org/admin'))}.{s}", "invalid")
    # Signature bytes flipped.
    flipped = s[:-4] + ("AAAA" if not s.endswith("AAAA") else "BBBB")
    refused(f"{h}.{good.split('.')[1]}.{flipped}", "invalid")


def test_alg_must_match_the_key() -> None:
    # ES384 header but P-256 key in the bundle under that kid.
    refused(mint(kid="ec", alg="ES384", key=EC384_KEY), "invalid")


@pytest.mark.parametrize(
    ("kid", "alg", "key"),
    [("ec", "RS256", RSA_KEY), ("ec", "PS256", RSA_KEY), ("rsa", "ES256", EC_KEY)],
)
def test_alg_of_another_key_kind_is_refused(kid: str, alg: str, key: Any) -> None:
    # An RSA algorithm naming an EC key (or the reverse) made PyJWT raise TypeError: the
    # ValidateJWTSVID call ended UNKNOWN with a traceback instead of InvalidArgument.
    refused(mint(kid=kid, alg=alg, key=key), f"not a key for {alg}")


def test_expired_is_refused() -> None:
    refused(mint(exp=int(NOW) - 1), "expired")
    refused(mint(exp=int(NOW)), "expired")  # exp is exclusive
    assert validate(mint(exp=int(NOW) + 1))[0] == SpiffeId.parse(SUB)


def test_wrong_audience_is_refused() -> None:
    refused(mint(), "audience", audience="spiffe://example.org/other")
    refused(mint(aud=["spiffe://example.org/other"]), "audience")


@pytest.mark.parametrize(
    "sub",
    ["web", "user@example.org", "https://example.org/web", "spiffe://Example.org/web", "spiffe://example.org/a//b",
     "spiffe://example.org/web?x=1"],
)
def test_non_spiffe_subject_is_refused(sub: str) -> None:
    refused(mint(sub=sub), "SPIFFE ID")


def test_subject_in_a_trust_domain_without_bundle_is_refused() -> None:
    refused(mint(sub="spiffe://other.org/web"), "no bundle")


@pytest.mark.parametrize("missing", ["sub", "aud", "exp"])
def test_required_claims(missing: str) -> None:
    drop: dict[str, Any] = {missing: None}
    with pytest.raises(InvalidJwtSvidError):
        validate(mint(**drop))


def test_other_typ_is_refused() -> None:
    refused(mint(headers={"typ": "at+jwt"}), "JWT or JOSE")


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "x" * 20000])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidJwtSvidError):
        validate(token)


def test_audience_argument_is_required() -> None:
    with pytest.raises(InvalidJwtSvidError, match="required"):
        validate(mint(), audience="")


def test_time_claims_are_judged_at_the_injected_time() -> None:
    # Issued far in the wall clock's future (NOW is 2030), valid at NOW.
    assert validate(mint())[0] == SpiffeId.parse(SUB)
    # Not yet valid at the injected time.
    refused(mint(nbf=int(NOW) + 60), "not yet valid")
    refused(mint(iat=int(NOW) + 60), "not yet valid")
    # Past tokens are judged at the injected time too, not by the real clock.
    old = 1_000_000_000
    assert validate(mint(iat=old, exp=old + 300), now=old + 10)[0] == SpiffeId.parse(SUB)
    refused(mint(iat=old, exp=old + 300), "expired", now=old + 300)


@pytest.mark.parametrize("value", ["soon", True, None])
def test_non_numeric_exp_is_refused(value: Any) -> None:
    c = claims()
    c["exp"] = value
    token = jwt.encode(c, EC_KEY, algorithm="ES256", headers={"kid": "ec"})
    with pytest.raises(InvalidJwtSvidError):
        validate(token)
    with pytest.raises(InvalidJwtSvidError):
        validate(token, now=None)


def test_audience_bounds_are_inclusive_and_named_in_the_refusal() -> None:
    check_audience_bounds(["a" * MAX_AUDIENCE_LENGTH] * MAX_AUDIENCES)
    with pytest.raises(ValueError, match=f"at most {MAX_AUDIENCES} audience values"):
        check_audience_bounds(["a"] * (MAX_AUDIENCES + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_AUDIENCE_LENGTH} characters"):
        check_audience_bounds(["a", "a" * (MAX_AUDIENCE_LENGTH + 1)])


@pytest.mark.parametrize(
    "over",
    [{"exp": 10**400}, {"iat": 10**400}, {"nbf": -(10**400)}, {"exp": float("nan")}, {"exp": float("inf")},
     {"nbf": float("nan")}],
)
def test_time_claims_beyond_any_date_are_refused(over: dict[str, Any]) -> None:
    # A huge integer raised OverflowError (a bad token must be InvalidArgument, not a crash);
    # a NaN exp never compared as expired, and NaN/Infinity are no JSON numbers anyway.
    refused(mint(**over), "claim")
