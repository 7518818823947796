"""Running designs as tasks on the server's event loop, independent of any browser.

A view or consumer starts a design and returns; the task is kept alive here (the event loop
itself only holds weak references to tasks) until the pipeline reaches a terminal status.
Designs a stopped server left behind are marked INTERRUPTED at the next start and can be
retried.
"""

from __future__ import annotations

import asyncio
import logging

from django.db import transaction
from django.utils import timezone

from agents.models import AgentRun, Design
from agents.pipeline import DesignNotRunnable, EventPublisher, run_design

logger = logging.getLogger("agents")

_running: dict[int, asyncio.Task[None]] = {}
INTERRUPTED_ERROR = "interrupted: the server stopped before this design finished"


def start_design(design_id: int) -> asyncio.Task[None]:
    """Run the pipeline as a task on the running loop; it outlives the request that started it."""
    existing = _running.get(design_id)
    if existing is not None and not existing.done():
        return existing
    task = asyncio.get_running_loop().create_task(run_design(design_id), name=f"design-{design_id}")
    _running[design_id] = task
    task.add_done_callback(lambda done: _forget(design_id, done))
    return task


def _forget(design_id: int, task: asyncio.Task[None]) -> None:
    if _running.get(design_id) is task:
        del _running[design_id]
    if task.cancelled():
        logger.warning("design %s: pipeline task cancelled", design_id)
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


async def retry_design(design_id: int) -> asyncio.Task[None]:
    """Reset a FAILED or INTERRUPTED design to QUEUED (older runs are kept) and start it again."""
    reset = await Design.objects.filter(
        pk=design_id, status__in=(Design.Status.FAILED, Design.Status.INTERRUPTED)
    ).aupdate(
        status=Design.Status.QUEUED,
        started_at=None,
        finished_at=None,
        verdict="",
        recommendation="",
        revisions=0,
        error="",
        failed_agent="",
    )
    if not reset:
        raise DesignNotRunnable(
            f"design {design_id} is not failed or interrupted; nothing to retry"
        )
    design = await Design.objects.aget(pk=design_id)
    await EventPublisher(design_id).design_status(design)
    return start_design(design_id)


def mark_interrupted() -> int:
    """At server start: designs left QUEUED or RUNNING by a stopped server become INTERRUPTED.

    Returns how many. Only call it where no other process runs designs on the same database.
    """
    now = timezone.now()
    unfinished = (Design.Status.QUEUED, Design.Status.RUNNING)
    with transaction.atomic():
        AgentRun.objects.filter(
            status=AgentRun.Status.RUNNING, design__status__in=unfinished
        ).update(status=AgentRun.Status.FAILED, error=INTERRUPTED_ERROR, finished_at=now)
        count = Design.objects.filter(status__in=unfinished).update(
            status=Design.Status.INTERRUPTED, error=INTERRUPTED_ERROR, finished_at=now
        )
    if count:
        logger.warning("%d design(s) left unfinished by a stopped server marked interrupted", count)
    return count
