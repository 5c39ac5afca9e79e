"""Retry delays: capped exponential backoff with full jitter, and jittered retry-after hints.

Pure apart from the injected `random.Random`; callers do the sleeping. Full jitter
(delay ~ U[0, min(cap, base·2^n)]) rather than "exponential plus a little noise" because
it is what actually de-synchronises a fleet that failed at the same moment.
"""

from __future__ import annotations

import math
import random

# 2**60 dwarfs any sane cap / base ratio; stops the exponent growing without bound.
_MAX_EXPONENT = 60


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class Backoff:
    """Delays for successive retries of one operation; `reset()` after a success."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        _check_positive("base", base)
        _check_positive("cap", cap)
        if base > cap:
            raise ValueError(f"base ({base}) must not exceed cap ({cap})")
        self.base = base
        self.cap = cap
        # A private, OS-seeded generator by default so agents started together differ.
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays have been handed out since the last reset."""
        return self._attempt

    def ceiling(self) -> float:
        """Upper bound of the next delay: min(cap, base·2^attempt)."""
        exponent = min(self._attempt, _MAX_EXPONENT)
        return min(self.cap, self.base * (2**exponent))

    def next(self) -> float:
        """The next delay in seconds, uniform in [0, ceiling]."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self._attempt += 1
        return delay

    def reset(self) -> None:
        self._attempt = 0


def jittered(
    retry_after: float,
    rng: random.Random,
    *,
    spread: float = 0.5,
    min_window: float = 1.0,
) -> float:
    """Honour a server's retry-after hint: never earlier, spread over a window after it.

    The delay is uniform in [h, h + max(spread·h, min_window)]. Without the spread, every
    agent refused in the same overload comes back at the same instant; `min_window`
    keeps small or whole-second hints (HTTP Retry-After) from re-synchronising them.
    A negative hint is treated as 0 (retry now, still jittered).
    """
    if not math.isfinite(retry_after):
        raise ValueError(f"retry_after must be finite, got {retry_after!r}")
    if not (math.isfinite(spread) and spread >= 0):
        raise ValueError(f"spread must be a finite number >= 0, got {spread!r}")
    if not (math.isfinite(min_window) and min_window >= 0):
        raise ValueError(f"min_window must be a finite number >= 0, got {min_window!r}")
    hint = max(0.0, retry_after)
    window = max(spread * hint, min_window)
    return hint + rng.random() * window
