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

    async def attest(self, caller: Caller) -> frozenset[Selector]:
        results = await asyncio.gather(*(a.attest(caller) for a in self.attestors))
        if not still_same_process(caller):
            raise AttestationError("caller process changed during attestation (PID reuse?)")
        return frozenset(s for r in results for s in r)
