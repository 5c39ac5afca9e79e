"""Node attestation and the agent registry: attest → agent SVID, renew, evict, ban.

Attempts are rate-limited per source address; failures are logged with their reason
(attestors never put secrets in reasons) and recorded as events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from cryptography import x509

from attestors.node.base import AttestationRequest, Challenge, NodeAttestor
from issuer.ca import minting
from issuer.ca.slots import CaManager, svid_chain
from issuer.datastore.base import AgentRecord, DataStore
from issuer.events import ocsf
from issuer.signing_thread import SigningThread
from meshid import telemetry
from meshid.errors import AttestationError, NotFoundError, OverloadedError, PermissionDeniedError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from meshid.token_bucket import KeyedBuckets

log = logging.getLogger("meshid.attestation")

CHALLENGE_TTL = 60.0
MAX_SESSIONS = 10_000
MAX_SOURCES = 100_000


@dataclass
class _Session:
    attestor: str
    request: AttestationRequest
    challenge: Challenge
    csr: bytes
    expires: float


@dataclass(frozen=True)
class IssuedAgentSvid:
    agent: AgentRecord
    chain: list[x509.Certificate]


class AgentService:
    def __init__(
        self,
        ds: DataStore,
        ca: CaManager,
        trust_domain: TrustDomain,
        attestors: dict[str, NodeAttestor],
        agent_svid_ttl: float,
        attest_rate_per_minute: int = 30,
        clock: Callable[[], float] = time.time,
        on_events: Callable[[], None] | None = None,
        signer: SigningThread | None = None,
    ) -> None:
        self.ds = ds
        self.ca = ca
        self.signer = signer or SigningThread()
        self.td = trust_domain
        self.attestors = attestors
        self.agent_svid_ttl = agent_svid_ttl
        self.clock = clock
        self._sources: KeyedBuckets[str] = KeyedBuckets(attest_rate_per_minute / 60.0,
                                                        max(1, attest_rate_per_minute), MAX_SOURCES)
        self._sessions: dict[str, _Session] = {}
        self._lock = asyncio.Lock()
        self._renewing: set[SpiffeId] = set()
        # Called once events are in the outbox (the server wakes its relay): sync and cheap.
        self.on_events = on_events

    def _events_written(self) -> None:
        if self.on_events is not None:
            self.on_events()

    # ------------------------------------------------------------------ attestation
    def _limit(self, source: str) -> None:
        wait = self._sources.try_take(source)
        if wait > 0:
            raise OverloadedError("too many attestation attempts from this address", retry_after=wait)

    def _attestor(self, name: str) -> NodeAttestor:
        attestor = self.attestors.get(name)
        if attestor is None:
            raise AttestationError(f"node attestor {name!r} is not enabled on this server")
        return attestor

    async def begin(self, request: AttestationRequest, csr: bytes) -> tuple[str, bytes] | IssuedAgentSvid:
        """First step: either a challenge (session id, nonce) or, without one, the agent SVID."""
        self._limit(request.source)
        attestor = self._attestor(request.attestor)
        # A CSR that cannot be signed is refused now, not after the attestor has spent
        # single-use evidence (a join token) on an attempt that cannot succeed.
        minting.load_csr_public_key(csr)
        try:
            challenge = await attestor.challenge(request)
        except AttestationError as exc:
            await self._failed(request, str(exc))
            raise
        if challenge is None:
            return await self._complete(attestor, request, None, csr)
        self._expire_sessions()
        if len(self._sessions) >= MAX_SESSIONS:
            raise OverloadedError("too many attestations in progress", retry_after=1.0)
        sid = secrets.token_urlsafe(24)
        self._sessions[sid] = _Session(
            request.attestor, request, challenge, csr, self.clock() + CHALLENGE_TTL
        )
        return sid, challenge.nonce

    async def answer(self, session_id: str, response: bytes, source: str) -> IssuedAgentSvid:
        self._limit(source)
        self._expire_sessions()
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise AttestationError("attestation session unknown or expired")
        request = replace(session.request, challenge_response=response)
        return await self._complete(self._attestor(session.attestor), request, session.challenge, session.csr)

    def _expire_sessions(self) -> None:
        now = self.clock()
        for sid in [s for s, v in self._sessions.items() if v.expires < now]:
            del self._sessions[sid]

    async def _complete(
        self, attestor: NodeAttestor, request: AttestationRequest, challenge: Challenge | None, csr: bytes
    ) -> IssuedAgentSvid:
        try:
            result = await attestor.attest(request, self.td, challenge)
        except AttestationError as exc:
            await self._failed(request, str(exc))
            raise
        except ValueError as exc:  # e.g. an attestor-derived agent ID that is not a valid SPIFFE ID
            await self._failed(request, f"attestation produced an invalid identity: {exc}")
            raise AttestationError("attestation produced an invalid identity") from None
        now = self.clock()
        async with self._lock:
            existing = await self.ds.get_agent(result.agent_id)
            if existing is not None and existing.banned:
                await self._failed(request, f"agent {result.agent_id} is banned")
                raise AttestationError(f"agent {result.agent_id} is banned")
            if existing is not None and not existing.can_reattest:
                await self._failed(request, f"agent {result.agent_id} already attested and may not re-attest")
                raise AttestationError("this agent has already attested")
            chain = await self._mint(result.agent_id, csr)
            record = AgentRecord(
                agent_id=result.agent_id,
                attestor=request.attestor,
                selectors=result.selectors,
                serial=f"{chain[0].serial_number:x}",
                expires_at=int(chain[0].not_valid_after_utc.timestamp()),
                can_reattest=result.can_reattest,
                created_at=existing.created_at if existing else int(now),
                updated_at=int(now),
            )
            await self.ds.put_agent(
                record,
                [
                    ocsf.node_attested(
                        record.agent_id,
                        request.attestor,
                        record.selectors,
                        now,
                        cert=chain[0],
                        src_ip=request.source,
                        reattest=existing is not None,
                    ),
                    self._agent_svid_issued(chain[0], record.agent_id, record.selectors, now, renew=False),
                ],
            )
        self._events_written()
        telemetry.default_telemetry().record_attestation("node", request.attestor, True)
        log.info("attested node %s via %s from %s", record.agent_id, request.attestor, request.source or "?")
        return IssuedAgentSvid(record, chain)

    async def _failed(self, request: AttestationRequest, reason: str) -> None:
        log.warning(
            "node attestation via %s from %s failed: %s", request.attestor, request.source or "?", reason
        )
        telemetry.default_telemetry().record_attestation("node", request.attestor, False)
        await self.ds.append_events(
            [
                ocsf.node_attestation_failed(
                    request.attestor, reason, self.clock(), trust_domain=self.td.name, src_ip=request.source
                )
            ]
        )
        self._events_written()

    async def _mint(self, agent_id: SpiffeId, csr: bytes) -> list[x509.Certificate]:
        active = self.ca.x509_active
        assert active.minter is not None
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        ttl = int(self.agent_svid_ttl)
        mint = functools.partial(active.minter.mint_from_csr, csr, agent_id, [], ttl, now)
        leaf = await self.signer.run(mint, self.ca.key_manager.signs_on_device)
        self.ca.note_signed(active.key_id, int(leaf.not_valid_after_utc.timestamp()))
        return list(svid_chain(active, leaf))

    # ------------------------------------------------------------------ authenticated agents
    async def authenticate(self, agent_id: SpiffeId, serial: int) -> AgentRecord:
        """Check an mTLS peer is a current, non-banned agent presenting its current SVID or
        the one its last renewal returned; the first call with the latter makes it current
        (and from then on the one before is refused), as SPIRE's agent authorizer does."""
        presented = f"{serial:x}"
        record = await self.ds.get_agent(agent_id)
        if record is None:
            raise PermissionDeniedError(f"{agent_id} is not an attested agent (evicted?); re-attest")
        if record.banned:
            raise PermissionDeniedError(f"agent {agent_id} is banned")
        if record.serial == presented:
            return record
        if record.new_serial == presented:
            now = int(self.clock())
            if await self.ds.promote_agent(record, now):
                return replace(
                    record, serial=record.new_serial, expires_at=record.new_expires_at,
                    new_serial="", new_expires_at=0, updated_at=now,
                )
            # Changed since we read it: another call (maybe on another replica) promoted
            # this same SVID, which is then current, or the agent was renewed or banned.
            record = await self.ds.get_agent(agent_id)
            if record is not None and not record.banned and record.serial == presented:
                return record
        raise PermissionDeniedError("agent SVID has been superseded; use the latest one")

    async def renew(self, agent: AgentRecord, csr: bytes) -> IssuedAgentSvid:
        """Sign a new agent SVID; `agent` is the record authenticate() returned for the SVID
        presented. One renewal per agent at a time, and only from its latest SVID: renewals
        racing with one SVID all passed authentication, each minted and stored its own SVID,
        and the agent could keep one the server no longer accepted. The in-process guard
        spares the signing; the datastore's conditional write decides across replicas."""
        if agent.agent_id in self._renewing:
            raise OverloadedError("a renewal of this agent's SVID is already under way", retry_after=1.0)
        self._renewing.add(agent.agent_id)
        try:
            current = await self.ds.get_agent(agent.agent_id)
            if current is None or current.banned or current.serial != agent.serial:
                raise PermissionDeniedError("agent SVID has been superseded; use the latest one")
            return await self._renew(current, csr)
        finally:
            self._renewing.discard(agent.agent_id)

    async def _renew(self, agent: AgentRecord, csr: bytes) -> IssuedAgentSvid:
        """The new SVID is stored as pending: the one the agent holds stays accepted until
        it presents the new one (authenticate), so a reply that never reaches the agent
        costs nothing. A renewal made while one is pending (that reply was lost) replaces
        it; the write is conditional on both serials as read, so of renewals racing across
        replicas one is stored."""
        chain = await self._mint(agent.agent_id, csr)
        now = self.clock()
        record = replace(
            agent,
            new_serial=f"{chain[0].serial_number:x}",
            new_expires_at=int(chain[0].not_valid_after_utc.timestamp()),
            updated_at=int(now),
        )
        events = [self._agent_svid_issued(chain[0], agent.agent_id, agent.selectors, now, renew=True)]
        if not await self.ds.renew_agent(record, agent, events):
            # Changed since we read it; the SVID just signed is dropped unseen. If only the
            # pending SVID moved (a renewal on another replica: the agent retried one whose
            # answer it did not get), the SVID presented is still current, and a refusal
            # would send the agent to re-attest: it is told to retry.
            now_stored = await self.ds.get_agent(agent.agent_id)
            if now_stored is not None and not now_stored.banned and now_stored.serial == agent.serial:
                raise OverloadedError("a renewal of this agent's SVID is already under way", retry_after=1.0)
            raise PermissionDeniedError("agent SVID has been superseded; use the latest one")
        self._events_written()
        return IssuedAgentSvid(record, chain)

    def _agent_svid_issued(
        self,
        leaf: x509.Certificate,
        agent_id: SpiffeId,
        selectors: Iterable[Selector],
        now: float,
        *,
        renew: bool,
    ) -> ocsf.Event:
        """The x509 issued event of an agent SVID (no entry: the server is its parent)."""
        return ocsf.x509_issued(
            leaf,
            spiffe_id=str(agent_id),
            entry_id="",
            entry_revision=0,
            parent_id=str(SpiffeId(self.td, "/meshid/server")),
            agent_id=str(agent_id),
            selectors=[str(s) for s in selectors],
            ca_key_id=self.ca.x509_active.key_id,
            rotation_reason="scheduled" if renew else "initial",
            scheduled_rotation_at=None,
            now=now,
            renew=renew,
        )

    async def evict(self, agent_id: SpiffeId) -> None:
        if await self.ds.get_agent(agent_id) is None:
            raise NotFoundError(f"no agent {agent_id}")
        await self.ds.delete_agent(agent_id, [ocsf.agent_evicted(str(agent_id), self.clock())])
        self._events_written()

    async def ban(self, agent_id: SpiffeId) -> None:
        record = await self.ds.get_agent(agent_id)
        if record is None:
            raise NotFoundError(f"no agent {agent_id}")
        await self.ds.put_agent(
            replace(record, banned=True, serial="", new_serial="", new_expires_at=0),
            [ocsf.agent_banned(str(agent_id), self.clock())],
        )
        self._events_written()

    async def list(self) -> list[AgentRecord]:
        return await self.ds.list_agents()
