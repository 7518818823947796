"""Slot accounting for one named pool: size, bounded overflow, a FIFO queue, honest stats.

A slot is the right to hold one connection. Pooled slots use the shared keep-alive client;
overflow slots get a temporary connection that is closed after use (the design note's
"temporary connection rather than blocking"). When the overflow is capped, callers queue
first-in first-out with a timeout, and past `max_waiting` they are refused at once.

State is guarded by a `threading.Lock` rather than asyncio primitives because one pool is
shared by every event loop of the process (Daphne's, a test's, one made by
`async_to_sync`); each waiter is woken on its own loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pools.engine.config import PoolConfig
from pools.engine.exceptions import PoolClosed, PoolExhausted, PoolTimeout
from pools.engine.stats import SLOT_COUNTERS, SlotPeaks, SlotStats, rounded_counter

logger = logging.getLogger("pools")


class SlotKind(StrEnum):
    POOLED = "pooled"
    OVERFLOW = "overflow"


@dataclass(eq=False)
class Slot:
    """A granted slot; give it back exactly once with `SlotPool.release`."""

    pool: str
    kind: SlotKind
    wait_ms: float
    queued: bool = False
    acquired_at: float = field(default_factory=time.perf_counter)
    released: bool = False

    @property
    def overflow(self) -> bool:
        return self.kind is SlotKind.OVERFLOW


class PeakWatch:
    """One reader's peaks of a pool since it last read them (`SlotPool.watch_peaks`).

    Each reader (a snapshot sampler) has its own, so reading and starting over never takes
    a peak from another reader. Raised under the pool's lock wherever a count grows.
    """

    __slots__ = ("in_use", "overflow_in_use", "waiting")

    def __init__(self, in_use: int, overflow_in_use: int, waiting: int) -> None:
        self.in_use = in_use
        self.overflow_in_use = overflow_in_use
        self.waiting = waiting


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: SlotKind | None = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def wake_on_its_loop(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> bool:
    """Resolve a waiter's `future` on the loop it waits on, from any thread.

    False when that loop is closed: nobody will take what was granted, so the caller gives
    it back. Shared by the slot pools and the deployment limiters, whose waiters may live on
    different event loops of one process.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _resolve(future)
        return True
    try:
        loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:
        return False
    return True


class SlotPool:
    """Counts slots of one pool. Thread-safe; waiters may live on different event loops."""

    def __init__(self, config: PoolConfig, max_connections: int) -> None:
        self._lock = threading.Lock()
        self._config = config
        self._max_connections = max_connections
        self._pooled_in_use = 0
        self._overflow_in_use = 0
        self._waiters: deque[_Waiter] = deque()
        self._closed = False
        self._burst_warned = False
        self._peak_watches: list[PeakWatch] = []
        self.counters: dict[str, float] = dict.fromkeys(SLOT_COUNTERS, 0)

    # -- configuration ------------------------------------------------------------------
    @property
    def config(self) -> PoolConfig:
        return self._config

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def overflow_limit(self) -> int:
        """Temporary connections allowed at once: the cap, or what the HTTP limit leaves."""
        if self._config.max_overflow is not None:
            return self._config.max_overflow
        return max(0, self._max_connections - self._config.size)

    def reconfigure(self, config: PoolConfig) -> None:
        """Apply a new size or limits; queued callers get any slots that this frees."""
        with self._lock:
            self._config = config
            wake = self._grant_waiters_locked()
        self._signal(wake)

    # -- acquire / release ----------------------------------------------------------------
    async def acquire(self, timeout: float | None = None) -> Slot:
        """A slot now, a temporary one if the pool is full, or a place in the queue."""
        started = time.perf_counter()
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            kind = self._take_locked() if not self._waiters else None
            if kind is not None:
                return self._granted_locked(kind, started)
            limit = self._config.max_waiting
            if limit is not None and len(self._waiters) >= limit:
                self.counters["requests_refused"] += 1
                raise PoolExhausted(
                    f"pool {self.name!r} is exhausted: {self._config.size} slots and "
                    f"{self.overflow_limit} temporary connections in use, "
                    f"{len(self._waiters)} callers already waiting"
                )
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop, loop.create_future())
            self._waiters.append(waiter)
            self.counters["requests_queued"] += 1
            if self._peak_watches:
                self._raise_peaks_locked()

        wait_for = self._config.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(wait_for):
                await waiter.future
        except BaseException as exc:
            with self._lock:
                kind = waiter.granted
                if kind is None:
                    self._waiters.remove(waiter)
                    if isinstance(exc, TimeoutError):
                        self.counters["requests_timeouts"] += 1
            if kind is not None:
                # Granted while we were being cancelled or timing out: give it back.
                self._give_back(kind)
            if isinstance(exc, TimeoutError):
                raise PoolTimeout(
                    f"no slot in pool {self.name!r} within {wait_for:g}s "
                    f"({self._config.size} slots, {self.overflow_limit} temporary connections, "
                    "all busy)"
                ) from None
            raise
        with self._lock:
            kind = waiter.granted
            if kind is None:  # woken by close()
                raise PoolClosed(f"pool {self.name!r} is closed")
            return self._granted_locked(kind, started, queued=True)

    def release(self, slot: Slot) -> None:
        """Return a slot; the first queued caller gets it."""
        if slot.released:
            return
        slot.released = True
        usage_ms = (time.perf_counter() - slot.acquired_at) * 1000
        with self._lock:
            self.counters["usage_ms"] += usage_ms
        self._give_back(slot.kind)

    def record_error(self) -> None:
        with self._lock:
            self.counters["requests_errors"] += 1

    def record_wait(self, slot: Slot, wait_ms: float) -> None:
        """More waiting for `slot` after it was granted here (a cluster-wide lease)."""
        slot.wait_ms += wait_ms
        with self._lock:
            self.counters["requests_wait_ms"] += wait_ms

    def record_retry(self) -> None:
        with self._lock:
            self.counters["requests_retries"] += 1

    def record_rate_limited(self) -> None:
        """A 429 from the endpoint, waited out (or not) by the caller."""
        with self._lock:
            self.counters["requests_rate_limited"] += 1

    def close(self) -> None:
        """Refuse new callers and wake the queued ones with `PoolClosed`."""
        with self._lock:
            self._closed = True
            waiters = list(self._waiters)
            self._waiters.clear()
        self._signal(waiters)

    def reopen(self) -> None:
        with self._lock:
            self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    # -- internals (call with the lock held) ------------------------------------------------
    def _take_locked(self) -> SlotKind | None:
        if self._pooled_in_use < self._config.size:
            self._pooled_in_use += 1
            if self._peak_watches:
                self._raise_peaks_locked()
            return SlotKind.POOLED
        if self._overflow_in_use < self.overflow_limit:
            self._overflow_in_use += 1
            if self._peak_watches:
                self._raise_peaks_locked()
            if not self._burst_warned:
                self._burst_warned = True
                logger.warning(
                    "⚠️  %s LLM pool exhausted, creating temporary connection "
                    "(%d slots busy; further warnings suppressed until the burst ends)",
                    self.name.capitalize(),
                    self._config.size,
                )
            return SlotKind.OVERFLOW
        return None

    def _granted_locked(self, kind: SlotKind, started: float, queued: bool = False) -> Slot:
        wait_ms = (time.perf_counter() - started) * 1000
        self.counters["requests_num"] += 1
        self.counters["requests_wait_ms"] += wait_ms
        if kind is SlotKind.OVERFLOW:
            self.counters["requests_overflow"] += 1
        return Slot(pool=self.name, kind=kind, wait_ms=wait_ms, queued=queued)

    def _give_back(self, kind: SlotKind) -> None:
        with self._lock:
            if kind is SlotKind.POOLED:
                self._pooled_in_use -= 1
            else:
                self._overflow_in_use -= 1
                if self._overflow_in_use == 0:
                    self._burst_warned = False
            wake = self._grant_waiters_locked()
        self._signal(wake)

    def _grant_waiters_locked(self) -> list[_Waiter]:
        woken: list[_Waiter] = []
        while self._waiters:
            kind = self._take_locked()
            if kind is None:
                break
            waiter = self._waiters.popleft()
            waiter.granted = kind
            woken.append(waiter)
        return woken

    def _signal(self, waiters: list[_Waiter]) -> None:
        for waiter in waiters:
            if not wake_on_its_loop(waiter.loop, waiter.future) and waiter.granted is not None:
                self._give_back(waiter.granted)

    def _raise_peaks_locked(self) -> None:
        in_use = self._pooled_in_use + self._overflow_in_use
        overflow, waiting = self._overflow_in_use, len(self._waiters)
        for watch in self._peak_watches:
            if in_use > watch.in_use:
                watch.in_use = in_use
            if overflow > watch.overflow_in_use:
                watch.overflow_in_use = overflow
            if waiting > watch.waiting:
                watch.waiting = waiting

    # -- peaks ------------------------------------------------------------------------------
    def watch_peaks(self) -> PeakWatch:
        """Start keeping the peaks for one more reader, from the pool as it is now."""
        with self._lock:
            watch = PeakWatch(
                self._pooled_in_use + self._overflow_in_use,
                self._overflow_in_use,
                len(self._waiters),
            )
            self._peak_watches.append(watch)
        return watch

    def unwatch_peaks(self, watch: PeakWatch) -> None:
        with self._lock:
            if watch in self._peak_watches:
                self._peak_watches.remove(watch)

    def read_peaks(self, watch: PeakWatch) -> SlotPeaks:
        """`watch`'s peaks since its last read (or since watching began); the next ones
        start from the pool as it is now, which the interval after this one begins with."""
        with self._lock:
            peaks = SlotPeaks(
                in_use=watch.in_use, overflow_in_use=watch.overflow_in_use, waiting=watch.waiting
            )
            watch.in_use = self._pooled_in_use + self._overflow_in_use
            watch.overflow_in_use = self._overflow_in_use
            watch.waiting = len(self._waiters)
        return peaks

    # -- stats ----------------------------------------------------------------------------------
    def stats(self) -> SlotStats:
        """psycopg_pool-style numbers; `in_use` includes temporary connections."""
        with self._lock:
            config = self._config
            counters: dict[str, Any] = {
                key: rounded_counter(value) for key, value in self.counters.items()
            }
            return SlotStats(
                model=config.model,
                temperature=config.temperature,
                total=config.size,
                in_use=self._pooled_in_use + self._overflow_in_use,
                available=max(0, config.size - self._pooled_in_use),
                overflow_in_use=self._overflow_in_use,
                waiting=len(self._waiters),
                max_overflow=config.max_overflow,
                overflow_limit=self.overflow_limit,
                max_waiting=config.max_waiting,
                timeout_s=config.timeout,
                **counters,
            )
