"""An `LLMHandle` and its streams, read for their state after each way a call ends.

Real registry and simulator (no mocks): after the block, after a stream closed early, after
a read to the end, after an endpoint error, after the slot was given back.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from pools.engine.events import EventKind, PoolEvent
from pools.engine.handle import rate_limit_headers

HELLO = [{"role": "user", "content": "hello"}]


def recorded(registry) -> list[PoolEvent]:
    events: list[PoolEvent] = []
    registry.events.subscribe(events.append)
    return events


async def test_a_stream_read_to_the_end_is_closed_and_forgotten(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 1}})
    events = recorded(registry)
    async with registry.get_main_llm() as llm:
        stream = llm.astream(HELLO)
        assert stream in llm._streams and not stream.closed
        text = await stream.text()
        assert text and stream.closed and stream not in llm._streams
        assert stream.finish_reason == "stop" and stream.usage is not None
        assert stream.first_token_ms is not None and stream.retries == 0
    assert [event.kind for event in events] == [EventKind.ACQUIRED, EventKind.COMPLETED]
    assert registry.stats().pools["main"].in_use == 0


async def test_a_stream_closed_early_holds_nothing_and_reports_no_outcome(
    make_registry, simulator_factory
):
    simulator = await simulator_factory(ttft_ms=0, tokens_per_second=50)
    registry = make_registry(simulator, {"main": {"size": 1}})
    events = recorded(registry)
    async with registry.get_main_llm() as llm:
        stream = llm.astream(HELLO)
        async for _ in stream:
            break
        await stream.aclose()
        assert stream.closed and not llm._streams
        assert stream.finish_reason is None  # never read to its end
        await stream.aclose()  # closing again changes nothing
    stats = registry.stats().pools["main"]
    assert (stats.in_use, stats.requests_errors) == (0, 0)
    assert [event.kind for event in events] == [EventKind.ACQUIRED]  # neither completed nor failed


async def test_a_stream_left_open_is_closed_when_the_block_ends(make_registry, simulator_factory):
    simulator = await simulator_factory(ttft_ms=0, tokens_per_second=50)
    registry = make_registry(simulator, {"main": {"size": 1}})
    async with registry.get_main_llm() as llm:
        stream = llm.astream(HELLO)
        async for _ in stream:
            break
        assert not stream.closed
    assert stream.closed and not llm._streams
    assert registry.stats().pools["main"].in_use == 0


async def test_after_an_endpoint_error_the_handle_counts_it_once(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 1, "max_retries": 1}})
    simulator.config.error_rate = 1.0
    events = recorded(registry)
    with pytest.raises(openai.InternalServerError):
        async with registry.get_main_llm() as llm:
            stream = llm.astream(HELLO)
            try:
                await stream.text()
            finally:
                assert stream.closed and stream.retries == 1 and stream.usage is None
    stats = registry.stats().pools["main"]
    assert (stats.in_use, stats.requests_errors, stats.requests_retries) == (0, 1, 1)
    failed = [event for event in events if event.kind is EventKind.FAILED]
    assert [event.error for event in failed] == ["InternalServerError"]


async def test_the_handle_outlives_its_slot_only_as_a_record(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 1}})
    async with registry.get_main_llm() as llm:
        result = await llm.ainvoke(HELLO)
        assert (llm.pool_name, llm.overflow, result.retries) == ("main", False, 0)
        assert llm.wait_ms >= 0 and result.usage.total_tokens > 0
    assert llm._slot.released and not llm._streams
    assert registry.stats().pools["main"].in_use == 0


async def test_the_endpoints_ratelimit_headers_reach_the_deployments_limiter(
    make_registry, simulator_factory
):
    # 21 requests a minute: after the 20th call one is left, under 5 % of the limit, and the
    # learned limit comes down on what the response's headers said.
    simulator = await simulator_factory(quota_rpm=21)
    registry = make_registry(simulator, {"main": {"size": 1}})
    limiter = registry.limiters["gpt-4o"]
    for _ in range(19):
        async with registry.get_main_llm() as llm:
            await llm.ainvoke(HELLO)
    assert limiter.snapshot()["last_change"]["reason"] == "start"
    async with registry.get_main_llm() as llm:
        await llm.ainvoke(HELLO)
    assert limiter.snapshot()["last_change"]["reason"] == "requests running low"


def test_ratelimit_headers_are_taken_whatever_their_case():
    headers = httpx.Headers(
        [
            ("Content-Type", "application/json"),
            ("X-RateLimit-Remaining-Requests", "3"),
            ("x-ratelimit-limit-requests", "600"),
            ("x-request-id", "abc"),
        ]
    )
    assert rate_limit_headers(headers) == {
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-limit-requests": "600",
    }
