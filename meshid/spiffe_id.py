"""SPIFFE IDs and trust domains, validated exactly as the SPIFFE ID standard says.

Rules: scheme `spiffe`; trust domain lowercase letters, digits, `.`, `-`, `_`, at most
255 bytes; path segments of letters, digits, `.`, `-`, `_`, no empty, `.` or `..`
segment, no trailing `/`; no query, fragment, userinfo or port; whole ID at most 2048 bytes.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from meshid.errors import InvalidSpiffeIdError

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def _check_trust_domain_name(name: str) -> None:
    if not name:
        raise InvalidSpiffeIdError("trust domain is missing")
    if len(name.encode()) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidSpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} bytes")
    for ch in name:
        if ch not in _TD_CHARS:
            if ch == ":":
                raise InvalidSpiffeIdError("trust domain must not contain a port")
            if ch == "@":
                raise InvalidSpiffeIdError("trust domain must not contain userinfo")
            raise InvalidSpiffeIdError(
                f"trust domain characters are limited to lowercase letters, digits, dots, dashes "
                f"and underscores (got {ch!r})"
            )


def _check_path(path: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise InvalidSpiffeIdError("path must start with '/'")
    segments = path[1:].split("/")
    for seg in segments:
        if seg == "":
            if path.endswith("/") and seg is segments[-1]:
                raise InvalidSpiffeIdError("path must not have a trailing '/'")
            raise InvalidSpiffeIdError("path must not contain empty segments")
        if seg in (".", ".."):
            raise InvalidSpiffeIdError("path must not contain dot segments")
        for ch in seg:
            if ch not in _PATH_CHARS:
                raise InvalidSpiffeIdError(
                    f"path segment characters are limited to letters, digits, dots, dashes and "
                    f"underscores (got {ch!r})"
                )


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A trust domain name such as `example.org` (never with a scheme)."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept `example.org` or `spiffe://example.org` (no path)."""
        if not isinstance(text, str):
            raise InvalidSpiffeIdError("trust domain must be a string")
        if "://" in text:
            sid = SpiffeId.parse(text)
            if sid.path:
                raise InvalidSpiffeIdError("a trust domain ID must not have a path")
            return sid.trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """An immutable, validated SPIFFE ID."""

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        _check_path(self.path)
        if len(str(self).encode()) > MAX_ID_LENGTH:
            raise InvalidSpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not isinstance(text, str):
            raise InvalidSpiffeIdError("SPIFFE ID must be a string")
        if not text:
            raise InvalidSpiffeIdError("SPIFFE ID is empty")
        if len(text.encode()) > MAX_ID_LENGTH:
            raise InvalidSpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")
        if not text.startswith(SCHEME_PREFIX):
            lowered = text.lower()
            if lowered.startswith(SCHEME_PREFIX):
                raise InvalidSpiffeIdError("scheme must be lowercase 'spiffe'")
            raise InvalidSpiffeIdError("scheme is missing or not 'spiffe'")
        rest = text[len(SCHEME_PREFIX):]
        if "?" in rest:
            raise InvalidSpiffeIdError("SPIFFE ID must not have a query")
        if "#" in rest:
            raise InvalidSpiffeIdError("SPIFFE ID must not have a fragment")
        slash = rest.find("/")
        td_part, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        return cls(TrustDomain(td_part), path)

    @classmethod
    def from_parts(cls, trust_domain: str | TrustDomain, path: str) -> SpiffeId:
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        return cls(td, path)

    @property
    def is_trust_domain_id(self) -> bool:
        return self.path == ""

    def member_of(self, td: TrustDomain) -> bool:
        return self.trust_domain == td

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"


def parse_id(text: str) -> SpiffeId:
    return SpiffeId.parse(text)
