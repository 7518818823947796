"""The typed stats: one conversion to /health's JSON, read back the same; the refusal of
new work decided by the engine from them."""

from __future__ import annotations

import asyncio

from pools.engine.admission import Refusal
from pools.engine.stats import PoolStats
from tests.helpers.waiting import eventually

POOL_KEYS = [
    "model",
    "temperature",
    "total",
    "in_use",
    "available",
    "overflow_in_use",
    "waiting",
    "max_overflow",
    "overflow_limit",
    "max_waiting",
    "timeout_s",
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
    "connections_num",
    "connections_closed",
    "connections_errors",
    "cluster_waiting",
    "breaker",
    "concurrency",
    "rate_budget",
]


async def test_the_json_keeps_health_s_keys_and_reads_back_the_same(make_registry, simulator):
    registry = make_registry(simulator)
    body = registry.stats().as_json()
    assert list(body) == [
        "initialized",
        "closed",
        "endpoint",
        "warmup_error",
        "cluster",
        "http",
        "pools",
    ]
    main = body["pools"]["main"]
    assert list(main) == POOL_KEYS
    assert set(main["concurrency"]["last_change"]) == {"reason", "at", "from", "to"}
    assert main["rate_budget"] is None and main["breaker"]["state"] == "closed"
    assert PoolStats.from_json(main) == registry.stats().pools["main"]


async def test_the_public_view_reads_back_without_the_operator_details():
    public = {"total": 2, "in_use": 1, "available": 1, "overflow_in_use": 0, "waiting": 0}
    stats = PoolStats.from_json({**public, "requests_num": 7})
    assert (stats.total, stats.in_use, stats.requests_num) == (2, 1, 7)
    assert stats.concurrency is None and stats.model == "" and stats.rate_budget is None


async def test_the_engine_refuses_work_for_a_full_queue_and_when_closed(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 1, "max_overflow": 0, "max_waiting": 1}})
    assert registry.refusal(["main", "unknown"]) is None
    async with registry.get_main_llm():
        waiter = asyncio.create_task(registry.pools["main"].acquire(timeout=5))
        await eventually(lambda: registry.stats().pools["main"].waiting == 1, what="a queue")
        assert registry.refusal(["main"]) == Refusal(
            "pool 'main' is full and 1 caller(s) already wait", 30.0
        )
    registry.pools["main"].release(await waiter)
    assert registry.refusal(["main"]) is None
    await registry.close()
    assert registry.refusal(["main"]) == Refusal("the pools are shut down")
