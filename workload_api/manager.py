"""The agent's sync-and-rotate loop: sync entries and bundle, decide which SVIDs are due
(new, entry changed, scheduled renewal, tainted CA, expired), batch-sign CSRs, update the
cache. Survives server outages: the cache keeps serving while retries back off with jitter.

Renewal schedules (workload_api.rotation) are drawn once per SVID and stored beside it;
syncs never re-draw them. Workload SVIDs and their private keys are kept in memory only,
never on disk, so after an agent restart they are all issued afresh, and because that is
a burst their first renewals are drawn from the stationary distribution (by design: the
fleet starts in the steady state). The agent's own SVID is persisted with its drawn
renewal time and keeps it across restarts (workload_api.node_identity).

After a CA taint every SVID signed by the tainted key, the agent's own included, is
re-issued at a moment drawn once per SVID uniformly over the server's taint window.

Recovery after a CA rotation while the agent was offline: if the server no longer
accepts the agent SVID, the agent re-attests with its node credentials (x509pop, k8s_psat;
a join token is single-use, so a join-token agent needs a new token). If instead the
agent cannot verify the server any more, because the server's chain now ends at a root
the agent never received (the new root was published and the old one revoked while the
agent was down), nothing it holds can authenticate the server: re-bootstrap it by putting
the new root in `trust_bundle_path` and removing `<data_dir>/bundle.json`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshid.backoff import Backoff, jittered
from meshid.bundle import Bundle
from meshid.certs import ChainWalker
from meshid.durable_files import write_atomically, write_off_loop
from meshid.entry import Entry
from meshid.errors import (
    ConfigError,
    InvalidBundleError,
    MeshidError,
    OverloadedError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from meshid.json_number import finite_number
from meshid.spiffe_id import SpiffeId
from workload_api.cache import SvidCache, X509Svid
from workload_api.keys import (
    WORKLOAD_KEY_TYPES,
    authority_key_id,
    chain_der,
    csr_for,
    issued_svid_problem,
    pkcs8_der,
    slow_to_generate,
)
from workload_api.node_identity import BUNDLE_FILE, NodeIdentity
from workload_api.rotation import RenewalSchedule, RotationPolicy, effective_issued_at
from workload_api.server_client import (
    IdentityRejectedError,
    ServerClient,
    ServerRejectedError,
    ServerUnavailableError,
    b64,
    bad_response,
    bounded_retry_after,
    certs_from_json,
)

log = logging.getLogger("meshid.agent.manager")

BATCH = 500
MAX_JWT_CACHE = 10_000
# The server refuses a sync that lists more known entries (its MAX_KNOWN): an agent that
# took more from a faulty server would fail every later sync.
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class JwtSvid:
    token: str = field(repr=False)  # a bearer credential: not for logs
    spiffe_id: SpiffeId
    expires_at: float
    schedule: RenewalSchedule


class SvidManager:
    def __init__(
        self,
        cache: SvidCache,
        client: ServerClient,
        node: NodeIdentity,
        policy: RotationPolicy,
        rng: random.Random,
        sync_interval: float,
        clock: Callable[[], float] = time.time,
        key_type: str = "ec-p256",
    ) -> None:
        self.cache = cache
        self._make_key = WORKLOAD_KEY_TYPES[key_type]
        self._slow_keys = slow_to_generate(key_type)
        self.client = client
        self.node = node
        self.policy = policy
        self.rng = rng
        self.sync_interval = sync_interval
        self.clock = clock
        self.backoff = Backoff(base=0.5, cap=30.0, rng=rng)
        self.bundle_sequence = -1
        self.tainted_akis: set[str] = set()
        self.taint_window = 600.0
        self._taint_due: dict[str, float] = {}
        self._agent_taint_due: float | None = None
        # A renewal of the agent SVID that failed is not retried before this (its own backoff).
        self._node_hold = 0.0
        self._node_backoff = Backoff(base=1.0, cap=300.0, rng=rng)
        self._unsaved_bundle: Bundle | None = None  # adopted, not yet on disk
        self._bundle_save_failed = False
        # Entries the server refused: no new request before the held time (backoff per entry).
        self._hold: dict[str, float] = {}
        self._entry_backoff: dict[str, Backoff] = {}
        self._reattests = 0
        self._startup = True
        self._jwt: dict[tuple[str, str, tuple[str, ...]], JwtSvid] = {}
        self._wake = asyncio.Event()
        self.failures: dict[tuple[str, int], int] = {}
        self.last_sync_ok = 0.0
        self.consecutive_failures = 0
        self._walker: ChainWalker | None = None  # for the held bundle's roots

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        while True:
            delay = self.sync_interval
            try:
                await self.step()
                self.backoff.reset()
                self.consecutive_failures = 0
                self._reattests = 0
                delay = min(self.sync_interval, max(0.05, self.next_due() - self.clock()))
            except OverloadedError as exc:
                # Bounded here too: a raise from this handler would end the loop for good.
                delay = jittered(bounded_retry_after(exc.retry_after), self.rng)
                log.info("server overloaded; retrying in %.1fs", delay)
            except (ServerUnavailableError, ServerRejectedError, OSError, TimeoutError) as exc:
                self.consecutive_failures += 1
                delay = self.backoff.next()
                log.warning("server sync failed (%s); serving cache, retry in %.1fs", exc, delay)
            except (PermissionDeniedError, UnauthenticatedError) as exc:
                # Evicted, superseded or the SVID no longer verifies after a CA rotation.
                log.warning("server refused the agent SVID (%s); re-attesting", exc)
                if isinstance(exc, IdentityRejectedError):
                    # Fetched over server-authenticated TLS, so as trustworthy as a synced bundle.
                    self._try_bundle(exc.bundle, "probed")  # saved by the attestation below
                try:
                    await self._reattest()
                    self._reattests += 1
                    # Refused again right after a fresh attestation: re-attesting is not what
                    # helps, so back off instead of attesting in a tight loop.
                    delay = 0.05 if self._reattests <= 1 else self.backoff.next()
                except Exception as exc2:  # keep serving the cache whatever happens
                    delay = self.backoff.next()
                    log.warning("re-attestation failed (%s); retry in %.1fs", exc2, delay)
            except ConfigError as exc:  # node credentials unreadable (say, a token file removed)
                delay = self.backoff.next()
                log.error("cannot attest the node (%s); retry in %.1fs", exc, delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = self.backoff.next()
                log.exception("unexpected error in sync loop; retry in %.1fs", delay)
            # Whatever the outcome: rotate() drops expired SVIDs only after a good sync, so
            # during an outage one past its notAfter went on being served (every peer refuses
            # it). The wait ends at the next expiry, not a backoff later.
            now = self.clock()
            self.cache.drop_expired(now)
            if self.cache.svids:
                delay = min(delay, max(0.05, min(s.expires_at for s in self.cache.svids.values()) - now))
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races
            # with a poke(), and the agent's shutdown would then wait forever.
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def poke(self) -> None:
        self._wake.set()

    async def _reattest(self) -> None:
        bundle = await self.node.attest()
        if bundle:
            self._try_bundle(bundle, "attestation's")
        await self._save_bundle()

    def agent_svid_tainted_due(self, now: float) -> bool:
        """Whether the agent's own SVID, signed by a tainted CA key, is due for re-issue.

        Its moment is drawn once, uniformly over the taint window, like any workload SVID's,
        so a fleet of agents does not renew at the same instant after a taint.
        """
        aki = self.node.authority_key_id
        if not aki or aki not in self.tainted_akis:
            self._agent_taint_due = None
            return False
        if self._agent_taint_due is None:
            self._agent_taint_due = now + self.rng.uniform(0, self.taint_window)
        return now >= self._agent_taint_due

    async def step(self) -> None:
        if not self.node.valid:
            await self._reattest()
        elif self.node.due() and self.clock() >= self._node_hold:
            if await self._renew_node(stationary=False):
                self._agent_taint_due = None
        await self.sync()
        # After the sync, so the slot is drawn as soon as the taint is learnt.
        if self.node.valid and self.agent_svid_tainted_due(self.clock()) and self.clock() >= self._node_hold:
            if await self._renew_node(stationary=True):
                self._agent_taint_due = None
        await self.rotate()
        await self._report()
        self.last_sync_ok = self.clock()

    async def _renew_node(self, stationary: bool) -> bool:
        """Renew the agent SVID; False if it failed in a way that leaves the held one usable
        (it cannot be saved, the server refused or garbled the renewal). Such a failure
        ended the whole round before: no sync and no workload renewal while the agent SVID
        was still good, until the workloads' SVIDs expired. It is retried on a backoff of
        its own; an outage, an overload or a refused identity still end the round."""
        try:
            await self.node.renew(stationary=stationary)
        except (OSError, ServerRejectedError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            self._node_hold = self.clock() + self._node_backoff.next()
            log.warning("agent SVID renewal failed (%s); going on with the held one, retry in %.1fs",
                        exc, self._node_hold - self.clock())
            return False
        self._node_backoff.reset()
        self._node_hold = 0.0
        return True

    # ------------------------------------------------------------------ sync
    async def sync(self) -> None:
        known = {eid: e.revision_number for eid, e in self.cache.entries.items()}
        created = {eid: e.created_at for eid, e in self.cache.entries.items()}
        data = await self.client.sync(known, self.bundle_sequence, self.cache.federated_digests, created)
        # Everything is checked before anything is applied: a malformed answer is refused
        # whole (the cache keeps serving, the loop backs off) instead of half-applied or
        # raising TypeError/KeyError with a traceback per loop.
        removed = _str_list(data, "removed")
        raw_entries = data.get("entries", [])
        if not isinstance(raw_entries, list):
            raise bad_response("sync answer: entries must be a list")
        raw_parents = _str_list(data, "workload_parents")
        tainted = _str_list(data, "tainted_authorities")
        window = finite_number(data.get("taint_window", self.taint_window))
        if window is None or window < 0:  # a NaN taint slot never came due: the taint was ignored
            raise bad_response("sync answer: taint_window must be a finite number >= 0")
        digests, fed_docs = data.get("federated_digests"), data.get("federated_bundles") or {}
        if digests is not None and not (isinstance(digests, dict) and isinstance(fed_docs, dict)
                                        and all(isinstance(v, str) for v in digests.values())):
            raise bad_response("sync answer: federated_digests and federated_bundles must be objects")
        entries = dict(self.cache.entries)
        for eid in removed:
            entries.pop(eid, None)
        # One bad entry (a selector type this agent does not know yet, say, from a newer
        # server) is skipped, not the whole sync: the server sends it again next time, and
        # the version held, if any, stays (as SPIRE's agent does with a malformed entry).
        skipped: list[str] = []
        for raw in raw_entries:
            try:
                e = Entry.from_json(raw)
            except (ValueError, TypeError) as exc:
                skipped.append(f"{_raw_id(raw)}: {exc}")
                continue
            if not e.spiffe_id.member_of(self.cache.td):
                skipped.append(f"{e.id}: {e.spiffe_id} is not in trust domain {self.cache.td}")
                continue
            entries[e.id] = e
        if len(entries) > MAX_ENTRIES:
            raise bad_response(f"sync answer leaves {len(entries)} entries, more than {MAX_ENTRIES}")
        parents: list[SpiffeId] = []
        for p in raw_parents:
            try:
                parents.append(SpiffeId.parse(p))
            except ValueError as exc:
                skipped.append(f"workload parent {p[:100]!r}: {exc}")
        if skipped:
            log.warning("ignored %d malformed item(s) of the server's sync answer (first: %s)",
                        len(skipped), skipped[0][:300])
        if "bundle" in data:
            self._try_bundle(data["bundle"], "synced")
        if digests is not None:  # absent from servers without federation
            self.cache.apply_federated(digests, fed_docs)
        self.tainted_akis = set(tainted)
        self.taint_window = window
        if raw_entries or removed or set(parents) != self.cache.workload_parents:
            self.cache.set_entries(entries.values(), parents)
        await self._save_bundle()

    def _try_bundle(self, doc: Any, source: str) -> None:
        """Adopt a bundle from the server if usable; otherwise keep the held one and say why.
        Written to disk later, by _save_bundle."""
        try:
            self._apply_bundle(doc)
        except (MeshidError, ValueError) as exc:
            log.warning("%s server bundle refused, keeping the held one: %s", source, exc)

    def _apply_bundle(self, doc: dict[str, Any]) -> None:
        bundle = Bundle.from_spiffe_json(self.cache.td, doc)
        held = self.cache.bundle
        if held is not None and bundle.sequence == held.sequence:
            return
        if not bundle.x509_authorities:
            # With no root the agent could authenticate no server again: wedged for good.
            raise InvalidBundleError("the bundle has no X509 authority")
        if held is not None and bundle.sequence < held.sequence:
            # Adopted all the same, as SPIRE's agent does: a server restored from a backup
            # goes on from its older sequence, and refusing would keep from agents every key
            # it makes until its sequence passed theirs (days). A replica a tick behind its
            # peers is corrected by the next sync.
            log.warning("server bundle sequence went back from %d to %d (datastore restored, or a "
                        "replica behind its peers); adopting it", held.sequence, bundle.sequence)
        self.bundle_sequence = bundle.sequence
        self.client.set_roots(bundle.x509_authorities)
        self.cache.set_bundle(bundle)
        self._unsaved_bundle = bundle

    async def _save_bundle(self) -> None:
        """Persist the adopted bundle for the next start, once what came with it is applied.
        On a thread: its fsyncs on a slow disk would hold every workload's stream; and not
        in the middle of a sync, where the workloads would be served the new bundle with the
        old entries meanwhile. A failed write (disk full) is retried at each sync rather
        than raised: the bundle is in use already."""
        bundle = self._unsaved_bundle
        if bundle is None:
            return
        path = self.node.dir / BUNDLE_FILE
        try:
            await write_off_loop(write_atomically, path, bundle.to_spiffe_bytes())
        except OSError as exc:
            if not self._bundle_save_failed:
                log.warning("could not save the bundle to %s (%s); retrying at each sync", path, exc)
            self._bundle_save_failed = True
            return
        if self._bundle_save_failed:
            log.info("bundle saved to %s", path)
        self._bundle_save_failed = False
        if self._unsaved_bundle is bundle:  # not replaced by a newer one meanwhile
            self._unsaved_bundle = None

    # ------------------------------------------------------------------ rotation
    def _workload_entries(self) -> list[Entry]:
        # The server only sends entries this agent is authorized for; pre-fetch them all.
        return list(self.cache.entries.values())

    def due(self, now: float) -> list[tuple[Entry, str]]:
        out: list[tuple[Entry, str]] = []
        entries = self._workload_entries()
        present = {e.id for e in entries}
        # Forget state of entries that are gone, so stale times never make next_due() spin.
        for eid in [eid for eid in self._hold if eid not in present]:
            del self._hold[eid]
            self._entry_backoff.pop(eid, None)
        taint_due: dict[str, float] = {}
        for entry in entries:
            svid = self.cache.svids.get(entry.id)
            if self._hold.get(entry.id, 0.0) > now:
                if entry.id in self._taint_due:
                    taint_due[entry.id] = self._taint_due[entry.id]
                continue  # the server refused it recently; its per-entry backoff has not run out
            if svid is None:
                out.append((entry, "initial"))
            elif svid.expires_at <= now:
                out.append((entry, "expired"))
            elif svid.entry_revision != entry.revision_number or \
                    svid.entry_created_at not in (None, entry.created_at):
                out.append((entry, "entry_changed"))
            elif authority_key_id(svid.leaf) in self.tainted_akis:
                # Spread re-issuance uniformly over the taint window, drawn once per SVID;
                # a scheduled renewal that falls earlier still happens at its own time.
                at = self._taint_due.get(entry.id)
                if at is None:
                    at = now + self.rng.uniform(0, self.taint_window)
                taint_due[entry.id] = at
                if now >= at or now >= svid.schedule.renew_at:
                    out.append((entry, "tainted"))
            elif now >= svid.schedule.renew_at:
                out.append((entry, "scheduled"))
        # Only SVIDs still signed by a tainted key keep a taint time (the key may be revoked
        # or un-listed before their turn comes).
        self._taint_due = taint_due
        return out

    def next_due(self) -> float:
        times = [max(s.schedule.renew_at, self._hold.get(eid, 0.0)) for eid, s in self.cache.svids.items()]
        times.extend(max(t, self._hold.get(eid, 0.0)) for eid, t in self._taint_due.items())
        times.extend(t for eid, t in self._hold.items() if eid not in self.cache.svids)
        if self.node.schedule is not None:
            times.append(max(self.node.schedule.renew_at, self._node_hold))
        if self._agent_taint_due is not None:
            times.append(max(self._agent_taint_due, self._node_hold))
        return min(times) if times else self.clock() + self.sync_interval

    async def rotate(self) -> None:
        now = self.clock()
        due = self.due(now)
        if not due:
            self._startup = False
            self.cache.drop_expired(now)
            if self.cache.bundle is not None:
                self.cache.ready.set()
            return
        mass = self._startup or (len(due) > 1 and all(r == "tainted" for _, r in due))
        for i in range(0, len(due), BATCH):
            await self._sign_batch(due[i : i + BATCH], mass)
            # The streams woken by the new SVIDs push them before our bookkeeping runs.
            await asyncio.sleep(0)
        self._startup = False
        self.cache.drop_expired(self.clock())

    async def _sign_batch(self, batch: list[tuple[Entry, str]], mass: bool) -> None:
        keys: dict[str, PrivateKeyTypes] = {}
        requests = []
        for entry, reason in batch:
            if self._slow_keys:  # one at a time, so a shutdown waits for one key at most
                key, csr = await asyncio.to_thread(_key_and_csr, self._make_key)
            else:
                key, csr = _key_and_csr(self._make_key)
            keys[entry.id] = key
            old = self.cache.svids.get(entry.id)
            requests.append({
                "entry_id": entry.id, "csr": b64(csr), "rotation_reason": reason,
                "scheduled_rotation_at": old.schedule.renew_at if old is not None else None,
            })
        sent_at = self.clock()
        results = await self.client.sign_x509(requests)
        by_entry = {entry.id: (entry, reason) for entry, reason in batch}
        fresh: list[X509Svid] = []
        answered: set[str] = set()
        now = self.clock()
        for res in results:
            eid = res.get("entry_id") if isinstance(res, dict) else None
            if not isinstance(eid, str) or eid not in by_entry or eid in answered:
                continue  # not an answer to a request of ours (or a second one)
            answered.add(eid)
            entry, reason = by_entry[eid]
            if "svid" not in res:
                self._back_off(eid)
                log.warning("server refused SVID for entry %s: %s", eid, res.get("error"))
                continue
            key = keys[eid]
            try:  # one garbled chain lost the whole batch (and retried it each loop)
                chain = tuple(certs_from_json(res["svid"]))
                wrong = _not_for(chain[0], key, entry.spiffe_id, now) or self._unchained(chain)
            except ServerRejectedError as exc:
                wrong = f"that does not parse ({exc})"
            if wrong:
                # Never handed to a workload; retried later like a refusal, not every loop.
                self._back_off(eid)
                log.error("server returned an SVID %s (entry %s); discarded", wrong, eid)
                continue
            leaf = chain[0]
            stationary = mass or reason in ("tainted", "forced")
            issued_at = effective_issued_at(leaf.not_valid_before_utc.timestamp(),
                                            leaf.not_valid_after_utc.timestamp(), sent_at)
            schedule = self.policy.schedule(issued_at, leaf.not_valid_after_utc.timestamp(), self.rng,
                                            stationary=stationary)
            self._taint_due.pop(eid, None)
            self._hold.pop(eid, None)
            self._entry_backoff.pop(eid, None)
            fresh.append(X509Svid(eid, entry.spiffe_id, chain, key, schedule, entry.revision_number,
                                  entry.hint, chain_der(chain), pkcs8_der(key), entry.created_at))
        # Held like a refusal: a renewal the server left unanswered stayed due, so next_due()
        # lay in the past and the loop synced and signed again every 50 ms.
        for eid in by_entry.keys() - answered:
            self._back_off(eid)
            log.warning("server did not answer the SVID request of entry %s", eid)
        self.cache.put_svids(fresh)

    def _unchained(self, chain: tuple[x509.Certificate, ...]) -> str:
        """Why `chain` does not lead to the trust bundle the workload gets with it ("" if it
        does). An SVID its peers cannot verify would break every connection it is used on,
        while the one held (if any) still works."""
        bundle = self.cache.bundle
        if bundle is None:
            return "with no trust bundle held to check it against"
        if self._walker is None or self._walker.roots != bundle.x509_authorities:
            self._walker = ChainWalker(bundle.x509_authorities)
        return "" if self._walker.reaches_root(chain) else "that does not chain to the trust bundle"

    def _back_off(self, entry_id: str) -> None:
        backoff = self._entry_backoff.setdefault(entry_id, Backoff(base=1.0, cap=300.0, rng=self.rng))
        self._hold[entry_id] = self.clock() + backoff.next()

    # ------------------------------------------------------------------ JWT-SVIDs
    def jwt_cached(self, entry: Entry, audience: list[str]) -> JwtSvid | None:
        """The JWT-SVID jwt_svid() would return without asking the server, if any."""
        return self._jwt_cached(_jwt_key(entry, audience), self.clock())

    def _jwt_cached(self, key: tuple[str, str, tuple[str, ...]], now: float) -> JwtSvid | None:
        cached = self._jwt.get(key)
        if cached is not None and now < cached.schedule.renew_at and now < cached.expires_at:
            return cached
        return None

    async def jwt_svid(self, entry: Entry, audience: list[str]) -> JwtSvid:
        key = _jwt_key(entry, audience)
        now = self.clock()
        cached = self._jwt_cached(key, now)
        if cached is not None:
            return cached
        try:
            token, _ = await self.client.sign_jwt(entry.id, list(key[2]))
        except Exception as exc:
            # Past its renewal time but unexpired, the held token still works: it is
            # returned while the server cannot renew it (an outage), as SPIRE's agent does;
            # every FetchJWTSVID failed instead for the second half of the token's life.
            held = self._jwt.get(key)
            if held is None or self.clock() >= held.expires_at:
                raise
            log.warning("cannot renew the JWT-SVID of %s (%s); returning the cached one",
                        entry.spiffe_id, exc)
            return held
        # The token's own exp, not the answer's expires_at: a larger one kept an expired
        # token cached and served.
        expires_at = _jwt_expiry(token, entry.spiffe_id, key[2], now)
        schedule = self.policy.schedule(now, max(now + 1, expires_at), self.rng)
        svid = JwtSvid(token, entry.spiffe_id, expires_at, schedule)
        if len(self._jwt) >= MAX_JWT_CACHE:
            kept = {k: v for k, v in self._jwt.items() if v.expires_at > now}
            if len(kept) >= MAX_JWT_CACHE:
                # All unexpired (new audiences are new keys): the bound held only for expired
                # tokens, and each insertion past it copied the cache. The oldest quarter
                # goes; a token evicted is signed again if asked for.
                kept = dict(list(kept.items())[len(kept) - MAX_JWT_CACHE * 3 // 4:])
            self._jwt = kept
        self._jwt.pop(key, None)  # re-inserted last: insertion order is age
        self._jwt[key] = svid
        return svid

    # ------------------------------------------------------------------ reporting
    def note_workload_failure(self, reason: str, uid: int) -> None:
        k = (reason[:200], uid)
        if k in self.failures or len(self.failures) < 1000:  # bounded whatever callers do
            self.failures[k] = self.failures.get(k, 0) + 1

    async def _report(self) -> None:
        if not self.failures:
            return
        pending, self.failures = self.failures, {}
        try:
            await self.client.report([{"reason": r, "uid": u, "count": c} for (r, u), c in pending.items()])
        except Exception:
            for k, c in pending.items():
                self.failures[k] = self.failures.get(k, 0) + c
            raise


def _key_and_csr(make: Callable[[], PrivateKeyTypes]) -> tuple[PrivateKeyTypes, bytes]:
    key = make()
    return key, csr_for(key)


def _str_list(data: dict[str, Any], name: str) -> list[str]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_response(f"sync answer: {name} must be a list of strings")
    return value


def _raw_id(raw: Any) -> str:
    eid = raw.get("id") if isinstance(raw, dict) else None
    return f"entry {eid[:100]!r}" if isinstance(eid, str) else "an entry"


def _jwt_expiry(token: str, spiffe_id: SpiffeId, audience: tuple[str, ...], now: float) -> float:
    """The exp of `token` if it is a JWT-SVID for `spiffe_id` covering `audience`, unexpired
    at `now`; bad_response otherwise, so a workload is never handed a token naming another
    identity or lacking an audience it asked for. The signature is not checked here: the
    key may be newer than the agent's last bundle sync, and the verifier checks it anyway."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise bad_response(f"JWT-SVID does not parse: {exc}") from None
    sub = claims.get("sub")
    if sub != str(spiffe_id):
        raise bad_response(f"JWT-SVID is for {str(sub)[:100]!r}, not the entry's {spiffe_id}")
    aud = claims.get("aud")
    held = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not set(audience) <= {a for a in held if isinstance(a, str)}:
        raise bad_response(f"JWT-SVID audience does not cover the requested {list(audience)}"[:300])
    exp = finite_number(claims.get("exp"))
    if exp is None or exp <= now:
        raise bad_response("JWT-SVID has no usable exp or has already expired")
    return exp


def _jwt_key(entry: Entry, audience: list[str]) -> tuple[str, str, tuple[str, ...]]:
    """A JWT-SVID cache key: the entry, the SPIFFE ID it names now (an entry changed to name
    another ID must not go on serving the old ID's token; SPIRE keys by SPIFFE ID) and the
    audience as a set."""
    return entry.id, str(entry.spiffe_id), tuple(sorted(set(audience)))


def _not_for(leaf: x509.Certificate, key: PrivateKeyTypes, spiffe_id: SpiffeId, now: float) -> str:
    """Why `leaf` is not an SVID for `spiffe_id` over `key`'s public key, valid at `now`
    ("" if it is)."""
    # An expired one was cached and pushed to the workload's stream before drop_expired().
    why, issued = issued_svid_problem(leaf, key, now)
    if not why and issued != spiffe_id:
        why = f"for {issued}, not the entry's {spiffe_id}"
    return why
