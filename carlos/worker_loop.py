"""An event loop on its own thread, for the work that streams from the LLM endpoint.

Why: a streamed chunk costs CPU (h11, httpcore, httpx, the SDK, JSON). With 50 designs
streaming, one event loop was busy 75-80 % of the time, and a `/health` probe or a page
waited behind hundreds of stream reads in a single turn of the loop (p99 2.9 s). With the
streaming on this loop, the server's loop only answers requests and sockets: the two
threads share the CPU through the GIL's switch interval, so a probe waits milliseconds.

Plain asyncio and threading; objects bound to a loop (clients, locks, futures) that are made
by coroutines run here belong to this loop, as anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

logger = logging.getLogger("pools")


class WorkerLoop:
    """A lazily started thread running one event loop; `run` hands it coroutines.

    Safe to call from any thread or loop. After `stop`, the next `run` starts a fresh
    thread and loop (tests and benchmarks run several servers' lives in one process).
    """

    def __init__(self, name: str, *, switch_interval: float | None = None) -> None:
        self.name = name
        self.switch_interval = switch_interval
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        loop = self._loop
        return loop is not None and loop.is_running()

    def owns_running_loop(self) -> bool:
        """True inside a coroutine or callback that runs on this worker's loop."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def loop(self) -> asyncio.AbstractEventLoop:
        """The worker's loop, started (thread and all) on first use."""
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = self._start()
            return self._loop

    async def run[T](self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await `coroutine` run as a task on the worker's loop, from another loop.

        Cancelling the caller cancels that task and waits for it to end (its own clean-up
        included) before the cancellation reaches the caller, as awaiting a task on one loop
        would. If the task itself is cancelled (the worker stops), the caller is cancelled.
        """
        if self.owns_running_loop():
            return await coroutine
        caller = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = caller.create_future()
        loop = self.loop()
        started: list[asyncio.Task[T]] = []

        def begin() -> None:
            task = loop.create_task(coroutine)
            task.add_done_callback(lambda done: _report(caller, done, outcome))
            started.append(task)

        def cancel() -> None:
            for task in started:
                task.cancel()

        try:
            loop.call_soon_threadsafe(begin)
        except RuntimeError:  # the worker stopped in between: nothing will run it
            coroutine.close()
            raise
        try:
            return await asyncio.shield(outcome)
        except asyncio.CancelledError:
            if not outcome.done():
                loop.call_soon_threadsafe(cancel)  # after begin: callbacks run in order
                await asyncio.wait([outcome])  # a second cancellation stops the waiting
            raise

    async def stop(
        self,
        *,
        timeout: float = 10.0,
        cleanup: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Cancel every task on the loop and wait for them (up to `timeout`), run `cleanup`
        on the loop (closing what belongs to it), then stop the loop and its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or loop.is_closed():
            return
        thread_gone = asyncio.ensure_future(asyncio.to_thread(thread.join, 2 * timeout + 5))
        if not loop.is_running():  # it stopped on its own (its thread cancels what is left)
            await thread_gone
            return
        try:
            finishing = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(_finish(timeout, cleanup), loop)
            )
            # A loop that stopped on its own never runs `_finish`: its thread's end says so.
            await asyncio.wait([finishing, thread_gone], return_when=asyncio.FIRST_COMPLETED)
            if finishing.done():
                finishing.result()  # a failed clean-up is the caller's to hear of
            else:
                finishing.cancel()
        finally:
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(loop.stop)
            await thread_gone
            if thread.is_alive():
                logger.warning("worker loop %r did not stop in time", self.name)

    def _start(self) -> asyncio.AbstractEventLoop:
        if self.switch_interval is not None and sys.getswitchinterval() > self.switch_interval:
            # A thread back from a system call waits up to the switch interval for the GIL
            # while this one computes; the serving loop makes thousands of such calls a
            # second (each socket write, each epoll change), so it must not wait 5 ms each.
            sys.setswitchinterval(self.switch_interval)
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                try:
                    _cancel_remaining(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        # A daemon: a process that exits without `stop` (a test run, a killed server) is not
        # held up by it; the designs it ran are marked interrupted at the next start.
        thread = threading.Thread(target=main, name=f"{self.name}-loop", daemon=True)
        thread.start()
        started.wait()
        self._thread = thread
        return loop


def _report[R](
    caller: asyncio.AbstractEventLoop, task: asyncio.Task[R], outcome: asyncio.Future[R]
) -> None:
    """On the worker's loop: hand a finished task's outcome to the caller's loop."""

    def copy() -> None:
        if outcome.done():
            return
        if task.cancelled():
            outcome.cancel()
        elif (error := task.exception()) is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(task.result())

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
        caller.call_soon_threadsafe(copy)


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """After the loop stopped: cancel what began too late for `stop` to see (a `run` racing
    it), so that its caller hears of it instead of waiting for good."""
    for _ in range(3):  # a task's clean-up could begin another: a few rounds, not forever
        loop.run_until_complete(asyncio.sleep(0))  # callbacks already handed over run first
        remaining = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not remaining:
            return
        for task in remaining:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*remaining, return_exceptions=True))


async def _finish(timeout: float, cleanup: Callable[[], Awaitable[None]] | None) -> None:
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    if pending:
        _, still_running = await asyncio.wait(pending, timeout=timeout)
        if still_running:
            logger.warning("%d task(s) still running after cancellation", len(still_running))
    if cleanup is not None:
        await cleanup()
