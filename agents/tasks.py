"""Running designs as tasks on the LLM loop (`carlos.serving.llm_loop`), independent of any
browser, and keeping them alive across restarts and crashes.

A view or consumer starts a design and returns; the design streams on the LLM loop, apart
from the loop that answers pages, sockets and `/health`, and the caller gets a task on its
own loop, kept here until the pipeline ends.

The process works on a design only while it holds the design's lease (agents.leases). A
keeper on each loop that runs designs renews their leases (one UPDATE every third of the
lease time) and stops a design it no longer holds (cancelled by its user, or taken over
after this process stalled). The `DesignSupervisor` of each serving process sweeps: it takes
over the unfinished designs no live process holds (a crashed instance's, once their leases
expired; a drained one's at once) and resumes them from their last finished agent, and
moves designs whose questions went unanswered for QUESTIONS_TIMEOUT on. On SIGTERM or
Ctrl-C, `drain` lets the running agents finish for up to DRAIN_SECONDS, then stops the
rest; every design it stops goes back to QUEUED with what its agents streamed saved, and its
lease released, so it resumes at once on another instance or at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from asgiref.sync import ThreadSensitiveContext
from django.conf import settings
from django.db import connections
from django.utils import timezone

from agents import leases
from agents.events import agent_label
from agents.leases import LeaseSettings
from agents.models import AgentRun, Design
from agents.pipeline import (
    DesignNotRunnable,
    EventPublisher,
    complete_even_if_cancelled,
    run_design,
)
from carlos.middleware import detached_task
from carlos.serving import llm_loop
from pools.engine.resilience import BreakerState
from pools.runtime import get_pool

logger = logging.getLogger("agents")

# Tasks on the caller's loop (what `start_design` returns), and the designs' own tasks on
# the LLM loop (what the supervisor renews, stops and drains), by design id.
_running: dict[int, asyncio.Task[None]] = {}
_working: dict[int, asyncio.Task[None]] = {}
_waiting_for_place: set[int] = set()
_keepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)
_places: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[int, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)
DEFAULT_MAX_RUNNING_DESIGNS = 50
RETRYABLE_STATUSES = (Design.Status.FAILED, Design.Status.INTERRUPTED, Design.Status.CANCELLED)


def start_design(design_id: int) -> asyncio.Task[None]:
    """Run the pipeline on the LLM loop; it outlives the request that started it.

    Returns a task on the caller's loop that ends with the pipeline; cancelling it stops
    the pipeline, which saves what it streamed and hands the design back QUEUED (to resume)
    before the task ends.
    """
    existing = _running.get(design_id)
    if existing is not None and not existing.done():
        return existing
    task = detached_task(llm_loop().run(run_here(design_id)), name=f"design-{design_id}")
    _running[design_id] = task
    task.add_done_callback(lambda done: _forget(design_id, done))
    return task


async def run_here(design_id: int) -> None:
    """Wait for a place on this loop, then run the design, its lease renewed meanwhile (the
    server runs it on the LLM loop through `start_design`; `manage.py design` directly)."""
    current = asyncio.current_task()
    assert current is not None
    _working[design_id] = current
    _keep_leases_on_this_loop()
    try:
        place = _running_place()
        _waiting_for_place.add(design_id)
        try:
            await place.acquire()
        except asyncio.CancelledError:  # stopped while waiting its turn: let another take it
            await _release_queued(design_id)
            raise
        finally:
            _waiting_for_place.discard(design_id)
        try:
            await _on_a_database_thread_of_its_own(design_id)
        except DesignNotRunnable as exc:
            logger.info("design %s: not started here: %s", design_id, exc)
        finally:
            place.release()
    finally:
        if _working.get(design_id) is current:
            del _working[design_id]
        _stop_keeper_when_idle()


async def _on_a_database_thread_of_its_own(design_id: int) -> None:
    """Run the design with its database work on a thread of its own, so it waits neither
    behind the live feeds' queries (asgiref's one shared thread) nor other designs' writes;
    the thread and its connection end with the run.

    Not with an in-memory SQLite database (the tests'): its connections share one cache
    whose table locks fail at once instead of waiting, so there it keeps to the shared
    thread and its one connection."""
    if getattr(connections["default"], "is_in_memory_db", lambda: False)():
        await run_design(design_id)
        return
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"design-{design_id}-db")
    try:
        async with ThreadSensitiveContext(executor=thread):
            await run_design(design_id)
    finally:
        thread.submit(connections.close_all)
        thread.shutdown(wait=False)  # after that last call; the loop does not wait for it


async def _release_queued(design_id: int) -> None:
    await complete_even_if_cancelled(leases.release(leases.this_instance(), design_id))


def _keep_leases_on_this_loop() -> None:
    """One lease keeper per loop that runs designs (started with its first design, stopped
    with its last)."""
    loop = asyncio.get_running_loop()
    keeper = _keepers.get(loop)
    if keeper is None or keeper.done():
        _keepers[loop] = loop.create_task(_keep_leases(), name="design lease keeper")


def _stop_keeper_when_idle() -> None:
    """The keeper lives while designs run on its loop: the last one to end stops it."""
    loop = asyncio.get_running_loop()
    if any(task.get_loop() is loop for task in _working.values()):
        return
    keeper = _keepers.pop(loop, None)
    if keeper is not None:
        keeper.cancel()


async def _keep_leases() -> None:
    """Renew the leases of the designs this loop runs, every third of the lease time, in one
    UPDATE, and stop those it no longer holds (cancelled, or taken over after a stall).

    If the database cannot be reached for two thirds of the lease time, the designs are
    stopped too: others may take them over once the leases expire.
    """
    owner, loop = leases.this_instance(), asyncio.get_running_loop()
    last_renewed = time.monotonic()
    while True:
        lease_seconds = LeaseSettings.current().lease_seconds
        await asyncio.sleep(lease_seconds / 3)
        ids = {pk for pk, task in _working.items() if task.get_loop() is loop}
        try:
            lost = await leases.renew(owner, ids)
        except Exception as exc:
            logger.warning("could not renew the design leases: %r", exc)
            if time.monotonic() - last_renewed >= lease_seconds * 2 / 3:
                for design_id in ids:
                    _stop_here(design_id)
            continue
        last_renewed = time.monotonic()
        for design_id in lost:
            if _stop_here(design_id):
                logger.warning(
                    "design %s: no longer held here (cancelled, or taken over); stopped",
                    design_id,
                )


def max_running_designs() -> int:
    return max(1, int(getattr(settings, "MAX_RUNNING_DESIGNS", DEFAULT_MAX_RUNNING_DESIGNS)))


def _running_place() -> asyncio.Semaphore:
    """This loop's places for running designs: the others wait QUEUED, first come first served.

    Why: streaming costs CPU per token, and the LLM loop shares one process's CPU with the
    loop that answers pages and `/health`; past what it can stream, more designs at once only
    make every design and every page slower. A semaphore belongs to the loop that uses it.
    """
    loop, limit = asyncio.get_running_loop(), max_running_designs()
    known = _places.get(loop)
    if known is None or known[0] != limit:  # a new limit applies to designs started from now
        known = _places[loop] = (limit, asyncio.Semaphore(limit))
    return known[1]


def _forget(design_id: int, task: asyncio.Task[None]) -> None:
    if _running.get(design_id) is task:
        del _running[design_id]
    if task.cancelled():
        logger.info("design %s: stopped in this process", design_id)
        return
    exc = task.exception()
    if exc is not None:
        logger.error("design %s: pipeline task crashed", design_id, exc_info=exc)


def running_task(design_id: int) -> asyncio.Task[None] | None:
    """The live task of a design started in this process, if any."""
    return _running.get(design_id)


async def wait_design(task: asyncio.Task[None]) -> None:
    """Wait for a design's task; cancelling the waiter (a browser leaving) leaves it running."""
    await asyncio.shield(task)


def _stop_here(design_id: int) -> bool:
    """Stop this process's work on a design, from any thread; False if it runs none."""
    task = _working.get(design_id)
    if task is None or task.done():
        return False
    task.get_loop().call_soon_threadsafe(task.cancel)
    return True


# -- what users do -------------------------------------------------------------------------


async def retry_design(design_id: int) -> asyncio.Task[None]:
    """Resume a FAILED, INTERRUPTED or CANCELLED design from its first unfinished agent."""
    reset = await Design.objects.filter(pk=design_id, status__in=RETRYABLE_STATUSES).aupdate(
        status=Design.Status.QUEUED,
        started_at=None,
        finished_at=None,
        error="",
        failed_agent="",
        takeovers=0,
        **leases.held_by(leases.this_instance()),
    )
    if not reset:
        raise DesignNotRunnable(
            f"design {design_id} is not failed, interrupted or cancelled; nothing to retry"
        )
    design = await Design.objects.aget(pk=design_id)
    await EventPublisher(design_id).design_status(design)
    return start_design(design_id)


CANCELLABLE_STATUSES = (
    Design.Status.QUEUED,
    Design.Status.RUNNING,
    Design.Status.AWAITING_ANSWERS,
)


async def cancel_design(design_id: int) -> bool:
    """End a queued, waiting or running design CANCELLED, keeping what it produced.

    The write comes first and is what decides: the process running the design (this one,
    at once; another, at its next lease renewal) then only stops, saving the text its
    running agents had streamed. False if the design was not cancellable any more.
    """
    now = timezone.now()
    cancelled = await Design.objects.filter(pk=design_id, status__in=CANCELLABLE_STATUSES).aupdate(
        status=Design.Status.CANCELLED,
        error="cancelled by its user",
        finished_at=now,
        **leases.RELEASED,
    )
    if not cancelled:
        return False
    if not _stop_here(design_id):
        # Run elsewhere, or by nobody: mark its running agents now (a live holder overwrites
        # them with the text it had streamed when it stops).
        await AgentRun.objects.filter(design_id=design_id, status=AgentRun.Status.RUNNING).aupdate(
            status=AgentRun.Status.STOPPED, error="cancelled by its user", finished_at=now
        )
    design = await Design.objects.aget(pk=design_id)
    await EventPublisher(design_id).design_status(design)
    logger.info("design %s: cancelled by its user", design_id)
    return True


# -- the supervisor: leases renewed, orphans taken over, drains ------------------------------


@dataclass
class DrainReport:
    finished: int  # designs whose running agents all finished within the drain time
    stopped: int  # designs stopped mid-agent, their streamed text saved
    seconds: float


class DesignSupervisor:
    """The serving process's sweeper of orphans and its drain, on the LLM loop."""

    def __init__(self, config: LeaseSettings | None = None) -> None:
        self.config = config or LeaseSettings.current()
        self.owner = leases.this_instance()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Begin sweeping (call on the LLM loop); the first sweep runs now."""
        leases.end_draining()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sweep_forever(), name="design sweeper")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:
                logger.warning("the design sweep failed: %r", exc)
            # Jittered, so that several instances do not all sweep at the same instant.
            await asyncio.sleep(self.config.sweep_seconds * random.uniform(0.8, 1.2))

    async def sweep(self) -> int:
        """Take over and resume what no live process holds; how many designs it started."""
        if leases.draining():
            return 0
        if (down := _endpoint_down()) is not None:
            logger.info("not taking designs over while %s", down)  # they would only fail
            return 0
        started = 0
        for candidate in await leases.orphans(max_running_designs() - len(_working)):
            if not await leases.take(candidate, self.owner):
                continue  # another instance took it first
            if candidate.takeovers > self.config.max_takeovers:
                await self._give_up(candidate)
                continue
            logger.warning(
                "design %s: taken over from %s; resuming it",
                candidate.pk,
                candidate.lease_owner or "a server that stopped",
            )
            start_design(candidate.pk)
            started += 1
        free = max_running_designs() - len(_working)
        for design_id in await leases.overdue_questions(self.config.questions_timeout, free):
            if await leases.skip_questions(design_id, self.owner):
                logger.info("design %s: questions unanswered in time; going on", design_id)
                start_design(design_id)
                started += 1
        return started

    async def _give_up(self, design: Design) -> None:
        """A design whose server died every time it ran it: FAILED, saying so, not again."""
        last = (
            await AgentRun.objects.filter(design_id=design.pk, status=AgentRun.Status.STOPPED)
            .order_by("-id")
            .values_list("agent", flat=True)
            .afirst()
        )
        error = (
            f"the server running this design stopped {design.takeovers} times while it ran"
            + (f", the last time at {agent_label(last)}" if last else "")
            + "; it was not resumed again. Retry to try once more."
        )
        written = await Design.objects.filter(pk=design.pk, lease_owner=self.owner).aupdate(
            status=Design.Status.FAILED,
            error=error,
            failed_agent=last or "",
            finished_at=timezone.now(),
            **leases.RELEASED,
        )
        if written:
            logger.error("design %s: %s", design.pk, error)
            await EventPublisher(design.pk).design_status(await Design.objects.aget(pk=design.pk))

    async def drain(self, seconds: float | None = None) -> DrainReport:
        """Take nothing new, let running agents finish for up to `seconds` (DRAIN_SECONDS),
        then stop the rest; every design still unfinished is handed back QUEUED."""
        seconds = self.config.drain_seconds if seconds is None else seconds
        began = time.monotonic()
        leases.begin_draining()
        for design_id in list(_waiting_for_place):
            _stop_here(design_id)
        working = [task for task in _working.values() if not task.done()]
        stopped = 0
        if working:
            logger.warning(
                "draining: %d design(s) running; their agents get up to %gs to finish",
                len(working),
                seconds,
            )
            _, still = await asyncio.wait(working, timeout=seconds)
            stopped = len(still)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=10)
        await self.stop()
        report = DrainReport(len(working) - stopped, stopped, time.monotonic() - began)
        if not working:  # a warning only when designs were in the way of the stop
            logger.info("drained: no design was running")
            return report
        logger.warning(
            "drained in %.1fs: %d design(s) reached a checkpoint, %d stopped mid-agent",
            report.seconds,
            report.finished,
            report.stopped,
        )
        return report


def _endpoint_down() -> str | None:
    """Why the pools could not serve a resumed design now (closed, unreachable, breaker
    open), or None."""
    registry = get_pool()
    if registry.closed:
        return "the pools are closed"
    if registry.warmup_error:
        return f"the LLM endpoint was not reachable at warm-up ({registry.warmup_error})"
    for model, breaker in registry.breakers.items():
        if breaker.state is BreakerState.OPEN:
            return f"the circuit of {model!r} is open"
    return None


_supervisor: DesignSupervisor | None = None


async def start_supervisor() -> DesignSupervisor:
    """Start this process's supervisor on the LLM loop (idempotent): call once serving."""

    async def begin() -> DesignSupervisor:
        global _supervisor
        if _supervisor is None or not _supervisor._tasks:
            _supervisor = DesignSupervisor()
            _supervisor.start()
        return _supervisor

    return await llm_loop().run(begin())


async def drain(seconds: float | None = None) -> DrainReport:
    """Drain this process's designs (see `DesignSupervisor.drain`), supervised or not."""
    return await llm_loop().run((_supervisor or DesignSupervisor()).drain(seconds))
