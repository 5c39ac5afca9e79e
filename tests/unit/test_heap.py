"""The run commands freeze the start-up heap once started, so full collections skip it."""

from __future__ import annotations

import gc
import os
import signal

from meshid.cli.main import run_until_signalled


async def test_run_commands_freeze_the_heap_after_start_and_stop_on_sigterm() -> None:
    seen: dict[str, int] = {}
    gc.unfreeze()

    async def start() -> None:
        seen["at_start"] = gc.get_freeze_count()
        os.kill(os.getpid(), signal.SIGTERM)  # handled by run_until_signalled, after start

    async def stop() -> None:
        seen["at_stop"] = gc.get_freeze_count()

    try:
        await run_until_signalled(start, stop)
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert seen["at_start"] == 0
    assert seen["at_stop"] > 1000  # modules, classes, the test session's own objects
