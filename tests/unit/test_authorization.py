"""Which entries an agent may obtain SVIDs for (issuer/authorization.py EntryIndex): its own
children, its node aliases' children, and transitively their descendants. Never anything else."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping

from issuer.authorization import EntryIndex
from meshid.entry import Entry
from meshid.selector import Selector, parse_selectors
from meshid.spiffe_id import SpiffeId

TD = "example.org"
SERVER = SpiffeId.parse(f"spiffe://{TD}/meshid/server")
AGENT_A = SpiffeId.parse(f"spiffe://{TD}/meshid/agent/join_token/a")
AGENT_B = SpiffeId.parse(f"spiffe://{TD}/meshid/agent/join_token/b")
_ids = itertools.count(1)


def sid(path: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TD}{path}")


def entry(spiffe_id: SpiffeId, parent: SpiffeId, *selectors: str) -> Entry:
    return Entry(f"e{next(_ids)}", spiffe_id, parent, parse_selectors(selectors or ("unix:uid:0",)))


def ids(entries: Mapping[str, Entry]) -> set[SpiffeId]:
    return {e.spiffe_id for e in entries.values()}


def test_agent_gets_only_its_own_children() -> None:
    a_web = entry(sid("/a/web"), AGENT_A)
    b_web = entry(sid("/b/web"), AGENT_B)
    index = EntryIndex([a_web, b_web], SERVER)
    assert set(index.authorized(AGENT_A, ())) == {a_web.id}
    assert set(index.authorized(AGENT_B, ())) == {b_web.id}
    # an agent nobody registered anything under gets nothing
    assert index.authorized(sid("/meshid/agent/join_token/c"), ()) == {}


def test_node_alias_children_are_inherited_when_alias_selectors_are_a_subset() -> None:
    node_sels = parse_selectors(
        ["k8s_psat:cluster:prod", "k8s_psat:agent_ns:spire", "k8s_psat:agent_node_name:n1"]
    )
    alias = entry(sid("/cluster/prod"), SERVER, "k8s_psat:cluster:prod")
    alias_child = entry(sid("/cluster/prod/web"), alias.spiffe_id, "k8s:ns:web")
    narrow_alias = entry(sid("/node/n1"), SERVER, "k8s_psat:cluster:prod", "k8s_psat:agent_node_name:n1")
    narrow_child = entry(sid("/node/n1/db"), narrow_alias.spiffe_id, "k8s:ns:db")
    other_alias = entry(sid("/cluster/staging"), SERVER, "k8s_psat:cluster:staging")
    other_child = entry(sid("/cluster/staging/web"), other_alias.spiffe_id, "k8s:ns:web")
    # selectors only partly held by the agent: not an alias
    partial_alias = entry(sid("/partial"), SERVER, "k8s_psat:cluster:prod", "k8s_psat:agent_node_name:n2")
    partial_child = entry(sid("/partial/x"), partial_alias.spiffe_id, "k8s:ns:x")
    everything = [alias, alias_child, narrow_alias, narrow_child, other_alias, other_child, partial_alias,
                  partial_child]
    index = EntryIndex(everything, SERVER)

    assert index.node_aliases(node_sels) == sorted([alias.spiffe_id, narrow_alias.spiffe_id])
    got = index.authorized(AGENT_A, node_sels)
    assert ids(got) == {alias_child.spiffe_id, narrow_child.spiffe_id}
    # The node entries themselves are not signed for the agent: only their children.
    assert alias.id not in got and narrow_alias.id not in got

    # An agent in another cluster gets the other alias' children only.
    staging = parse_selectors(["k8s_psat:cluster:staging"])
    assert ids(index.authorized(AGENT_B, staging)) == {other_child.spiffe_id}
    # An agent without node selectors inherits nothing.
    assert index.authorized(AGENT_A, ()) == {}


def test_selector_value_with_colons_is_matched_whole() -> None:
    alias = entry(sid("/cluster/prod"), SERVER, "k8s_psat:cluster:prod")
    child = entry(sid("/cluster/prod/web"), alias.spiffe_id)
    index = EntryIndex([alias, child], SERVER)
    assert index.authorized(AGENT_A, parse_selectors(["k8s_psat:cluster:prod-2"])) == {}
    assert index.authorized(AGENT_A, [Selector("k8s_psat", "cluster")]) == {}
    assert ids(index.authorized(AGENT_A, parse_selectors(["k8s_psat:cluster:prod"]))) == {child.spiffe_id}


def test_descendants_are_authorized_transitively_and_cycles_terminate() -> None:
    downstream = entry(sid("/downstream"), AGENT_A)
    nested = entry(sid("/downstream/nested"), downstream.spiffe_id)
    deeper = entry(sid("/downstream/nested/deeper"), nested.spiffe_id)
    # a cycle: x parented to y, y parented to x, and x also under the agent
    x = entry(sid("/x"), AGENT_A)
    y = entry(sid("/y"), sid("/x"))
    x_again = entry(sid("/x"), sid("/y"), "unix:uid:1")
    unrelated = entry(sid("/unrelated"), sid("/somewhere"))
    index = EntryIndex([downstream, nested, deeper, x, y, x_again, unrelated], SERVER)
    got = index.authorized(AGENT_A, ())
    assert set(got) == {downstream.id, nested.id, deeper.id, x.id, y.id, x_again.id}
    assert unrelated.id not in got


def test_agent_a_never_sees_agent_b_subtree() -> None:
    b_child = entry(sid("/b/svc"), AGENT_B)
    b_grandchild = entry(sid("/b/svc/inner"), b_child.spiffe_id)
    a_child = entry(sid("/a/svc"), AGENT_A)
    index = EntryIndex([b_child, b_grandchild, a_child], SERVER)
    assert set(index.authorized(AGENT_A, ())) == {a_child.id}
    assert set(index.authorized(AGENT_B, ())) == {b_child.id, b_grandchild.id}


def test_entries_parented_to_the_server_are_never_signed_for_agents_directly() -> None:
    node = entry(sid("/node"), SERVER, "k8s_psat:cluster:prod")
    index = EntryIndex([node], SERVER)
    # even an agent holding the node selectors gets no SVID for the node entry itself
    assert index.authorized(AGENT_A, parse_selectors(["k8s_psat:cluster:prod"])) == {}


def test_answers_are_kept_per_agent_and_node_selectors_and_read_only() -> None:
    alias = entry(sid("/cluster/prod"), SERVER, "k8s_psat:cluster:prod")
    child = entry(sid("/prod/web"), alias.spiffe_id)
    own = entry(sid("/a/web"), AGENT_A)
    index = EntryIndex([alias, child, own], SERVER)
    prod = parse_selectors(["k8s_psat:cluster:prod"])
    first = index.authorized(AGENT_A, prod)
    assert index.authorized(AGENT_A, list(reversed(prod))) is first  # same set, same answer
    assert set(first) == {own.id, child.id}
    assert set(index.authorized(AGENT_A, ())) == {own.id}  # other selectors, other answer
    try:
        first["x"] = own  # type: ignore[index]
    except TypeError:
        pass
    else:
        raise AssertionError("the kept answer must be read-only")


def _shape(idx: EntryIndex) -> tuple[object, ...]:
    return (
        dict(idx.by_id),
        {p: sorted(e.id for e in es) for p, es in idx.by_parent.items() if es},
        sorted(e.id for e in idx.node_entries),
    )


def test_an_index_with_one_change_equals_one_built_from_scratch() -> None:
    """with_change (what the server applies after its own write) against a full rebuild,
    over random creates, re-parentings, selector changes and deletes, including changes
    the snapshot already holds; and the answers an agent gets are the same."""
    import random

    rng = random.Random(5)
    parents = [SERVER, AGENT_A, AGENT_B, sid("/w/0"), sid("/w/1"), sid("/w/2")]
    node_sels = ["k8s_psat:cluster:c1", "k8s_psat:cluster:c2", "unix:uid:0"]
    live: dict[str, Entry] = {}
    idx = EntryIndex([], SERVER, 0)
    for rev in range(1, 300):
        eid = f"x{rng.randrange(40)}"
        if eid in live and rng.random() < 0.3:
            after = None
            live.pop(eid)
        else:
            parent = rng.choice(parents)
            sels = rng.sample(node_sels, rng.randint(1, 2)) if parent == SERVER else ["unix:uid:1"]
            after = Entry(eid, sid(f"/w/{rng.randrange(3)}"), parent, parse_selectors(sels))
            live[eid] = after
        old, old_shape = idx, _shape(idx)
        idx = idx.with_change(eid, after, rev)
        assert _shape(old) == old_shape  # snapshots are immutable: in-flight answers keep theirs
        if rng.random() < 0.2:
            idx = idx.with_change(eid, after, rev)  # already held: nothing changes
        fresh = EntryIndex(live.values(), SERVER, rev)
        assert idx.revision == rev and _shape(idx) == _shape(fresh)
        for agent in (AGENT_A, AGENT_B):
            have = parse_selectors(rng.sample(node_sels, rng.randint(0, 3)))
            assert dict(idx.authorized(agent, have)) == dict(fresh.authorized(agent, have))


def test_expired_entries_are_not_authorized_nor_anything_under_them() -> None:
    """An entry past its expires_at counts as gone (SPIRE prunes it): no SVID for it, nothing
    parented to it through it, and an expired node entry is no alias. The server signed and
    synced expired entries forever (expires_at was stored and never looked at)."""
    now = 1_900_000_000.0
    live = entry(sid("/a/live"), AGENT_A)
    expiring = Entry(f"e{next(_ids)}", sid("/a/expiring"), AGENT_A, parse_selectors(["unix:uid:1"]),
                     expires_at=int(now) + 60)
    expired = Entry(f"e{next(_ids)}", sid("/a/expired"), AGENT_A, parse_selectors(["unix:uid:2"]),
                    expires_at=int(now) - 1)
    under_expired = entry(sid("/a/expired/child"), expired.spiffe_id)
    alias = Entry(f"e{next(_ids)}", sid("/cluster/prod"), SERVER, parse_selectors(["k8s_psat:cluster:prod"]),
                  expires_at=int(now) + 30)
    alias_child = entry(sid("/cluster/prod/web"), alias.spiffe_id)
    index = EntryIndex([live, expiring, expired, under_expired, alias, alias_child], SERVER)
    prod = parse_selectors(["k8s_psat:cluster:prod"])

    first = index.authorized(AGENT_A, prod, now)
    assert set(first) == {live.id, expiring.id, alias_child.id}
    assert index.node_aliases(prod, now) == [alias.spiffe_id]
    assert index.authorized(AGENT_A, prod, now + 29) is first  # kept while nothing expires
    # At its expires_at the alias is gone, and with it its children.
    assert set(index.authorized(AGENT_A, prod, now + 30)) == {live.id, expiring.id}
    assert index.node_aliases(prod, now + 30) == []
    assert set(index.authorized(AGENT_A, prod, now + 60)) == {live.id}
    # Without a time, the current one.
    gone = Entry(f"e{next(_ids)}", sid("/a/gone"), AGENT_A, parse_selectors(["unix:uid:3"]),
                 expires_at=int(time.time()) - 1)
    assert set(EntryIndex([live, gone], SERVER).authorized(AGENT_A, ())) == {live.id}
