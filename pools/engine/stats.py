"""The pools' stats as typed values: what `PoolRegistry.stats()` returns.

Readers in the process (/metrics, OpenTelemetry, the snapshot sampler, the views) use the
attributes; `/health`, the cluster's instance reports and the snapshots' JSON use
`as_json()`, the one conversion to the JSON shape operators and tests read (its keys never
change). `from_json()` reads one pool of a /health answer back, from any server version and
from the public view too: what such an answer lacks takes its field's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Self


def _plain_fields(instance: object) -> dict[str, Any]:
    """The dataclass's fields by name, nested stats as their JSON."""
    values: dict[str, Any] = {}
    for spec in fields(instance):  # type: ignore[arg-type]
        value = getattr(instance, spec.name)
        values[spec.name] = value.as_json() if hasattr(value, "as_json") else value
    return values


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `data` that name a field of dataclass `cls`."""
    names = {spec.name for spec in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


class _Json:
    """`as_json` and `from_json` by field name, for the stats below (nested ones included)."""

    __slots__ = ()

    def as_json(self) -> dict[str, Any]:
        return _plain_fields(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(**_known(cls, data))


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStats(_Json):
    """One deployment's circuit breaker (`CircuitBreaker.snapshot()`)."""

    state: str = "closed"
    retry_in_s: float = 0.0
    consecutive_failures: int = 0
    recent_failure_rate: float = 0.0
    times_opened: int = 0
    last_reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStats(_Json):
    """One deployment's rate budget (`RateBudget.snapshot()`)."""

    rpm: int | None = None
    tpm: int | None = None
    shared: bool = False
    requests_available: float | None = None
    tokens_available: float | None = None
    throttled: int = 0
    refused: int = 0

    def wait_for(self, tokens: int) -> float:
        """Seconds until the budget has room for one more call of `tokens` (0: room now)."""
        waits = [0.0]
        if self.rpm and self.requests_available is not None:
            waits.append((1 - self.requests_available) * 60 / self.rpm)
        if self.tpm and self.tokens_available is not None:
            needed = min(tokens, self.tpm) - self.tokens_available
            waits.append(needed * 60 / self.tpm)
        return max(waits)


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitChangeStats(_Json):
    """The last change of a deployment's concurrency limit; JSON says "from" and "to"."""

    reason: str = ""
    at: float | None = None
    before: int = 0
    after: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "at": self.at, "from": self.before, "to": self.after}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            reason=str(data.get("reason") or ""),
            at=data.get("at"),
            before=data.get("from", 0),
            after=data.get("to", 0),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentStats(_Json):
    """A deployment's limiter (`DeploymentLimiter.snapshot()`), as seen by one pool on it."""

    deployment: str = ""
    adaptive: bool = False
    limit: int = 0
    floor: int = 0
    ceiling: int = 0
    in_flight: int = 0
    waiting: int = 0
    paused_s: float = 0.0
    pause_reason: str | None = None
    last_change: LimitChangeStats = LimitChangeStats()
    refused_at: int | None = None
    ttft_best_ms: float | None = None
    ttft_recent_ms: float | None = None
    drops: int = 0
    pauses: int = 0
    decreases: int = 0
    timeouts: int = 0
    pool_adaptive: bool = True  # the pool follows the learned limit (not only the pause)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        values = _known(cls, data)
        values["last_change"] = LimitChangeStats.from_json(data.get("last_change") or {})
        return cls(**values)


# The slot pool's counters (`SlotPool.counters`), and with its connections' the cumulative
# counters of a pool, as a snapshot row keeps them (`PoolStats.counters`).
SLOT_COUNTERS = (
    "requests_num",
    "requests_overflow",
    "requests_queued",
    "requests_wait_ms",
    "requests_timeouts",
    "requests_refused",
    "requests_errors",
    "requests_retries",
    "requests_rate_limited",
    "usage_ms",
)
COUNTER_FIELDS = (*SLOT_COUNTERS, "connections_num", "connections_closed", "connections_errors")


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotPeaks(_Json):
    """The most slots in use, temporary connections in use and callers queued for a slot at
    once since a reader last looked (`SlotPool.read_peaks`): what an instant's sample misses."""

    in_use: int = 0
    overflow_in_use: int = 0
    waiting: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotStats(_Json):
    """One pool's slots (`SlotPool.stats()`): psycopg_pool-style numbers and counters.

    `in_use` includes temporary connections. Counters are whole numbers, but the
    millisecond sums are floats once they grew (rounded to the microsecond).
    """

    model: str = ""
    temperature: float | None = None
    total: int
    in_use: int
    available: int
    overflow_in_use: int
    waiting: int
    max_overflow: int | None = None
    overflow_limit: int = 0
    max_waiting: int | None = None
    timeout_s: float = 0.0
    requests_num: int = 0
    requests_overflow: int = 0
    requests_queued: int = 0
    requests_wait_ms: float = 0
    requests_timeouts: int = 0
    requests_refused: int = 0
    requests_errors: int = 0
    requests_retries: int = 0
    requests_rate_limited: int = 0
    usage_ms: float = 0

    @property
    def full(self) -> bool:
        """Every slot and temporary connection is in use: the next caller queues."""
        return self.in_use >= self.total + self.overflow_limit


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats(SlotStats):
    """One named pool: its slots, connections, and the deployment's breaker, limiter and
    budget; the entry of `/health`'s "pools"."""

    connections_num: int = 0
    connections_closed: int = 0
    connections_errors: int = 0
    cluster_waiting: int = 0
    breaker: BreakerStats | None = None
    concurrency: DeploymentStats | None = None
    rate_budget: BudgetStats | None = None

    @classmethod
    def of(cls, slots: SlotStats, **more: Any) -> Self:
        """A pool's stats: its slots' and `more` (connections, breaker, limiter, budget)."""
        return cls(**{spec.name: getattr(slots, spec.name) for spec in fields(slots)}, **more)

    @property
    def average_wait_ms(self) -> float | None:
        return self.requests_wait_ms / self.requests_num if self.requests_num else None

    def counters(self) -> dict[str, float]:
        """The cumulative counters, by their /health names (a snapshot row's `counters`)."""
        return {name: getattr(self, name) for name in COUNTER_FIELDS}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """One pool of a /health answer; the slot numbers are required (KeyError without)."""
        values = _known(cls, data)
        for name, nested in (
            ("breaker", BreakerStats),
            ("concurrency", DeploymentStats),
            ("rate_budget", BudgetStats),
        ):
            if values.get(name) is not None:
                values[name] = nested.from_json(values[name])
        for name in ("total", "in_use", "available", "overflow_in_use", "waiting"):
            values[name] = int(data[name])
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointStats(_Json):
    kind: str
    url: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpStats(_Json):
    """The process's HTTP client settings and its connections, all pools together."""

    max_connections: int
    max_keepalive_connections: int
    keepalive_expiry_s: float
    event_loops: int
    connections_open: int
    connections_num: int
    connections_closed: int
    connections_errors: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterStats(_Json):
    """This instance's coordination through Redis (`ClusterCoordinator.snapshot()`)."""

    instance: str
    mode: str
    lease_seconds: float
    leases_granted: int
    local_fallbacks: int
    redis_errors: int
    last_error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryStats(_Json):
    """Everything /health and the commands show; never a key or a credential."""

    initialized: bool
    closed: bool
    endpoint: EndpointStats
    warmup_error: str | None
    cluster: ClusterStats | None
    http: HttpStats
    pools: dict[str, PoolStats]

    def as_json(self) -> dict[str, Any]:
        """The JSON shape /health shows (its keys are read by tests and operators)."""
        values = _plain_fields(self)
        values["pools"] = {name: pool.as_json() for name, pool in self.pools.items()}
        return values


def rounded_counter(value: float) -> float:
    """A counter as stats show it: whole when it is, else rounded to the microsecond."""
    return round(value, 3) if isinstance(value, float) else int(value)


__all__ = [
    "COUNTER_FIELDS",
    "SLOT_COUNTERS",
    "BreakerStats",
    "BudgetStats",
    "ClusterStats",
    "DeploymentStats",
    "EndpointStats",
    "HttpStats",
    "LimitChangeStats",
    "PoolStats",
    "RegistryStats",
    "SlotPeaks",
    "SlotStats",
]
