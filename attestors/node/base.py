"""The one interface every node attestor implements (server side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain


@dataclass(frozen=True)
class AttestationRequest:
    """What an agent sent to attest its node.

    `payload` is the attestor-specific JSON object (already size-limited by the API);
    `challenge_response` carries a proof for challenge/response attestors (x509pop);
    `source` is the caller's address, for rate limiting and logs.
    """

    attestor: str
    payload: dict[str, Any]
    source: str = ""
    challenge_response: bytes | None = None


@dataclass(frozen=True)
class AttestationResult:
    agent_id: SpiffeId
    selectors: tuple[Selector, ...]
    # Whether the same agent ID may attest again (join tokens: no; x509pop / k8s_psat: yes).
    can_reattest: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Challenge:
    """A nonce the agent must sign (x509pop) before attestation completes."""

    nonce: bytes
    state: dict[str, Any]


class NodeAttestor(Protocol):
    """Server-side node attestation plug-in.

    `challenge` returns None for attestors without a challenge step. `attest` raises
    `meshid.errors.AttestationError` with a reason that never contains the secret.
    """

    name: str

    async def challenge(self, request: AttestationRequest) -> Challenge | None: ...

    async def attest(
        self, request: AttestationRequest, trust_domain: TrustDomain, challenge: Challenge | None
    ) -> AttestationResult: ...


def agent_id(trust_domain: TrustDomain, attestor: str, *parts: str) -> SpiffeId:
    """Agent IDs look like SPIRE's, under /meshid/agent/<attestor>/... ."""
    return SpiffeId(trust_domain, "/" + "/".join(("meshid", "agent", attestor, *parts)))
