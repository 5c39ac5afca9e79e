"""Server admission control for signing: bounded concurrency and token buckets.

Overload is answered at once with a retry-after hint (OverloadedError), never by
letting requests queue until they time out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from meshid.errors import OverloadedError

MAX_TRACKED_AGENTS = 100_000


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
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


@dataclass
class AdmissionStats:
    admitted: int = 0
    refused_rate: int = 0
    refused_busy: int = 0


class Admission:
    def __init__(
        self,
        max_concurrent: int,
        agent_rate: float,
        agent_burst: int,
        global_rate: float,
        global_burst: int,
        max_queue: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sem = asyncio.Semaphore(max_concurrent)
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._waiting = 0
        self._running = 0
        self._clock = clock
        self._agent_rate = agent_rate
        self._agent_burst = agent_burst
        self._global = TokenBucket(global_rate, global_burst, clock)
        self._agents: dict[str, TokenBucket] = {}
        self.stats = AdmissionStats()

    def _bucket(self, agent: str) -> TokenBucket:
        b = self._agents.get(agent)
        if b is None:
            if len(self._agents) >= MAX_TRACKED_AGENTS:
                # Full buckets carry no state worth keeping; drop them to bound memory.
                self._agents = {k: v for k, v in self._agents.items() if v.tokens < v.burst}
            b = self._agents[agent] = TokenBucket(self._agent_rate, self._agent_burst, self._clock)
        return b

    @asynccontextmanager
    async def admit(self, agent: str, cost: int) -> AsyncIterator[None]:
        """Admit `cost` signings for `agent` or raise OverloadedError with a retry-after."""
        bucket = self._bucket(agent)
        wait = bucket.try_take(cost)
        if wait > 0:
            self.stats.refused_rate += 1
            raise OverloadedError("agent signing rate exceeded", retry_after=max(wait, 0.05))
        wait = self._global.try_take(cost)
        if wait > 0:
            bucket.give_back(cost)
            self.stats.refused_rate += 1
            raise OverloadedError("server signing rate exceeded", retry_after=max(wait, 0.05))
        if self._running >= self._max_concurrent and self._waiting >= self._max_queue:
            bucket.give_back(cost)
            self._global.give_back(cost)
            self.stats.refused_busy += 1
            raise OverloadedError("server busy signing", retry_after=0.5)
        self._waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        self.stats.admitted += 1
        try:
            yield
        finally:
            self._running -= 1
            self._sem.release()
