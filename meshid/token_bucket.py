"""A token bucket: the rate limits of the server (admission, node attestation) and of the
agent (new JWT-SVIDs per caller uid)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        # A zero rate would turn every refusal's retry-after into a division by zero.
        if not (rate > 0 and burst > 0):
            raise ValueError(f"token bucket needs rate > 0 and burst > 0, got rate={rate!r}, burst={burst!r}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self, n: float) -> float:
        """Take n tokens; return 0 on success or the seconds to wait until n are available."""
        self._refill()
        if n > self.burst:
            n = self.burst  # a batch larger than the bucket may pass when it is full
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    def give_back(self, n: float) -> None:
        self.tokens = min(self.burst, self.tokens + n)

    def is_full(self) -> bool:
        """Full once refilled to now (the stored count is only updated when the bucket is used)."""
        self._refill()
        return self.tokens >= self.burst
