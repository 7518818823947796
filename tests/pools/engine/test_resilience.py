"""Deadlines, the single retry layer and the circuit breaker, against real faults."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from pools import runtime
from pools.engine.config import parse_config
from pools.engine.exceptions import (
    CircuitOpen,
    DeadlineExceeded,
    EmptyResponse,
    MalformedResponse,
    TruncatedResponse,
)
from pools.engine.registry import PoolRegistry
from pools.engine.resilience import (
    CircuitBreaker,
    Failure,
    RetryPolicy,
    classify,
    parse_retry_after,
)
from tests.conftest import probe
from tests.helpers.waiting import eventually

HELLO = [{"role": "user", "content": "Design a queue"}]
FAST_BACKOFF = {"BACKOFF_BASE": 0.01, "BACKOFF_MAX": 0.02}


@pytest.fixture
async def build(simulator_factory):
    """A registry with one `main` pool against a fresh simulator; both closed afterwards."""
    made: list[PoolRegistry] = []

    async def factory(pool: dict | None = None, resilience: dict | None = None, **simulator):
        sim = await simulator_factory(**simulator)
        registry = PoolRegistry(
            parse_config(
                {
                    "ENDPOINT": {"SIMULATOR_URL": sim.base_url},
                    "POOLS": {"main": {"SIZE": 2, **(pool or {})}},
                    "RESILIENCE": {**FAST_BACKOFF, **(resilience or {})},
                }
            )
        )
        made.append(registry)
        return registry, sim

    yield factory
    for registry in made:
        assert registry.stats().pools["main"].in_use == 0  # nothing leaked
        await registry.close()


async def invoke(registry: PoolRegistry):
    async with registry.get_main_llm() as llm:
        return await llm.ainvoke(HELLO)


async def stream_all(registry: PoolRegistry) -> list[str]:
    chunks: list[str] = []
    async with registry.get_main_llm() as llm:
        async for chunk in llm.astream(HELLO):
            chunks.append(chunk)
    return chunks


async def test_first_token_deadline(build):
    registry, _ = await build({"FIRST_TOKEN_TIMEOUT": 0.2, "MAX_RETRIES": 0}, ttft_ms=2000)
    with pytest.raises(DeadlineExceeded) as caught:
        await stream_all(registry)
    assert caught.value.deadline == "first_token"


async def test_idle_gap_deadline_is_not_retried_after_tokens(build):
    registry, sim = await build(
        {"IDLE_TIMEOUT": 0.2, "MAX_RETRIES": 2}, stall_rate=1.0, stall_seconds=5
    )
    chunks: list[str] = []
    with pytest.raises(DeadlineExceeded) as caught:
        async with registry.get_main_llm() as llm:
            async for chunk in llm.astream(HELLO):
                chunks.append(chunk)
    assert caught.value.deadline == "idle"
    assert chunks  # the user saw tokens, so the call was not repeated
    assert sim.stats.chat_requests == 1
    assert registry.stats().pools["main"].requests_retries == 0


async def test_total_deadline(build):
    registry, _ = await build(
        {"CALL_TIMEOUT": 0.3, "IDLE_TIMEOUT": 5, "MAX_RETRIES": 0}, tokens_per_second=20
    )
    with pytest.raises(DeadlineExceeded) as caught:
        await stream_all(registry)
    assert caught.value.deadline == "total"


async def test_server_errors_are_retried_then_surface(build):
    registry, sim = await build({"MAX_RETRIES": 2}, error_rate=1.0)
    with pytest.raises(openai.InternalServerError):
        await invoke(registry)
    assert sim.stats.chat_requests == 3  # one call, two retries
    stats = registry.stats().pools["main"]
    assert stats.requests_retries == 2 and stats.requests_errors == 1


async def test_a_retry_recovers_from_a_passing_fault(build):
    registry, sim = await build({"MAX_RETRIES": 2}, error_rate=1.0)

    async def heal_after_first_attempt() -> None:
        while sim.stats.chat_requests < 1:
            await asyncio.sleep(0.001)
        sim.config.error_rate = 0.0

    healer = asyncio.create_task(heal_after_first_attempt())
    result = await invoke(registry)
    await healer
    assert result.text and result.retries >= 1
    assert registry.breaker_for("main").state == "closed"


async def test_retry_after_is_honoured_on_429(build):
    registry, sim = await build(
        {"MAX_RETRIES": 2}, capacity=1, retry_after_s=0.5, tokens_per_second=200
    )
    holder = asyncio.create_task(stream_all(registry))  # takes the simulator's capacity
    await eventually(lambda: sim.stats.in_flight >= 1, what="the holder's call is under way")
    started = time.monotonic()
    result = await invoke(registry)
    assert time.monotonic() - started >= 0.5  # waited what the server asked for
    assert result.text and result.retries >= 1
    assert sim.stats.status_counts.get(429, 0) >= 1
    await holder


async def test_stream_with_tokens_is_never_retried(build):
    registry, sim = await build({"MAX_RETRIES": 2}, reset_rate=1.0)
    chunks: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async with registry.get_main_llm() as llm:
            async for chunk in llm.astream(HELLO):
                chunks.append(chunk)
    assert chunks and sim.stats.chat_requests == 1


async def test_cancelled_call_is_not_retried(build):
    registry, sim = await build({"MAX_RETRIES": 2}, ttft_ms=1000)
    task = asyncio.create_task(invoke(registry))
    await eventually(lambda: sim.stats.in_flight >= 1, what="the call is under way")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert sim.stats.chat_requests == 1
    assert registry.breaker_for("main").state == "closed"


async def test_breaker_opens_fails_fast_then_probes_and_closes(build):
    registry, sim = await build(
        {"MAX_RETRIES": 0}, {"BREAKER_FAILURES": 3, "BREAKER_COOLDOWN": 2.0}, error_rate=1.0
    )
    previous = runtime.install(registry)
    try:
        await registry.initialize()
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                await invoke(registry)
        assert registry.breaker_for("main").state == "open"
        before = sim.stats.chat_requests
        started = time.monotonic()
        with pytest.raises(CircuitOpen, match="circuit for deployment 'gpt-4o' is open"):
            await invoke(registry)
        assert sim.stats.chat_requests == before  # refused without touching the upstream
        assert time.monotonic() - started < 1  # at once, not after a timeout
        health = await probe("/health")
        assert health.status_code == 503
        assert health.json()["pools"]["main"]["breaker"]["state"] == "open"
        assert "circuit open" in health.json()["reason"]
        assert (await probe("/health/live")).status_code == 200

        await asyncio.sleep(2.05)  # cooldown over: half-open, one probe goes through
        sim.config.error_rate = 0.0
        assert (await invoke(registry)).text
        assert registry.breaker_for("main").state == "closed"
        assert (await probe("/health")).status_code == 200
    finally:
        runtime.install(previous)


async def test_breaker_is_shared_by_pools_of_one_deployment(simulator_factory):
    sim = await simulator_factory()
    registry = PoolRegistry(
        parse_config(
            {
                "ENDPOINT": {"SIMULATOR_URL": sim.base_url},
                "POOLS": {"main": {"MODEL": "gpt-4o"}, "ronei": {"MODEL": "gpt-4o"}, "mini": {}},
            }
        )
    )
    assert registry.breaker_for("main") is registry.breaker_for("ronei")
    assert registry.breaker_for("mini") is not registry.breaker_for("main")
    await registry.close()


def test_a_429_is_a_rate_signal_never_a_breaker_failure():
    """Reproduces: one 429 opened the deployment's circuit and failed the sibling calls."""
    breaker = CircuitBreaker("gpt-4o", failures_to_open=1)
    failure = classify(rate_limit_error(retry_after="2"))
    assert failure.rate_limited and failure.retryable and failure.retry_after == 2.0
    assert not failure.breaker_failure
    breaker.record_failure(failure, "RateLimitError")
    assert breaker.state == "closed"


def test_local_deadlines_and_the_calls_own_total_do_not_count_against_the_upstream():
    assert classify(DeadlineExceeded("first_token", 1)).breaker_failure  # upstream silent
    assert classify(DeadlineExceeded("idle", 1)).breaker_failure
    assert not classify(DeadlineExceeded("total", 1)).breaker_failure  # the call's budget


def test_a_success_from_before_the_outage_does_not_close_the_circuit():
    """Reproduces: any success, even of a call started before the opening, closed it."""
    now = [100.0]
    breaker = CircuitBreaker("gpt-4o", failures_to_open=2, cooldown=30, clock=lambda: now[0])
    started_before = now[0]
    now[0] += 1
    for _ in range(2):
        breaker.record_failure(Failure(True, True), "InternalServerError")
    assert breaker.state == "open"
    breaker.record_success(started_at=started_before)
    assert breaker.state == "open"
    assert breaker.opened_since(started_before) == pytest.approx(30)  # it may wait for it
    assert breaker.opened_since(now[0]) is None  # a new call fails fast instead
    now[0] += 30.01
    assert breaker.state == "half_open"
    assert breaker.before_attempt() is None  # the probe
    assert breaker.before_attempt() > 0  # only one probe at a time: the others wait for it
    breaker.check()  # half-open refuses nobody at acquire time
    breaker.record_success(started_at=now[0])
    assert breaker.state == "closed"


def test_breaker_opens_on_failure_rate():
    breaker = CircuitBreaker("m", failures_to_open=100, failure_rate=0.5, window=10)
    server_error = Failure(True, True)
    for index in range(10):
        if breaker.state == "open":
            break
        if index % 2:
            breaker.record_failure(server_error, "500")
        else:
            breaker.record_success()
    assert breaker.state == "open"


def test_client_errors_do_not_count_against_the_upstream():
    breaker = CircuitBreaker("m", failures_to_open=1)
    breaker.record_failure(Failure(False, False), "BadRequestError")
    assert breaker.state == "closed"


def test_retry_after_parsing_and_cap():
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    policy = RetryPolicy(retry_after_cap=5)
    assert policy.delay(1, Failure(True, True, retry_after=60)) == 5
    backoff = [policy.delay(n, Failure(True, True)) for n in (1, 2, 3, 10)]
    assert 0.25 <= backoff[0] <= 0.5 and 0.5 <= backoff[1] <= 1.0 and backoff[3] <= 8.0


def test_classification():
    assert classify(DeadlineExceeded("first_token", 1)).retryable
    assert not classify(DeadlineExceeded("idle", 1)).retryable
    assert not classify(ValueError()).retryable
    for cut in (TruncatedResponse("cut"), MalformedResponse("bad chunk")):
        assert classify(cut).retryable and classify(cut).breaker_failure
    assert classify(EmptyResponse("empty")).retryable
    assert not classify(EmptyResponse("empty")).breaker_failure


def rate_limit_error(**headers: str) -> openai.RateLimitError:
    request = httpx.Request("POST", "https://example.invalid/v1/chat/completions")
    response = httpx.Response(
        429, headers={k.replace("_", "-"): v for k, v in headers.items()}, request=request
    )
    return openai.RateLimitError("Rate limit reached", response=response, body=None)


async def test_a_busy_event_loop_is_not_mistaken_for_a_silent_upstream(
    make_registry, simulator_thread
):
    # The simulator streams from its own thread while this loop is blocked (CPU-bound work,
    # no await) for three idle deadlines: the tokens wait unread, so the deadline is extended
    # and the call completes, with no failure counted against the breaker.
    simulator_thread.config.tokens_per_second = 200
    registry = make_registry(
        simulator_thread, {"main": {"size": 1, "idle_timeout": 0.2, "max_retries": 0}}
    )
    loop = asyncio.get_running_loop()
    chunks: list[str] = []
    async with registry.get_main_llm() as llm:
        stream = llm.astream(HELLO, max_tokens=60)
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:  # blocks while the next read waits
                loop.call_soon(time.sleep, 0.6)
    assert len(chunks) > 3 and stream.usage is not None
    assert stream.deadline_extensions >= 1
    assert registry.breaker_for("main").snapshot()["recent_failure_rate"] == 0
