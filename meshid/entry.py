"""Registration entries: which selectors under which parent receive which SPIFFE ID."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from meshid.errors import InvalidSpiffeIdError
from meshid.selector import Selector, parse_selectors
from meshid.spiffe_id import SpiffeId, TrustDomain

MAX_HINT_BYTES = 1024
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
# The shortest SVID lifetime the server issues: its [ca] TTLs and an entry's own (0 = default).
MIN_SVID_TTL = 10


@dataclass(frozen=True, slots=True)
class Entry:
    """An immutable registration entry. TTLs of 0 mean "use the server default"."""

    id: str
    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[TrustDomain, ...] = ()
    admin: bool = False
    downstream: bool = False
    hint: str = ""
    revision_number: int = 0
    created_at: int = 0
    expires_at: int = 0
    store_svid: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.selectors:
            raise ValueError("an entry needs at least one selector")
        if self.spiffe_id.is_trust_domain_id:
            raise InvalidSpiffeIdError("an entry's SPIFFE ID must have a path")
        for ttl_name in ("x509_svid_ttl", "jwt_svid_ttl"):
            ttl = getattr(self, ttl_name)
            if not isinstance(ttl, int) or ttl < 0 or ttl > MAX_TTL_SECONDS:
                raise ValueError(f"{ttl_name} must be an integer between 0 and {MAX_TTL_SECONDS}")
        if len(self.hint.encode()) > MAX_HINT_BYTES:
            raise ValueError(f"hint is longer than {MAX_HINT_BYTES} bytes")
        for name in self.dns_names:
            _check_dns_name(name)

    def replace(self, **changes: Any) -> Entry:
        return dataclasses.replace(self, **changes)

    def same_identity(self, other: Entry) -> bool:
        """SPIRE treats spiffe_id + parent_id + selector set as an entry's natural key."""
        return (
            self.spiffe_id == other.spiffe_id
            and self.parent_id == other.parent_id
            and set(self.selectors) == set(other.selectors)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spiffe_id": str(self.spiffe_id),
            "parent_id": str(self.parent_id),
            "selectors": [str(s) for s in self.selectors],
            "x509_svid_ttl": self.x509_svid_ttl,
            "jwt_svid_ttl": self.jwt_svid_ttl,
            "dns_names": list(self.dns_names),
            "federates_with": [str(td.id) for td in self.federates_with],
            "admin": self.admin,
            "downstream": self.downstream,
            "hint": self.hint,
            "revision_number": self.revision_number,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "store_svid": self.store_svid,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        """Build from JSON; raises ValueError/InvalidSpiffeIdError/InvalidSelectorError on bad input."""
        if not isinstance(data, dict):
            raise ValueError("entry must be a JSON object")
        try:
            selectors = data["selectors"]
            if not isinstance(selectors, list):
                raise ValueError("selectors must be a list of 'type:value' strings")
            return cls(
                id=_str(data.get("id", ""), "id"),
                spiffe_id=SpiffeId.parse(data["spiffe_id"]),
                parent_id=SpiffeId.parse(data["parent_id"]),
                selectors=parse_selectors(selectors),
                x509_svid_ttl=_int(data.get("x509_svid_ttl", 0), "x509_svid_ttl"),
                jwt_svid_ttl=_int(data.get("jwt_svid_ttl", 0), "jwt_svid_ttl"),
                dns_names=tuple(_str_list(data.get("dns_names", []), "dns_names")),
                federates_with=tuple(
                    TrustDomain.parse(t) for t in _str_list(data.get("federates_with", []), "federates_with")
                ),
                admin=_bool(data.get("admin", False), "admin"),
                downstream=_bool(data.get("downstream", False), "downstream"),
                hint=_str(data.get("hint", ""), "hint"),
                revision_number=_int(data.get("revision_number", 0), "revision_number"),
                created_at=_int(data.get("created_at", 0), "created_at"),
                expires_at=_int(data.get("expires_at", 0), "expires_at"),
                store_svid=_bool(data.get("store_svid", False), "store_svid"),
            )
        except KeyError as exc:
            raise ValueError(f"entry is missing required field {exc.args[0]!r}") from None


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):  # bool("false") is True
        raise ValueError(f"{name} must be a boolean")
    return value


def _str(value: Any, name: str) -> str:
    # Not str()-ed: a list nested 1000 deep (orjson allows 1024) made repr() raise RecursionError.
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return value


def _check_dns_name(name: str) -> None:
    if not name or len(name) > 253:
        raise ValueError(f"invalid DNS name {name!r}")
    labels = name.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0:
            continue
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            raise ValueError(f"invalid DNS name {name!r}")
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in label):
            raise ValueError(f"invalid DNS name {name!r}")
