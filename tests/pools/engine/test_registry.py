"""The pool engine against a real simulator over real sockets."""

from __future__ import annotations

import asyncio
import logging
import threading

import openai
import pytest
from asgiref.sync import async_to_sync

from pools.engine.exceptions import PoolClosed, PoolExhausted, PoolTimeout, UnknownPool
from pools.engine.registry import PoolRegistry
from tests.conftest import registry_config

HELLO = [{"role": "user", "content": "Design a small web app"}]


async def eventually(predicate, timeout: float = 5.0) -> None:
    """Wait until `predicate()` holds (server-side socket state settles asynchronously)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def one_call(registry: PoolRegistry) -> str:
    """One whole call through the main pool: the answer's text."""
    async with registry.get_main_llm() as llm:
        return (await llm.ainvoke(HELLO)).text


async def one_holding_one_queued(
    registry: PoolRegistry,
) -> tuple[asyncio.Task[str], asyncio.Task[str]]:
    """Start two calls on a main pool of one slot; return once the second queues for it."""
    holder = asyncio.create_task(one_call(registry))
    queued = asyncio.create_task(one_call(registry))
    await eventually(lambda: registry.stats().pools["main"].waiting == 1)
    return holder, queued


async def test_sequential_calls_reuse_one_connection(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 2}})
    for _ in range(5):
        async with registry.get_main_llm() as llm:
            result = await llm.ainvoke(HELLO)
            assert result.text
            assert result.usage.completion_tokens > 0
    assert simulator.stats.connections_accepted == 1
    assert registry.stats().pools["main"].connections_num == 1
    assert registry.stats().pools["main"].requests_num == 5


async def test_warm_up_opens_every_slot_once(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 3}, "mini": {"size": 2}})
    opened = await registry.initialize()
    assert opened == {"main": 3, "mini": 2}
    assert simulator.stats.connections_accepted == 5
    assert await registry.initialize() == opened  # idempotent: nothing new
    assert simulator.stats.connections_accepted == 5
    # Calls after warm-up run on the warm connections: the server accepts nothing new.
    for _ in range(3):
        async with registry.get_mini_llm() as llm:
            await llm.ainvoke(HELLO)
    async with registry.get_main_llm() as llm:
        await llm.ainvoke(HELLO)
    assert simulator.stats.connections_accepted == 5
    assert registry.stats().http.connections_open == 5


async def test_concurrent_calls_use_distinct_pooled_connections(make_registry, simulator_factory):
    simulator = await simulator_factory(ttft_ms=100)
    registry = make_registry(simulator, {"main": {"size": 4}})

    async def call() -> None:
        async with registry.get_main_llm() as llm:
            assert not llm.overflow
            await llm.ainvoke(HELLO)

    for _ in range(3):
        await asyncio.gather(*(call() for _ in range(4)))
    assert simulator.stats.connections_accepted == 4
    assert simulator.stats.peak_in_flight == 4


async def test_stream_yields_chunks_and_usage(make_registry, simulator):
    registry = make_registry(simulator, {"mini": {"size": 1}})
    async with registry.get_mini_llm() as llm:
        stream = llm.astream(HELLO)
        chunks = [chunk async for chunk in stream]
    assert len(chunks) > 3
    assert stream.usage is not None and stream.usage.completion_tokens == len(chunks)
    assert stream.finish_reason == "stop"
    assert stream.first_token_ms is not None


async def test_model_and_temperature_are_bound_to_the_pool(make_registry, simulator):
    registry = make_registry(
        simulator,
        {"main": {"model": "gpt-4o", "temperature": 0.7}, "ronei": {"temperature": 0.9}},
    )
    async with registry.get_ronei_llm() as llm:
        assert (llm.model, llm.temperature, llm.pool_name) == ("gpt-4o", 0.9, "ronei")
        result = await llm.ainvoke(HELLO)
    assert result.model == "gpt-4o"
    with pytest.raises(UnknownPool):
        async with registry.acquire("nope"):
            pass


async def test_exhaustion_overflows_instead_of_blocking(make_registry, simulator_factory, caplog):
    simulator = await simulator_factory(ttft_ms=150)
    registry = make_registry(simulator, {"main": {"size": 2}})
    peak = {"in_use": 0, "overflow": 0}

    async def call() -> bool:
        async with registry.get_main_llm() as llm:
            stats = registry.stats().pools["main"]
            peak["in_use"] = max(peak["in_use"], stats.in_use)
            peak["overflow"] = max(peak["overflow"], stats.overflow_in_use)
            result = await llm.ainvoke(HELLO)
            return llm.overflow and bool(result.text)

    with caplog.at_level(logging.WARNING, logger="pools"):
        overflowed = await asyncio.gather(*(call() for _ in range(50)))
    assert sum(overflowed) == 48
    stats = registry.stats().pools["main"]
    assert stats.requests_num == 50 and stats.requests_overflow == 48
    assert stats.in_use == 0 and stats.overflow_in_use == 0 and stats.waiting == 0
    assert peak == {"in_use": 50, "overflow": 48}  # the stats never hid the overflow
    warnings = [
        r for r in caplog.records if "exhausted, creating temporary connection" in r.message
    ]
    assert len(warnings) == 1  # once per burst
    # Temporary connections are closed after use: only the two pooled ones stay open.
    await eventually(lambda: simulator.stats.connections_open == 2)
    assert stats.connections_num == 50 and stats.connections_closed == 48


async def test_capped_overflow_queues_fifo_then_times_out(make_registry, simulator_factory):
    simulator = await simulator_factory(ttft_ms=300)
    registry = make_registry(simulator, {"main": {"size": 1, "max_overflow": 1, "timeout": 5}})
    order: list[int] = []

    async def call(index: int) -> None:
        async with registry.get_main_llm() as llm:
            order.append(index)
            await llm.ainvoke(HELLO)

    tasks = []
    for index in range(5):
        tasks.append(asyncio.create_task(call(index)))
        await asyncio.sleep(0.02)  # enqueue in a known order
    await eventually(lambda: registry.stats().pools["main"].waiting == 3)
    stats = registry.stats().pools["main"]
    assert (stats.in_use, stats.available, stats.overflow_in_use) == (2, 0, 1)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert registry.stats().pools["main"].requests_queued == 3
    assert simulator.stats.peak_in_flight == 2

    # A queue timeout raises PoolTimeout and leaves nothing behind.
    holder = asyncio.create_task(call(9))
    holder2 = asyncio.create_task(call(10))
    await eventually(lambda: registry.stats().pools["main"].in_use == 2)
    with pytest.raises(PoolTimeout):
        async with registry.acquire("main", timeout=0.05):
            pass
    await asyncio.gather(holder, holder2)
    stats = registry.stats().pools["main"]
    assert stats.requests_timeouts == 1 and stats.waiting == 0 and stats.in_use == 0


async def test_max_waiting_refuses_at_once(make_registry, simulator_factory):
    simulator = await simulator_factory(ttft_ms=300)
    registry = make_registry(
        simulator, {"main": {"size": 1, "max_overflow": 0, "max_waiting": 1, "timeout": 5}}
    )
    first, second = await one_holding_one_queued(registry)
    with pytest.raises(PoolExhausted, match="1 callers already waiting"):
        async with registry.get_main_llm():
            pass
    await asyncio.gather(first, second)
    stats = registry.stats().pools["main"]
    assert stats.requests_refused == 1 and stats.in_use == 0


async def test_cancel_while_holding_a_stream_releases_the_slot(make_registry, simulator_factory):
    simulator = await simulator_factory(ttft_ms=0, tokens_per_second=20)
    registry = make_registry(simulator, {"main": {"size": 1}})
    got_chunk = asyncio.Event()

    async def reader() -> None:
        async with registry.get_main_llm() as llm:
            async for _ in llm.astream(HELLO):
                got_chunk.set()

    task = asyncio.create_task(reader())
    await got_chunk.wait()
    assert registry.stats().pools["main"].in_use == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert registry.stats().pools["main"].in_use == 0
    assert registry.stats().pools["main"].requests_errors == 0  # cancelling is no error
    await eventually(lambda: simulator.stats.connections_open == 0)  # half-read: dropped


async def test_cancel_while_queued_leaves_no_waiter_and_loses_no_slot(
    make_registry, simulator_factory
):
    simulator = await simulator_factory(ttft_ms=200)
    registry = make_registry(simulator, {"main": {"size": 1, "max_overflow": 0, "timeout": 5}})
    holder, queued = await one_holding_one_queued(registry)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert registry.stats().pools["main"].waiting == 0
    await holder
    # The slot is still there for the next caller.
    async with registry.acquire("main", timeout=1) as llm:
        await llm.ainvoke(HELLO)
    assert registry.stats().pools["main"].in_use == 0


async def test_slot_granted_to_a_waiter_cancelled_at_the_same_time_is_given_back(
    make_registry, simulator
):
    registry = make_registry(simulator, {"main": {"size": 1, "max_overflow": 0, "timeout": 5}})
    pool = registry.pools["main"]
    held = await pool.acquire()
    queued = asyncio.create_task(pool.acquire())
    await eventually(lambda: pool.stats().waiting == 1)
    pool.release(held)  # grants the slot to the queued task...
    queued.cancel()  # ...which is cancelled before it can run
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert pool.stats().in_use == 0
    again = await pool.acquire(timeout=0.1)
    pool.release(again)


async def test_abandoned_half_read_stream_is_closed_with_the_block(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 1}})
    async with registry.get_main_llm() as llm:
        stream = llm.astream(HELLO)
        iterator = aiter(stream)
        await anext(iterator)
        await anext(iterator)
        assert registry.stats().pools["main"].in_use == 1
    assert stream.closed
    assert registry.stats().pools["main"].in_use == 0
    await eventually(lambda: simulator.stats.connections_open == 0)
    async with registry.get_main_llm() as llm:  # the pool still works on a new connection
        assert (await llm.ainvoke(HELLO)).text
    assert simulator.stats.connections_accepted == 2


async def test_error_from_the_endpoint_is_counted_and_slot_released(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 1}})
    simulator.config.error_rate = 1.0
    with pytest.raises(openai.InternalServerError):
        async with registry.get_main_llm() as llm:
            llm.client = llm.client.with_options(max_retries=0)
            await llm.ainvoke(HELLO)
    stats = registry.stats().pools["main"]
    assert stats.requests_errors == 1 and stats.in_use == 0


async def test_closed_registry_refuses_calls_and_wakes_waiters(make_registry, simulator_factory):
    simulator = await simulator_factory(ttft_ms=300)
    registry = make_registry(simulator, {"main": {"size": 1, "max_overflow": 0, "timeout": 5}})
    await registry.initialize()
    holder, queued = await one_holding_one_queued(registry)
    await registry.close()
    with pytest.raises(PoolClosed):
        await queued
    with pytest.raises(PoolClosed):
        async with registry.get_main_llm():
            pass
    assert not registry.usable
    holder.cancel()


def test_clients_belong_to_their_loop(simulator_thread):
    """One registry used from fresh loops (asyncio.run, async_to_sync): no cross-loop errors."""
    registry = PoolRegistry(registry_config(simulator_thread.base_url, {"main": {"size": 2}}))

    async def two_calls() -> str:
        texts = [await one_call(registry), await one_call(registry)]
        await registry.aclose_loop()
        return texts[0]

    assert asyncio.run(two_calls())
    assert async_to_sync(two_calls)()
    assert asyncio.run(two_calls())
    assert registry.stats().pools["main"].requests_num == 6
    assert registry.stats().http.connections_open == 0


def test_one_registry_serves_several_loops_at_once(simulator_thread):
    """Two threads, two loops, one registry: slots are shared, clients are per loop."""
    registry = PoolRegistry(registry_config(simulator_thread.base_url, {"main": {"size": 2}}))
    errors: list[BaseException] = []

    def worker() -> None:
        async def run() -> None:
            for _ in range(5):
                await one_call(registry)
            await registry.aclose_loop()

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = registry.stats().pools["main"]
    assert stats.requests_num == 10 and stats.in_use == 0


async def test_events_report_every_grant_call_and_refusal(make_registry, simulator_factory):
    from pools.engine.events import EventKind

    simulator = await simulator_factory(ttft_ms=50)
    registry = make_registry(simulator, {"main": {"size": 1, "max_overflow": 0, "max_waiting": 0}})
    events = []
    registry.events.subscribe(events.append)
    async with registry.get_main_llm() as llm:
        await llm.ainvoke(HELLO)
        stream = llm.astream(HELLO)
        await stream.text()
        with pytest.raises(PoolExhausted):
            async with registry.get_main_llm():
                pass
    kinds = [(e.kind, e.pool) for e in events]
    assert kinds == [
        (EventKind.ACQUIRED, "main"),
        (EventKind.COMPLETED, "main"),
        (EventKind.COMPLETED, "main"),
        (EventKind.REFUSED, "main"),
    ]
    invoke, streamed = events[1], events[2]
    assert invoke.latency_ms >= 50 and invoke.ttft_ms is None and invoke.tokens_out > 0
    assert streamed.ttft_ms >= 50 and streamed.tokens_out == stream.usage.completion_tokens
    assert events[3].error == "PoolExhausted"


async def test_streams_read_to_the_end_leave_their_connection_reusable(make_registry, simulator):
    registry = make_registry(simulator, {"main": {"size": 1}})
    for _ in range(4):
        async with registry.get_main_llm() as llm:
            assert await llm.astream(HELLO).text()
    assert simulator.stats.connections_accepted == 1


async def test_a_warm_up_that_reached_nothing_never_says_ready(caplog):
    """Reproduces (issue 15): after "Warm-up could not reach the LLM endpoint", the server's
    log went on with "✅ Connection pool ready: 0 main, 0 ronei, 0 mini"."""
    import socket

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    registry = PoolRegistry(registry_config(f"http://127.0.0.1:{port}/v1"))
    try:
        with caplog.at_level(logging.INFO, logger="pools"):
            await registry.initialize()
    finally:
        await registry.close()
    messages = [record.getMessage() for record in caplog.records]
    assert any("Warm-up could not reach the LLM endpoint" in m for m in messages), messages
    assert not any("Connection pool ready" in m for m in messages), messages
    assert any("started cold" in m for m in messages), messages
