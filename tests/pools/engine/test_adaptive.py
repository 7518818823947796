"""The deployment limiter: the 429 pause, the learned concurrency limit, FIFO admission."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pools.engine.adaptive import DeploymentLimiter, LimitSettings, Outcome
from pools.engine.exceptions import RateLimited
from tests.helpers.waiting import eventually


def limiter(**settings) -> DeploymentLimiter:
    return DeploymentLimiter("gpt-4o", LimitSettings(**{"ceiling": 8, **settings}))


async def test_a_healthy_deployment_admits_up_to_the_ceiling_without_waiting():
    gate = limiter()
    permits = [await asyncio.wait_for(gate.acquire(time.monotonic(), 5), 1) for _ in range(8)]
    assert gate.snapshot()["in_flight"] == 8 and gate.limit == 8
    waiting = asyncio.create_task(gate.acquire(time.monotonic(), 5))
    await eventually(lambda: gate.snapshot()["waiting"] == 1, what="the ninth caller waits")
    assert not waiting.done()
    gate.release(permits[0], Outcome.SUCCESS)
    permits[0] = await asyncio.wait_for(waiting, 1)
    for permit in permits:
        gate.release(permit, Outcome.SUCCESS)
    assert gate.snapshot()["in_flight"] == 0


async def test_a_burst_of_429s_measures_the_capacity_and_the_limit_settles_on_it():
    now = [100.0]
    gate = DeploymentLimiter(
        "gpt-4o",
        LimitSettings(ceiling=20, backoff_ratio=0.7, probe_interval_s=1, probe_interval_max_s=8),
        clock=lambda: now[0],
    )
    burst = [await gate.acquire(now[0], 5) for _ in range(12)]
    now[0] += 0.1
    for permit in burst[:4]:  # 12 sent at once, 4 refused: the endpoint takes 8
        gate.release(permit, Outcome.DROP)
    # 12 x 0.7 at the first refusal; the later ones of the round find fewer in flight each,
    # and after the last what is left in flight (8) is what the endpoint takes.
    assert gate.limit == 8
    assert gate.snapshot()["refused_at"] == 9 and gate.snapshot()["decreases"] == 1
    for permit in burst[4:]:
        gate.release(permit, Outcome.SUCCESS)

    async def round_trip(outcome: Outcome = Outcome.SUCCESS) -> None:
        permits = [await gate.acquire(now[0], 5) for _ in range(gate.limit)]
        now[0] += 0.01
        for permit in permits:
            gate.release(permit, outcome)

    for _ in range(5):
        await round_trip()
    assert gate.limit == 8  # back fast to just below what was refused, and it stays there
    now[0] += 1.1
    await round_trip()  # a probe: one step above, now and then
    assert gate.limit == 9
    permits = [await gate.acquire(now[0], 5) for _ in range(9)]
    now[0] += 0.01
    gate.release(permits[0], Outcome.DROP)  # refused again at 9: the next probe waits longer
    for permit in permits[1:]:
        gate.release(permit, Outcome.SUCCESS)
    for _ in range(5):
        await round_trip()
    assert gate.limit == 8
    now[0] += 1.0
    await round_trip()
    assert gate.limit == 8  # the probe interval doubled to 2 s
    now[0] += 1.0
    await round_trip()
    assert gate.limit == 9
    await round_trip()  # 9 ran unrefused: capacity came back, the remembered level is gone
    assert gate.snapshot()["refused_at"] is None


async def drop_with(gate: DeploymentLimiter, in_flight: int) -> None:
    """A 429 while `in_flight` calls run (the others then end without a verdict)."""
    permits = [await gate.acquire(time.monotonic(), 5) for _ in range(in_flight)]
    gate.release(permits[0], Outcome.DROP)
    for permit in permits[1:]:
        gate.release(permit, Outcome.IGNORE)


async def test_the_limit_climbs_back_while_calls_succeed_with_it_in_use():
    gate = limiter(ceiling=8, backoff_ratio=0.5, probe_interval_s=0)
    await drop_with(gate, 8)
    assert gate.limit == 4
    for _ in range(60):
        permits = [await gate.acquire(time.monotonic(), 5) for _ in range(gate.limit)]
        for permit in permits:
            gate.release(permit, Outcome.SUCCESS)
    assert gate.limit == 8  # back at the ceiling, never above it
    assert gate.snapshot()["last_change"]["reason"] == "recovering"


async def test_an_idle_deployment_does_not_grow_its_limit():
    gate = limiter(ceiling=100, backoff_ratio=0.1)
    await drop_with(gate, 100)
    assert gate.limit == 10
    for _ in range(50):  # one call at a time: the limit of 10 is never in use
        gate.release(await gate.acquire(time.monotonic(), 5), Outcome.SUCCESS)
    assert gate.limit == 10


async def test_a_429_pauses_dispatch_and_callers_wait_it_out_in_order():
    gate = limiter(ceiling=1)  # one at a time, so the order of the grants shows
    gate.pause(0.2, "429, Retry-After 0.2s")
    order: list[str] = []

    async def call(name: str, ticket: float) -> None:
        permit = await gate.acquire(ticket, 5)
        order.append(name)
        gate.release(permit, Outcome.SUCCESS)

    started = time.monotonic()
    await asyncio.gather(call("late", started + 1), call("retry", started - 1))
    assert time.monotonic() - started >= 0.2  # nothing went out during the pause
    assert order == ["retry", "late"]  # a retry keeps its place: first come, first served


async def test_a_pause_longer_than_the_deadline_fails_at_once_and_says_why():
    gate = limiter()
    gate.pause(40, "429, Retry-After 40s")
    with pytest.raises(RateLimited) as caught:
        # Fail-safe only: it must not wait at all for what cannot fit in 12 s.
        await asyncio.wait_for(gate.acquire(time.monotonic(), 12), 5)
    assert gate.snapshot()["waiting"] == 0
    message = str(caught.value)
    assert "asked to wait 40.0s (429, Retry-After 40s)" in message
    assert "total deadline leaves 12.0s" in message
    assert caught.value.retry_after == pytest.approx(40, abs=0.5)


async def test_a_429_without_retry_after_pauses_with_jittered_backoff_growing():
    gate = limiter(pause_backoff_base=0.5, pause_backoff_max=8)
    pauses = []
    for _ in range(6):
        gate.release(await gate.acquire(time.monotonic(), 60), Outcome.DROP)
        pauses.append(gate.pause(None, "429 without Retry-After"))
        gate._paused_until = 0  # the next attempt goes now, for the test
    assert 0.25 <= pauses[0] <= 0.5 and 0.5 <= pauses[1] <= 1.0
    assert pauses[-1] <= 8
    assert gate.pause(0, "429, Retry-After 0s") == 0 and gate.paused_for() == 0  # 0 is now


async def test_queued_past_the_deadline_behind_the_limit_names_the_limit():
    gate = limiter(ceiling=1)
    held = await gate.acquire(time.monotonic(), 5)
    with pytest.raises(RateLimited, match="at its concurrency limit of 1 calls"):
        await gate.acquire(time.monotonic(), 0.05)
    gate.release(held, Outcome.SUCCESS)
    assert gate.snapshot() | {"last_change": None} == gate.snapshot() | {
        "in_flight": 0,
        "waiting": 0,
        "last_change": None,
    }


async def test_a_cancelled_waiter_leaves_no_trace_and_loses_no_permit():
    gate = limiter(ceiling=1)
    held = await gate.acquire(time.monotonic(), 5)
    waiter = asyncio.create_task(gate.acquire(time.monotonic(), 5))
    await eventually(lambda: gate.snapshot()["waiting"] == 1, what="the waiter waits")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.release(held, Outcome.IGNORE)
    assert gate.snapshot()["waiting"] == 0 and gate.snapshot()["in_flight"] == 0
    gate.release(await asyncio.wait_for(gate.acquire(time.monotonic(), 5), 1), Outcome.IGNORE)


async def test_a_pool_without_the_adaptive_limit_obeys_the_pause_only():
    gate = limiter(ceiling=1)
    held = await gate.acquire(time.monotonic(), 5)
    fixed = await asyncio.wait_for(gate.acquire(time.monotonic(), 5, counted=False), 1)
    gate.release(fixed, Outcome.SUCCESS)
    gate.pause(0.1, "429")
    started = time.monotonic()
    gate.release(await gate.acquire(time.monotonic(), 5, counted=False), Outcome.SUCCESS)
    assert time.monotonic() - started >= 0.1
    gate.release(held, Outcome.SUCCESS)


async def test_first_tokens_well_above_their_best_bring_the_limit_down():
    gate = limiter(ceiling=40, latency_tolerance=2.0)
    for _ in range(5):  # the best first token: 100 ms
        gate.release(await gate.acquire(time.monotonic(), 5), Outcome.SUCCESS, ttft_s=0.1)
    assert gate.limit == 40
    for _ in range(10):  # the endpoint slows down under load: 500 ms
        gate.release(await gate.acquire(time.monotonic(), 5), Outcome.SUCCESS, ttft_s=0.5)
    assert gate.limit < 40
    assert gate.snapshot()["last_change"]["reason"] == "latency"
    assert gate.snapshot()["ttft_best_ms"] == 100.0


async def test_ratelimit_headers_running_low_bring_the_limit_down_and_garbage_is_ignored():
    gate = limiter(ceiling=40, low_remaining_ratio=0.5)
    unknown = [
        {"x-ratelimit-limit-requests": "-1", "x-ratelimit-remaining-requests": "-1"},
        {"x-ratelimit-limit-requests": "0", "x-ratelimit-remaining-requests": "0"},
        {"x-ratelimit-remaining-requests": "1"},  # no limit to compare with
        {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "500"},
    ]
    for headers in unknown:
        gate.release(await gate.acquire(time.monotonic(), 5), Outcome.SUCCESS, headers=headers)
    assert gate.limit == 40
    low = {"x-ratelimit-limit-tokens": "150000", "x-ratelimit-remaining-tokens": "2000"}
    gate.release(await gate.acquire(time.monotonic(), 5), Outcome.SUCCESS, headers=low)
    assert gate.limit == 20
    assert gate.snapshot()["last_change"]["reason"] == "tokens running low"


def test_permits_are_shared_by_every_event_loop_of_the_process():
    gate = limiter(ceiling=1)

    async def hold_then_release(seconds: float) -> float:
        started = time.monotonic()
        permit = await gate.acquire(started, 5)
        await asyncio.sleep(seconds)
        gate.release(permit, Outcome.SUCCESS)
        return time.monotonic() - started

    results: list[float] = []
    first = threading.Thread(target=lambda: results.append(asyncio.run(hold_then_release(0.2))))
    first.start()
    time.sleep(0.05)
    waited = asyncio.run(hold_then_release(0))
    first.join()
    assert waited >= 0.1  # the second loop's caller waited for the first loop's permit


async def test_above_the_refused_level_it_never_steps_up_while_the_endpoint_says_it_is_full():
    now = [100.0]
    gate = DeploymentLimiter(
        "gpt-4o", LimitSettings(ceiling=20, backoff_ratio=0.7), clock=lambda: now[0]
    )
    burst = [await gate.acquire(now[0], 5) for _ in range(10)]
    now[0] += 0.1
    for permit in burst[:2]:
        gate.release(permit, Outcome.DROP)
    for permit in burst[2:]:
        gate.release(permit, Outcome.SUCCESS)
    assert gate.limit == 8

    def headers(remaining: int) -> dict[str, str]:
        return {"x-ratelimit-limit-requests": "8", "x-ratelimit-remaining-requests": str(remaining)}

    async def round_trip(remaining: int) -> None:
        permits = [await gate.acquire(now[0], 5) for _ in range(gate.limit)]
        now[0] += 10  # long past any probe interval
        for permit in permits:
            gate.release(permit, Outcome.SUCCESS, headers=headers(remaining))

    await round_trip(remaining=0)
    assert gate.limit == 8  # full: no step above, however long it has been
    await round_trip(remaining=4)
    assert gate.limit > 8  # room again: the next step goes, in case capacity came back
