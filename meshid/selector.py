"""Selectors: `type:value`, where the value may itself contain `:` (e.g. `unix:uid:1000`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshid.errors import InvalidSelectorError

MAX_SELECTOR_LENGTH = 1024


def has_control_characters(text: str) -> bool:
    """C0 controls or DEL: a NUL no datastore column stores, a newline that forges log lines."""
    return any(ord(c) < 0x20 or c == "\x7f" for c in text)


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    type: str
    value: str

    def __post_init__(self) -> None:
        if not self.type or ":" in self.type:
            raise InvalidSelectorError(f"selector type {self.type!r} must be non-empty and contain no ':'")
        if not self.type.replace("_", "").replace("-", "").isalnum():
            raise InvalidSelectorError(f"selector type {self.type!r} must be alphanumeric, '_' or '-'")
        if not self.value:
            raise InvalidSelectorError(f"selector {self.type!r} has an empty value")
        if len(self.type) + 1 + len(self.value) > MAX_SELECTOR_LENGTH:
            raise InvalidSelectorError(f"selector is longer than {MAX_SELECTOR_LENGTH} characters")
        if has_control_characters(self.value):
            raise InvalidSelectorError("selector value contains control characters")
        if any("\ud800" <= c <= "\udfff" for c in self.value):
            # JSON can carry one (\ud800), but it is not text: no datastore could store it.
            raise InvalidSelectorError("selector value contains a lone UTF-16 surrogate (not valid Unicode)")

    @classmethod
    def parse(cls, text: str) -> Selector:
        if not isinstance(text, str):
            raise InvalidSelectorError("selector must be a string")
        kind, sep, value = text.partition(":")
        if not sep:
            raise InvalidSelectorError(f"selector {text!r} is not of the form type:value")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def parse_selectors(texts: Iterable[str]) -> tuple[Selector, ...]:
    return tuple(sorted({Selector.parse(t) for t in texts}))


def matches_all(required: Iterable[Selector], have: frozenset[Selector] | set[Selector]) -> bool:
    """An entry applies when every one of its selectors is in the caller's set."""
    return all(s in have for s in required)
