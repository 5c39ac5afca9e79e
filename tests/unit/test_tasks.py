"""TaskOwner: every task it spawned has ended (or is reported) when stop() returns."""

from __future__ import annotations

import asyncio
import logging

import pytest

from meshid import tasks
from meshid.tasks import TaskOwner


class Stubborn:
    """A task body that swallows its first cancellation and gives in to the second."""

    def __init__(self) -> None:
        self.swallowed = 0

    async def run(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.swallowed += 1
                if self.swallowed >= 2:
                    raise


async def test_stop_cancels_and_awaits_every_task() -> None:
    owner = TaskOwner("t")
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    spawned = [owner.spawn(f"f{i}", forever()) for i in range(3)]
    await started.wait()
    await owner.stop()
    assert all(t.cancelled() for t in spawned)


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "CANCEL_RETRY", 0.05)
    owner = TaskOwner("t")
    stubborn = Stubborn()
    task = owner.spawn("stubborn", stubborn.run())
    await asyncio.sleep(0)
    await asyncio.wait_for(owner.stop(), 5)
    assert task.cancelled() and stubborn.swallowed == 2


async def test_tasks_spawned_while_stopping_are_stopped_too() -> None:
    owner = TaskOwner("t")
    late: list[asyncio.Task[None]] = []

    async def spawns_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            late.append(owner.spawn("late", asyncio.sleep(3600)))

    owner.spawn("parent", spawns_on_cancel())
    await asyncio.sleep(0)
    await asyncio.wait_for(owner.stop(), 5)
    assert late and late[0].cancelled()


async def test_a_task_that_never_ends_is_reported_and_stop_returns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tasks, "CANCEL_RETRY", 0.02)
    monkeypatch.setattr(tasks, "STOP_GIVE_UP", 0.1)
    owner = TaskOwner("t")
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    task = owner.spawn("immortal", immortal())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="meshid.tasks"):
        await asyncio.wait_for(owner.stop(), 5)
    assert "left behind: t:immortal" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait([task])


async def test_a_failed_task_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner("t")

    async def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="meshid.tasks"):
        task = owner.spawn("boom", boom())
        await asyncio.wait([task])
        await asyncio.sleep(0)
    assert "background task t:boom failed" in caplog.text
    await owner.stop()


async def test_cancel_and_wait_cancels_again_a_task_that_swallowed_it() -> None:
    stubborn = Stubborn()
    task = asyncio.create_task(stubborn.run())
    await asyncio.sleep(0)
    await tasks.cancel_and_wait(task, retry=0.01)
    assert task.cancelled() and stubborn.swallowed == 2


async def test_every_logs_a_repeated_error_once_then_its_recovery(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A job failing the same way every period (a datastore down) is one line per
    REPEAT_QUIET, not one per period; recovery is said once. Our own errors come without a
    traceback, others with one."""
    from meshid.errors import ConfigError

    sealed = "sealed elsewhere"
    boom = RuntimeError("boom")
    outcomes: list[Exception | None] = [ConfigError(sealed), ConfigError(sealed), ConfigError(sealed), None]
    outcomes += [boom, boom, None]
    done = asyncio.Event()

    async def job() -> None:
        if not outcomes:
            done.set()
            await asyncio.sleep(3600)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    caplog.set_level(logging.DEBUG, logger="meshid.tasks")
    task = asyncio.create_task(tasks.every(0.001, job, "test job"))
    await asyncio.wait_for(done.wait(), 5)
    await tasks.cancel_and_wait(task)
    ours = [r for r in caplog.records if r.name == "meshid.tasks"]
    lines = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in ours]
    assert lines == [
        (logging.WARNING, "periodic test job failed: sealed elsewhere", False),
        (logging.DEBUG, "periodic test job failed again: ConfigError: sealed elsewhere", False),
        (logging.DEBUG, "periodic test job failed again: ConfigError: sealed elsewhere", False),
        (logging.WARNING, "periodic test job works again after 3 failed run(s)", False),
        (logging.ERROR, "periodic test job failed", True),
        (logging.DEBUG, "periodic test job failed again: RuntimeError: boom", False),
        (logging.WARNING, "periodic test job works again after 2 failed run(s)", False),
    ]

    # Past the quiet window the same error is said again.
    monkeypatch.setattr(tasks, "REPEAT_QUIET", 0.0)
    outcomes[:] = [RuntimeError("boom"), RuntimeError("boom")]
    done.clear()
    caplog.clear()
    task = asyncio.create_task(tasks.every(0.001, job, "test job"))
    await asyncio.wait_for(done.wait(), 5)
    await tasks.cancel_and_wait(task)
    assert [r.levelno for r in caplog.records if r.name == "meshid.tasks"] == [logging.ERROR, logging.ERROR]


async def test_every_survives_an_error_whose_message_cannot_be_formatted() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    runs = 0
    done = asyncio.Event()

    async def job() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise Unprintable()
        done.set()

    task = asyncio.create_task(tasks.every(0.001, job, "test job"))
    await asyncio.wait_for(done.wait(), 5)
    await tasks.cancel_and_wait(task)
    assert runs >= 3
