"""Capped exponential backoff with full jitter, and jittered retry-after hints."""

from __future__ import annotations

import math
import random

import pytest

from meshid.backoff import Backoff, jittered


def test_ceiling_doubles_then_caps() -> None:
    b = Backoff(0.5, 30, random.Random(1))
    ceilings = []
    for _ in range(10):
        ceilings.append(b.ceiling())
        b.next()
    assert ceilings == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert b.attempt == 10


def test_delays_are_full_jitter_within_ceiling() -> None:
    b = Backoff(0.5, 30, random.Random(2))
    for _ in range(2_000):
        ceiling = b.ceiling()
        assert 0.0 <= b.next() <= ceiling
    # Deep in the capped regime: U[0, cap], mean cap / 2, and small values do occur.
    delays = [b.next() for _ in range(20_000)]
    assert sum(delays) / len(delays) == pytest.approx(15, abs=0.5)
    assert min(delays) < 1.0


def test_reset_starts_over() -> None:
    b = Backoff(1, 10, random.Random(3))
    for _ in range(5):
        b.next()
    b.reset()
    assert b.attempt == 0
    assert b.ceiling() == 1
    assert b.next() <= 1


def test_many_attempts_do_not_overflow() -> None:
    b = Backoff(0.5, 30, random.Random(4))
    for _ in range(5_000):
        assert b.next() <= 30


def test_default_rng() -> None:
    assert 0 <= Backoff().next() <= 0.5


@pytest.mark.parametrize(
    ("base", "cap"), [(0, 30), (-1, 30), (1, 0), (5, 1), (math.nan, 30), (0.5, math.inf)]
)
def test_invalid_backoff(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base, cap)


@pytest.mark.parametrize("hint", [0.0, 0.25, 1.0, 2.0, 17.0, 300.0])
def test_jittered_never_before_hint(hint: float) -> None:
    rng = random.Random(5)
    window = max(0.5 * hint, 1.0)
    values = [jittered(hint, rng) for _ in range(5_000)]
    assert min(values) >= hint
    assert max(values) <= hint + window
    # Spread over the window, not clustered at the hint.
    assert sum(values) / len(values) == pytest.approx(hint + window / 2, rel=0.05, abs=0.05)


def test_jittered_negative_hint_is_now() -> None:
    assert 0.0 <= jittered(-5.0, random.Random(6)) <= 1.0


def test_jittered_custom_spread() -> None:
    v = jittered(10.0, random.Random(7), spread=0.0, min_window=0.0)
    assert v == 10.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retry_after": math.nan},
        {"retry_after": math.inf},
        {"retry_after": 1.0, "spread": -1.0},
        {"retry_after": 1.0, "min_window": math.nan},
    ],
)
def test_jittered_invalid(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        jittered(rng=random.Random(8), **kwargs)
