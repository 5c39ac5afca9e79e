"""Workload attestation: run every configured attestor on the caller, then check the
caller is still the process that connected (PID-reuse guard)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from attestors.workload.base import Caller, WorkloadAttestor
from meshid.errors import AttestationError
from meshid.selector import Selector
from workload_api.peercred import still_same_process


class WorkloadAttestation:
    def __init__(self, attestors: Sequence[WorkloadAttestor]) -> None:
        self.attestors = list(attestors)
        # /proc readers run inline (a task each would cost more than they do); attestors
        # that ask a kubelet or a container runtime run concurrently.
        self._inline = [a for a in self.attestors if getattr(a, "local", False)]
        self._concurrent = [a for a in self.attestors if not getattr(a, "local", False)]

    async def close(self) -> None:
        for attestor in self.attestors:
            close = getattr(attestor, "close", None)
            if close is not None:
                await close()

    async def attest(self, caller: Caller) -> frozenset[Selector]:
        results = [await a.attest(caller) for a in self._inline]
        if len(self._concurrent) == 1:
            results.append(await self._concurrent[0].attest(caller))
        elif self._concurrent:
            tasks = [asyncio.ensure_future(a.attest(caller)) for a in self._concurrent]
            try:
                results += await asyncio.gather(*tasks)
            except BaseException:
                # gather leaves the others running when one fails: a kubelet poll of up to
                # 30 s per failed call, owned by nobody and outliving the caller's stream cap.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        if not still_same_process(caller):
            raise AttestationError("caller process changed during attestation (PID reuse?)")
        return frozenset(s for r in results for s in r)
