"""Server admission control for signing: bounded concurrency and token buckets.

Overload is answered at once with a retry-after hint (OverloadedError), never by
letting requests queue until they time out. Checks run cheapest and most specific first:
the agent's own bucket, then the global bucket, then the signing slots; a later refusal
gives back the tokens an earlier check took, so a refused request costs nothing.
Every refusal is counted in `stats` and in the `meshid.svid.refused` metric
(reason "overloaded"), which /metrics exposes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from meshid import telemetry
from meshid.errors import OverloadedError
from meshid.token_bucket import TokenBucket

MAX_TRACKED_AGENTS = 100_000


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
        # Checked here so a bad [admission] table stops the server at start, not at first use.
        if max_concurrent < 1 or max_queue < 0 or not (agent_rate > 0 and agent_burst > 0):
            raise ValueError("admission: need max_concurrent_signing >= 1, max_queue >= 0, "
                             "agent_rate > 0 and agent_burst > 0")
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
                self._agents = {k: v for k, v in self._agents.items() if not v.is_full()}
            b = self._agents[agent] = TokenBucket(self._agent_rate, self._agent_burst, self._clock)
        return b

    @staticmethod
    def _refused(kind: str, message: str, retry_after: float) -> OverloadedError:
        telemetry.default_telemetry().record_refused(kind, "overloaded")
        return OverloadedError(message, retry_after=retry_after)

    @asynccontextmanager
    async def admit(self, agent: str, cost: int, kind: str = "x509") -> AsyncIterator[None]:
        """Admit `cost` signings of `kind` (x509, jwt) for `agent` or raise OverloadedError."""
        bucket = self._bucket(agent)
        wait = bucket.try_take(cost)
        if wait > 0:
            self.stats.refused_rate += 1
            raise self._refused(kind, "agent signing rate exceeded", max(wait, 0.05))
        wait = self._global.try_take(cost)
        if wait > 0:
            bucket.give_back(cost)
            self.stats.refused_rate += 1
            raise self._refused(kind, "server signing rate exceeded", max(wait, 0.05))
        if self._running >= self._max_concurrent and self._waiting >= self._max_queue:
            bucket.give_back(cost)
            self._global.give_back(cost)
            self.stats.refused_busy += 1
            raise self._refused(kind, "server busy signing", 0.5)
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
