"""Running designs as tasks on the LLM loop (`pools.runtime.llm_loop`), independent of any
browser.

A view or consumer starts a design and returns; the design streams on the LLM loop, apart
from the loop that answers pages, sockets and `/health`, and the caller gets a task on its
own loop, kept here until the pipeline reaches a terminal status.
Designs a stopped server left behind are marked INTERRUPTED at the next start and can be
retried. With REDIS_URL set, several instances share one database: each running design is
then claimed in Redis by the instance that runs it (a key renewed while it runs, expiring
within the lease time if that process dies), and an instance starting up marks only the
unfinished designs that no live instance claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Iterable

import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from redis.exceptions import RedisError

from agents.models import AgentRun, Design
from agents.pipeline import DesignNotRunnable, EventPublisher, run_design
from pools.config import ClusterConfig
from pools.runtime import get_pool, llm_loop

logger = logging.getLogger("agents")

_running: dict[int, asyncio.Task[None]] = {}
_places: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[int, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)
DEFAULT_MAX_RUNNING_DESIGNS = 50
INTERRUPTED_ERROR = "interrupted: the server stopped before this design finished"


def start_design(design_id: int) -> asyncio.Task[None]:
    """Run the pipeline on the LLM loop; it outlives the request that started it.

    Returns a task on the caller's loop that ends with the pipeline; cancelling it cancels
    the pipeline, which then ends INTERRUPTED before the task does.
    """
    existing = _running.get(design_id)
    if existing is not None and not existing.done():
        return existing
    task = asyncio.get_running_loop().create_task(
        llm_loop().run(_run_claimed(design_id)), name=f"design-{design_id}"
    )
    _running[design_id] = task
    task.add_done_callback(lambda done: _forget(design_id, done))
    return task


async def _run_claimed(design_id: int) -> None:
    async with claimed(design_id):
        place = _running_place()
        try:
            await place.acquire()
        except asyncio.CancelledError:  # the server stops while the design waits its turn
            await Design.objects.filter(pk=design_id, status=Design.Status.QUEUED).aupdate(
                status=Design.Status.INTERRUPTED,
                error=INTERRUPTED_ERROR,
                finished_at=timezone.now(),
            )
            raise
        try:
            await run_design(design_id)
        finally:
            place.release()


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


def claim_key(cluster: ClusterConfig, design_id: int) -> str:
    return f"{cluster.prefix}:design:{design_id}:owner"


@contextlib.asynccontextmanager
async def claimed(design_id: int) -> AsyncIterator[None]:
    """While the block runs, Redis names this instance as the one running `design_id`.

    Why: another instance starting on the same database must not mark this design
    interrupted. The key lives for the lease time and is renewed every third of it, so a
    killed process's claims vanish as its pool leases do. Without REDIS_URL this does
    nothing; if Redis fails, the design runs anyway (unclaimed) and the failure is logged.
    """
    registry = get_pool()
    cluster = registry.config.cluster
    if cluster is None or registry.cluster is None:
        yield
        return
    client = aioredis.from_url(
        cluster.url,
        socket_timeout=cluster.redis_timeout,
        socket_connect_timeout=cluster.redis_timeout,
    )
    key, owner = claim_key(cluster, design_id), registry.cluster.instance
    ttl_ms = max(1, int(cluster.lease_seconds * 1000))
    failing = False

    async def claim() -> None:
        nonlocal failing
        try:
            await client.set(key, owner, px=ttl_ms)
        except (RedisError, OSError, TimeoutError) as exc:
            if not failing:
                logger.warning("design %s: cannot claim it in Redis (%s)", design_id, exc)
            failing = True
        else:
            failing = False

    async def renew() -> None:
        while True:
            await asyncio.sleep(cluster.lease_seconds / 3)
            await claim()  # also claims it again once Redis is back

    await claim()
    renewer = asyncio.get_running_loop().create_task(renew())
    try:
        yield
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await client.delete(key)
        await client.aclose()


def claimed_elsewhere(cluster: ClusterConfig, design_ids: Iterable[int]) -> set[int]:
    """The designs among `design_ids` that a live instance claims (raises RedisError)."""
    ids = list(design_ids)
    if not ids:
        return set()
    client = redis.Redis.from_url(
        cluster.url,
        socket_timeout=cluster.redis_timeout,
        socket_connect_timeout=cluster.redis_timeout,
    )
    try:
        owners = client.mget([claim_key(cluster, design_id) for design_id in ids])
    finally:
        client.close()
    return {design_id for design_id, owner in zip(ids, owners, strict=True) if owner}


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

    Returns how many. With REDIS_URL set, designs a live instance claims (see `claimed`) are
    left alone, and if Redis cannot be asked nothing is marked: a design wrongly left
    unfinished can be marked at a later start, a live design wrongly interrupted is lost.
    Without REDIS_URL, only call it where no other process runs designs on the same database.
    """
    now = timezone.now()
    unfinished = Design.objects.filter(status__in=(Design.Status.QUEUED, Design.Status.RUNNING))
    cluster = get_pool().config.cluster
    if cluster is not None:
        candidates = list(unfinished.values_list("pk", flat=True))
        try:
            alive = claimed_elsewhere(cluster, candidates)
        except (RedisError, OSError) as exc:
            logger.warning(
                "cannot ask Redis which unfinished designs live instances run (%s): "
                "none marked interrupted",
                exc,
            )
            return 0
        if alive:
            logger.info("%d unfinished design(s) left alone: live instances run them", len(alive))
        unfinished = Design.objects.filter(
            pk__in=[pk for pk in candidates if pk not in alive],
            status__in=(Design.Status.QUEUED, Design.Status.RUNNING),
        )
    with transaction.atomic():
        AgentRun.objects.filter(status=AgentRun.Status.RUNNING, design__in=unfinished).update(
            status=AgentRun.Status.FAILED, error=INTERRUPTED_ERROR, finished_at=now
        )
        count = unfinished.update(
            status=Design.Status.INTERRUPTED, error=INTERRUPTED_ERROR, finished_at=now
        )
    if count:
        logger.warning("%d design(s) left unfinished by a stopped server marked interrupted", count)
    return count
