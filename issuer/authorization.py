"""Which entries an agent may obtain SVIDs for: the pure policy, no I/O.

As in SPIRE: an agent is authorized for entries whose parent is the agent ID or one of
its node aliases (node entries, parented to the server, whose selectors are all among
the agent's node selectors), and, transitively, for entries parented to any SPIFFE ID
it is authorized for (nested/downstream workloads). Never anything else.

An entry past its `expires_at` (0 = never) counts as gone, as in SPIRE, which prunes it:
no SVID for it, and nothing parented to its SPIFFE ID is authorized through it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from meshid.entry import Entry
from meshid.selector import Selector, matches_all
from meshid.spiffe_id import SpiffeId

_MAX_CACHED_AGENTS = 10_000


class EntryIndex:
    """An immutable snapshot of all entries, indexed for authorization queries."""

    def __init__(self, entries: Iterable[Entry], server_id: SpiffeId, revision: int = 0) -> None:
        self.revision = revision
        self.server_id = server_id
        self.by_id: dict[str, Entry] = {}
        self.by_parent: dict[SpiffeId, list[Entry]] = defaultdict(list)
        self.node_entries: list[Entry] = []
        for e in entries:
            self.by_id[e.id] = e
            self.by_parent[e.parent_id].append(e)
            if e.parent_id == server_id:
                self.node_entries.append(e)
        # authorized() walks every entry an agent may sign; agents ask on every sign and
        # sync call, and the snapshot never changes, so each answer is kept (bounded), with
        # the span of time it holds for: (answer, computed at, first expiry among its entries).
        self._authorized: dict[
            tuple[SpiffeId, frozenset[Selector]], tuple[Mapping[str, Entry], float, float]
        ] = {}

    def with_change(self, entry_id: str, after: Entry | None, revision: int) -> EntryIndex:
        """This snapshot with one entry added, replaced or (after=None) removed, labelled
        `revision`: what one write of this server did, without reloading every entry (a
        reload per write made bulk registration quadratic in datastore reads and parsing).
        Idempotent: a change the snapshot already holds leaves it as it was. The dicts are
        copied (C-speed); only the touched parents' lists are rebuilt."""
        new = EntryIndex((), self.server_id, revision)
        new.by_id = dict(self.by_id)
        new.by_parent = defaultdict(list, self.by_parent)  # lists shared, never mutated
        new.node_entries = self.node_entries
        before = new.by_id.pop(entry_id, None)
        if before is not None:
            siblings = [e for e in new.by_parent.get(before.parent_id, ()) if e.id != entry_id]
            if siblings:
                new.by_parent[before.parent_id] = siblings
            else:
                new.by_parent.pop(before.parent_id, None)
            if before.parent_id == self.server_id:
                new.node_entries = [e for e in new.node_entries if e.id != entry_id]
        if after is not None:
            new.by_id[entry_id] = after
            new.by_parent[after.parent_id] = [*new.by_parent.get(after.parent_id, ()), after]
            if after.parent_id == self.server_id:
                new.node_entries = [*new.node_entries, after]
        return new

    def node_aliases(self, node_selectors: Iterable[Selector], now: float | None = None) -> list[SpiffeId]:
        """SPIFFE IDs of the unexpired node entries whose selectors the node holds."""
        now = time.time() if now is None else now
        return sorted({e.spiffe_id for e in self._aliases(frozenset(node_selectors), now)})

    def _aliases(self, have: frozenset[Selector], now: float) -> list[Entry]:
        return [e for e in self.node_entries if _live(e, now) and matches_all(e.selectors, have)]

    def authorized(
        self, agent_id: SpiffeId, node_selectors: Iterable[Selector], now: float | None = None
    ) -> Mapping[str, Entry]:
        """Every entry the agent may sign at `now` (default: the current time), by entry id
        (read-only; computed once per agent and node selector set for this snapshot, until
        an entry it holds expires)."""
        now = time.time() if now is None else now
        key = (agent_id, frozenset(node_selectors))
        found = self._authorized.get(key)
        if found is not None and found[1] <= now < found[2]:
            return found[0]
        if found is None and len(self._authorized) >= _MAX_CACHED_AGENTS:
            self._authorized.clear()
        walked, until = self._walk(agent_id, key[1], now)
        answer = MappingProxyType(walked)
        self._authorized[key] = (answer, now, until)
        return answer

    def _walk(
        self, agent_id: SpiffeId, node_selectors: frozenset[Selector], now: float
    ) -> tuple[dict[str, Entry], float]:
        """Breadth-first from the agent and its node aliases, cycle-safe, leaving out expired
        entries and what is only reachable through them; also the first expiry among the
        entries it used (when the answer changes), inf if none expires."""
        aliases = self._aliases(node_selectors, now)
        until = min((e.expires_at for e in aliases if e.expires_at), default=math.inf)
        frontier = [agent_id, *(e.spiffe_id for e in aliases)]
        seen_parents: set[SpiffeId] = set()
        out: dict[str, Entry] = {}
        while frontier:
            parent = frontier.pop()
            if parent in seen_parents:
                continue
            seen_parents.add(parent)
            for e in self.by_parent.get(parent, ()):
                if e.id not in out and _live(e, now):
                    out[e.id] = e
                    if e.expires_at:
                        until = min(until, e.expires_at)
                    frontier.append(e.spiffe_id)
        return out, until


def _live(entry: Entry, now: float) -> bool:
    return not entry.expires_at or entry.expires_at > now
