"""Per-pool figures for the interval since the last drain, fed by the engine's event bus.

Plain asyncio side (no Django): the snapshot sampler drains it once per interval and saves
one row per pool. Observers run on the caller's path, so `observe` only appends to bounded
buffers; percentiles are computed at `drain()` from a uniform reservoir sample, so memory
stays fixed however many calls an interval holds.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from pools.engine.events import EventBus, EventKind, PoolEvent

# Samples kept per pool and per measure between two drains; beyond it a uniform sample
# (reservoir) stands for the whole interval. 1024 samples give p95 within about 1% rank.
DEFAULT_RESERVOIR_SIZE = 1024


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """An operator's age or window such as 90m, 12h, 30d (also s and w); ValueError otherwise."""
    match = _DURATION.match(text or "")
    if match is None or float(match[1]) <= 0:
        raise ValueError(
            f"{text!r} is not a duration: use a positive number and a unit, "
            "e.g. 90m, 12h, 30d (s, m, h, d or w)"
        )
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2].lower()])


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Reservoir:
    """A uniform sample of at most `size` values out of however many were added (Algorithm R)."""

    __slots__ = ("_random", "count", "size", "values")

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.count = 0
        self.values: list[float] = []
        self._random = rng

    def add(self, value: float) -> None:
        self.count += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = self._random.randrange(self.count)
        if slot < self.size:
            self.values[slot] = value


@dataclass
class _Accumulator:
    """What one pool did since the last drain."""

    waits: Reservoir
    latencies: Reservoir
    ttfts: Reservoir
    requests: int = 0
    overflow_requests: int = 0
    queued_requests: int = 0
    errors: int = 0
    refused: int = 0
    wait_max_ms: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.requests or self.errors or self.refused or self.latencies.count)


@dataclass(frozen=True)
class PoolInterval:
    """One pool's figures for one interval: counts, and percentiles in milliseconds."""

    pool: str
    seconds: float
    requests: int  # slots granted
    overflow_requests: int  # of which on a temporary connection
    queued_requests: int  # callers that had to queue (granted later, or timed out)
    errors: int  # calls that raised
    refused: int  # PoolTimeout / PoolExhausted
    wait_p50_ms: float | None
    wait_p95_ms: float | None
    wait_max_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    tokens_in: int
    tokens_out: int
    completed: int  # calls that finished (their latency is in the percentiles)
    error_kinds: dict[str, int]


class IntervalRecorder:
    """Subscribes to an `EventBus` and accumulates per-pool samples until `drain()`.

    Thread-safe: calls may end on any event loop of the process (Daphne's, a thread's made
    by `async_to_sync`), and the sampler drains from its own.
    """

    def __init__(
        self,
        pools: Iterable[str] = (),
        *,
        reservoir_size: int = DEFAULT_RESERVOIR_SIZE,
        seed: int | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._reservoir_size = reservoir_size
        self._pools = list(pools)
        self._current: dict[str, _Accumulator] = {}
        self._since = time.monotonic()
        self._buses: list[EventBus] = []

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, events: EventBus) -> None:
        events.subscribe(self.observe)
        self._buses.append(events)

    def detach(self) -> None:
        for bus in self._buses:
            bus.unsubscribe(self.observe)
        self._buses.clear()

    # -- the observer (on the caller's path: keep it cheap) ------------------------------------
    def _new(self) -> _Accumulator:
        size, rng = self._reservoir_size, self._random
        return _Accumulator(Reservoir(size, rng), Reservoir(size, rng), Reservoir(size, rng))

    def observe(self, event: PoolEvent) -> None:
        with self._lock:
            acc = self._current.get(event.pool)
            if acc is None:
                acc = self._current[event.pool] = self._new()
            if event.kind is EventKind.ACQUIRED:
                acc.requests += 1
                acc.overflow_requests += event.overflow
                acc.queued_requests += event.queued
                if event.wait_ms is not None:
                    acc.waits.add(event.wait_ms)
                    if acc.wait_max_ms is None or event.wait_ms > acc.wait_max_ms:
                        acc.wait_max_ms = event.wait_ms
            elif event.kind is EventKind.COMPLETED:
                if event.latency_ms is not None:
                    acc.latencies.add(event.latency_ms)
                if event.ttft_ms is not None:
                    acc.ttfts.add(event.ttft_ms)
                acc.tokens_in += event.tokens_in
                acc.tokens_out += event.tokens_out
            elif event.kind is EventKind.FAILED:
                acc.errors += 1
                kind = event.error or "error"
                acc.error_kinds[kind] = acc.error_kinds.get(kind, 0) + 1
            elif event.kind is EventKind.REFUSED:
                acc.refused += 1
                # A timeout was queued first, as the slot counter `requests_queued` counts it.
                acc.queued_requests += event.error == "PoolTimeout"
                kind = event.error or "refused"
                acc.error_kinds[kind] = acc.error_kinds.get(kind, 0) + 1

    # -- the sampler's side -------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True when anything happened since the last drain."""
        with self._lock:
            return any(acc.active for acc in self._current.values())

    def drain(self) -> dict[str, PoolInterval]:
        """Figures per pool since the previous drain (every known pool, idle ones too); resets."""
        now = time.monotonic()
        with self._lock:
            current, self._current = self._current, {}
            seconds, self._since = now - self._since, now
        names = list(dict.fromkeys([*self._pools, *current]))
        return {name: self._figures(name, current.get(name), seconds) for name in names}

    def _figures(self, name: str, acc: _Accumulator | None, seconds: float) -> PoolInterval:
        acc = acc or self._new()
        waits, latencies, ttfts = acc.waits.values, acc.latencies.values, acc.ttfts.values
        return PoolInterval(
            pool=name,
            seconds=seconds,
            requests=acc.requests,
            overflow_requests=acc.overflow_requests,
            queued_requests=acc.queued_requests,
            errors=acc.errors,
            refused=acc.refused,
            wait_p50_ms=percentile(waits, 50),
            wait_p95_ms=percentile(waits, 95),
            wait_max_ms=acc.wait_max_ms,
            latency_p50_ms=percentile(latencies, 50),
            latency_p95_ms=percentile(latencies, 95),
            ttft_p50_ms=percentile(ttfts, 50),
            ttft_p95_ms=percentile(ttfts, 95),
            tokens_in=acc.tokens_in,
            tokens_out=acc.tokens_out,
            completed=acc.latencies.count,
            error_kinds=dict(acc.error_kinds),
        )
