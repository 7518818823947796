"""The worker loop: coroutines run on its own thread, and cancellation crosses in both ways."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from carlos.worker_loop import WorkerLoop
from tests.helpers.waiting import eventually


@pytest.fixture
async def worker() -> AsyncIterator[WorkerLoop]:
    loop = WorkerLoop("test")
    yield loop
    await loop.stop()


async def test_a_coroutine_runs_on_the_worker_thread_and_returns_its_result(worker):
    async def where() -> tuple[str, asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return threading.current_thread().name, asyncio.get_running_loop()

    name, loop = await worker.run(where())
    assert name == "test-loop" and threading.current_thread().name != name
    assert loop is not asyncio.get_running_loop() and worker.running
    assert (await worker.run(where()))[1] is loop  # one loop, started once


async def test_errors_reach_the_caller(worker):
    async def fail() -> None:
        raise ValueError("upstream said no")

    with pytest.raises(ValueError, match="upstream said no"):
        await worker.run(fail())


async def test_cancelling_the_caller_waits_for_the_task_to_clean_up(worker):
    started, cleaned = threading.Event(), threading.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.05)  # clean-up that itself waits
            cleaned.set()

    caller = asyncio.create_task(worker.run(work()))
    await asyncio.to_thread(started.wait, 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert cleaned.is_set()  # before the caller saw its cancellation


async def test_stopping_cancels_its_tasks_runs_cleanup_and_a_later_run_starts_afresh(worker):
    started = threading.Event()
    cleanup_ran_on: list[str] = []

    async def forever() -> None:
        started.set()
        await asyncio.sleep(60)

    async def cleanup() -> None:
        cleanup_ran_on.append(threading.current_thread().name)

    caller = asyncio.create_task(worker.run(forever()))
    await asyncio.to_thread(started.wait, 5)
    first_loop = worker.loop()
    await worker.stop(cleanup=cleanup)
    with pytest.raises(asyncio.CancelledError):  # the task was cancelled: so is its caller
        await caller
    assert cleanup_ran_on == ["test-loop"] and not worker.running and first_loop.is_closed()

    async def answer() -> int:
        return 42

    assert await worker.run(answer()) == 42
    assert worker.loop() is not first_loop


async def test_on_its_own_loop_run_awaits_directly(worker):
    async def inner() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def outer() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
        return asyncio.get_running_loop(), await worker.run(inner())

    here, there = await worker.run(outer())
    assert here is there


async def test_stopping_a_worker_never_started_does_nothing():
    """No thread or loop is started just to be stopped, and there is nothing to clean up."""
    threads_before = set(threading.enumerate())
    cleaned: list[bool] = []

    async def cleanup() -> None:
        cleaned.append(True)

    idle = WorkerLoop("idle")
    await asyncio.wait_for(idle.stop(cleanup=cleanup), 5)
    assert cleaned == [] and not idle.running
    assert set(threading.enumerate()) <= threads_before  # no thread was started


async def test_a_run_that_races_stop_is_cancelled_not_left_waiting(worker):
    """A coroutine handed over while the worker stops still ends, and so does its caller."""
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(60)

    first = asyncio.create_task(worker.run(forever()))
    await asyncio.to_thread(started.wait, 5)
    loop = worker.loop()
    # Hand one more over behind stop's back: as if it arrived while stop was under way.
    late = asyncio.create_task(worker.run(forever()))
    await asyncio.sleep(0)
    loop.call_soon_threadsafe(loop.stop)
    for caller in (first, late):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 10)
    await eventually(loop.is_closed, what="its thread closes the loop")
    await asyncio.wait_for(worker.stop(), 10)  # then stopping for good is quick
