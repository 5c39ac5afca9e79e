"""WorkloadAttestation (workload_api/attestation.py): every attestor's selectors together."""

from __future__ import annotations

import asyncio
import os

import pytest

from attestors.workload.base import Caller
from meshid.errors import AttestationError
from meshid.selector import Selector
from workload_api.attestation import WorkloadAttestation
from workload_api.peercred import process_start_time


class Failing:
    name = "docker"

    async def attest(self, caller: Caller) -> list[Selector]:
        raise AttestationError("docker: daemon unreachable")


class Slow:
    """Stands for a kubelet attestor polling for a pod not listed yet (up to 30 s)."""

    name = "k8s"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ended = asyncio.Event()

    async def attest(self, caller: Caller) -> list[Selector]:
        self.started.set()
        try:
            await asyncio.sleep(3600)
            return [Selector("k8s", "ns:default")]
        finally:
            self.ended.set()


def me() -> Caller:
    start = process_start_time(os.getpid())
    assert start is not None
    return Caller(os.getpid(), os.getuid(), os.getgid(), start)


async def test_a_failing_attestor_cancels_the_others_still_running() -> None:
    # The call fails at once; the other attestors' work was left running unowned (a kubelet
    # poll of up to 30 s per call, outliving the call and the caller's stream cap).
    slow = Slow()
    attestation = WorkloadAttestation([slow, Failing()])
    with pytest.raises(AttestationError, match="daemon unreachable"):
        await attestation.attest(me())
    assert slow.started.is_set()
    await asyncio.wait_for(slow.ended.wait(), 1.0)


async def test_selectors_of_every_attestor_are_joined() -> None:
    class Fixed:
        name = "fixed"

        def __init__(self, sel: Selector) -> None:
            self.sel = sel

        async def attest(self, caller: Caller) -> list[Selector]:
            await asyncio.sleep(0)
            return [self.sel]

    a, b = Selector("k8s", "ns:default"), Selector("docker", "label:x")
    assert await WorkloadAttestation([Fixed(a), Fixed(b)]).attest(me()) == {a, b}
