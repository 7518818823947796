"""The interval's peaks: kept by the pool itself for each reader, so a burst between two
snapshots shows whatever the sampler's clock, and two samplers never take each other's."""

from __future__ import annotations

import asyncio

import pytest

from pools.engine.stats import SlotPeaks
from pools.sampler import SnapshotSampler

HELLO = [{"role": "user", "content": "hello"}]


async def test_a_read_gives_the_peaks_since_the_last_and_starts_over_from_now(
    make_registry, simulator
):
    pool = make_registry(simulator, pools={"main": {"size": 2, "max_overflow": 1}}).pools["main"]
    watch = pool.watch_peaks()
    slots = [await pool.acquire() for _ in range(3)]  # 2 pooled, 1 temporary
    queued = asyncio.create_task(pool.acquire(timeout=5))
    await asyncio.sleep(0)
    assert pool.stats().waiting == 1
    pool.release(slots.pop())  # the queued caller gets the freed temporary connection
    slots.append(await queued)
    assert pool.read_peaks(watch) == SlotPeaks(in_use=3, overflow_in_use=1, waiting=1)

    # The next interval begins with the 3 still in use: its peak is never below that.
    for slot in slots[1:]:
        pool.release(slot)
    assert pool.read_peaks(watch) == SlotPeaks(in_use=3, overflow_in_use=1, waiting=0)
    assert pool.read_peaks(watch) == SlotPeaks(in_use=1, overflow_in_use=0, waiting=0)

    # A reader that stopped watching is left alone.
    pool.unwatch_peaks(watch)
    more = [await pool.acquire() for _ in range(2)]
    assert (watch.in_use, watch.overflow_in_use) == (1, 0)
    for slot in [slots[0], *more]:
        pool.release(slot)


@pytest.mark.django_db(transaction=True)
async def test_two_samplers_each_see_the_whole_burst(make_registry, simulator):
    registry = make_registry(simulator, pools={"main": {"size": 1, "max_overflow": 1}})
    await registry.initialize()
    simulator.config.ttft_ms = 30
    first = SnapshotSampler(registry, interval_s=60, instance="first:1")
    second = SnapshotSampler(registry, interval_s=60, instance="second:2")
    first.start()
    second.start()

    async def call() -> None:
        async with registry.get_main_llm() as llm:
            await llm.ainvoke(HELLO)

    try:
        await asyncio.gather(*(call() for _ in range(4)))  # 1 slot, 1 temporary, 2 queued
        one = {row.pool: row for row in await first.snapshot_once()}["main"]
        other = {row.pool: row for row in await second.snapshot_once()}["main"]
        after = {row.pool: row for row in await first.snapshot_once()}["main"]
    finally:
        await first.stop(flush=False)
        await second.stop(flush=False)
    for row in (one, other):
        assert (row.in_use_peak, row.overflow_in_use_peak, row.waiting_peak) == (2, 1, 2)
        assert row.requests == 4
    # The first sampler's next interval starts over: nothing happened in it.
    assert (after.in_use_peak, after.overflow_in_use_peak, after.waiting_peak) == (0, 0, 0)
    # Stopped samplers leave nothing on the pool's path.
    assert registry.pools["main"]._peak_watches == []


@pytest.mark.django_db(transaction=True)
async def test_rows_count_the_deployments_pauses_per_interval(make_registry, simulator):
    registry = make_registry(simulator)
    await registry.initialize()
    limiter = registry.limiters["gpt-4o"]  # main's and ronei's deployment
    limiter.pause(0.01, "429, Retry-After 0.01s")
    sampler = SnapshotSampler(registry, interval_s=60, instance="pauses:1")
    limiter.pause(0.01, "429, Retry-After 0.01s")  # counted from here on
    limiter.pause(0.01, "429, Retry-After 0.01s")
    first = {row.pool: row.pauses for row in await sampler.snapshot_once()}
    second = {row.pool: row.pauses for row in await sampler.snapshot_once()}
    assert first == {"main": 2, "ronei": 2, "mini": 0}
    assert second == {"main": 0, "ronei": 0, "mini": 0}
