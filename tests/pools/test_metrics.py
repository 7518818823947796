"""GET /metrics: Prometheus text that matches the registry, and who may scrape it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import openai
import pytest
from django.test import AsyncClient, AsyncRequestFactory, override_settings
from prometheus_client.parser import text_string_to_metric_families

from pools import runtime, views
from pools.engine.adaptive import Outcome
from pools.engine.exceptions import PoolExhausted
from pools.engine.metrics import limit_reason_label, metrics_for
from pools.engine.registry import PoolRegistry

HELLO = [{"role": "user", "content": "hello"}]


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def scrape(**headers: str) -> dict:
    response = await AsyncClient().get("/metrics", headers=headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "no-store" in response["Cache-Control"]
    return parse(response.content.decode())


@contextlib.asynccontextmanager
async def installed(registry: PoolRegistry) -> AsyncIterator[PoolRegistry]:
    """`registry` as the process registry, its metrics subscribed at start (as `serve` and the
    lifespan do), initialized; the previous registry is put back afterwards."""
    previous = runtime.install(registry)
    metrics_for(registry)
    await registry.initialize()
    try:
        yield registry
    finally:
        runtime.install(previous)


@pytest.fixture
async def registry(make_registry, simulator):
    """Small pools, no retries (a failure shows at once), installed as the process registry."""
    pools = {
        "main": {"size": 2, "max_retries": 0},
        "mini": {"size": 1, "max_overflow": 0, "max_waiting": 0, "max_retries": 0},
    }
    async with installed(make_registry(simulator, pools=pools)) as registry:
        yield registry


async def test_metrics_match_the_registry_after_calls(registry, simulator):
    simulator.config.ttft_ms = 10
    tokens_out = 0
    for _ in range(3):
        async with registry.get_main_llm() as llm:
            tokens_out += (await llm.ainvoke(HELLO)).usage.completion_tokens
    async with registry.acquire("mini") as llm:
        stream = llm.astream(HELLO)
        await stream.text()
        # The only mini slot is held and nothing may wait: the next caller is refused.
        with pytest.raises(PoolExhausted):
            async with registry.acquire("mini"):
                pass
        samples = await scrape()
        assert value(samples, "carlos_pool_in_use", pool="mini") == 1
        assert value(samples, "carlos_pool_available", pool="mini") == 0
    simulator.config.error_rate = 1.0
    async with registry.get_main_llm() as llm:
        with pytest.raises(openai.InternalServerError):
            await llm.ainvoke(HELLO)
    simulator.config.error_rate = 0.0

    samples = await scrape()
    stats = registry.stats().pools
    assert value(samples, "carlos_pools_up") == 1
    for pool in ("main", "mini"):
        assert value(samples, "carlos_pool_size", pool=pool) == stats[pool].total
        assert value(samples, "carlos_pool_in_use", pool=pool) == 0
        assert value(samples, "carlos_pool_waiting", pool=pool) == 0
        requests = value(samples, "carlos_pool_requests_total", pool=pool)
        assert requests == stats[pool].requests_num
        assert value(samples, "carlos_pool_connections_opened_total", pool=pool) == (
            stats[pool].connections_num
        )
        # Every granted slot's wait is in the histogram.
        assert value(samples, "carlos_pool_acquire_wait_seconds_count", pool=pool) == requests
    assert value(samples, "carlos_pool_requests_total", pool="main") == 4
    assert value(samples, "carlos_pool_exhausted_total", pool="mini") == 1
    assert value(samples, "carlos_pool_errors_total", pool="mini", kind="PoolExhausted") == 1
    assert value(samples, "carlos_pool_errors_total", pool="main", kind="InternalServerError") == 1

    # Three completed calls on main (the failed one is not a latency sample), one stream on mini.
    assert value(samples, "carlos_pool_call_latency_seconds_count", pool="main") == 3
    assert value(samples, "carlos_pool_call_latency_seconds_sum", pool="main") >= 3 * 0.010
    assert value(samples, "carlos_pool_time_to_first_token_seconds_count", pool="mini") == 1
    assert value(samples, "carlos_pool_time_to_first_token_seconds_sum", pool="mini") >= 0.010
    assert ("carlos_pool_time_to_first_token_seconds_count", (("pool", "main"),)) not in samples
    in_all_buckets = value(
        samples, "carlos_pool_call_latency_seconds_bucket", pool="main", le="+Inf"
    )
    assert in_all_buckets == 3
    assert value(samples, "carlos_pool_tokens_total", pool="main", direction="out") == tokens_out
    assert value(samples, "carlos_pool_tokens_total", pool="main", direction="in") > 0


async def test_each_registry_has_its_own_metrics(make_registry, simulator):
    first, second = make_registry(simulator), make_registry(simulator)
    assert metrics_for(first) is metrics_for(first)
    assert metrics_for(first).collectors is not metrics_for(second).collectors
    await first.initialize()
    async with first.get_main_llm() as llm:
        await llm.ainvoke(HELLO)
    previous = runtime.install(second)
    try:
        samples = await scrape()
    finally:
        runtime.install(previous)
    assert value(samples, "carlos_pool_requests_total", pool="main") == 0
    assert value(samples, "carlos_pools_up") == 0  # second was never warmed
    assert ("carlos_pool_call_latency_seconds_count", (("pool", "main"),)) not in samples


# -- access --------------------------------------------------------------------------------------
async def status_for(remote_addr: str = "127.0.0.1", authorization: str | None = None) -> int:
    headers = {"Authorization": authorization} if authorization else {}
    request = AsyncRequestFactory().get("/metrics", headers=headers)
    request.META["REMOTE_ADDR"] = remote_addr
    return (await views.metrics(request)).status_code


async def test_metrics_are_open_without_restrictions(installed_registry):
    assert await status_for("203.0.113.9") == 200


@override_settings(METRICS_TOKEN="s3cret-token")
async def test_metrics_token(installed_registry):
    assert (await AsyncClient().get("/metrics")).status_code == 403
    bad = await AsyncClient().get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 403
    assert await status_for(authorization="s3cret-token") == 403  # the scheme is required
    assert await status_for(authorization="Basic s3cret-token") == 403
    await scrape(Authorization="Bearer s3cret-token")


@override_settings(METRICS_ALLOWED_IPS=["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"])
async def test_metrics_ip_allow_list(installed_registry):
    await scrape()  # the test client is 127.0.0.1
    assert await status_for("10.20.30.40") == 200
    assert await status_for("::ffff:10.1.1.1") == 200  # IPv4 seen through an IPv6 socket
    assert await status_for("2001:db8::1") == 200
    assert await status_for("192.168.1.5") == 403
    assert await status_for("") == 403


@override_settings(METRICS_TOKEN="t", METRICS_ALLOWED_IPS=["10.0.0.0/8"])
async def test_metrics_token_and_allow_list_must_both_pass(installed_registry):
    assert await status_for("10.0.0.1", "Bearer t") == 200
    assert await status_for("10.0.0.1") == 403
    assert await status_for("127.0.0.1", "Bearer t") == 403


@override_settings(METRICS_ALLOWED_IPS=["10.0.0.0/8", "not-an-address"])
async def test_a_broken_allow_list_refuses_everyone(installed_registry, caplog):
    assert await status_for("10.0.0.1") == 403
    assert "METRICS_ALLOWED_IPS is invalid" in caplog.text


async def test_scrapes_while_calls_run_concurrently(registry, simulator):
    """Scrapes read live stats under load without disturbing the calls."""
    simulator.config.ttft_ms = 30

    async def call() -> None:
        async with registry.get_main_llm() as llm:
            await llm.ainvoke(HELLO)

    calls = [asyncio.create_task(call()) for _ in range(4)]
    while not any(task.done() for task in calls):
        samples = await scrape()
        assert 0 <= value(samples, "carlos_pool_in_use", pool="main") <= 4
        await asyncio.sleep(0.005)
    await asyncio.gather(*calls)
    samples = await scrape()
    assert value(samples, "carlos_pool_requests_total", pool="main") == 4
    assert value(samples, "carlos_pool_overflow_requests_total", pool="main") == 2


# -- the deployment's concurrency limit, its queue and its 429 pause ---------------------------
@pytest.fixture
async def limited(make_registry, simulator):
    """main on gpt-4o with a limit of at most 10; mini on gpt-4o-mini opted out (ADAPTIVE=0)."""
    pools = {"main": {"size": 2, "max_concurrency": 10}, "mini": {"size": 1, "adaptive": False}}
    async with installed(make_registry(simulator, pools=pools)) as registry:
        yield registry


async def test_metrics_show_the_deployment_limit_its_queue_and_pause(limited, simulator):
    registry = limited
    limiter = registry.limiters["gpt-4o"]
    # A real 429 with a short Retry-After: the call waits it out and succeeds, the pool counts
    # the 429, and the deployment's limit comes down from its ceiling of 10.
    simulator.config.retry_after_s = 0.05
    simulator.config.next_429 = 1
    async with registry.get_main_llm() as llm:
        assert (await llm.ainvoke(HELLO)).text
    samples = await scrape()
    assert value(samples, "carlos_pool_rate_limited_total", pool="main") == 1
    assert value(samples, "carlos_pool_concurrency_limit_ceiling", pool="main") == 10
    assert value(samples, "carlos_pool_concurrency_limit_floor", pool="main") == 1
    assert value(samples, "carlos_pool_concurrency_limit", pool="main") == limiter.limit < 10
    assert value(samples, "carlos_pool_concurrency_limit_decreases_total", pool="main") == 1
    assert value(samples, "carlos_pool_deployment_pauses_total", pool="main") == 1
    assert value(samples, "carlos_pool_adaptive", pool="main") == 1
    # Another attempt answered 429: the last change is the 429's.
    limiter.release(await limiter.acquire(time.monotonic(), 5), Outcome.DROP)
    samples = await scrape()
    assert value(samples, "carlos_pool_concurrency_limit_change_info", pool="main", reason="429")
    assert value(samples, "carlos_pool_concurrency_limit_decreases_total", pool="main") == 2

    # The limit is full: the next attempt queues at the deployment, holding its slot; then a
    # 429 pause stops dispatch for 30 s.
    held = [await limiter.acquire(time.monotonic(), 5) for _ in range(limiter.limit)]
    queued = asyncio.create_task(limiter.acquire(time.monotonic(), 5))
    try:
        while limiter.snapshot()["waiting"] < 1:
            await asyncio.sleep(0.005)
        limiter.pause(30, "429, Retry-After 30s")
        samples = await scrape()
        stats = registry.stats().pools["main"].concurrency
        assert value(samples, "carlos_pool_deployment_in_flight", pool="main") == len(held)
        assert value(samples, "carlos_pool_deployment_waiting", pool="main") == 1
        assert 29 < value(samples, "carlos_pool_deployment_paused_seconds", pool="main") <= 30
        assert value(samples, "carlos_pool_deployment_pauses_total", pool="main") == 2
        for name, figure in (
            ("concurrency_limit", stats.limit),
            ("deployment_in_flight", stats.in_flight),
            ("deployment_waiting", stats.waiting),
        ):
            assert value(samples, f"carlos_pool_{name}", pool="main") == figure
        assert value(
            samples, "carlos_pool_concurrency_limit_changed_timestamp_seconds", pool="main"
        ) == pytest.approx(stats.last_change.at)
    finally:
        queued.cancel()
        for permit in held:
            limiter.release(permit, Outcome.IGNORE)

    # mini's deployment is untouched, and mini follows the pause only.
    assert value(samples, "carlos_pool_adaptive", pool="mini") == 0
    assert value(samples, "carlos_pool_rate_limited_total", pool="mini") == 0
    assert value(samples, "carlos_pool_concurrency_limit_decreases_total", pool="mini") == 0
    assert value(samples, "carlos_pool_deployment_paused_seconds", pool="mini") == 0
    assert value(samples, "carlos_pool_concurrency_limit_change_info", pool="mini", reason="start")
    # One reason per pool at a time.
    reasons = [key for key in samples if key[0] == "carlos_pool_concurrency_limit_change_info"]
    assert len(reasons) == 2


def test_limit_reasons_make_a_small_set_of_labels():
    assert limit_reason_label("start") == "start"
    assert limit_reason_label("429") == "429"
    assert limit_reason_label("tokens running low") == "tokens running low"
    assert limit_reason_label("recovering") == "recovering"
    # Another instance's reasons keep their prefix; a pause's free text is cut to its kind.
    assert limit_reason_label("cluster: 429, Retry-After 2.5s") == "cluster: 429"
    assert limit_reason_label("cluster: latency") == "cluster: latency"
    assert limit_reason_label("cluster: whatever else") == "cluster: other"
    assert limit_reason_label("") == "other"
