"""Signing for agents: X509-SVID batches and JWT-SVIDs, strictly within what entries allow.

The CA work of large batches, and all of it when the CA key is in an HSM, runs in an
executor so health checks and other agents are not starved; each batch's issuance
events are written to the outbox in one transaction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from issuer.admission import Admission
from issuer.ca import minting
from issuer.ca.minting import LeafRequest, MintedLeaf
from issuer.ca.slots import CaManager, LoadedKey, jwt_kid
from issuer.datastore.base import AgentRecord, DataStore
from issuer.entries import EntryService
from issuer.events import ocsf
from issuer.events.model import Event
from issuer.signing_thread import SigningThread
from meshid import telemetry
from meshid.entry import Entry
from meshid.errors import OverloadedError, PermissionDeniedError
from meshid.jwtsvid import check_audience_bounds

log = logging.getLogger("meshid.signing")

MAX_BATCH = 500
EXECUTOR_THRESHOLD = 8
ROTATION_REASONS = ("initial", "scheduled", "forced", "tainted", "expired", "entry_changed")
# Overload refusals are `io.meshid.svid.refused` events too (SPEC-EVENTS), but a refusal
# must stay cheap under the load it sheds: at most one event per agent and kind per this
# many seconds, carrying the count of refused requests folded into it.
OVERLOAD_EVENT_INTERVAL = 10.0


@dataclass(frozen=True)
class X509Request:
    entry_id: str
    csr: bytes
    rotation_reason: str = "initial"
    scheduled_rotation_at: float | None = None


@dataclass(frozen=True)
class X509Result:
    entry_id: str
    chain_der: tuple[bytes, ...] | None = None  # leaf, CA, upstream intermediates (DER)
    error_code: str = ""
    error: str = ""


class SigningService:
    def __init__(
        self,
        ds: DataStore,
        ca: CaManager,
        entries: EntryService,
        admission: Admission,
        default_x509_ttl: float,
        default_jwt_ttl: float,
        jwt_issuer: str = "",
        clock: Callable[[], float] = time.time,
        on_events: Callable[[], None] | None = None,
        signer: SigningThread | None = None,
    ) -> None:
        self.ds = ds
        self.ca = ca
        self.entries = entries
        self.admission = admission
        self.default_x509_ttl = default_x509_ttl
        self.default_jwt_ttl = default_jwt_ttl
        self.jwt_issuer = jwt_issuer or None
        self.clock = clock
        self.taint_window = 600.0
        self.signer = signer or SigningThread()
        # Called once events are in the outbox (the server wakes its relay): sync and cheap.
        self.on_events = on_events
        # (agent ID, kind) -> (time of its last overload event, refusals since then)
        self._overload_reported: dict[tuple[str, str], tuple[float, int]] = {}

    def _events_written(self) -> None:
        if self.on_events is not None:
            self.on_events()

    @contextlib.asynccontextmanager
    async def _admit(self, agent: AgentRecord, cost: int, kind: str) -> AsyncIterator[None]:
        """admission.admit, recording an overload refusal as an svid.refused event."""
        try:
            async with self.admission.admit(str(agent.agent_id), cost, kind=kind):
                yield
        except OverloadedError as exc:
            await self._overload_refused(agent, cost, kind, exc)
            raise

    async def _overload_refused(self, agent: AgentRecord, cost: int, kind: str, exc: OverloadedError) -> None:
        key = (str(agent.agent_id), kind)
        now = self.clock()
        last, held = self._overload_reported.get(key, (float("-inf"), 0))
        if now - last < OVERLOAD_EVENT_INTERVAL:
            # Held back: the next refusal after the interval, or the server's tick
            # (flush_overload_refusals), reports it.
            self._overload_reported[key] = (last, held + cost)
            return
        self._overload_reported[key] = (now, 0)
        await self._write_overload_events([_overload_event(key, held + cost, now, str(exc))])

    async def flush_overload_refusals(self) -> None:
        """Report refusals held back by the rate bound once their interval has passed, even
        if the overload has ended and no refusal follows; forget quiet agents."""
        now = self.clock()
        events: list[Event] = []
        for key, (last, held) in list(self._overload_reported.items()):
            if now - last < OVERLOAD_EVENT_INTERVAL:
                continue
            if not held:
                del self._overload_reported[key]
                continue
            self._overload_reported[key] = (now, 0)
            events.append(_overload_event(key, held, now, "refused while the server was overloaded"))
        await self._write_overload_events(events)

    async def _write_overload_events(self, events: list[Event]) -> None:
        if not events:
            return
        try:
            await self.ds.append_events(events)  # one transaction for a whole tick's
        except Exception as err:  # the agent must still get its retry-after answer
            log.warning("could not record overload refusal events: %s", err)
            return
        self._events_written()

    async def sign_x509(self, agent: AgentRecord, requests: list[X509Request]) -> list[X509Result]:
        if len(requests) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} CSRs per call")
        async with self._admit(agent, len(requests), "x509"):
            index = await self.entries.index()
            now = self.clock()
            allowed = index.authorized(agent.agent_id, agent.selectors, now)
            active = self.ca.x509_active
            jobs: list[tuple[int, X509Request, Entry]] = []
            results: list[X509Result | None] = [None] * len(requests)
            refusals: list[Event] = []
            for i, req in enumerate(requests):
                entry = allowed.get(req.entry_id)
                if entry is None:
                    results[i] = X509Result(
                        req.entry_id,
                        error_code="permission_denied",
                        error="entry is not authorized for this agent",
                    )
                    refusals.append(
                        ocsf.svid_refused(
                            "not_authorized", agent.agent_id, now, entry_id=req.entry_id,
                            detail="entry is not authorized for this agent",
                        )
                    )
                    continue
                jobs.append((i, req, entry))
            minted = await self._mint_all(active, agent, jobs, now)
            events: list[Event] = list(refusals)
            max_not_after = 0
            assert active.minter is not None
            ca_chain = active.minter.chain_der_parts
            for (i, req, _entry), (outcome, event) in zip(jobs, minted, strict=True):
                events.append(event)
                if isinstance(outcome, Exception):
                    results[i] = X509Result(req.entry_id, error_code="invalid_argument", error=str(outcome))
                    continue
                results[i] = X509Result(req.entry_id, chain_der=(outcome.der, *ca_chain))
                max_not_after = max(max_not_after, outcome.not_after)
            if max_not_after:
                self.ca.note_signed(active.key_id, max_not_after)
            if events:
                await self.ds.append_events(events)
                self._events_written()
            issued = sum(1 for r in results if r is not None and r.chain_der is not None)
            tel = telemetry.default_telemetry()
            tel.record_issued("x509", n=issued)
            if issued < len(requests):
                tel.record_refused("x509", "not_authorized_or_invalid", len(requests) - issued)
            return [r for r in results if r is not None]

    def close(self) -> None:
        self.signer.close()

    async def _mint_all(
        self, active: LoadedKey, agent: AgentRecord, jobs: list[tuple[int, X509Request, Entry]], now: float
    ) -> list[tuple[MintedLeaf | Exception, Event]]:
        """Mint a batch and build its events: pure CPU work, done in an executor when large."""
        minter = active.minter
        assert minter is not None
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        requests = [
            LeafRequest(
                req.csr, entry.spiffe_id, entry.dns_names, int(entry.x509_svid_ttl or self.default_x509_ttl)
            )
            for _, req, entry in jobs
        ]
        issuer = minter.issuer_rfc4514

        def run() -> list[tuple[MintedLeaf | Exception, Event]]:
            out: list[tuple[MintedLeaf | Exception, Event]] = []
            for (_, req, entry), leaf in zip(jobs, minter.mint_batch_leaves(requests, when), strict=True):
                if isinstance(leaf, Exception):
                    out.append(
                        (
                            leaf,
                            ocsf.svid_refused(
                                "bad_csr",
                                agent.agent_id,
                                now,
                                spiffe_id=entry.spiffe_id,
                                entry_id=req.entry_id,
                                detail=str(leaf),
                            ),
                        )
                    )
                    continue
                reason = req.rotation_reason if req.rotation_reason in ROTATION_REASONS else "scheduled"
                sid = str(entry.spiffe_id)
                facts = ocsf.LeafFacts(
                    leaf.der, leaf.serial, leaf.not_before, leaf.not_after, issuer, sid, entry.dns_names
                )
                out.append(
                    (
                        leaf,
                        ocsf.x509_issued(
                            facts,
                            spiffe_id=sid,
                            entry_id=entry.id,
                            entry_revision=entry.revision_number,
                            parent_id=entry.parent_id,
                            agent_id=agent.agent_id,
                            selectors=entry.selectors,
                            ca_key_id=active.key_id,
                            rotation_reason=reason,
                            scheduled_rotation_at=req.scheduled_rotation_at,
                            now=now,
                            renew=reason != "initial",
                        ),
                    )
                )
            return out

        off_loop = len(jobs) >= EXECUTOR_THRESHOLD or self.ca.key_manager.signs_on_device
        return await self.signer.run(run, off_loop)

    async def sign_jwt(self, agent: AgentRecord, entry_id: str, audience: list[str]) -> tuple[str, int]:
        if not audience or not all(isinstance(a, str) and a for a in audience):
            raise ValueError("audience must be a non-empty list of non-empty strings")
        check_audience_bounds(audience)
        async with self._admit(agent, 1, "jwt"):
            index = await self.entries.index()
            now = self.clock()
            entry = index.authorized(agent.agent_id, agent.selectors, now).get(entry_id)
            if entry is None:
                await self.ds.append_events(
                    [
                        ocsf.svid_refused(
                            "not_authorized",
                            agent.agent_id,
                            now,
                            kind="jwt",
                            entry_id=entry_id,
                            detail="entry is not authorized for this agent",
                        )
                    ]
                )
                self._events_written()
                telemetry.default_telemetry().record_refused("jwt", "not_authorized")
                raise PermissionDeniedError("entry is not authorized for this agent")
            active = self.ca.jwt_active
            ttl = int(entry.jwt_svid_ttl or self.default_jwt_ttl)
            iat = int(now)  # whole seconds, so the reported expiry is exactly the token's exp
            expires = min(iat + ttl, active.record.not_after)
            mint = functools.partial(
                minting.mint_jwt_svid,
                active.key,
                jwt_kid(active),
                entry.spiffe_id,
                audience,
                expires - iat,
                dt.datetime.fromtimestamp(iat, dt.UTC),
                issuer=self.jwt_issuer,
            )
            token = await self.signer.run(mint, self.ca.key_manager.signs_on_device)
            self.ca.note_signed(active.key_id, expires)
            await self.ds.append_events(
                [
                    ocsf.jwt_issued(
                        entry.spiffe_id,
                        audience,
                        entry.id,
                        entry.revision_number,
                        entry.parent_id,
                        agent.agent_id,
                        entry.selectors,
                        jwt_kid(active),
                        now,
                        expires,
                        now,
                    )
                ]
            )
            self._events_written()
            telemetry.default_telemetry().record_issued("jwt")
            return token, expires


def _overload_event(key: tuple[str, str], count: int, now: float, detail: str) -> Event:
    agent_id, kind = key
    return ocsf.svid_refused("overloaded", agent_id, now, kind=kind, detail=detail, count=count)
