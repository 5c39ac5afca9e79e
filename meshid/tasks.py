"""Background task ownership: whoever starts a task cancels and awaits it on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from meshid.errors import MeshidError

log = logging.getLogger("meshid.tasks")

CANCEL_RETRY = 0.5  # seconds between cancellations of a task that has not ended
STOP_GIVE_UP = 30.0
REPEAT_QUIET = 60.0  # seconds a periodic job's repeated error stays at debug


async def cancel_and_wait(task: asyncio.Task[Any], retry: float = CANCEL_RETRY) -> None:
    """Cancel one task and wait until it has ended. Python 3.11's asyncio.wait_for swallows
    a cancellation that lands just as its inner awaitable completes (gh-86296), so the task
    is cancelled again until it is done. Its own exception, if any, is raised."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry)
    with contextlib.suppress(asyncio.CancelledError):
        await task


class TaskOwner:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel every task and wait for it to end. A task that swallows its cancellation
        (asyncio.wait_for racing its inner future can) is cancelled again until it ends;
        one that never does is reported and left behind after STOP_GIVE_UP seconds."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + STOP_GIVE_UP
        warned = False
        while self._tasks:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            _, pending = await asyncio.wait(tasks, timeout=CANCEL_RETRY)
            if not pending:
                continue  # tasks spawned while stopping are cancelled in the next round
            names = ", ".join(sorted(t.get_name() for t in pending))
            if loop.time() >= give_up:
                log.error(
                    "%s: tasks still running after %.0f s of cancelling, left behind: %s",
                    self.name,
                    STOP_GIVE_UP,
                    names,
                )
                self._tasks.difference_update(pending)
            elif not warned:
                log.warning("%s: tasks slow to honour cancellation: %s", self.name, names)
                warned = True
        self._tasks.clear()


async def every(interval: float, fn: Callable[[], Awaitable[Any]], what: str) -> None:
    """Run fn periodically; an error is logged and retried next period, never kills the loop.

    The same error again within REPEAT_QUIET seconds goes to debug: a datastore that is down
    or a CA key sealed under another master secret fails every tick, and one line a minute
    says so as well as a traceback every few seconds. Our own errors (MeshidError) are one
    line; anything else keeps its traceback. Recovery is logged once."""
    last: tuple[str, float] | None = None
    failures = 0
    while True:
        await asyncio.sleep(interval)
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            try:
                message = str(exc)
            except Exception:  # an exception whose str() raises must not end the loop
                message = "(its message could not be formatted)"
            text = f"{type(exc).__name__}: {message}"
            now = time.monotonic()
            if last is not None and last[0] == text and now - last[1] < REPEAT_QUIET:
                log.debug("periodic %s failed again: %s", what, text)
                continue
            last = (text, now)
            if isinstance(exc, MeshidError):
                log.warning("periodic %s failed: %s", what, message or type(exc).__name__)
            else:
                log.exception("periodic %s failed", what)
        else:
            if failures:
                log.warning("periodic %s works again after %d failed run(s)", what, failures)
            last, failures = None, 0
