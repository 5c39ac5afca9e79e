"""A token bucket: the rate limits of the server (admission, node attestation) and of the
agent (new JWT-SVIDs per caller uid)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")


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


class KeyedBuckets(Generic[K]):
    """A token bucket per key (a source address, a caller uid), at most `max_keys` of them.
    When full, the least recently used key goes, not the whole table: a wipe reset every
    key's limit, so a flood of new keys reset the flooder's own. Used longest ago, its
    bucket is the likeliest to be full again (dropping a full bucket loses nothing); to push
    out one still draining takes `max_keys` keys used since, each with a full bucket."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def try_take(self, key: K, n: float = 1) -> float:
        """Take n tokens from key's bucket; 0 on success, else the seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        else:
            self._buckets.move_to_end(key)
        return bucket.try_take(n)
