"""Prometheus metrics for the pools, served at /metrics.

Gauges and counters are read from `registry.stats()` (typed) at scrape time by a custom collector,
so they can never drift from /health (the deployment's concurrency limit, its queue and its
429 pause included, under each pool on the deployment); histograms (acquire wait, call
latency, time to first token) and the token and error counters are fed by the engine's event
bus. Each pool registry gets its own `CollectorRegistry` (not prometheus_client's global one),
so a registry installed by a test, or a reloaded module, never collides with an earlier one.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from pools.engine.events import EventKind, PoolEvent
from pools.engine.registry import PoolRegistry
from pools.engine.stats import DeploymentStats, PoolStats

_Metric = TypeVar("_Metric", Histogram, Counter)

logger = logging.getLogger("pools")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
PREFIX = "carlos_pool"

# Seconds. Acquiring is microseconds when a slot is free and up to the pool timeout (30 s)
# when callers queue; calls and first tokens run from tens of ms to minutes.
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30)

_GAUGES: dict[str, tuple[Callable[[PoolStats], float], str]] = {
    "size": (lambda pool: pool.total, "Configured slots of the pool."),
    "in_use": (
        lambda pool: pool.in_use,
        "Slots in use, temporary (overflow) connections included.",
    ),
    "available": (lambda pool: pool.available, "Pooled slots free."),
    "overflow_in_use": (lambda pool: pool.overflow_in_use, "Temporary connections in use."),
    "waiting": (lambda pool: pool.waiting, "Callers queued for a slot."),
}
_COUNTERS: dict[str, tuple[Callable[[PoolStats], float], int, str]] = {
    "requests": (lambda pool: pool.requests_num, 1, "Slots granted."),
    "overflow_requests": (
        lambda pool: pool.requests_overflow,
        1,
        "Slots granted on a temporary connection.",
    ),
    "queued_requests": (
        lambda pool: pool.requests_queued,
        1,
        "Callers that had to queue for a slot.",
    ),
    "timeouts": (
        lambda pool: pool.requests_timeouts,
        1,
        "Queued callers that gave up (PoolTimeout).",
    ),
    "exhausted": (
        lambda pool: pool.requests_refused,
        1,
        "Callers refused at once (PoolExhausted).",
    ),
    "usage_seconds": (lambda pool: pool.usage_ms, 1000, "Time slots were held."),
    "connections_opened": (
        lambda pool: pool.connections_num,
        1,
        "TCP connections opened for the pool.",
    ),
    "connections_closed": (
        lambda pool: pool.connections_closed,
        1,
        "TCP connections of the pool closed.",
    ),
    "connection_errors": (
        lambda pool: pool.connections_errors,
        1,
        "TCP connections that failed to open.",
    ),
    "rate_limited": (
        lambda pool: pool.requests_rate_limited,
        1,
        "429 answers to the pool's calls (each pauses the deployment; the call waits, retries).",
    ),
}
# The pool's deployment (`pools.engine.adaptive`): the pools on one model share its limiter, so
# these repeat, the same, under each of them.
_CONCURRENCY_GAUGES: dict[str, tuple[Callable[[DeploymentStats], float], str]] = {
    "concurrency_limit": (
        lambda deployment: deployment.limit,
        "Attempts the pool's deployment may have in flight: its learned concurrency limit.",
    ),
    "concurrency_limit_floor": (
        lambda deployment: deployment.floor,
        "Lowest concurrency limit of the pool's deployment.",
    ),
    "concurrency_limit_ceiling": (
        lambda deployment: deployment.ceiling,
        "Highest concurrency limit of the pool's deployment (where it starts).",
    ),
    "deployment_in_flight": (
        lambda deployment: deployment.in_flight,
        "Attempts in flight to the pool's deployment, from every pool on it.",
    ),
    "deployment_waiting": (
        lambda deployment: deployment.waiting,
        "Calls queued for the pool's deployment (its concurrency limit or 429 pause), "
        "each holding its slot.",
    ),
    "deployment_paused_seconds": (
        lambda deployment: deployment.paused_s,
        "Seconds left of the 429 pause of the pool's deployment (0: dispatch is open).",
    ),
}
_CONCURRENCY_COUNTERS: dict[str, tuple[Callable[[DeploymentStats], float], str]] = {
    "concurrency_limit_decreases": (
        lambda deployment: deployment.decreases,
        "Times the concurrency limit of the pool's deployment came down.",
    ),
    "deployment_pauses": (
        lambda deployment: deployment.pauses,
        "429 pauses of the pool's deployment.",
    ),
    "deployment_queue_timeouts": (
        lambda deployment: deployment.timeouts,
        "Calls whose deadline passed in the queue of the pool's deployment.",
    ),
}
# Why the limit last changed, as a label: these, "cluster: " and one of these (another
# instance's change), or "other"; so the label's values stay few.
LIMIT_REASONS = (
    "start",
    "429",
    "latency",
    "requests running low",
    "tokens running low",
    "recovering",
)
CLUSTER_PREFIX = "cluster: "


def limit_reason_label(reason: str) -> str:
    """A bounded label for a limit change's reason ("429, Retry-After 2s" -> "429")."""
    cluster = reason.startswith(CLUSTER_PREFIX)
    base = reason.removeprefix(CLUSTER_PREFIX)
    known = next((known for known in LIMIT_REASONS if base.startswith(known)), "other")
    return f"{CLUSTER_PREFIX}{known}" if cluster else known


class _StatsCollector(Collector):
    """Gauges and counters from `registry.stats()` at scrape time, by attribute."""

    def __init__(self, registry: weakref.ref[PoolRegistry]) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        registry = self._registry()
        if registry is None:
            return
        pools = registry.stats().pools
        up = GaugeMetricFamily(
            "carlos_pools_up", "1 when the pools are initialized and not closed, else 0."
        )
        up.add_metric([], 1.0 if registry.usable else 0.0)
        yield up
        for name, (gauge, documentation) in _GAUGES.items():
            values = {pool: float(gauge(stats)) for pool, stats in pools.items()}
            yield _per_pool(GaugeMetricFamily, name, documentation, values)
        for name, (counter, divisor, documentation) in _COUNTERS.items():
            values = {pool: float(counter(stats)) / divisor for pool, stats in pools.items()}
            yield _per_pool(CounterMetricFamily, name, documentation, values)
        yield from _concurrency(pools)


def _per_pool(
    kind: type[GaugeMetricFamily | CounterMetricFamily],
    name: str,
    documentation: str,
    values: dict[str, float],
) -> Metric:
    """A `carlos_pool_<name>` family with one sample a pool, labelled by the pool."""
    family = kind(f"{PREFIX}_{name}", documentation, labels=["pool"])
    for pool, value in values.items():
        family.add_metric([pool], value)
    return family


def _concurrency(pools: dict[str, PoolStats]) -> Iterator[Metric]:
    """The deployment limiter's figures under each pool (none for a pool without them)."""
    limited = {pool: stats.concurrency for pool, stats in pools.items() if stats.concurrency}
    for name, (gauge, documentation) in _CONCURRENCY_GAUGES.items():
        values = {pool: float(gauge(deployment)) for pool, deployment in limited.items()}
        yield _per_pool(GaugeMetricFamily, name, documentation, values)
    yield _per_pool(
        GaugeMetricFamily,
        "adaptive",
        "1 when the pool's calls follow the learned concurrency limit (ADAPTIVE), 0 when they "
        "only obey the 429 pause.",
        {pool: 1.0 if deployment.pool_adaptive else 0.0 for pool, deployment in limited.items()},
    )
    for name, (counter, documentation) in _CONCURRENCY_COUNTERS.items():
        values = {pool: float(counter(deployment)) for pool, deployment in limited.items()}
        yield _per_pool(CounterMetricFamily, name, documentation, values)
    change = InfoMetricFamily(
        f"{PREFIX}_concurrency_limit_change",
        "Why the concurrency limit of the pool's deployment last changed (reason: start, 429, "
        "latency, requests running low, tokens running low, recovering, cluster: ..., other).",
        labels=["pool"],
    )
    changed_at = GaugeMetricFamily(
        f"{PREFIX}_concurrency_limit_changed_timestamp_seconds",
        "When the concurrency limit of the pool's deployment last changed (Unix time; its "
        "start when it never did).",
        labels=["pool"],
    )
    for pool, deployment in limited.items():
        last = deployment.last_change
        change.add_metric([pool], {"reason": limit_reason_label(last.reason)})
        if last.at is not None:
            changed_at.add_metric([pool], float(last.at))
    yield change
    yield changed_at


class PoolMetrics:
    """The metrics of one pool registry: its own CollectorRegistry, fed by its event bus."""

    def __init__(self, registry: PoolRegistry) -> None:
        self.collectors = CollectorRegistry()
        self.collectors.register(_StatsCollector(weakref.ref(registry)))
        self.wait = self._histogram(
            "acquire_wait_seconds", "Time a caller waited for a slot.", WAIT_BUCKETS
        )
        self.latency = self._histogram(
            "call_latency_seconds",
            "Duration of completed calls (whole answer, or the stream read to its end).",
            LATENCY_BUCKETS,
        )
        self.ttft = self._histogram(
            "time_to_first_token_seconds",
            "Time from the request to the first streamed token.",
            TTFT_BUCKETS,
        )
        self.tokens = self._counter(
            "tokens",
            "Tokens of completed calls, by direction (in = prompt, out = completion).",
            "direction",
        )
        self.errors = self._counter(
            "errors",
            "Calls that raised (kind = exception class) and callers the pool refused "
            "(kind = PoolTimeout or PoolExhausted).",
            "kind",
        )
        self._children: dict[tuple[int, tuple[str, ...]], Histogram | Counter] = {}
        registry.events.subscribe(self.observe)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        """A `carlos_pool_<name>` histogram by pool, in this registry's collectors."""
        return Histogram(
            f"{PREFIX}_{name}", documentation, ["pool"], buckets=buckets, registry=self.collectors
        )

    def _counter(self, name: str, documentation: str, label: str) -> Counter:
        """A `carlos_pool_<name>` counter by pool and `label`, in this registry's collectors."""
        return Counter(f"{PREFIX}_{name}", documentation, ["pool", label], registry=self.collectors)

    def observe(self, event: PoolEvent) -> None:
        """Event-bus observer: cheap, on the caller's path."""
        pool = event.pool
        if event.kind is EventKind.ACQUIRED:
            if event.wait_ms is not None:
                self._child(self.wait, pool).observe(event.wait_ms / 1000)
        elif event.kind is EventKind.COMPLETED:
            if event.latency_ms is not None:
                self._child(self.latency, pool).observe(event.latency_ms / 1000)
            if event.ttft_ms is not None:
                self._child(self.ttft, pool).observe(event.ttft_ms / 1000)
            self._child(self.tokens, pool, "in").inc(event.tokens_in)
            self._child(self.tokens, pool, "out").inc(event.tokens_out)
        elif event.kind in (EventKind.FAILED, EventKind.REFUSED):
            self._child(self.errors, pool, event.error or event.kind.value).inc()

    def _child(self, metric: _Metric, *labels: str) -> _Metric:
        """`metric.labels(*labels)`, remembered: prometheus_client validates and converts the
        labels on every call, which cost 10-40 us per pool call (benchmark_pools)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return cast(_Metric, child)

    def render(self) -> bytes:
        return generate_latest(self.collectors)


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[PoolRegistry, PoolMetrics] = weakref.WeakKeyDictionary()


def metrics_for(registry: PoolRegistry) -> PoolMetrics:
    """The registry's metrics, created (and subscribed to its events) on first use.

    The server calls it at start so histograms count from the first call, not the first
    scrape.
    """
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = PoolMetrics(registry)
        return metrics
