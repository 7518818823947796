"""Rate budgets per deployment: configured limits, tightened by the endpoint's headers."""

from __future__ import annotations

import time

import pytest

from pools.engine.budget import RateBudget, estimate_tokens, parse_reset
from pools.engine.config import ConfigErrors, parse_config
from pools.engine.exceptions import RateBudgetExceeded
from pools.engine.registry import PoolRegistry

HELLO = [{"role": "user", "content": "Design a cache"}]


def registry_with_limits(simulator, limits, **resilience) -> PoolRegistry:
    return PoolRegistry(
        parse_config(
            {
                "ENDPOINT": {"SIMULATOR_URL": simulator.base_url},
                "POOLS": {"main": {"SIZE": 2, "MODEL": "gpt-4o"}},
                "RATE_LIMITS": limits,
                "RESILIENCE": resilience,
            }
        )
    )


async def call(registry: PoolRegistry) -> str:
    async with registry.get_main_llm() as llm:
        return (await llm.ainvoke(HELLO, max_tokens=20)).text


async def test_call_over_budget_is_refused_with_a_clear_error(simulator):
    registry = registry_with_limits(simulator, "gpt-4o=2", RATE_LIMIT_MAX_WAIT=0.1)
    try:
        assert await call(registry) and await call(registry)
        with pytest.raises(RateBudgetExceeded, match="rate budget of deployment 'gpt-4o'"):
            await call(registry)
        assert simulator.stats.chat_requests == 2  # refused before reaching the endpoint
        budget = registry.stats().pools["main"].rate_budget
        assert budget.refused == 1 and budget.rpm == 2
        assert registry.stats().pools["main"].in_use == 0
    finally:
        await registry.close()


async def test_endpoint_headers_tighten_the_budget_and_calls_wait(simulator_factory):
    # The simulator reports 0 requests remaining after each call (capacity 1), so each next
    # call waits for the refill of a 600-per-minute budget: 0.1 s.
    simulator = await simulator_factory(capacity=1)
    registry = registry_with_limits(simulator, {"gpt-4o": {"RPM": 600}})
    try:
        started = time.monotonic()
        for _ in range(3):
            assert await call(registry)
        assert time.monotonic() - started >= 0.2
        assert registry.stats().pools["main"].rate_budget.throttled >= 2
        assert simulator.stats.status_counts.get(429, 0) == 0  # we never hit the server's limit
    finally:
        await registry.close()


async def test_token_budget_waits_for_refill_and_settles_real_usage():
    now = [0.0]
    budget = RateBudget("m", rpm=0, tpm=600, max_wait=15, clock=lambda: now[0])
    assert await budget.reserve(500) == 0
    assert await budget.reserve(200) == pytest.approx(10.0)  # 100 missing, 10 tokens/s
    with pytest.raises(RateBudgetExceeded):
        await budget.reserve(200, max_wait=1)  # the caller's deadline is shorter than the wait
    await budget.settle(estimated=500, actual=100)  # the call used less: give 400 back
    assert await budget.reserve(200) == 0
    now[0] += 6
    assert budget.snapshot()["tokens_available"] == pytest.approx(360, abs=1)


def test_parse_reset_and_estimates():
    assert parse_reset("1s") == 1 and parse_reset("6m0s") == 360 and parse_reset("20ms") == 0.02
    assert parse_reset("1h2m3.5s") == pytest.approx(3723.5) and parse_reset("junk") is None
    assert estimate_tokens([{"content": "x" * 400}], {"max_tokens": 50}, 1000) == 154


def test_rate_limit_configuration_errors():
    with pytest.raises(ConfigErrors, match="LLM_RATE_LIMITS"):
        parse_config({"ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"}, "RATE_LIMITS": "x"})
    config = parse_config(
        {"ENDPOINT": {"SIMULATOR_URL": "http://h:9/v1"}, "RATE_LIMITS": "gpt-4o=600/150000, m=5"}
    )
    assert (config.rate_limits["gpt-4o"].rpm, config.rate_limits["gpt-4o"].tpm) == (600, 150000)
    assert (config.rate_limits["m"].rpm, config.rate_limits["m"].tpm) == (5, 0)
