"""SPIFFE IDs and selectors, rule by rule as SPEC-PROTOCOLS.md §2 states them."""

from __future__ import annotations

import pytest

from meshid.errors import InvalidSelectorError, InvalidSpiffeIdError
from meshid.selector import MAX_SELECTOR_LENGTH, Selector, matches_all, parse_selectors
from meshid.spiffe_id import MAX_ID_LENGTH, MAX_TRUST_DOMAIN_LENGTH, SpiffeId, TrustDomain, parse_id


# --------------------------------------------------------------------------- accepted
@pytest.mark.parametrize(
    ("text", "td", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/workload", "example.org", "/workload"),
        ("spiffe://example.org/ns/prod/sa/web", "example.org", "/ns/prod/sa/web"),
        # td: lowercase letters, digits, '.', '-', '_'
        ("spiffe://my-td_1.example.org/x", "my-td_1.example.org", "/x"),
        ("spiffe://123/x", "123", "/x"),
        # path: letters of both cases, digits, '.', '-', '_' (dots inside a segment are fine)
        ("spiffe://example.org/Web-Server_01/v1.2/..x/x..", "example.org", "/Web-Server_01/v1.2/..x/x.."),
        ("spiffe://example.org/.../-/_", "example.org", "/.../-/_"),
    ],
)
def test_valid_ids_parse_and_round_trip(text: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == path
    assert str(sid) == text
    assert parse_id(text) == sid
    assert sid.is_trust_domain_id == (path == "")


# --------------------------------------------------------------------------- refused, one rule each
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # scheme
        ("", "empty"),
        ("example.org/workload", "scheme"),
        ("https://example.org/workload", "scheme"),
        ("spiffe:/example.org/workload", "scheme"),
        ("spiffe:example.org/workload", "scheme"),
        ("SPIFFE://example.org/workload", "scheme"),
        ("Spiffe://example.org/workload", "scheme"),
        # trust domain present and lowercase
        ("spiffe://", "missing"),
        ("spiffe:///workload", "missing"),
        ("spiffe://Example.org/workload", "lowercase"),
        ("spiffe://EXAMPLE.ORG", "lowercase"),
        # trust domain characters
        ("spiffe://exa mple.org/w", "characters"),
        ("spiffe://exa%20mple.org/w", "characters"),
        ("spiffe://exämple.org/w", "characters"),
        ("spiffe://example.org!/w", "characters"),
        ("spiffe://[::1]/w", "characters"),
        # port and userinfo
        ("spiffe://example.org:8443/workload", "port"),
        ("spiffe://example.org:/workload", "port"),
        ("spiffe://user@example.org/workload", "userinfo"),
        ("spiffe://user:pw@example.org/workload", "port"),  # ':' is found first; refused either way
        # empty, dot and dot-dot segments
        ("spiffe://example.org//workload", "empty"),
        ("spiffe://example.org/a//b", "empty"),
        ("spiffe://example.org/./workload", "dot"),
        ("spiffe://example.org/a/.", "dot"),
        ("spiffe://example.org/../workload", "dot"),
        ("spiffe://example.org/a/../b", "dot"),
        # trailing slash
        ("spiffe://example.org/", "trailing"),
        ("spiffe://example.org/workload/", "trailing"),
        # query and fragment
        ("spiffe://example.org/workload?x=1", "query"),
        ("spiffe://example.org?x=1", "query"),
        ("spiffe://example.org/workload#frag", "fragment"),
        ("spiffe://example.org#frag", "fragment"),
        # path characters
        ("spiffe://example.org/work load", "characters"),
        ("spiffe://example.org/work%20load", "characters"),
        ("spiffe://example.org/wörk", "characters"),
        ("spiffe://example.org/a:b", "characters"),
        ("spiffe://example.org/a@b", "characters"),
        ("spiffe://example.org/a+b", "characters"),
        ("spiffe://example.org/a~b", "characters"),
        ("spiffe://example.org/a\\b", "characters"),
        ("spiffe://example.org/a\nb", "characters"),
    ],
)
def test_invalid_ids_are_refused_with_the_rule_named(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as info:
        SpiffeId.parse(text)
    assert reason in str(info.value).lower()
    assert isinstance(info.value, ValueError)  # callers may catch ValueError


def test_non_string_is_refused() -> None:
    for value in (None, b"spiffe://example.org/x", 42):
        with pytest.raises(InvalidSpiffeIdError):
            SpiffeId.parse(value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- lengths
def test_trust_domain_of_255_bytes_is_accepted_and_256_refused() -> None:
    labels = ["a" * 63, "b" * 63, "c" * 63, "d" * 63]  # 4*63 + 3 dots = 255
    td_255 = ".".join(labels)
    assert len(td_255.encode()) == MAX_TRUST_DOMAIN_LENGTH == 255
    sid = SpiffeId.parse(f"spiffe://{td_255}/w")
    assert sid.trust_domain.name == td_255
    assert TrustDomain(td_255).name == td_255

    td_256 = td_255 + "e"
    with pytest.raises(InvalidSpiffeIdError, match="255"):
        SpiffeId.parse(f"spiffe://{td_256}/w")
    with pytest.raises(InvalidSpiffeIdError, match="255"):
        TrustDomain(td_256)


def _id_of_length(n: int) -> str:
    prefix = "spiffe://example.org"
    # segments of 100 characters, then one that pads to exactly n bytes
    body = ""
    while len(prefix) + len(body) + 101 <= n - 2:
        body += "/" + "s" * 100
    body += "/" + "t" * (n - len(prefix) - len(body) - 1)
    text = prefix + body
    assert len(text.encode()) == n
    return text


def test_id_of_2048_bytes_is_accepted_and_2049_refused() -> None:
    ok = _id_of_length(MAX_ID_LENGTH)
    assert str(SpiffeId.parse(ok)) == ok
    with pytest.raises(InvalidSpiffeIdError, match="2048"):
        SpiffeId.parse(_id_of_length(MAX_ID_LENGTH + 1))
    # Built from parts, the same limit applies.
    sid = SpiffeId.parse(ok)
    with pytest.raises(InvalidSpiffeIdError, match="2048"):
        SpiffeId(sid.trust_domain, sid.path + "x")


# --------------------------------------------------------------------------- construction paths
def test_construction_from_parts_validates_too() -> None:
    td = TrustDomain("example.org")
    assert str(SpiffeId(td, "/a/b")) == "spiffe://example.org/a/b"
    assert str(SpiffeId.from_parts("example.org", "/a")) == "spiffe://example.org/a"
    assert str(SpiffeId.from_parts("spiffe://example.org", "/a")) == "spiffe://example.org/a"
    for bad_path in ("a/b", "/a/", "//a", "/a/./b", "/a/../b", "/a b", "/a?b"):
        with pytest.raises(InvalidSpiffeIdError):
            SpiffeId(td, bad_path)
    for bad_td in ("", "Example.org", "example.org:443", "user@example.org", "exa mple"):
        with pytest.raises(InvalidSpiffeIdError):
            TrustDomain(bad_td)


def test_trust_domain_parse_accepts_name_or_trust_domain_id_only() -> None:
    assert TrustDomain.parse("example.org") == TrustDomain("example.org")
    assert TrustDomain.parse("spiffe://example.org") == TrustDomain("example.org")
    assert TrustDomain.parse("example.org").id == SpiffeId.parse("spiffe://example.org")
    with pytest.raises(InvalidSpiffeIdError, match="path"):
        TrustDomain.parse("spiffe://example.org/workload")
    with pytest.raises(InvalidSpiffeIdError):
        TrustDomain.parse("https://example.org")


def test_ids_are_immutable_values() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")
    assert a == SpiffeId.parse("spiffe://example.org/a")
    assert hash(a) == hash(SpiffeId.parse("spiffe://example.org/a"))
    assert a.member_of(TrustDomain("example.org"))
    assert not a.member_of(TrustDomain("example.com"))
    with pytest.raises(AttributeError):
        a.path = "/b"  # type: ignore[misc]


# --------------------------------------------------------------------------- selectors
@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("unix:uid:1000", "unix", "uid:1000"),
        ("k8s:ns:default", "k8s", "ns:default"),
        ("k8s:pod-label:app:web", "k8s", "pod-label:app:web"),
        ("docker:image_id:sha256:abcd", "docker", "image_id:sha256:abcd"),
        ("meshid:agent_id:spiffe://example.org/meshid/agent/x", "meshid", "agent_id:spiffe://example.org/meshid/agent/x"),
        ("systemd:id:web.service", "systemd", "id:web.service"),
        ("k8s_psat:cluster:prod", "k8s_psat", "cluster:prod"),
        ("cilium:mutual-auth", "cilium", "mutual-auth"),
    ],
)
def test_selector_value_may_contain_colons(text: str, kind: str, value: str) -> None:
    s = Selector.parse(text)
    assert (s.type, s.value) == (kind, value)
    assert str(s) == text
    assert Selector.parse(str(s)) == s


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix",  # no separator
        ":uid:1000",  # empty type
        "unix:",  # empty value
        "un ix:uid:1",  # type not alphanumeric/_/-
        "un.ix:uid:1",
        "unix:uid:\x00",  # control characters in the value
        "unix:uid:1\n",
        "unix:uid:\x7f",
        "unix:uid:\ud800",  # a lone surrogate: JSON carries it, no datastore stores it
        "unix:" + "v" * MAX_SELECTOR_LENGTH,  # too long
    ],
)
def test_malformed_selectors_are_refused(text: str) -> None:
    with pytest.raises(InvalidSelectorError):
        Selector.parse(text)


def test_selector_non_string_and_direct_construction_are_checked() -> None:
    with pytest.raises(InvalidSelectorError):
        Selector.parse(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidSelectorError):
        Selector("a:b", "c")  # ':' in the type is ambiguous
    assert Selector("unix", "uid:0") == Selector.parse("unix:uid:0")


def test_selector_sets_deduplicate_sort_and_match_as_subsets() -> None:
    sels = parse_selectors(["unix:uid:0", "k8s:ns:a", "unix:uid:0"])
    assert sels == (Selector("k8s", "ns:a"), Selector("unix", "uid:0"))
    have = frozenset(parse_selectors(["unix:uid:0", "unix:gid:0", "k8s:ns:a"]))
    assert matches_all(sels, have)
    assert not matches_all((*sels, Selector("k8s", "sa:x")), have)
    assert matches_all((), have)
    # a value containing ':' is matched whole, not by prefix
    assert not matches_all((Selector("unix", "uid:0"),), frozenset({Selector("unix", "uid:00")}))
