"""Entry API query semantics: SPIRE's four match modes, paging and output masks."""

from __future__ import annotations

import pytest

from issuer._gen.spire.api.server.entry.v1 import entry_pb2
from issuer.entry_api import entry_from_proto, entry_to_proto, filter_from_proto
from issuer.entry_filters import (
    MASKABLE_FIELDS,
    EntryFilter,
    FederatesWithMatch,
    Match,
    SelectorMatch,
    apply_output_mask,
    decode_page_token,
    encode_page_token,
    filter_entries,
    match_sets,
    paginate,
)
from meshid._gen.spire.api.types import entry_pb2 as types_entry_pb2
from meshid._gen.spire.api.types import federateswith_pb2, selector_pb2, spiffeid_pb2
from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
A, B, C = Selector("k8s", "ns:a"), Selector("k8s", "sa:b"), Selector("unix", "uid:1")
FED1, FED2, FED3 = TrustDomain("one.org"), TrustDomain("two.org"), TrustDomain("three.org")


def entry(eid: str, *selectors: Selector, fed: tuple[TrustDomain, ...] = (), **kw: object) -> Entry:
    return Entry(
        id=eid,
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/w/{eid}"),
        parent_id=SpiffeId.parse("spiffe://example.org/agent"),
        selectors=tuple(selectors),
        federates_with=fed,
        **kw,  # type: ignore[arg-type]
    )


# Entries' selector sets: {A}, {A,B}, {A,B,C}, {C}.
E_A, E_AB, E_ABC, E_C = entry("a", A), entry("ab", A, B), entry("abc", A, B, C), entry("c", C)
ALL = [E_A, E_AB, E_ABC, E_C]


def ids(entries: list[Entry]) -> set[str]:
    return {e.id for e in entries}


def by_selectors(mode: Match, *sels: Selector) -> set[str]:
    return ids(filter_entries(ALL, EntryFilter(by_selectors=SelectorMatch(frozenset(sels), mode))))


class TestSelectorMatch:
    def test_exact_is_set_equality_regardless_of_order(self) -> None:
        assert by_selectors(Match.EXACT, B, A) == {"ab"}
        assert by_selectors(Match.EXACT, A) == {"a"}

    def test_subset_means_entry_selectors_within_given(self) -> None:
        # SPIRE: entries an agent with selectors {A,B} would match.
        assert by_selectors(Match.SUBSET, A, B) == {"a", "ab"}
        assert by_selectors(Match.SUBSET, A, B, C) == {"a", "ab", "abc", "c"}

    def test_superset_means_entry_has_every_given_selector(self) -> None:
        assert by_selectors(Match.SUPERSET, A, B) == {"ab", "abc"}
        assert by_selectors(Match.SUPERSET, C) == {"abc", "c"}

    def test_any_means_at_least_one_shared(self) -> None:
        assert by_selectors(Match.ANY, B, C) == {"ab", "abc", "c"}
        assert by_selectors(Match.ANY, Selector("x", "y")) == set()

    def test_empty_set_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="empty selector set"):
            SelectorMatch(frozenset(), Match.ANY)

    @pytest.mark.parametrize(
        ("have", "given", "mode", "expected"),
        [
            ({1, 2}, {1, 2}, Match.EXACT, True),
            ({1}, {1, 2}, Match.EXACT, False),
            ({1}, {1, 2}, Match.SUBSET, True),
            ({1, 3}, {1, 2}, Match.SUBSET, False),
            ({1, 2, 3}, {1, 2}, Match.SUPERSET, True),
            ({1}, {1, 2}, Match.SUPERSET, False),
            ({3, 2}, {1, 2}, Match.ANY, True),
            ({3}, {1, 2}, Match.ANY, False),
        ],
    )
    def test_match_sets_table(self, have: set[int], given: set[int], mode: Match, expected: bool) -> None:
        assert match_sets(frozenset(have), frozenset(given), mode) is expected


class TestFederatesWithMatch:
    # Entries federate with {}, {1}, {1,2}, {1,2,3}.
    ENTRIES = [entry("none", A), entry("f1", A, fed=(FED1,)), entry("f12", A, fed=(FED1, FED2)),
               entry("f123", A, fed=(FED1, FED2, FED3))]

    def run(self, mode: Match, *tds: TrustDomain) -> set[str]:
        f = EntryFilter(by_federates_with=FederatesWithMatch(frozenset(tds), mode))
        return ids(filter_entries(self.ENTRIES, f))

    def test_exact(self) -> None:
        assert self.run(Match.EXACT, FED2, FED1) == {"f12"}

    def test_subset_excludes_entries_federating_with_nothing(self) -> None:
        assert self.run(Match.SUBSET, FED1, FED2) == {"f1", "f12"}

    def test_superset(self) -> None:
        assert self.run(Match.SUPERSET, FED1, FED2) == {"f12", "f123"}

    def test_any(self) -> None:
        assert self.run(Match.ANY, FED3) == {"f123"}
        assert self.run(Match.ANY, FED2, TrustDomain("other.org")) == {"f12", "f123"}

    def test_empty_set_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="empty trust domain set"):
            FederatesWithMatch(frozenset(), Match.EXACT)


class TestOtherFilters:
    def test_ids_hint_downstream_and_conjunction(self) -> None:
        other_parent = entry("p", A).replace(parent_id=SpiffeId.parse("spiffe://example.org/other"))
        hinted = entry("h", A, hint="front")
        down = entry("d", A, downstream=True)
        entries = [*ALL, other_parent, hinted, down]
        assert ids(filter_entries(entries, EntryFilter(by_spiffe_id=E_AB.spiffe_id))) == {"ab"}
        assert ids(filter_entries(entries, EntryFilter(by_parent_id=other_parent.parent_id))) == {"p"}
        assert ids(filter_entries(entries, EntryFilter(by_hint="front"))) == {"h"}
        assert ids(filter_entries(entries, EntryFilter(by_hint=""))) == ids(entries)  # as SPIRE: no filter
        assert ids(filter_entries(entries, EntryFilter(by_downstream=True))) == {"d"}
        assert "d" not in ids(filter_entries(entries, EntryFilter(by_downstream=False)))
        exact_a = SelectorMatch(frozenset({A}), Match.EXACT)
        both = EntryFilter(by_parent_id=E_A.parent_id, by_selectors=exact_a)
        assert ids(filter_entries(entries, both)) == {"a", "h", "d"}
        assert ids(filter_entries(entries, EntryFilter())) == ids(entries)


class TestPaging:
    ENTRIES = [entry(f"e{i:02d}", A) for i in range(7)]

    def test_walks_every_entry_once_in_id_order(self) -> None:
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = paginate(list(reversed(self.ENTRIES)), 3, token)
            seen += [e.id for e in page.entries]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == [e.id for e in self.ENTRIES]
        assert pages == 3

    def test_exact_multiple_has_no_empty_trailing_page(self) -> None:
        page = paginate(self.ENTRIES[:6], 3, "")
        assert len(page.entries) == 3 and page.next_page_token
        last = paginate(self.ENTRIES[:6], 3, page.next_page_token)
        assert [e.id for e in last.entries] == ["e03", "e04", "e05"] and last.next_page_token == ""

    def test_no_page_size_returns_everything(self) -> None:
        page = paginate(self.ENTRIES, 0)
        assert len(page.entries) == 7 and page.next_page_token == ""

    def test_deleted_entry_does_not_shift_the_next_page(self) -> None:
        first = paginate(self.ENTRIES, 3)
        remaining = [e for e in self.ENTRIES if e.id != "e01"]  # deleted between calls
        assert [e.id for e in paginate(remaining, 3, first.next_page_token).entries] == ["e03", "e04", "e05"]

    def test_token_is_opaque_and_round_trips(self) -> None:
        token = encode_page_token("e02")
        assert "e02" not in token
        assert decode_page_token(token) == "e02"

    @pytest.mark.parametrize("bad", ["!!!", "bm90LW91cnM", "\u00e9"])
    def test_foreign_token_is_invalid_argument(self, bad: str) -> None:
        with pytest.raises(ValueError, match="page token"):
            paginate(self.ENTRIES, 3, bad)


class TestMasks:
    def full(self) -> types_entry_pb2.Entry:
        e = entry("m", A, B, fed=(FED1,), x509_svid_ttl=60, jwt_svid_ttl=30, dns_names=("a.example.org",),
                  admin=True, downstream=True, hint="h", revision_number=2, created_at=5, expires_at=9,
                  store_svid=True)
        return entry_to_proto(e.replace(extra={"additional_attributes": {"jwt_svid_include_jti": True}}))

    def test_no_mask_keeps_everything(self) -> None:
        pb = self.full()
        assert apply_output_mask(pb, None) == self.full()

    def test_empty_mask_keeps_only_id(self) -> None:
        pb = apply_output_mask(self.full(), frozenset())
        assert pb == types_entry_pb2.Entry(id="m")

    def test_mask_keeps_selected_fields(self) -> None:
        pb = apply_output_mask(self.full(), frozenset({"spiffe_id", "selectors", "hint"}))
        assert pb.id == "m" and pb.hint == "h" and len(pb.selectors) == 2
        assert pb.spiffe_id.path == "/w/m"
        assert not pb.HasField("parent_id") and not pb.admin and pb.x509_svid_ttl == 0
        assert not pb.HasField("additional_attributes")

    def test_every_mask_field_exists_on_entry_and_mask(self) -> None:
        assert set(MASKABLE_FIELDS) == {f.name for f in types_entry_pb2.EntryMask.DESCRIPTOR.fields}
        assert set(MASKABLE_FIELDS) | {"id"} == {f.name for f in types_entry_pb2.Entry.DESCRIPTOR.fields}


class TestProtoConversion:
    """The proto edges of the filters and entries (issuer.entry_api helpers, no I/O)."""

    def test_cilium_filter(self) -> None:
        f = entry_pb2.ListEntriesRequest.Filter(
            by_spiffe_id=spiffeid_pb2.SPIFFEID(trust_domain="example.org", path="/identity/42"),
            by_parent_id=spiffeid_pb2.SPIFFEID(trust_domain="example.org", path="/cilium-operator"),
            by_selectors=selector_pb2.SelectorMatch(selectors=[selector_pb2.Selector(type="cilium",
                                                                                     value="mutual-auth")]),
        )
        got = filter_from_proto(f, TD)
        assert got.by_spiffe_id == SpiffeId.parse("spiffe://example.org/identity/42")
        assert got.by_parent_id == SpiffeId.parse("spiffe://example.org/cilium-operator")
        assert got.by_selectors == SelectorMatch(frozenset({Selector("cilium", "mutual-auth")}), Match.EXACT)
        assert got.by_hint is None and got.by_downstream is None

    @pytest.mark.parametrize(
        ("f", "message"),
        [
            (entry_pb2.ListEntriesRequest.Filter(by_spiffe_id=spiffeid_pb2.SPIFFEID(trust_domain="other.org",
                                                                                    path="/x")),
             "malformed SPIFFE ID filter"),
            (entry_pb2.ListEntriesRequest.Filter(by_parent_id=spiffeid_pb2.SPIFFEID(trust_domain="example.org",
                                                                                    path="no-slash")),
             "malformed parent ID filter"),
            (entry_pb2.ListEntriesRequest.Filter(by_selectors=selector_pb2.SelectorMatch()),
             "malformed selectors filter: empty selector set"),
            (entry_pb2.ListEntriesRequest.Filter(by_selectors=selector_pb2.SelectorMatch(
                selectors=[selector_pb2.Selector(type="", value="x")])), "malformed selectors filter"),
            (entry_pb2.ListEntriesRequest.Filter(by_federates_with=federateswith_pb2.FederatesWithMatch()),
             "malformed federates with filter: empty trust domain set"),
            (entry_pb2.ListEntriesRequest.Filter(by_federates_with=federateswith_pb2.FederatesWithMatch(
                trust_domains=["Bad TD"])), "malformed federates with filter"),
        ],
    )
    def test_malformed_filters(self, f: entry_pb2.ListEntriesRequest.Filter, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            filter_from_proto(f, TD)

    def test_unknown_match_value_is_rejected(self) -> None:
        f = entry_pb2.CountEntriesRequest.Filter()
        f.by_selectors.selectors.add(type="a", value="b")
        f.by_selectors.match = 7  # type: ignore[assignment]  # open enum: any int arrives
        with pytest.raises(ValueError, match="match behavior"):
            filter_from_proto(f, TD)

    def test_federates_with_accepts_scheme_form(self) -> None:
        any_ = federateswith_pb2.FederatesWithMatch.MATCH_ANY
        f = entry_pb2.ListEntriesRequest.Filter(by_federates_with=federateswith_pb2.FederatesWithMatch(
            trust_domains=["spiffe://one.org", "one.org"], match=any_))
        got = filter_from_proto(f, TD).by_federates_with
        assert got == FederatesWithMatch(frozenset({FED1}), Match.ANY)

    def test_entry_round_trip(self) -> None:
        pb = TestMasks().full()
        back = entry_from_proto(pb, TD)
        # Server-owned fields are not taken from requests.
        assert back.revision_number == 0 and back.created_at == 0
        assert entry_to_proto(back.replace(revision_number=2, created_at=5)) == pb

    @pytest.mark.parametrize(
        ("pb", "message"),
        [
            (types_entry_pb2.Entry(), "invalid spiffe_id: missing"),
            (types_entry_pb2.Entry(spiffe_id={"trust_domain": "example.org", "path": "/a"}),
             "invalid parent_id: missing"),
            (types_entry_pb2.Entry(spiffe_id={"trust_domain": "example.org", "path": "/a"},
                                   parent_id={"trust_domain": "example.org", "path": "/p"}), "selector"),
            (types_entry_pb2.Entry(spiffe_id={"trust_domain": "evil.org", "path": "/a"},
                                   parent_id={"trust_domain": "example.org", "path": "/p"},
                                   selectors=[{"type": "a", "value": "b"}]), "not a member"),
            (types_entry_pb2.Entry(spiffe_id={"trust_domain": "example.org", "path": "/a"},
                                   parent_id={"trust_domain": "example.org", "path": "/p"},
                                   selectors=[{"type": "a", "value": "b"}], x509_svid_ttl=-1),
             "x509_svid_ttl"),
            (types_entry_pb2.Entry(id="bad id!", spiffe_id={"trust_domain": "example.org", "path": "/a"},
                                   parent_id={"trust_domain": "example.org", "path": "/p"},
                                   selectors=[{"type": "a", "value": "b"}]), "entry ID"),
        ],
    )
    def test_bad_entries_raise_value_error(self, pb: types_entry_pb2.Entry, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            entry_from_proto(pb, TD)
