"""The background task that saves one `PoolSnapshot` per pool every interval.

Started by `manage.py serve` after warm-up and by `PoolLifespan` at start-up, stopped at
shutdown before the pools close; never started by management commands or tests unless they
ask. It runs on the server's event loop and only awaits (async ORM, its writes in Django's
database thread), so requests never wait on it, and a database error is logged and the
unsaved rows are retried at the next interval instead of killing the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from pools.intervals import IntervalRecorder, PoolInterval
from pools.models import PoolSnapshot
from pools.registry import PoolRegistry

logger = logging.getLogger("pools")

DEFAULT_INTERVAL_S = 30.0
DEFAULT_JITTER = 0.1
# Rows kept for a retry while the database is down (about 100 intervals of three pools);
# the oldest are dropped past it, so an outage cannot grow memory without bound.
MAX_PENDING_ROWS = 300
COUNTER_KEYS = (
    "requests_num",
    "requests_overflow",
    "requests_queued",
    "requests_wait_ms",
    "requests_timeouts",
    "requests_refused",
    "requests_errors",
    "usage_ms",
    "connections_num",
    "connections_closed",
    "connections_errors",
)


def gauges(pool_stats: dict[str, Any]) -> dict[str, int]:
    """The moment's fields of a row, from one pool's entry in `registry.stats()`/`/health`."""
    return {
        "size": int(pool_stats["total"]),
        "in_use": int(pool_stats["in_use"]),
        "available": int(pool_stats["available"]),
        "overflow_in_use": int(pool_stats["overflow_in_use"]),
        "waiting": int(pool_stats["waiting"]),
    }


def counters(pool_stats: dict[str, Any]) -> dict[str, float]:
    return {key: pool_stats[key] for key in COUNTER_KEYS if key in pool_stats}


class SnapshotSampler:
    """Drains an `IntervalRecorder` every `interval_s` (± `jitter`) and writes the rows."""

    def __init__(
        self,
        registry: PoolRegistry,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        jitter: float = DEFAULT_JITTER,
        instance: str | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.registry = registry
        self.interval_s = interval_s
        self.jitter = min(max(jitter, 0.0), 0.9)
        self.instance = instance or registry.instance
        self.recorder = IntervalRecorder(registry.pools)
        self.cycles = 0  # intervals whose rows were saved
        self.failures = 0  # intervals whose write failed
        self._pending: list[PoolSnapshot] = []
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def start(self) -> asyncio.Task[None]:
        """Subscribe to the pool events and start the loop on the running event loop."""
        if self._task is not None:
            return self._task
        self.recorder.attach(self.registry.events)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="pool-snapshot-sampler"
        )
        logger.info(
            "📈 Pool snapshots every %gs (±%d%%) as %s",
            self.interval_s,
            round(self.jitter * 100),
            self.instance,
        )
        return self._task

    async def stop(self, *, flush: bool = True, timeout: float = 10.0) -> None:
        """Stop the loop (a write in progress finishes first); save the last interval's rows
        when calls happened in it or earlier rows still wait for a retry."""
        self._stopping.set()
        task = self._task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            if flush and (self.recorder.active or self._pending):
                await self._save_logged()
        finally:
            self.recorder.detach()

    async def snapshot_once(self) -> list[PoolSnapshot]:
        """Drain the interval and write its rows (plus any left from a failed write); raises
        on a database error, keeping the rows for the next attempt."""
        rows = [*self._pending, *self.build_rows()]
        self._pending = []
        try:
            await sync_to_async(close_old_connections)()
            await PoolSnapshot.objects.abulk_create(rows)
        except BaseException:
            self._pending = rows[-MAX_PENDING_ROWS:]
            raise
        finally:
            await sync_to_async(close_old_connections)()
        self.cycles += 1
        return rows

    def build_rows(self) -> list[PoolSnapshot]:
        """One unsaved row per pool: live gauges now, the recorder's figures since last time."""
        intervals = self.recorder.drain()
        pools = self.registry.stats()["pools"]
        now = timezone.now()
        return [
            snapshot_from(self.instance, now, pools[name], interval)
            for name, interval in intervals.items()
            if name in pools
        ]

    async def _save_logged(self) -> bool:
        try:
            await self.snapshot_once()
        except Exception as exc:
            self.failures += 1
            logger.error(
                "❌ Could not save pool snapshots (%s: %s); %d rows kept, retrying next interval",
                type(exc).__name__,
                exc,
                len(self._pending),
            )
            return False
        return True

    async def _run(self) -> None:
        while not self._stopping.is_set():
            delay = self.interval_s * random.uniform(1 - self.jitter, 1 + self.jitter)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            await self._save_logged()


def snapshot_from(
    instance: str, taken_at: Any, pool_stats: dict[str, Any], interval: PoolInterval
) -> PoolSnapshot:
    return PoolSnapshot(
        taken_at=taken_at,
        instance=instance,
        pool=interval.pool,
        **gauges(pool_stats),
        interval_s=round(interval.seconds, 3),
        requests=interval.requests,
        overflow_requests=interval.overflow_requests,
        queued_requests=interval.queued_requests,
        errors=interval.errors,
        refused=interval.refused,
        wait_p50_ms=interval.wait_p50_ms,
        wait_p95_ms=interval.wait_p95_ms,
        wait_max_ms=interval.wait_max_ms,
        latency_p50_ms=interval.latency_p50_ms,
        latency_p95_ms=interval.latency_p95_ms,
        ttft_p50_ms=interval.ttft_p50_ms,
        ttft_p95_ms=interval.ttft_p95_ms,
        tokens_in=interval.tokens_in,
        tokens_out=interval.tokens_out,
        error_kinds=interval.error_kinds,
        counters=counters(pool_stats),
    )


def start_sampler(registry: PoolRegistry) -> SnapshotSampler | None:
    """Start the sampler the settings ask for on the running loop; None when turned off."""
    interval = float(getattr(settings, "POOL_SNAPSHOT_INTERVAL", DEFAULT_INTERVAL_S) or 0)
    if interval <= 0:
        logger.info("Pool snapshots are off (POOL_SNAPSHOT_INTERVAL=0)")
        return None
    jitter = float(getattr(settings, "POOL_SNAPSHOT_JITTER", DEFAULT_JITTER))
    sampler = SnapshotSampler(registry, interval_s=interval, jitter=jitter)
    sampler.start()
    return sampler
