"""What lets a call in or turns new work away: the parts `PoolRegistry.acquire` composes.

Each concern is one small helper: the cluster-wide lease taken for a slot, the closing of
the connection a block used (a temporary one, or those a failed call stranded).
`refusal_for` says, before any of it, why new work would be refused now (the views ask it
before starting a design in the background); `deployment_unready`, why a deployment makes
the service unready (/health's readiness); `limit_settings`, how many calls a deployment's
limiter lets in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from pools.engine.adaptive import DeploymentLimiter, LimitSettings
from pools.engine.config import PoolConfig, PoolsConfig, Resilience
from pools.engine.exceptions import CircuitOpen, PoolTimeout
from pools.engine.resilience import BreakerState, CircuitBreaker
from pools.engine.slots import Slot, SlotPool
from pools.engine.stats import BreakerStats, PoolStats
from pools.engine.transport import close_stranded_connections

if TYPE_CHECKING:
    from pools.engine.cluster import ClusterCoordinator, Lease
    from pools.engine.handle import LLMHandle


async def close_connection(
    handle: LLMHandle, temporary: httpx.AsyncClient | None, shared: httpx.AsyncClient, failed: bool
) -> None:
    """Leaving a block: its streams closed, then its temporary connection; after a failure
    or a cancellation, the shared client's connections it may have left mid-response."""
    try:
        await handle._close_streams()
    finally:
        if temporary is not None:
            await temporary.aclose()
        elif failed:
            await close_stranded_connections(shared)


async def take_lease(
    cluster: ClusterCoordinator,
    pool: SlotPool,
    slot: Slot,
    timeout: float | None,
    waiting: Counter[str],
) -> Lease:
    """A cluster-wide lease for `slot`; the caller releases it. Waiting for it counts as
    waiting for the slot (in `wait_ms`, the counters and the ACQUIRED event)."""
    leasing = time.perf_counter()
    lease = await wait_for_lease(cluster, pool, timeout, slot.wait_ms, waiting)
    pool.record_wait(slot, (time.perf_counter() - leasing) * 1000)
    return lease


async def wait_for_lease(
    cluster: ClusterCoordinator,
    pool: SlotPool,
    timeout: float | None,
    waited_ms: float,
    waiting: Counter[str],
) -> Lease:
    """A cluster-wide lease for one more call of `pool`, waiting while the cluster is full
    (counted in `waiting`, by pool, meanwhile)."""
    from pools.engine.cluster import ClusterCircuitOpen, ClusterFull

    config = pool.config
    wait = (config.timeout if timeout is None else timeout) - waited_ms / 1000
    loop = asyncio.get_running_loop()
    waiting[pool.name] += 1
    try:
        return await cluster.acquire_waiting(
            pool.name, config.size + pool.overflow_limit, config.model, loop.time() + wait
        )
    except ClusterFull:
        raise PoolTimeout(
            f"no cluster-wide slot in pool {pool.name!r} within {max(wait, 0):g}s "
            f"(capacity {config.size + pool.overflow_limit} across all instances)"
        ) from None
    except ClusterCircuitOpen as exc:
        raise CircuitOpen(
            f"the circuit for deployment {config.model!r} is open ({exc.reason}); "
            f"retry in {exc.retry_after:.1f}s",
            retry_after=exc.retry_after,
        ) from None
    finally:
        waiting[pool.name] -= 1


def deployment_unready(
    model: str,
    breaker: CircuitBreaker,
    limiter: DeploymentLimiter,
    pools: Mapping[str, SlotPool],
) -> str | None:
    """Why deployment `model` makes the service unready, or None: its circuit is open, or a
    429 paused it for longer than the calls of its pools may wait."""
    names = [name for name, pool in pools.items() if pool.config.model == model]
    if breaker.state is BreakerState.OPEN:
        snapshot = BreakerStats(**breaker.snapshot())
        return (
            f"circuit open for deployment {model!r} (pools {', '.join(names)}) after "
            f"{snapshot.last_reason}; retry in {snapshot.retry_in_s:.0f}s"
        )
    paused = limiter.paused_for()
    longest_wait = max(pools[name].config.call_timeout for name in names)
    if paused > longest_wait:
        return (
            f"deployment {model!r} (pools {', '.join(names)}) is rate limited for "
            f"{paused:.0f}s, longer than its calls may wait ({longest_wait:g}s)"
        )
    return None


def pool_capacity(pool: PoolConfig, max_connections: int) -> int:
    """Calls one pool can run at once: its size plus its overflow cap (or what HTTP leaves)."""
    overflow = pool.max_overflow
    if overflow is None:
        overflow = max(0, max_connections - pool.size)
    return pool.size + overflow


def limit_settings(config: PoolsConfig, model: str) -> LimitSettings:
    """The limiter of deployment `model`: bounds summed over its adaptive pools."""
    pools = [pool for pool in config.pools.values() if pool.model == model and pool.adaptive]
    max_connections = config.http.max_connections
    floor = max(1, sum(pool.min_concurrency for pool in pools))
    ceiling = sum(pool.max_concurrency or pool_capacity(pool, max_connections) for pool in pools)
    resilience = config.resilience
    return LimitSettings(
        floor=floor,
        ceiling=max(floor, min(ceiling, max_connections)) if pools else max_connections,
        adaptive=bool(pools),
        backoff_ratio=resilience.limit_backoff_ratio,
        latency_tolerance=resilience.limit_latency_tolerance,
        pause_backoff_base=resilience.backoff_base,
        pause_backoff_max=resilience.backoff_max,
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why new work would be refused now, and in how many seconds to ask again (None: no
    hint of its own)."""

    reason: str
    retry_after_s: float | None = None


def refusal_for(
    names: Iterable[str],
    stats_of: Callable[[str], PoolStats | None],
    breaker_of: Callable[[str], CircuitBreaker],
    resilience: Resilience,
) -> Refusal | None:
    """Why work using the pools `names` would be refused now, or None if it can start.

    For each pool (one that is not configured is skipped: the work reports it when it
    fails): its circuit breaker, a capped pool whose queue is full (MAX_WAITING), its rate
    budget when waiting for it would take longer than a call may wait.
    """
    for name in names:
        pool = stats_of(name)
        if pool is None:
            continue
        try:
            breaker_of(name).check()
        except CircuitOpen as exc:
            return Refusal(f"{type(exc).__name__}: {exc}", exc.retry_after)
        if pool.full and pool.max_waiting is not None and pool.waiting >= pool.max_waiting:
            return Refusal(
                f"pool {name!r} is full and {pool.waiting} caller(s) already wait", pool.timeout_s
            )
        budget = pool.rate_budget
        wait = budget.wait_for(resilience.default_output_tokens) if budget is not None else 0.0
        if wait > resilience.rate_limit_max_wait:
            return Refusal(f"the rate budget of {pool.model!r} is used up", wait)
    return None


__all__ = [
    "Refusal",
    "close_connection",
    "deployment_unready",
    "limit_settings",
    "pool_capacity",
    "refusal_for",
    "take_lease",
    "wait_for_lease",
]
