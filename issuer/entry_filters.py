"""Entry API query logic, pure: filters, paging and output masks, with no I/O.

The match modes follow SPIRE's datastore (not the looser wording of the proto comments):

- selectors: EXACT = the entry's set equals the given set; SUBSET = the entry's set is a
  subset of the given one; SUPERSET = the entry's set contains every given selector;
  ANY = the entry has at least one of them.
- federates_with: the same, except that an entry federating with nothing never matches
  (SPIRE joins on the federation table, so such entries drop out of every mode).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, TypeVar

from meshid.entry import Entry
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain

# Field names of types.Entry (and types.EntryMask) that a mask can select; `id` is
# always returned, as SPIRE does.
MASKABLE_FIELDS: tuple[str, ...] = (
    "spiffe_id",
    "parent_id",
    "selectors",
    "x509_svid_ttl",
    "federates_with",
    "admin",
    "downstream",
    "expires_at",
    "dns_names",
    "revision_number",
    "store_svid",
    "jwt_svid_ttl",
    "hint",
    "created_at",
    "additional_attributes",
)

_TOKEN_PREFIX = "after:"

T = TypeVar("T", bound=Hashable)


class Match(IntEnum):
    """SelectorMatch / FederatesWithMatch MatchBehavior; the numbers are the wire values."""

    EXACT = 0
    SUBSET = 1
    SUPERSET = 2
    ANY = 3


def match_sets(have: frozenset[T], given: frozenset[T], mode: Match) -> bool:
    """Does a candidate's set `have` match the query set `given` under `mode`?"""
    if mode is Match.EXACT:
        return have == given
    if mode is Match.SUBSET:
        return have <= given
    if mode is Match.SUPERSET:
        return have >= given
    if mode is Match.ANY:
        return not have.isdisjoint(given)
    raise ValueError(f"unknown match behavior {mode!r}")


@dataclass(frozen=True)
class SelectorMatch:
    selectors: frozenset[Selector]
    match: Match = Match.EXACT

    def __post_init__(self) -> None:
        # An empty set would match everything (or nothing) silently; SPIRE rejects it too.
        if not self.selectors:
            raise ValueError("empty selector set")

    def matches(self, entry: Entry) -> bool:
        return match_sets(frozenset(entry.selectors), self.selectors, self.match)


@dataclass(frozen=True)
class FederatesWithMatch:
    trust_domains: frozenset[TrustDomain]
    match: Match = Match.EXACT

    def __post_init__(self) -> None:
        if not self.trust_domains:
            raise ValueError("empty trust domain set")

    def matches(self, entry: Entry) -> bool:
        have = frozenset(entry.federates_with)
        return bool(have) and match_sets(have, self.trust_domains, self.match)


@dataclass(frozen=True)
class EntryFilter:
    """ListEntries/CountEntries filter; every field that is set must match (AND)."""

    by_spiffe_id: SpiffeId | None = None
    by_parent_id: SpiffeId | None = None
    by_selectors: SelectorMatch | None = None
    by_federates_with: FederatesWithMatch | None = None
    by_hint: str | None = None
    by_downstream: bool | None = None

    def matches(self, entry: Entry) -> bool:
        if self.by_spiffe_id is not None and entry.spiffe_id != self.by_spiffe_id:
            return False
        if self.by_parent_id is not None and entry.parent_id != self.by_parent_id:
            return False
        # SPIRE treats an empty hint filter as "no filter".
        if self.by_hint and entry.hint != self.by_hint:
            return False
        if self.by_downstream is not None and entry.downstream != self.by_downstream:
            return False
        if self.by_selectors is not None and not self.by_selectors.matches(entry):
            return False
        return self.by_federates_with is None or self.by_federates_with.matches(entry)


def filter_entries(entries: Iterable[Entry], f: EntryFilter) -> list[Entry]:
    return [e for e in entries if f.matches(e)]


@dataclass(frozen=True)
class Page:
    entries: list[Entry]
    next_page_token: str  # "" when this is the last page


def encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_id).encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    """The id after which the next page starts; ValueError for a token we did not issue."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError(f"could not parse page token {token!r}") from None
    if not raw.startswith(_TOKEN_PREFIX):
        raise ValueError(f"could not parse page token {token!r}")
    return raw[len(_TOKEN_PREFIX):]


def paginate(entries: Sequence[Entry], page_size: int, page_token: str = "") -> Page:
    """Entries ordered by id; a page resumes after the id in its token, so entries created
    or deleted between calls neither shift nor repeat the rest. page_size <= 0 = no paging."""
    ordered = sorted(entries, key=lambda e: e.id)
    if page_token:
        after = decode_page_token(page_token)
        ordered = [e for e in ordered if e.id > after]
    if page_size <= 0:
        return Page(ordered, "")
    page = ordered[:page_size]
    more = len(ordered) > page_size
    return Page(page, encode_page_token(page[-1].id) if more else "")


class _Message(Protocol):
    def ClearField(self, field_name: str, /) -> None: ...


M = TypeVar("M", bound=_Message)


def apply_output_mask(msg: M, fields: frozenset[str] | None) -> M:
    """Clear every maskable field of a types.Entry not in `fields` (None = keep all)."""
    if fields is not None:
        for name in MASKABLE_FIELDS:
            if name not in fields:
                msg.ClearField(name)
    return msg
