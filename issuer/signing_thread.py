"""The one thread CA signatures leave the event loop on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class SigningThread:
    """Where signing runs off the event loop: large batches, and every signature whose key is
    on a device (KeyManager.signs_on_device), so the loop never waits on an HSM. Shared by
    the agent attestation and SVID signing services. One thread: minting is mostly GIL-bound
    Python, so more threads add no throughput and only starve the event loop (health checks,
    other agents)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshid-signing")

    async def run(self, fn: Callable[[], T], off_loop: bool) -> T:
        """`fn()`, on the signing thread when `off_loop`, else right here."""
        if not off_loop:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
