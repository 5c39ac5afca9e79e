"""The agent's SVID cache: entries, X509-SVIDs with their renewal schedules, bundles,
and targeted change notification for Workload API streams.

A stream watches the entry ids it currently matches; rotating one SVID wakes only the
streams holding it, an entry change only the streams whose selectors match the entry
(before or after), and bundle changes wake everyone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshid.bundle import Bundle
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api.rotation import RenewalSchedule

log = logging.getLogger("meshid.agent.cache")

_MAX_MATCH_CACHE = 4096
# How long a stream's first message waits for the SVIDs of all its entries (see
# Watcher.hold_first_message); then it goes out with those there are.
FIRST_MESSAGE_WAIT = 10.0


@dataclass(frozen=True)
class X509Svid:
    entry_id: str
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates
    key: PrivateKeyTypes = field(repr=False)  # private keys stay out of logs and error messages
    schedule: RenewalSchedule
    entry_revision: int
    hint: str = ""
    # DER forms, computed once per SVID rather than on every response.
    chain_der: bytes = b""
    key_der: bytes = field(default=b"", repr=False)
    # created_at of the entry version it was signed for (None: unknown): an entry deleted and
    # re-created under its id can be back at the revision the SVID records.
    entry_created_at: int | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    # Cached: the agent scans every SVID's expiry after each rotation, and reading a
    # certificate's validity builds a datetime each time.
    @functools.cached_property
    def issued_at(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @functools.cached_property
    def expires_at(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()


class Watcher:
    """One stream's interest: woken on entry-set and bundle changes, and on changes of the
    SVIDs of `entry_ids` (the cache keeps an index of watchers by entry id, so that an
    SVID rotation touches its own streams, not every stream). Hashed by identity."""

    def __init__(
        self, selectors: frozenset[Selector], index: dict[str, set[Watcher]], any_entry_change: bool = False
    ) -> None:
        self.selectors = selectors
        # False: woken by entry changes only where an entry it matches (or matched) changed.
        self.any_entry_change = any_entry_change
        self.event = asyncio.Event()
        self._entry_ids: frozenset[str] = frozenset()
        self._index = index
        self._hold_timer: asyncio.TimerHandle | None = None

    def hold_first_message(self) -> None:
        """Until the first message is sent, or for FIRST_MESSAGE_WAIT, it waits for the SVIDs
        of all the entries it covers, as SPIRE's agent holds a new subscriber: an SVID missing
        from it says the identity was removed (Cilium drops it), and a workload's X509Source
        would start without it. The event is set when the time is up."""
        self._hold_timer = asyncio.get_running_loop().call_later(FIRST_MESSAGE_WAIT, self.event.set)

    def first_message_sent(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    @property
    def holding_partial(self) -> bool:
        """Whether a message lacking some of its SVIDs is to be held back now."""
        timer = self._hold_timer
        return timer is not None and asyncio.get_running_loop().time() < timer.when()

    @property
    def entry_ids(self) -> frozenset[str]:
        return self._entry_ids

    @entry_ids.setter
    def entry_ids(self, ids: Iterable[str]) -> None:
        new = frozenset(ids)
        old = self._entry_ids
        if new == old:
            return
        for eid in old - new:
            holders = self._index.get(eid)
            if holders is not None:
                holders.discard(self)
                if not holders:
                    del self._index[eid]
        for eid in new - old:
            self._index.setdefault(eid, set()).add(self)
        self._entry_ids = new


class SvidCache:
    def __init__(self, trust_domain: TrustDomain) -> None:
        self.td = trust_domain
        self.entries: dict[str, Entry] = {}
        self.svids: dict[str, X509Svid] = {}
        self.bundle: Bundle | None = None
        self.federated: dict[TrustDomain, Bundle] = {}
        self.federated_digests: dict[str, str] = {}  # "spiffe://td" → server's digest of what we hold
        self.workload_parents: set[SpiffeId] = set()
        self.bundle_version = 0
        self.entries_version = 0
        self._watchers: set[Watcher] = set()
        self._watchers_by_entry: dict[str, set[Watcher]] = {}
        # For entry changes: the streams holding a selector, and those woken by any change.
        self._watchers_by_selector: dict[Selector, set[Watcher]] = {}
        self._watchers_of_any_entry: set[Watcher] = set()
        self.ready = asyncio.Event()
        # matching_entries answers for the current entry set: selector → entries holding
        # it, and the answer per caller selector set (callers of one shape repeat).
        self._matched_for: tuple[dict[str, Entry], int] | None = None
        self._by_selector: dict[Selector, list[Entry]] = {}
        self._matches: dict[frozenset[Selector], list[Entry]] = {}

    # ------------------------------------------------------------------ queries
    def matching_entries(self, selectors: frozenset[Selector]) -> list[Entry]:
        """Entries whose selectors the caller has. Everything in the cache is already authorized
        for this agent by the server (its children, its aliases' children and their descendants,
        as in SPIRE), so nested layouts like Cilium's /cilium-operator → /identity/N work.

        Runs on every Workload API call: only entries sharing a selector with the caller are
        checked, and the answer is kept per selector set until the entries change."""
        if self._matched_for is None or self._matched_for[0] is not self.entries or \
                self._matched_for[1] != self.entries_version:
            self._index_entries()
        found = self._matches.get(selectors)
        if found is None:
            candidates: dict[str, Entry] = {}  # an entry has at least one selector (Entry checks)
            for sel in selectors:
                for e in self._by_selector.get(sel, ()):
                    if e.id not in candidates and all(s in selectors for s in e.selectors):
                        candidates[e.id] = e
            found = sorted(candidates.values(), key=lambda e: (str(e.spiffe_id), e.id))
            if len(self._matches) >= _MAX_MATCH_CACHE:
                self._matches.clear()
            self._matches[selectors] = found
        return list(found)

    def _index_entries(self) -> None:
        by_selector: dict[Selector, list[Entry]] = {}
        for e in self.entries.values():
            for sel in set(e.selectors):
                by_selector.setdefault(sel, []).append(e)
        self._by_selector = by_selector
        self._matches = {}
        self._matched_for = (self.entries, self.entries_version)

    def federated_for(self, entries: Iterable[Entry]) -> dict[TrustDomain, Bundle]:
        """The federated bundles held for the trust domains `entries` federate with: what a
        workload matching them may see (SPIRE's WorkloadUpdate.FederatedBundles)."""
        out: dict[TrustDomain, Bundle] = {}
        for e in entries:
            for td in e.federates_with:
                b = self.federated.get(td)
                if b is not None:
                    out.setdefault(td, b)
        return out

    def bundles_for(self, entries: Iterable[Entry]) -> dict[TrustDomain, Bundle]:
        """The own bundle plus :meth:`federated_for` `entries`: the bundles the Workload API
        hands a caller matching `entries` (none: the own bundle only)."""
        assert self.bundle is not None
        return {**self.federated_for(entries), self.td: self.bundle}

    def x509_bundle_map(self) -> dict[str, bytes]:
        """Own and every federated X509 root set the agent holds, keyed `spiffe://td` (DER
        concatenated), as the Delegated Identity API sends them (SPIRE sends a delegate all
        bundles; Workload API callers get only :meth:`bundles_for` their entries)."""
        assert self.bundle is not None
        out = {str(self.td.id): self.bundle.x509_der()}
        for td, b in self.federated.items():
            out[str(td.id)] = b.x509_der()
        return out

    def jwt_bundle_map(self) -> dict[str, bytes]:
        """Own and every federated JWKS document keyed `spiffe://td` (Delegated Identity API)."""
        assert self.bundle is not None
        out = {str(self.td.id): self.bundle.jwks_bytes()}
        for td, b in self.federated.items():
            out[str(td.id)] = b.jwks_bytes()
        return out

    def svid_of(self, entry: Entry) -> X509Svid | None:
        """The SVID held for `entry`, if it is for the SPIFFE ID the entry names now. An entry
        changed to name another ID (and perhaps other selectors) keeps its old SVID until the
        new one is signed, or for good if the server refuses it: that SVID and its key are
        no longer the entry's to hand out, to the workloads it now matches or any other."""
        s = self.svids.get(entry.id)
        return s if s is not None and s.spiffe_id == entry.spiffe_id else None

    # ------------------------------------------------------------------ updates
    def set_entries(self, entries: Iterable[Entry], parents: Iterable[SpiffeId]) -> None:
        old, new = self.entries, {e.id: e for e in entries}
        # Every version that differs, before and after: a stream is concerned if it
        # matches either (it gains, loses or sees a changed entry).
        changed = [e for eid, e in new.items() if (o := old.get(eid)) is not e and o != e]
        changed += [o for eid, o in old.items() if new.get(eid) is not o and new.get(eid) != o]
        parents_changed = set(parents) != self.workload_parents
        self.entries = new
        self.workload_parents = set(parents)
        for eid in [eid for eid in self.svids if eid not in self.entries]:
            del self.svids[eid]
        self.entries_version += 1
        if parents_changed:
            self._wake_all()
        else:
            self._wake_concerned(changed)

    def set_bundle(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.bundle_version += 1
        self._wake_all()

    def apply_federated(self, digests: Mapping[str, Any], docs: Mapping[str, Any]) -> bool:
        """Apply a sync's federated bundles: `digests` names every trust domain we should hold,
        `docs` carries the ones that changed. Returns whether anything changed."""
        fresh: dict[TrustDomain, Bundle] = {}
        kept: dict[str, str] = {}
        for key, digest in digests.items():
            try:
                td = TrustDomain.parse(key)
            except ValueError as exc:
                log.warning("ignoring federated bundle for %r from the server: %s", key, exc)
                continue
            if td == self.td:
                # Our own trust domain's bundle comes only from the sync's own bundle: as a
                # "federated" one it would stand in for it in the bundle maps workloads get.
                log.warning("ignoring a federated bundle for the agent's own trust domain %s", td)
                continue
            if key in docs:
                try:
                    fresh[td] = Bundle.from_spiffe_json(td, docs[key])
                except ValueError as exc:
                    log.warning("ignoring federated bundle of %s from the server: %s", td, exc)
                    if td in self.federated:
                        fresh[td] = self.federated[td]  # keep the old one; no digest → resent
                    continue
            elif td in self.federated and self.federated_digests.get(key) == digest:
                fresh[td] = self.federated[td]
            else:
                continue  # not held: left unrecorded, so the server sends it next time
            kept[key] = str(digest)
        self.federated_digests = kept
        if fresh.keys() == self.federated.keys() and all(fresh[td] is self.federated[td] for td in fresh):
            return False
        self.federated = fresh
        self.bundle_version += 1
        self._wake_all()
        return True

    def put_svids(self, svids: Iterable[X509Svid]) -> None:
        touched: set[str] = set()
        for s in svids:
            self.svids[s.entry_id] = s
            touched.add(s.entry_id)
        if touched:
            self._wake_entries(touched)
            self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.bundle is not None:
            self.ready.set()

    def drop_expired(self, now: float) -> None:
        gone = {eid for eid, s in self.svids.items() if s.expires_at <= now}
        for eid in gone:
            del self.svids[eid]
        if gone:
            self._wake_entries(gone)

    # ------------------------------------------------------------------ watching
    def watch(self, selectors: frozenset[Selector], *, any_entry_change: bool = False) -> Watcher:
        """A stream's watcher. Entry changes wake it only when they concern entries its
        selectors match (then or before), unless `any_entry_change` (a stream whose
        answer depends on entries other than its own matches)."""
        w = Watcher(selectors, self._watchers_by_entry, any_entry_change)
        self._watchers.add(w)
        if any_entry_change:
            self._watchers_of_any_entry.add(w)
        for sel in selectors:
            self._watchers_by_selector.setdefault(sel, set()).add(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        w.entry_ids = ()
        w.first_message_sent()  # its timer, if any, goes
        if w not in self._watchers:
            return
        self._watchers.discard(w)
        self._watchers_of_any_entry.discard(w)
        for sel in w.selectors:
            holders = self._watchers_by_selector.get(sel)
            if holders is not None:
                holders.discard(w)
                if not holders:
                    del self._watchers_by_selector[sel]

    def _wake_concerned(self, changed: list[Entry]) -> None:
        """An entry change wakes the streams it concerns: with 1000 streams, waking them all
        for one workload's entry costs tens of ms of loop time, pushes included. Found
        through indexes, not a scan: those holding the entry, those whose selectors include
        the entry's (looked up by one of its selectors), and those woken by any change."""
        if not changed:
            return
        for w in self._watchers_of_any_entry:
            w.event.set()
        for e in changed:
            for w in self._watchers_by_entry.get(e.id, ()):
                w.event.set()
            # An entry has at least one selector (Entry checks); a stream it matches holds
            # them all, so it is among the holders of the first.
            for w in self._watchers_by_selector.get(e.selectors[0], ()):
                if not w.event.is_set() and all(s in w.selectors for s in e.selectors):
                    w.event.set()

    def _wake_entries(self, entry_ids: Iterable[str]) -> None:
        for eid in entry_ids:
            for w in self._watchers_by_entry.get(eid, ()):
                w.event.set()

    def _wake_all(self) -> None:
        for w in self._watchers:
            w.event.set()

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)
