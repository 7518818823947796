"""The background task that saves one `PoolSnapshot` per pool every interval.

Started by `manage.py serve` after warm-up and by `PoolLifespan` at start-up, stopped at
shutdown before the pools close; never started by management commands or tests unless they
ask. It runs on the server's event loop and only awaits (async ORM, its writes in Django's
database thread), so requests never wait on it, and a database error is logged and the
unsaved rows are retried at the next interval instead of killing the task.

Besides the moment's gauges, each row keeps the interval's peaks (slots in use, temporary
connections, callers queued for a slot and for the deployment; `PeakTracker`), the
deployment's concurrency limit and 429 pause (`pools.engine.adaptive`), and the 429s and
pauses since the previous row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from pools.engine.intervals import IntervalRecorder, PoolInterval
from pools.engine.registry import PoolRegistry
from pools.engine.slots import PeakWatch
from pools.engine.stats import DeploymentStats, PoolStats
from pools.models import LIMIT_REASON_LENGTH, PoolSnapshot

logger = logging.getLogger("pools")

DEFAULT_INTERVAL_S = 30.0
DEFAULT_JITTER = 0.1
# How often the queues are looked at between two rows, for the interval's peaks.
DEFAULT_PEAK_TICK_S = 1.0
# Rows kept for a retry while the database is down (about 100 intervals of three pools);
# the oldest are dropped past it, so an outage cannot grow memory without bound.
MAX_PENDING_ROWS = 300


def gauges(stats: PoolStats) -> dict[str, Any]:
    """The moment's fields of a row, from one pool's stats (the registry's, or a /health
    answer's read back; the deployment's fields stay empty without "concurrency", as an
    older server's)."""
    return {
        "size": stats.total,
        "in_use": stats.in_use,
        "available": stats.available,
        "overflow_in_use": stats.overflow_in_use,
        "waiting": stats.waiting,
        "limit_reason": limit_reason(stats.concurrency),
        **_deployment_gauges(stats.concurrency),
    }


def _deployment_gauges(deployment: DeploymentStats | None) -> dict[str, Any]:
    if deployment is None:
        return dict.fromkeys(
            ("concurrency_limit", "deployment_in_flight", "deployment_waiting", "paused_s")
        )
    return {
        "concurrency_limit": _whole(deployment.limit),
        "deployment_in_flight": _whole(deployment.in_flight),
        "deployment_waiting": _whole(deployment.waiting),
        "paused_s": round(float(deployment.paused_s), 3),
    }


def limit_reason(deployment: DeploymentStats | None) -> str:
    """Why the deployment's limit last changed, cut to the row's column."""
    reason = deployment.last_change.reason if deployment is not None else ""
    return reason[:LIMIT_REASON_LENGTH]


def _whole(value: float) -> int:
    return max(0, int(value))


class PeakTracker:
    """Per pool, the most slots in use, temporary connections in use, callers queued for a
    slot and calls queued for the deployment since the last drain: one row's moment alone
    would show a flat 0 through a busy interval.

    The pool keeps the first three exactly, raised wherever a count grows
    (`SlotPool.watch_peaks`), with one watch per tracker, so two samplers never take each
    other's peaks. The deployment's queue has no such hook: the sampler's loop looks at it
    about every second (`sample()`), and a queue shorter than that may be missed.
    """

    def __init__(self, registry: PoolRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._watches: dict[str, PeakWatch] = {}
        self._deployment_waiting: dict[str, int] = {}

    def start(self) -> None:
        """Have every pool keep this tracker's peaks from now on."""
        for name, pool in self.registry.pools.items():
            if name not in self._watches:
                self._watches[name] = pool.watch_peaks()

    def stop(self) -> None:
        for name, watch in self._watches.items():
            self.registry.pools[name].unwatch_peaks(watch)
        self._watches.clear()

    def sample(self) -> None:
        """Look at every deployment's queue now (in-memory counters only, no I/O)."""
        queued: dict[str, int] = {}
        for name, pool in self.registry.pools.items():
            model = pool.config.model
            if model not in queued:
                limiter = self.registry.limiters.get(model)
                queued[model] = limiter.waiting if limiter is not None else 0
            with self._lock:
                if queued[model] > self._deployment_waiting.get(name, -1):
                    self._deployment_waiting[name] = queued[model]

    def drain(self) -> dict[str, dict[str, int]]:
        """The peaks per pool since the last drain (the slots' only while started); starts
        over."""
        with self._lock:
            deployment, self._deployment_waiting = self._deployment_waiting, {}
        peaks: dict[str, dict[str, int]] = {}
        for name, watch in self._watches.items():
            slots = self.registry.pools[name].read_peaks(watch)
            peaks[name] = {
                "in_use_peak": slots.in_use,
                "overflow_in_use_peak": slots.overflow_in_use,
                "waiting_peak": slots.waiting,
            }
        for name, waiting in deployment.items():
            peaks.setdefault(name, {})["deployment_waiting_peak"] = waiting
        return peaks


class SnapshotSampler:
    """Drains an `IntervalRecorder` every `interval_s` (± `jitter`) and writes the rows."""

    def __init__(
        self,
        registry: PoolRegistry,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        jitter: float = DEFAULT_JITTER,
        instance: str | None = None,
        peak_tick_s: float = DEFAULT_PEAK_TICK_S,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.registry = registry
        self.interval_s = interval_s
        self.jitter = min(max(jitter, 0.0), 0.9)
        self.peak_tick_s = max(0.05, peak_tick_s)
        self.instance = instance or registry.instance
        self.recorder = IntervalRecorder(registry.pools)
        self.peaks = PeakTracker(registry)
        # Each pool's 429 and pause counters at the last row: a row holds the increase since.
        self._last_counts: dict[tuple[str, str], int] = {}
        for name, stats in registry.stats().pools.items():
            self._increase(name, "rate_limited", stats.requests_rate_limited)
            self._increase(name, "pauses", _pauses(stats))
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
        self.peaks.start()
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
            self.peaks.stop()

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
        """One unsaved row per pool: live gauges now, the recorder's figures and the peaks
        since last time."""
        self.peaks.sample()
        intervals = self.recorder.drain()
        peaks = self.peaks.drain()
        pools = self.registry.stats().pools
        now = timezone.now()
        rows = []
        for name, interval in intervals.items():
            if name not in pools:
                continue
            stats = pools[name]
            row = snapshot_from(self.instance, now, stats, interval, peaks.get(name))
            row.rate_limited = self._increase(name, "rate_limited", stats.requests_rate_limited)
            row.pauses = self._increase(name, "pauses", _pauses(stats))
            rows.append(row)
        return rows

    def _increase(self, pool: str, counter: str, count: int | None) -> int | None:
        """How much `counter` of `pool` grew since the last row (None: not counted)."""
        if count is None:
            return None
        before = self._last_counts.get((pool, counter), 0)
        self._last_counts[pool, counter] = count
        return count - before if count >= before else count  # a smaller count: a new registry

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
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            delay = self.interval_s * random.uniform(1 - self.jitter, 1 + self.jitter)
            due = loop.time() + delay
            # Wake about every `peak_tick_s` until the row is due, to see the queues' peaks.
            while (left := due - loop.time()) > 0 and not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, self.peak_tick_s)):
                        await self._stopping.wait()
                self._sample_peaks()
            if self._stopping.is_set():
                return
            await self._save_logged()

    def _sample_peaks(self) -> None:
        try:
            self.peaks.sample()
        except Exception:  # a look at the queues must never end the loop
            logger.exception("sampling the pools' peaks failed")


def _pauses(stats: PoolStats) -> int | None:
    """The 429 pauses of the pool's deployment so far (None without its limiter's stats)."""
    return stats.concurrency.pauses if stats.concurrency is not None else None


def snapshot_from(
    instance: str,
    taken_at: Any,
    stats: PoolStats,
    interval: PoolInterval,
    peaks: dict[str, int] | None = None,
) -> PoolSnapshot:
    moment = gauges(stats)
    peaks = peaks or {}
    # A peak is never below the row's own moment (a queue may have formed since the last look).
    in_use_peak = max(peaks.get("in_use_peak", 0), moment["in_use"])
    waiting_peak = max(peaks.get("waiting_peak", 0), moment["waiting"])
    overflow_peak = max(peaks.get("overflow_in_use_peak", 0), moment["overflow_in_use"])
    deployment_waiting = [peaks.get("deployment_waiting_peak"), moment["deployment_waiting"]]
    known = [value for value in deployment_waiting if value is not None]
    deployment_waiting_peak = max(known) if known else None
    return PoolSnapshot(
        taken_at=taken_at,
        instance=instance,
        pool=interval.pool,
        **moment,
        in_use_peak=in_use_peak,
        overflow_in_use_peak=overflow_peak,
        waiting_peak=waiting_peak,
        deployment_waiting_peak=deployment_waiting_peak,
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
        counters=stats.counters(),
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
