"""Cluster-wide capacity and shared breaker through a real Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import openai
import pytest
import redis

from pools.engine.config import parse_config
from pools.engine.exceptions import CircuitOpen, PoolTimeout, RateBudgetExceeded
from pools.engine.registry import PoolRegistry
from tests.conftest import probe
from tests.helpers.services import REDIS_URL, forget_keys, needs_redis, run_prefix
from tests.helpers.waiting import eventually

ROOT = Path(__file__).resolve().parents[3]
HELLO = [{"role": "user", "content": "Design a ledger"}]
pytestmark = needs_redis()


def cluster_raw(base_url: str, prefix: str, **pool) -> dict:
    return {
        "ENDPOINT": {"SIMULATOR_URL": base_url},
        "POOLS": {"main": {"SIZE": 4, "MAX_OVERFLOW": 4, "TIMEOUT": 20, **pool}},
        "RESILIENCE": {"BACKOFF_BASE": 0.01, "BACKOFF_MAX": 0.02},
        "CLUSTER": {"REDIS_URL": REDIS_URL, "PREFIX": prefix, "LEASE_SECONDS": 1},
    }


@pytest.fixture
async def instances(simulator_factory):
    """Build 'instances': registries that share one Redis prefix, as separate processes do."""
    prefix = run_prefix()
    made: list[PoolRegistry] = []

    async def build(count: int = 2, **options):
        sim = await simulator_factory(**options.pop("simulator", {}))
        rate_limits = options.pop("rate_limits", {})
        for _ in range(count):
            raw = cluster_raw(sim.base_url, prefix, **options)
            if rate_limits:
                raw["RATE_LIMITS"] = rate_limits
                raw["RESILIENCE"]["RATE_LIMIT_MAX_WAIT"] = 0.5
            made.append(PoolRegistry(parse_config(raw)))
        return sim, made[-count:]

    yield build
    for registry in made:
        await registry.close()
    forget_keys(REDIS_URL, prefix)


async def one_call(registry: PoolRegistry) -> str:
    async with registry.get_main_llm() as llm:
        return (await llm.ainvoke(HELLO, max_tokens=5)).text


async def test_cluster_never_exceeds_its_capacity(instances):
    simulator, (first, second) = await instances(simulator={"ttft_ms": 40})
    calls = [one_call(first if index % 2 else second) for index in range(100)]
    results = await asyncio.gather(*calls)
    assert all(results)
    # Each instance alone may run 8 (4 slots + 4 overflow), 16 together without Redis;
    # coordinated, the cluster never runs more than 8.
    assert 1 < simulator.stats.peak_in_flight <= 8
    for registry in (first, second):
        stats = registry.stats()
        assert stats.pools["main"].in_use == 0
        assert stats.cluster.leases_granted >= 1
    assert first.stats().cluster.instance != second.stats().cluster.instance


async def test_an_open_breaker_is_shared(instances):
    simulator, (first, second) = await instances(MAX_RETRIES=0, simulator={"error_rate": 1.0})
    first.breaker_for("main").failures_to_open = 1
    with pytest.raises(openai.InternalServerError):
        await one_call(first)
    shared = redis.Redis.from_url(REDIS_URL)
    await eventually(  # the opening is published in the background
        lambda: shared.exists(first.cluster.breaker_key("gpt-4o")), what="the breaker published"
    )
    shared.close()
    before = simulator.stats.chat_requests
    with pytest.raises(CircuitOpen, match="seen by"):
        await one_call(second)  # second never failed itself
    assert simulator.stats.chat_requests == before


async def test_a_429_seen_by_one_instance_pauses_every_instance(instances):
    """Reproduces (issue 11): a 429 paused nothing beyond the instance that got it."""
    simulator, (first, second) = await instances(
        simulator={"next_429": 1, "retry_after_s": 1.0, "ttft_ms": 20}
    )
    for registry in (first, second):
        await registry.initialize()
    waiting = asyncio.create_task(one_call(first))
    await eventually(lambda: simulator.stats.status_counts.get(429, 0) == 1, what="the 429")
    await eventually(
        lambda: second.limiters["gpt-4o"].paused_for() > 0, what="the second instance pauses"
    )
    assert second.stats().pools["main"].concurrency.pause_reason.startswith("429")
    requests = simulator.stats.chat_requests
    second_call = asyncio.create_task(one_call(second))
    await asyncio.sleep(0.1)
    assert simulator.stats.chat_requests == requests  # nothing went out during the pause
    assert await second_call and await waiting
    assert simulator.stats.status_counts[429] == 1


async def test_the_learned_limit_is_one_limit_for_the_cluster(instances):
    from pools.engine.adaptive import Outcome

    _, (first, second) = await instances()
    for registry in (first, second):
        await registry.initialize()
    await eventually(
        lambda: first.cluster.live_instances == 2 and second.cluster.live_instances == 2,
        what="both instances see each other",
    )
    limiter = first.limiters["gpt-4o"]
    before = limiter.limit
    limiter.release(await limiter.acquire(time.monotonic(), 5), Outcome.DROP)
    assert limiter.limit < before
    # Each instance runs its share of one cluster limit: the same learned value on both.
    await eventually(
        lambda: second.limiters["gpt-4o"].limit == limiter.limit, what="the second adopts it"
    )
    assert second.stats().pools["main"].concurrency.last_change.reason == ("cluster: 429")


async def test_rate_budget_is_shared_across_instances(instances):
    # 4 requests a minute for the whole cluster: alone, each instance would allow 4.
    simulator, (first, second) = await instances(rate_limits="gpt-4o=4")
    for registry in (first, second, first, second):
        assert await one_call(registry)
    for registry in (first, second):
        with pytest.raises(RateBudgetExceeded, match="rate budget of deployment 'gpt-4o'"):
            await one_call(registry)
    assert simulator.stats.chat_requests == 4
    budget = second.stats().pools["main"].rate_budget
    assert budget.shared is True and budget.refused == 1
    assert budget.requests_available < 1


async def test_headers_seen_by_one_instance_throttle_the_other(instances):
    # The simulator reports 0 requests left after each call; the first instance's response
    # caps the shared bucket, so the second instance, which has not called yet, waits.
    simulator, (first, second) = await instances(
        rate_limits={"gpt-4o": {"RPM": 600}}, simulator={"capacity": 1}
    )
    assert await one_call(first)
    assert await one_call(second)
    assert second.stats().pools["main"].rate_budget.throttled >= 1
    assert simulator.stats.status_counts.get(429, 0) == 0


async def test_rate_budget_falls_back_to_local_buckets_without_redis(simulator):
    raw = cluster_raw(simulator.base_url, run_prefix())
    raw["CLUSTER"].update(REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT=0.1)
    raw["RATE_LIMITS"] = "gpt-4o=2"
    raw["RESILIENCE"]["RATE_LIMIT_MAX_WAIT"] = 0.1
    registry = PoolRegistry(parse_config(raw))
    try:
        assert await one_call(registry) and await one_call(registry)
        with pytest.raises(RateBudgetExceeded):
            await one_call(registry)  # this process's own budget still holds
        budget = registry.stats().pools["main"].rate_budget
        assert budget.shared is False and budget.refused == 1
        assert registry.stats().cluster.mode.startswith("local")
    finally:
        await registry.close()


async def test_cluster_view_lists_every_instance(instances):
    _, (first, second) = await instances()
    await first.initialize()
    await second.initialize()
    view = await first.cluster_stats()
    assert set(view["instances"]) == {
        first.stats().cluster.instance,
        second.stats().cluster.instance,
    }
    assert view["instances"][second.stats().cluster.instance]["pools"]["main"]["total"] == 4


async def test_unreachable_redis_falls_back_to_local_limits_and_resumes(simulator, caplog):
    config = parse_config(cluster_raw(simulator.base_url, run_prefix()))
    from dataclasses import replace

    down = replace(config.cluster, url="redis://127.0.0.1:1/0", redis_timeout=0.1)
    registry = PoolRegistry(replace(config, cluster=down))
    registry.cluster.settings = replace(down, retry_redis_after=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="pools"):
            assert await one_call(registry)
            assert await one_call(registry)  # local limits, Redis not asked again yet
        snapshot = registry.stats().cluster
        assert snapshot.mode.startswith("local")
        assert snapshot.local_fallbacks == 2 and snapshot.redis_errors == 1
        assert sum("Redis unreachable" in r.message for r in caplog.records) == 1

        # Redis "comes back": point at the real one and wait out the retry period.
        registry.cluster.settings = replace(registry.cluster.settings, url=REDIS_URL)
        await registry.cluster.aclose_loop()  # drop the client bound to the dead address
        await asyncio.sleep(0.25)
        with caplog.at_level(logging.INFO, logger="pools"):
            assert await one_call(registry)
        assert registry.stats().cluster.mode == "cluster"
        assert any("coordination resumed" in r.message for r in caplog.records)
    finally:
        await registry.close()


HOLDER = """
import asyncio, sys
from pools.engine.config import parse_config
from pools.engine.registry import PoolRegistry
from tests.pools.engine.test_cluster import cluster_raw

async def main():
    registry = PoolRegistry(parse_config(cluster_raw(sys.argv[1], sys.argv[2])))
    stack = [registry.get_main_llm() for _ in range(8)]
    for lease in stack:
        await lease.__aenter__()
    print("held", registry.cluster.instance, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_leases_of_a_killed_instance_expire(instances):
    simulator, (survivor,) = await instances(count=1)
    prefix = survivor.cluster.settings.prefix
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        simulator.base_url,
        prefix,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)},
    )
    try:
        line = (await holder.stdout.readline()).decode()
        assert line.startswith("held ")
        with pytest.raises(PoolTimeout, match="no cluster-wide slot"):
            async with survivor.acquire("main", timeout=0.3):
                pass
        holder.send_signal(signal.SIGKILL)  # no release, no goodbye
        await holder.wait()
        client = redis.Redis.from_url(REDIS_URL)
        assert client.zcard(survivor.cluster.lease_key("main")) == 8  # still held by the dead
        # Nobody renews them any more: they expire (lease time 1 s) and the survivor takes the
        # whole capacity; the generous bound only keeps a broken build from hanging.
        calls = asyncio.gather(*(one_call(survivor) for _ in range(8)))
        assert all(await asyncio.wait_for(calls, timeout=15))
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_health_cluster_scope(instances):
    from pools import runtime

    _, (first, second) = await instances()
    await first.initialize()
    await second.initialize()
    previous = runtime.install(first)
    try:
        body = (await probe("/health?scope=cluster")).json()
        assert len(body["cluster_view"]["instances"]) == 2
        assert body["cluster"]["mode"] == "cluster"
        assert (await probe("/health?scope=galaxy")).status_code == 400
    finally:
        runtime.install(previous)


async def test_health_cluster_scope_without_redis(installed_registry):
    response = await probe("/health?scope=cluster")
    assert response.status_code == 400 and "REDIS_URL" in response.json()["error"]
