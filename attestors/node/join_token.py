"""Join-token node attestation: single-use, expiring tokens stored only as SHA-256 hashes.

The agent ID is `spiffe://<td>/meshid/agent/join_token/<token_id>`, where token_id is a
random id made with the token: it never contains (or derives from) the secret.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from attestors.node.base import AttestationRequest, AttestationResult, Challenge, agent_id
from meshid.errors import AttestationError
from meshid.spiffe_id import TrustDomain

NAME = "join_token"
MAX_TOKEN_LENGTH = 256
# A token's lifetime: at least a second (0.0001 made a token expired when shown), at most a week.
MIN_TOKEN_TTL = 1
MAX_TOKEN_TTL = 7 * 24 * 3600

ConsumeFn = Callable[[str, int], Awaitable[str | None]]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NewToken:
    token: str = field(repr=False)  # shown once to the operator, never stored or logged
    token_id: str
    token_hash: str
    expires_at: int


def new_token(ttl_seconds: float, now: float | None = None) -> NewToken:
    token = secrets.token_urlsafe(32)
    now = time.time() if now is None else now
    return NewToken(token, str(uuid.uuid4()), hash_token(token), int(now + ttl_seconds))


class JoinTokenAttestor:
    name = NAME

    def __init__(self, consume: ConsumeFn, clock: Callable[[], float] = time.time) -> None:
        self._consume = consume
        self._clock = clock

    async def challenge(self, request: AttestationRequest) -> Challenge | None:
        return None

    async def attest(
        self, request: AttestationRequest, trust_domain: TrustDomain, challenge: Challenge | None
    ) -> AttestationResult:
        token = request.payload.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise AttestationError("join token missing or malformed")
        token_id = await self._consume(hash_token(token), int(self._clock()))
        if token_id is None:
            # One message for unknown, used and expired tokens: no oracle for guessing.
            raise AttestationError("join token is invalid, expired or already used")
        return AttestationResult(agent_id(trust_domain, NAME, token_id), (), can_reattest=False)
