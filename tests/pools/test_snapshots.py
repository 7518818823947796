"""Pool history: interval figures from the event bus, the sampler that saves them, and its
life under the server (start after warm-up, stop before close, survive database errors)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import override_settings

from carlos.lifespan import PoolLifespan
from pools.engine.adaptive import Outcome
from pools.engine.events import EventKind, PoolEvent
from pools.engine.intervals import IntervalRecorder, Reservoir, parse_duration, percentile
from pools.models import PoolSnapshot
from pools.sampler import SnapshotSampler

HELLO = [{"role": "user", "content": "hello"}]


# -- plain figures ----------------------------------------------------------------------------
def test_percentile_interpolates_between_ranks():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_reservoir_keeps_a_bounded_uniform_sample():
    reservoir = Reservoir(100, random.Random(1))
    for value in range(10_000):
        reservoir.add(float(value))
    assert reservoir.count == 10_000
    assert len(reservoir.values) == 100
    # A uniform sample of 0..9999: its median lands near the middle, not at the start.
    assert 3_000 < percentile(reservoir.values, 50) < 7_000


def test_recorder_counts_an_interval_and_resets_on_drain():
    recorder = IntervalRecorder(["main", "mini"], reservoir_size=50, seed=1)
    for wait in (1.0, 2.0, 3.0, 40.0):
        recorder.observe(PoolEvent("main", EventKind.ACQUIRED, wait_ms=wait))
    recorder.observe(PoolEvent("main", EventKind.ACQUIRED, wait_ms=5.0, overflow=True))
    recorder.observe(PoolEvent("main", EventKind.ACQUIRED, wait_ms=9.0, queued=True))
    recorder.observe(
        PoolEvent(
            "main", EventKind.COMPLETED, latency_ms=100, ttft_ms=30, tokens_in=7, tokens_out=5
        )
    )
    recorder.observe(PoolEvent("main", EventKind.COMPLETED, latency_ms=300, tokens_in=3))
    recorder.observe(PoolEvent("main", EventKind.FAILED, error="APIConnectionError"))
    recorder.observe(PoolEvent("main", EventKind.REFUSED, error="PoolTimeout"))
    recorder.observe(PoolEvent("main", EventKind.REFUSED, error="PoolExhausted"))

    figures = recorder.drain()
    assert set(figures) == {"main", "mini"}  # idle pools get a row too
    main = figures["main"]
    assert (main.requests, main.overflow_requests, main.queued_requests) == (6, 1, 2)
    assert (main.errors, main.refused) == (1, 2)
    assert main.error_kinds == {"APIConnectionError": 1, "PoolTimeout": 1, "PoolExhausted": 1}
    assert main.wait_p50_ms == pytest.approx(4.0)  # waits 1 2 3 5 9 40
    assert main.wait_max_ms == 40.0
    assert main.latency_p50_ms == pytest.approx(200.0)
    assert main.ttft_p50_ms == main.ttft_p95_ms == 30.0
    assert (main.tokens_in, main.tokens_out, main.completed) == (10, 5, 2)
    mini = figures["mini"]
    assert (mini.requests, mini.wait_p50_ms, mini.latency_p95_ms) == (0, None, None)

    again = recorder.drain()["main"]
    assert (again.requests, again.errors, again.wait_max_ms) == (0, 0, None)


def test_parse_duration_accepts_operator_forms():
    assert parse_duration("90m").total_seconds() == 5400
    assert parse_duration("12h").total_seconds() == 43200
    assert parse_duration("30d").days == 30
    assert parse_duration(" 1.5H ").total_seconds() == 5400
    for bad in ("", "30", "d", "3x", "0h", "-1d", "1 day"):
        with pytest.raises(ValueError, match=r"e\.g\. 90m, 12h, 30d"):
            parse_duration(bad)


# -- the sampler against a real registry and simulator ------------------------------------------
async def _rows() -> list[PoolSnapshot]:
    return [row async for row in PoolSnapshot.objects.order_by("taken_at", "pool")]


async def _wait_rows(
    check: Callable[[list[PoolSnapshot]], bool], deadline_s: float = 15.0
) -> list[PoolSnapshot]:
    """Poll the table until `check(rows)` holds; fail (not hang) after a generous deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        rows = await _rows()
        if check(rows):
            return rows
        if loop.time() > end:
            pytest.fail(f"condition not met; rows: {[(r.pool, r.requests) for r in rows]}")
        await asyncio.sleep(0.05)


def _total(rows: list[PoolSnapshot], pool: str, field: str = "requests") -> int:
    return sum(getattr(row, field) or 0 for row in rows if row.pool == pool)


@pytest.mark.django_db(transaction=True)
async def test_snapshot_rows_hold_each_interval_once(installed_registry, simulator):
    registry = installed_registry
    await registry.initialize()
    simulator.config.ttft_ms = 15
    sampler = SnapshotSampler(registry, interval_s=60, instance="test-host:1")
    sampler.recorder.attach(registry.events)
    try:
        tokens_out = 0
        for _ in range(3):
            async with registry.get_main_llm() as llm:
                tokens_out += (await llm.ainvoke(HELLO)).usage.completion_tokens
        async with registry.get_main_llm() as llm:
            stream = llm.astream(HELLO)
            await stream.text()
            tokens_out += stream.usage.completion_tokens
        first = {row.pool: row for row in await sampler.snapshot_once()}

        async with registry.get_mini_llm() as llm:
            await llm.ainvoke(HELLO)
        second = {row.pool: row for row in await sampler.snapshot_once()}
    finally:
        sampler.recorder.detach()

    assert set(first) == set(second) == {"main", "ronei", "mini"}
    main = first["main"]
    assert (main.instance, main.size, main.in_use, main.available) == ("test-host:1", 10, 0, 10)
    assert (main.requests, main.errors, main.overflow_requests) == (4, 0, 0)
    assert main.tokens_out == tokens_out > 0
    assert main.tokens_in > 0
    assert 0 <= main.wait_p50_ms <= main.wait_p95_ms <= main.wait_max_ms
    # Every call waited for the simulator's first token; only the streamed one has a TTFT.
    assert main.latency_p50_ms >= 15 and main.latency_p95_ms >= main.latency_p50_ms
    assert main.ttft_p50_ms == main.ttft_p95_ms and main.ttft_p50_ms >= 15
    assert main.counters["requests_num"] == 4
    assert first["mini"].requests == 0 and first["mini"].latency_p50_ms is None

    # The second row counts only what happened after the first.
    assert (second["main"].requests, second["mini"].requests) == (0, 1)
    assert second["main"].latency_p50_ms is None
    assert second["main"].counters["requests_num"] == 4  # cumulative counters go on
    assert second["main"].taken_at > main.taken_at
    assert await PoolSnapshot.objects.acount() == 6


@pytest.mark.django_db(transaction=True)
async def test_sampler_writes_at_its_interval_and_stops_cleanly(installed_registry, simulator):
    registry = installed_registry
    await registry.initialize()
    before = asyncio.all_tasks()
    sampler = SnapshotSampler(registry, interval_s=0.25, jitter=0.0)
    task = sampler.start()
    assert task.get_name() == "pool-snapshot-sampler"
    for _ in range(2):
        async with registry.get_main_llm() as llm:
            await llm.ainvoke(HELLO)
    rows = await _wait_rows(lambda rows: len({row.taken_at for row in rows}) >= 3)
    assert _total(rows, "main") == 2 and _total(rows, "ronei") == 0
    times = sorted({row.taken_at for row in rows})
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 0.2  # one row set per interval, never faster
    assert {row.instance for row in rows} == {sampler.instance}

    # A call after the last write is saved by stop() (the final interval is not lost).
    async with registry.get_ronei_llm() as llm:
        await llm.ainvoke(HELLO)
    await sampler.stop()
    assert task.done() and not task.cancelled() and task.exception() is None
    left = [
        t
        for t in asyncio.all_tasks() - before
        if not t.done() and "SnapshotSampler" in t.get_coro().__qualname__
    ]
    assert left == []
    assert _total(await _rows(), "ronei") == 1
    # Stopped means unsubscribed: later calls are not counted anywhere.
    async with registry.get_main_llm() as llm:
        await llm.ainvoke(HELLO)
    assert not sampler.recorder.active


@pytest.mark.django_db(transaction=True)
async def test_rows_keep_the_deployment_limit_the_peaks_and_the_429s(make_registry, simulator):
    # main: one slot, on gpt-4o with a limit of at most 10; mini on gpt-4o-mini.
    registry = make_registry(
        simulator,
        pools={"main": {"size": 1, "max_overflow": 0, "max_concurrency": 10}, "mini": {}},
    )
    await registry.initialize()
    sampler = SnapshotSampler(registry, interval_s=60, instance="test-host:1", peak_tick_s=0.02)
    sampler.start()
    limiter = registry.limiters["gpt-4o"]
    try:
        # A real 429, waited out: counted, and the limit comes down from its ceiling of 10.
        simulator.config.retry_after_s = 0.05
        simulator.config.next_429 = 1
        async with registry.get_main_llm() as llm:
            await llm.ainvoke(HELLO)

        async def call() -> None:
            async with registry.get_main_llm() as llm:
                await llm.ainvoke(HELLO)

        # The limit is full: the first call takes main's slot and queues at the deployment,
        # the second queues for the slot. Both are over before the row is taken.
        held = [await limiter.acquire(time.monotonic(), 5) for _ in range(limiter.limit)]
        calls = [asyncio.create_task(call())]
        while limiter.snapshot()["waiting"] < 1:
            await asyncio.sleep(0.005)
        calls.append(asyncio.create_task(call()))
        while registry.pools["main"].stats().waiting < 1:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)  # the sampler's loop looks at the queues meanwhile
        for permit in held:
            limiter.release(permit, Outcome.IGNORE)
        await asyncio.gather(*calls)
        # Another attempt answered 429, and the pause is still on when the row is taken.
        limiter.release(await limiter.acquire(time.monotonic(), 5), Outcome.DROP)
        limiter.pause(30, "429, Retry-After 30s")
        limit = registry.stats().pools["main"].concurrency.limit

        first = {row.pool: row for row in await sampler.snapshot_once()}
        second = {row.pool: row for row in await sampler.snapshot_once()}
    finally:
        await sampler.stop(flush=False)

    main = first["main"]
    assert (main.requests, main.rate_limited, main.errors) == (3, 1, 0)
    assert (main.concurrency_limit, main.limit_reason) == (limit, "429")
    assert limit < 10
    assert (main.deployment_in_flight, main.deployment_waiting) == (0, 0)
    assert 29 < main.paused_s <= 30
    # The moment is idle; the interval was not.
    assert (main.in_use, main.waiting) == (0, 0)
    assert (main.in_use_peak, main.waiting_peak, main.deployment_waiting_peak) == (1, 1, 1)
    assert main.counters["requests_rate_limited"] == 1

    mini = first["mini"]
    assert (mini.rate_limited, mini.limit_reason, mini.paused_s) == (0, "start", 0)
    assert mini.concurrency_limit == registry.stats().pools["mini"].concurrency.ceiling
    assert (mini.in_use_peak, mini.waiting_peak, mini.deployment_waiting_peak) == (0, 0, 0)

    # The next row counts the 429s since the first, and its peaks start over.
    again = second["main"]
    assert (again.rate_limited, again.concurrency_limit, again.limit_reason) == (0, limit, "429")
    assert (again.in_use_peak, again.waiting_peak, again.deployment_waiting_peak) == (0, 0, 0)
    saved = await PoolSnapshot.objects.aget(pk=main.pk)
    assert (saved.concurrency_limit, saved.limit_reason, saved.rate_limited) == (limit, "429", 1)


def _drop_table() -> None:
    with connection.schema_editor() as editor:
        editor.delete_model(PoolSnapshot)


def _create_table() -> None:
    with connection.schema_editor() as editor:
        editor.create_model(PoolSnapshot)


@pytest.mark.django_db(transaction=True)
async def test_sampler_survives_a_database_error(installed_registry, caplog):
    registry = installed_registry
    await registry.initialize()
    await sync_to_async(_drop_table)()
    sampler = SnapshotSampler(registry, interval_s=0.2, jitter=0.0)
    try:
        with caplog.at_level(logging.ERROR, logger="pools"):
            sampler.start()
            for _ in range(3):
                async with registry.get_main_llm() as llm:
                    await llm.ainvoke(HELLO)
            loop = asyncio.get_running_loop()
            end = loop.time() + 15
            while sampler.failures == 0:
                assert loop.time() < end, "the write never failed"
                await asyncio.sleep(0.05)
        # OperationalError on SQLite, ProgrammingError on PostgreSQL: either way, logged.
        assert "Could not save pool snapshots (" in caplog.text
        assert not sampler.task.done()  # the loop lives on
    finally:
        await sync_to_async(_create_table)()
    # The next interval writes, including the rows kept from the failed one.
    await _wait_rows(lambda rows: _total(rows, "main") == 3)
    assert sampler.cycles >= 1
    await sampler.stop()
    assert _total(await _rows(), "main") == 3


@pytest.mark.django_db(transaction=True)
async def test_lifespan_runs_the_sampler_between_startup_and_shutdown(installed_registry):
    app = PoolLifespan(lambda scope, receive, send: None)
    inbox: asyncio.Queue = asyncio.Queue()
    sent: list[str] = []

    async def send(message: dict) -> None:
        sent.append(message["type"])

    with override_settings(POOL_SNAPSHOT_INTERVAL=0.2, POOL_SNAPSHOT_JITTER=0):
        await inbox.put({"type": "lifespan.startup"})
        server = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
        while "lifespan.startup.complete" not in sent:
            await asyncio.sleep(0.01)
        sampler = app.sampler
        assert sampler is not None and sampler.interval_s == 0.2
        async with installed_registry.get_mini_llm() as llm:
            await llm.ainvoke(HELLO)
        await _wait_rows(lambda rows: _total(rows, "mini") == 1)
        await inbox.put({"type": "lifespan.shutdown"})
        await server
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert sampler.task.done() and app.sampler is None
    assert installed_registry.closed


@pytest.mark.django_db(transaction=True)
async def test_lifespan_leaves_the_sampler_off_when_the_interval_is_zero(installed_registry):
    app = PoolLifespan(lambda scope, receive, send: None)
    inbox: asyncio.Queue = asyncio.Queue()
    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        await inbox.put(message)

    async def send(message: dict) -> None:
        if message["type"] == "lifespan.startup.complete":
            assert app.sampler is None

    with override_settings(POOL_SNAPSHOT_INTERVAL=0):
        await app({"type": "lifespan"}, inbox.get, send)
    assert await PoolSnapshot.objects.acount() == 0
