"""JWT-SVID validation per the SPIFFE JWT-SVID spec (pure; used by ValidateJWTSVID).

Accepts a missing `typ` or `JWT`/`JOSE`; refuses `none`, HMAC, unknown `kid`, bad
signatures, expired tokens, a wrong audience and a `sub` that is not a SPIFFE ID.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.bundle import Bundle
from meshid.errors import MeshidError
from meshid.json_number import finite_number
from meshid.spiffe_id import SpiffeId, TrustDomain

ALLOWED_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
MAX_TOKEN_BYTES = 16 * 1024
CLOCK_SKEW = 30.0
# Bounds on the audiences of a JWT-SVID request, far above any real deployment (SPIRE sets
# none; tokens are sent in HTTP headers, where a few KiB is already much): without them a
# 4 MB audience made a 5.5 MB token and a 4 MB issuance event.
MAX_AUDIENCES = 64
MAX_AUDIENCE_LENGTH = 2048


class InvalidJwtSvidError(MeshidError, ValueError):
    pass


def check_audience_bounds(audience: Sequence[object]) -> None:
    """Refuse (ValueError) more than MAX_AUDIENCES values or one above MAX_AUDIENCE_LENGTH
    characters; the agent's Workload API and the server's signing both apply it."""
    if len(audience) > MAX_AUDIENCES:
        raise ValueError(f"at most {MAX_AUDIENCES} audience values are allowed, got {len(audience)}")
    for value in audience:
        if isinstance(value, str) and len(value) > MAX_AUDIENCE_LENGTH:
            raise ValueError(
                f"an audience value may be at most {MAX_AUDIENCE_LENGTH} characters, got one of {len(value)}"
            )


def validate_jwt_svid(
    token: str, audience: str, bundles: Mapping[TrustDomain, Bundle], now: float | None = None
) -> tuple[SpiffeId, dict[str, Any]]:
    if not token or not audience:
        raise InvalidJwtSvidError("audience and token are required")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidJwtSvidError("token is too large")
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise InvalidJwtSvidError(f"malformed JWT: {exc}") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise InvalidJwtSvidError(f"unsupported token signature algorithm {alg!r}")
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise InvalidJwtSvidError(f"token header type {typ!r} is not JWT or JOSE")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidJwtSvidError("token header has no key id")
    sub = unverified.get("sub")
    if not isinstance(sub, str):
        raise InvalidJwtSvidError("token has no subject")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except ValueError as exc:
        raise InvalidJwtSvidError(f"token subject is not a SPIFFE ID: {exc}") from None
    bundle = bundles.get(spiffe_id.trust_domain)
    if bundle is None:
        raise InvalidJwtSvidError(f"no bundle for trust domain {spiffe_id.trust_domain}")
    key = bundle.jwt_authorities.get(kid)
    if key is None:
        raise InvalidJwtSvidError(f"key {kid!r} not found in the bundle of {spiffe_id.trust_domain}")
    # PyJWT raises TypeError (not a PyJWTError) for a key of the wrong kind for `alg`, e.g.
    # RS256 naming an EC key: the caller's token picks both, so it is a refusal, not a crash.
    if not isinstance(key, ec.EllipticCurvePublicKey if alg.startswith("ES") else rsa.RSAPublicKey):
        raise InvalidJwtSvidError(f"key {kid!r} of {spiffe_id.trust_domain} is not a key for {alg}")
    try:
        claims = _decode_at(token, key, alg, audience, time.time() if now is None else now)
    except jwt.ExpiredSignatureError:
        raise InvalidJwtSvidError("token has expired") from None
    except jwt.InvalidAudienceError:
        raise InvalidJwtSvidError(f"token audience does not include {audience!r}") from None
    except jwt.PyJWTError as exc:
        raise InvalidJwtSvidError(f"token is invalid: {exc}") from None
    return spiffe_id, claims


def _decode_at(token: str, key: Any, alg: str, audience: str, now: float) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, key=key, algorithms=[alg], audience=audience,
        # Time claims are checked against the injected `now`, not PyJWT's wall clock.
        options={"require": ["sub", "aud", "exp"], "verify_exp": False, "verify_iat": False,
                 "verify_nbf": False},
    )
    if _numeric(claims, "exp") <= now:
        raise jwt.ExpiredSignatureError("expired")
    # nbf/iat get a small allowance for clock skew between the minting server and us (the
    # spec requires only exp; refusing a token minted a second "in the future" breaks interop).
    for name in ("nbf", "iat"):
        if name in claims and _numeric(claims, name) > now + CLOCK_SKEW:
            raise jwt.ImmatureSignatureError(f"the token is not yet valid ({name})")
    return claims


def _numeric(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise jwt.InvalidTokenError(f"{name} claim must be a number")
    # 10**400 was an uncaught OverflowError, not a refusal; a NaN exp never expired.
    number = finite_number(value)
    if number is None:
        raise jwt.InvalidTokenError(f"{name} claim must be a finite number within range")
    return number

