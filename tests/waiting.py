"""Polling until a condition holds: the one helper integration tests use to wait for
background work (agent sync, relay delivery, rotation) without fixed sleeps."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def wait_for(cond: Callable[[], Any], within: float, what: str,
                   poke: Callable[[], None] | None = None, interval: float = 0.05) -> Any:
    """Poll cond (plain or async) until it returns something truthy and return that;
    AssertionError naming `what` after `within` seconds. poke runs between polls (e.g. to
    wake a sync loop instead of waiting for its timer)."""
    deadline = time.monotonic() + within
    while True:
        result = cond()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        if poke is not None:
            poke()
        await asyncio.sleep(interval)
