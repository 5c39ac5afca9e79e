"""The agent cache's entry matching (workload_api/cache.py): an entry applies when all its
selectors are among the caller's; the selector index and the per-caller answers must never
differ from checking every entry."""

from __future__ import annotations

import random

from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api.cache import SvidCache, X509Svid
from workload_api.rotation import RenewalSchedule

TD = TrustDomain("example.org")
AGENT = SpiffeId.parse("spiffe://example.org/agent")
POOL = [Selector("unix", f"uid:{i}") for i in range(6)] + [Selector("k8s", f"ns:{n}") for n in "abc"]


def brute(entries: list[Entry], have: frozenset[Selector]) -> list[str]:
    out = [e for e in entries if all(s in have for s in e.selectors)]
    return [e.id for e in sorted(out, key=lambda e: (str(e.spiffe_id), e.id))]


def random_entries(rng: random.Random, n: int) -> list[Entry]:
    return [
        Entry(f"e{i}", SpiffeId(TD, f"/w/{rng.randrange(8)}"), AGENT,
              tuple(sorted(set(rng.sample(POOL, rng.randint(1, 3))))))
        for i in range(n)
    ]


def test_matching_equals_checking_every_entry() -> None:
    rng = random.Random(7)
    cache = SvidCache(TD)
    for _round in range(20):
        entries = random_entries(rng, rng.randint(0, 40))
        cache.set_entries(entries, [AGENT])
        for _ in range(30):
            have = frozenset(rng.sample(POOL, rng.randint(0, len(POOL))))
            assert [e.id for e in cache.matching_entries(have)] == brute(entries, have)
            assert [e.id for e in cache.matching_entries(have)] == brute(entries, have)  # kept answer


def test_answers_follow_entry_changes_and_are_the_callers_to_keep() -> None:
    cache = SvidCache(TD)
    uid1 = frozenset({Selector("unix", "uid:1")})
    first = Entry("e1", SpiffeId(TD, "/a"), AGENT, (Selector("unix", "uid:1"),))
    cache.set_entries([first], [AGENT])
    got = cache.matching_entries(uid1)
    assert [e.id for e in got] == ["e1"]
    got.clear()  # a caller filtering its list must not change the cache's answer
    assert [e.id for e in cache.matching_entries(uid1)] == ["e1"]
    second = Entry("e2", SpiffeId(TD, "/b"), AGENT, (Selector("unix", "uid:1"),))
    cache.set_entries([first, second], [AGENT])
    assert [e.id for e in cache.matching_entries(uid1)] == ["e1", "e2"]
    cache.entries = {"e2": second}  # replaced wholesale, without set_entries
    assert [e.id for e in cache.matching_entries(uid1)] == ["e2"]


def test_an_svid_change_wakes_only_the_streams_holding_it() -> None:
    cache = SvidCache(TD)
    a, b, c = (cache.watch(frozenset()) for _ in range(3))
    a.entry_ids = {"e1"}
    b.entry_ids = {"e1", "e2"}
    c.entry_ids = {"e3"}
    cache.put_svids([_svid("e1")])
    assert (a.event.is_set(), b.event.is_set(), c.event.is_set()) == (True, True, False)
    for w in (a, b, c):
        w.event.clear()
    b.entry_ids = {"e2"}  # b's caller no longer matches e1
    cache.unwatch(a)
    cache.put_svids([_svid("e1")])
    assert not (a.event.is_set() or b.event.is_set() or c.event.is_set())
    cache.put_svids([_svid("e2")])
    assert b.event.is_set() and not c.event.is_set()
    cache.unwatch(b)
    cache.unwatch(c)
    assert cache._watchers_by_entry == {}  # nothing left behind by streams that ended


def _svid(entry_id: str) -> X509Svid:
    return X509Svid(entry_id, SpiffeId(TD, f"/{entry_id}"), (), None,  # type: ignore[arg-type]
                    RenewalSchedule(0.0, "uniform"), 1)


def test_an_entry_change_wakes_the_streams_it_concerns() -> None:
    cache = SvidCache(TD)
    uid1, uid2 = Selector("unix", "uid:1"), Selector("unix", "uid:2")
    e1 = Entry("e1", SpiffeId(TD, "/a"), AGENT, (uid1,))
    e2 = Entry("e2", SpiffeId(TD, "/b"), AGENT, (uid2,))
    cache.set_entries([e1, e2], [AGENT])
    one, two = cache.watch(frozenset({uid1})), cache.watch(frozenset({uid2}))
    delegate = cache.watch(frozenset({Selector("unix", "uid:9")}), any_entry_change=True)

    def woken() -> tuple[bool, bool, bool]:
        out = (one.event.is_set(), two.event.is_set(), delegate.event.is_set())
        for w in (one, two, delegate):
            w.event.clear()
        return out

    cache.set_entries([e1.replace(hint="new"), e2], [AGENT])  # e1 changed
    assert woken() == (True, False, True)
    cache.set_entries([cache.entries["e1"], e2], [AGENT])  # nothing changed
    assert woken() == (False, False, False)
    moved = e2.replace(selectors=(uid1,))  # e2 now matches uid 1 and no longer uid 2
    cache.set_entries([cache.entries["e1"], moved], [AGENT])
    assert woken() == (True, True, True)
    cache.set_entries([cache.entries["e1"]], [AGENT])  # e2 removed
    assert woken() == (True, False, True)
    cache.set_entries([cache.entries["e1"]], [AGENT, SpiffeId(TD, "/alias")])  # parents: everyone
    assert woken() == (True, True, True)


def test_entry_change_wakes_exactly_who_a_scan_would() -> None:
    """The watcher indexes (by entry held, by selector, any-change) against the definition:
    a stream is woken when it holds a changed entry, its selectors match an old or new
    version of one, or it asked for any change. Watchers come and go between rounds."""
    rng = random.Random(11)
    cache = SvidCache(TD)
    entries = random_entries(rng, 30)
    cache.set_entries(entries, [AGENT])
    watchers = []
    for _round in range(40):
        for _ in range(rng.randint(0, 6)):
            have = frozenset(rng.sample(POOL, rng.randint(1, 4)))
            w = cache.watch(have, any_entry_change=rng.random() < 0.1)
            w.entry_ids = [e.id for e in rng.sample(entries, rng.randint(0, 3))]
            watchers.append(w)
        for w in rng.sample(watchers, min(len(watchers), rng.randint(0, 3))):
            cache.unwatch(w)
            watchers.remove(w)
        old = {e.id: e for e in entries}
        for i in rng.sample(range(len(entries)), rng.randint(0, 4)):
            entries[i] = entries[i].replace(selectors=tuple(sorted(set(rng.sample(POOL, rng.randint(1, 3))))))
        new = {e.id: e for e in entries}
        changed = [e for eid, e in new.items() if old[eid] != e]
        changed += [old[eid] for eid in new if old[eid] != new[eid]]
        expect = {
            id(w) for w in watchers
            if w.any_entry_change
            or any(e.id in w.entry_ids or all(s in w.selectors for s in e.selectors) for e in changed)
        }
        for w in watchers:
            w.event.clear()
        cache.set_entries(entries, [AGENT])
        assert {id(w) for w in watchers if w.event.is_set()} == (expect if changed else set())
    for w in watchers:
        cache.unwatch(w)
    # Nothing of a closed stream stays behind in the indexes.
    assert cache.watcher_count == 0
    assert not cache._watchers_by_selector and not cache._watchers_by_entry
    assert not cache._watchers_of_any_entry
