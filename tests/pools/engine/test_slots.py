"""`SlotPool` on its own: the state after acquire, release, overflow, queueing and close.

No registry, no HTTP: what a slot pool holds is read from its typed `stats()`.
"""

from __future__ import annotations

import asyncio

import pytest

from pools.engine.config import PoolConfig
from pools.engine.exceptions import PoolClosed, PoolExhausted, PoolTimeout
from pools.engine.slots import Slot, SlotKind, SlotPool
from pools.engine.stats import SlotStats
from tests.helpers.waiting import eventually


def slot_pool(size: int = 2, max_connections: int = 100, **settings: object) -> SlotPool:
    config = PoolConfig(name="main", model="gpt-4o", size=size, **settings)  # type: ignore[arg-type]
    return SlotPool(config, max_connections)


def held(pool: SlotPool) -> tuple[int, int, int, int]:
    """(in use, pooled free, overflow in use, waiting)."""
    stats = pool.stats()
    return stats.in_use, stats.available, stats.overflow_in_use, stats.waiting


async def one_queued(pool: SlotPool) -> tuple[Slot, asyncio.Task[Slot]]:
    """Take the pool's one slot and queue a caller behind it: (the slot, the queued caller)."""
    slot = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire(timeout=5))
    await eventually(lambda: pool.stats().waiting == 1, what="the caller queues")
    return slot, waiter


async def test_a_new_pool_is_all_free() -> None:
    stats = slot_pool(size=3).stats()
    assert isinstance(stats, SlotStats)
    assert (stats.total, stats.in_use, stats.available, stats.waiting) == (3, 0, 3, 0)
    assert stats.requests_num == 0 and stats.requests_wait_ms == 0 and not stats.full


async def test_acquire_then_release_gives_the_slot_back_once() -> None:
    pool = slot_pool(size=2)
    slot = await pool.acquire()
    assert slot.kind is SlotKind.POOLED and not slot.overflow and not slot.queued
    assert held(pool) == (1, 1, 0, 0)
    pool.release(slot)
    pool.release(slot)  # a second release changes nothing
    assert held(pool) == (0, 2, 0, 0)
    stats = pool.stats()
    assert stats.requests_num == 1 and stats.usage_ms >= 0


async def test_past_its_size_a_pool_lends_temporary_connections_up_to_the_cap() -> None:
    pool = slot_pool(size=1, max_overflow=1)
    pooled = await pool.acquire()
    overflow = await pool.acquire()
    assert overflow.kind is SlotKind.OVERFLOW and overflow.overflow
    assert held(pool) == (2, 0, 1, 0)
    assert pool.stats().full and pool.stats().requests_overflow == 1
    pool.release(overflow)
    assert held(pool) == (1, 0, 0, 0)
    pool.release(pooled)
    assert held(pool) == (0, 1, 0, 0)


async def test_without_a_cap_the_http_limit_bounds_the_overflow() -> None:
    pool = slot_pool(size=2, max_connections=3)
    assert pool.overflow_limit == 1
    assert pool.stats().overflow_limit == 1


async def test_a_full_pool_queues_first_in_first_out() -> None:
    pool = slot_pool(size=1, max_overflow=0)
    first = await pool.acquire()
    order: list[str] = []

    async def wait(name: str) -> None:
        slot = await pool.acquire(timeout=5)
        order.append(name)
        assert slot.queued
        pool.release(slot)

    waiters = [asyncio.create_task(wait(name)) for name in ("a", "b")]
    await eventually(lambda: pool.stats().waiting == 2, what="two callers queue")
    assert held(pool) == (1, 0, 0, 2) and pool.stats().requests_queued == 2
    pool.release(first)
    await asyncio.gather(*waiters)
    assert order == ["a", "b"]
    assert held(pool) == (0, 1, 0, 0) and pool.stats().requests_num == 3


async def test_a_queued_caller_that_times_out_leaves_the_queue() -> None:
    pool = slot_pool(size=1, max_overflow=0)
    slot = await pool.acquire()
    with pytest.raises(PoolTimeout):
        await pool.acquire(timeout=0.05)
    stats = pool.stats()
    assert (stats.waiting, stats.requests_timeouts, stats.in_use) == (0, 1, 1)
    pool.release(slot)
    assert held(pool) == (0, 1, 0, 0)


async def test_a_cancelled_waiter_leaves_nothing_held() -> None:
    pool = slot_pool(size=1, max_overflow=0)
    slot, waiter = await one_queued(pool)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert held(pool) == (1, 0, 0, 0)
    pool.release(slot)
    assert held(pool) == (0, 1, 0, 0)


async def test_past_max_waiting_a_caller_is_refused_at_once() -> None:
    pool = slot_pool(size=1, max_overflow=0, max_waiting=1)
    slot, waiter = await one_queued(pool)
    with pytest.raises(PoolExhausted):
        await pool.acquire(timeout=5)
    assert pool.stats().requests_refused == 1 and pool.stats().waiting == 1
    pool.release(slot)
    pool.release(await waiter)
    assert held(pool) == (0, 1, 0, 0)


async def test_close_wakes_the_queue_and_refuses_until_reopened() -> None:
    pool = slot_pool(size=1, max_overflow=0)
    slot, waiter = await one_queued(pool)
    pool.close()
    with pytest.raises(PoolClosed):
        await waiter
    assert pool.closed and pool.stats().waiting == 0
    with pytest.raises(PoolClosed):
        await pool.acquire()
    pool.release(slot)  # a slot held across close is still given back
    pool.reopen()
    pool.release(await pool.acquire())
    assert held(pool) == (0, 1, 0, 0)


async def test_a_larger_size_grants_the_queue() -> None:
    pool = slot_pool(size=1, max_overflow=0)
    slot, waiter = await one_queued(pool)
    pool.reconfigure(PoolConfig(name="main", model="gpt-4o", size=2, max_overflow=0))
    second = await waiter
    assert held(pool) == (2, 0, 0, 0)
    pool.release(slot)
    pool.release(second)
    assert held(pool) == (0, 2, 0, 0)
