"""The endpoint pushing back, as real endpoints do: 429s waited out, streams verified,
warm connections kept warm, health that tells the truth.

Each test reproduces one defect of issue 11 against the simulator over real sockets; the
docstring names it. Every one of them failed on the code before the change.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from pools import runtime
from pools.engine.config import parse_config
from pools.engine.exceptions import MalformedResponse, RateLimited, TruncatedResponse
from pools.engine.registry import PoolRegistry
from tests.conftest import probe
from tests.helpers.waiting import eventually

HELLO = [{"role": "user", "content": "Design a queue"}]
FAST = {"BACKOFF_BASE": 0.01, "BACKOFF_MAX": 0.05, "BREAKER_COOLDOWN": 30}


@pytest.fixture
async def pools(simulator_factory):
    """`registry, sim = await pools(pool_options, **simulator_options)`: the default three
    pools (main and ronei on gpt-4o, mini on gpt-4o-mini), warmed; closed afterwards."""
    made: list[PoolRegistry] = []

    async def build(options: dict[str, Any] | None = None, **simulator: Any):
        sim = await simulator_factory(**simulator)
        names = ("main", "ronei", "mini")
        registry = PoolRegistry(
            parse_config(
                {
                    "ENDPOINT": {"SIMULATOR_URL": sim.base_url},
                    "SIZE": 2,
                    "POOLS": {name: dict(options or {}) for name in names},
                    "RESILIENCE": FAST,
                }
            )
        )
        made.append(registry)
        await registry.initialize()
        return registry, sim

    yield build
    for registry in made:
        for stats in registry.stats().pools.values():
            assert stats.in_use == 0 and stats.concurrency.in_flight == 0
        await registry.close()


async def heal_after_one(sim: Any, counted: str, fault: str) -> None:
    """Switch `fault` off once the simulator has served one (its stat `counted`)."""
    while getattr(sim.stats, counted) < 1:
        await asyncio.sleep(0.001)
    sim.apply_faults({fault: 0.0})


async def stream(registry: PoolRegistry, pool: str = "main", **kwargs: Any) -> str:
    async with registry.acquire(pool) as llm:
        return await llm.astream(HELLO, **kwargs).text()


async def test_one_429_on_a_deployment_is_waited_out_by_both_parallel_calls(pools):
    """Reproduces: one 429 (Retry-After 2) while Carlos and Ronei ran in parallel failed
    both (CircuitOpen, then 'cancelled'), though the server served exactly one 429."""
    registry, sim = await pools(ttft_ms=50, next_429=1, retry_after_s=0.3, fault_model="gpt-4o")
    carlos, ronei = await asyncio.gather(stream(registry, "main"), stream(registry, "ronei"))
    assert carlos and ronei
    assert sim.stats.status_counts[429] == 1
    assert registry.breaker_for("main").state == "closed"
    stats = registry.stats().pools
    assert stats["main"].requests_rate_limited + stats["ronei"].requests_rate_limited == 1
    assert stats["main"].concurrency.pauses == 1


async def test_two_429s_a_few_ms_apart_do_not_refuse_the_first_callers_retry(pools):
    """Reproduces: the first caller's own retry was refused (CircuitOpen ... retry in 0.0s)."""
    registry, sim = await pools(next_429=2, retry_after_s=0.2, fault_model="gpt-4o")
    results = await asyncio.gather(*(stream(registry, "main") for _ in range(2)))
    assert all(results) and sim.stats.status_counts[429] == 2


async def test_retry_after_zero_means_now_and_locks_nothing_out(pools):
    """Reproduces: `Retry-After: 0` failed the call in 41 ms and locked the deployment out
    for the breaker's 30 s."""
    registry, sim = await pools(next_429=1, retry_after_s=0, fault_model="gpt-4o")
    assert await stream(registry)
    assert registry.limiters["gpt-4o"].paused_for() == 0
    assert await stream(registry, "ronei")  # the deployment takes calls at once
    assert sim.stats.status_counts[429] == 1


async def test_a_retry_after_longer_than_the_deadline_fails_at_once_and_says_so(pools):
    """Reproduces: `Retry-After: 40` waited the capped 30 s and was then refused locally."""
    registry, sim = await pools(
        {"CALL_TIMEOUT": 5}, next_429=1, retry_after_s=40, fault_model="gpt-4o"
    )
    with pytest.raises(RateLimited) as caught:
        # Fail-safe only: waiting out the 40 s the server asked would run past it.
        await asyncio.wait_for(stream(registry), 20)
    assert sim.stats.chat_requests == 1  # no retry inside the pause, no local cap of 30 s
    assert registry.limiters["gpt-4o"].paused_for() > 30  # the server's 40 s, honoured
    assert "asked to wait 40.0s (429, Retry-After 40s)" in str(caught.value)
    assert "total deadline leaves" in str(caught.value)
    # A call on another deployment is not held up.
    assert await stream(registry, "mini")


async def test_a_429_without_retry_after_backs_off_briefly_instead_of_locking_out(pools):
    """Reproduces: a missing Retry-After locked the deployment out for the whole cooldown."""
    registry, sim = await pools(next_429=1, retry_after_mode="none", fault_model="gpt-4o")
    # Fail-safe only: the breaker's 30 s cooldown would run past it; the backoff is 0.01-0.05 s.
    assert await asyncio.wait_for(stream(registry), 20)
    assert sim.stats.status_counts[429] == 1
    assert registry.breaker_for("main").state == "closed"
    assert registry.limiters["gpt-4o"].counters["pauses"] == 1


async def test_a_per_key_quota_makes_calls_wait_not_fail(pools):
    """Reproduces: a 40-requests-a-minute key and 40 calls over the three pools: 17 passed
    and 23 failed with CircuitOpen in 3 s; warm-up alone had spent 25 requests of it."""
    registry, sim = await pools({"CALL_TIMEOUT": 30}, quota_rpm=8, quota_window_s=1.0)
    assert sim.stats.requests_total <= 3  # warm-up: one request, not one per slot
    names = ["main", "ronei", "mini"] * 7
    results = await asyncio.gather(*(stream(registry, name) for name in names))
    assert all(results)
    assert sim.stats.status_counts.get(429, 0) > 0  # the quota really pushed back
    assert {pool: breaker.state for pool, breaker in registry.breakers.items()} == {
        "gpt-4o": "closed",
        "gpt-4o-mini": "closed",
    }


async def test_a_stream_cut_without_finish_reason_is_never_a_whole_answer(pools):
    """Reproduces: a stream that ended early, with no finish_reason and no [DONE], was
    accepted as a whole answer (36 of 536 characters)."""
    registry, sim = await pools(truncate_rate=1.0)
    chunks: list[str] = []
    with pytest.raises(TruncatedResponse, match="without a finish reason"):
        async with registry.acquire("main") as llm:
            async for chunk in llm.astream(HELLO):
                chunks.append(chunk)
    assert chunks  # text reached the caller: it fails clearly, it is not retried
    assert sim.stats.chat_requests == 1


@pytest.mark.parametrize("finish", ["length", "content_filter"])
async def test_a_cut_finish_reason_reaches_the_caller(pools, finish):
    """Reproduces: finish_reason "length" was accepted silently (the pipeline now fails it)."""
    registry, _ = await pools(**{f"{finish}_rate": 1.0})
    async with registry.acquire("main") as llm:
        answer = llm.astream(HELLO)
        assert await answer.text()
        assert answer.finish_reason == finish


async def test_a_malformed_chunk_before_any_text_is_retried_not_a_crash(pools):
    """Reproduces: a malformed chunk raised a raw JSONDecodeError logged as a crash, and was
    not retried."""
    registry, sim = await pools(malformed_rate=1.0)
    healer = asyncio.create_task(heal_after_one(sim, "malformed", "malformed_rate"))
    assert await stream(registry)
    await healer
    assert sim.stats.chat_requests == 2
    sim.apply_faults({"malformed_rate": 1.0})
    with pytest.raises(MalformedResponse):
        await stream(registry)


async def test_an_empty_stream_is_retried(pools):
    """Reproduces: an empty stream was not retried."""
    registry, sim = await pools(empty_rate=1.0)
    healer = asyncio.create_task(heal_after_one(sim, "empties", "empty_rate"))
    assert await stream(registry)
    await healer
    assert sim.stats.chat_requests == 2


async def test_missing_usage_is_estimated_and_marked(pools):
    """Reproduces: a server that sends no usage recorded 0 -> 0 tokens."""
    registry, _ = await pools(no_usage=1)
    async with registry.acquire("main") as llm:
        answer = llm.astream(HELLO)
        text = await answer.text()
        result = await llm.ainvoke(HELLO)
    assert answer.usage is not None and answer.usage.estimated
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens >= len(text) // 8
    assert result.usage.estimated and result.usage.completion_tokens > 0


async def test_an_outage_of_the_first_stages_deployment_makes_health_503(pools):
    """Reproduces: with the endpoint failing, /health stayed 200 (it watched only main's
    breaker, and a design's first call is on mini) while every design failed."""
    registry, _ = await pools({"MAX_RETRIES": 0}, error_rate=1.0, fault_model="gpt-4o-mini")
    previous = runtime.install(registry)
    try:
        for _ in range(10):
            with pytest.raises(openai.InternalServerError):
                await stream(registry, "mini")
        response = await probe("/health")
        assert response.status_code == 503
        assert "circuit open for deployment 'gpt-4o-mini' (pools mini)" in response.json()["reason"]
    finally:
        runtime.install(previous)


async def test_connections_the_server_closed_while_idle_are_replaced(pools, monkeypatch):
    """Reproduces: servers close idle keep-alive connections (uvicorn after 5 s); the warmed
    connections died, the next call paid the handshake, and connections_open still counted
    them."""
    from pools.engine import registry as registry_module

    monkeypatch.setattr(registry_module, "KEEP_WARM_INTERVAL_S", 0.05)
    registry, sim = await pools(keepalive_timeout_s=0.3)
    warm = registry.config.total_slots
    # The server closes every idle connection, and they come back, without a request.
    await eventually(lambda: sim.stats.idle_closes >= warm, what="every idle connection closed")
    await eventually(lambda: sim.stats.connections_open >= warm, what="the connections reopened")
    sim.apply_faults({"keepalive_timeout_s": 60})
    assert sim.stats.chat_requests == 0
    assert registry.stats().http.connections_open == warm  # open sockets, counted
    accepted = sim.stats.connections_accepted
    assert await stream(registry)
    assert sim.stats.connections_accepted == accepted  # the call found a warm connection
