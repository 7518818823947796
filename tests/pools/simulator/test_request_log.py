"""The request log at GET /_simulator/requests: what a test in another process reads."""

import time
from typing import Any

import httpx
import httpx2
import openai
import pytest

from pools.simulator import (
    LLMSimulator,
    SimulatorConfig,
)
from tests.pools.simulator.helpers import (
    MESSAGES,
    OTHER_MESSAGES,
    TRACEPARENT,
    azure,
    logged,
    payload,
    sdk,
    wait_for,
)

# --- request log ------------------------------------------------------------------------------


async def test_request_log_records_each_call_in_order(simulator_factory: Any) -> None:
    sim = await simulator_factory(request_log=5)
    started = time.time()
    async with sdk(sim) as client:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=OTHER_MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"traceparent": TRACEPARENT},
        )
        assert [chunk async for chunk in stream]
    async with azure(sim) as client:
        stream = await client.chat.completions.create(
            model="my-gpt4o", messages=MESSAGES, stream=True
        )
        assert [chunk async for chunk in stream]

    log = await logged(sim)
    assert log["enabled"] is True and log["dropped"] == 0
    entries = log["requests"]
    assert [
        (e["seq"], e["model"], e["deployment"], e["stream"], e["messages"], e["traceparent"])
        for e in entries
    ] == [
        (1, "gpt-4o", None, False, MESSAGES, None),
        (2, "gpt-4o-mini", None, True, OTHER_MESSAGES, TRACEPARENT),
        (3, "my-gpt4o", "my-gpt4o", True, MESSAGES, None),
    ]
    assert all(e["status"] == 200 and e["outcome"] == "completed" for e in entries)
    arrivals = [e["at"] for e in entries]
    assert started <= arrivals[0] <= arrivals[1] <= arrivals[2] <= time.time()
    assert sim.requests_log() == entries  # the same log, in process
    assert sim.stats.requests_total == 3  # reading the log is not counted as a request


async def test_request_log_records_refusals_and_cut_answers(simulator_factory: Any) -> None:
    sim = await simulator_factory(request_log=10, next_429=1, retry_after_s=0)
    async with sdk(sim) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="gpt-4o", messages=[])

        sim.apply_faults({"reset_rate": 1.0})
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                pass

        sim.apply_faults({"reset_rate": 0.0, "truncate_rate": 1.0})
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        assert [chunk async for chunk in stream]  # ends cleanly, but without [DONE]

        # A client that gives up before the answer starts.
        sim.apply_faults({"truncate_rate": 0.0, "ttft_ms": 5000})
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, timeout=httpx2.Timeout(5.0, read=0.2)
            )
    await wait_for(lambda: all(e["outcome"] for e in sim.requests_log()))

    entries = (await logged(sim))["requests"]
    assert [(e["seq"], e["status"], e["outcome"]) for e in entries] == [
        (1, 429, "refused"),
        (2, 400, "refused"),
        (3, 200, "cut"),  # reset mid-stream
        (4, 200, "cut"),  # truncated
        (5, None, "cut"),  # the client went away before any answer
    ]
    # A body that was refused before it validated still names what is known of it.
    assert entries[1]["model"] is None and entries[1]["messages"] is None
    assert entries[0]["model"] == "gpt-4o" and entries[0]["messages"] == MESSAGES


async def test_request_log_is_bounded_and_read_since_a_seq(simulator_factory: Any) -> None:
    sim = await simulator_factory(request_log=2)
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        for model in ("gpt-4o", "gpt-4o-mini", "gpt-4o"):
            response = await http.post("/chat/completions", json=payload(model=model))
            assert response.status_code == 200

    log = await logged(sim)
    assert [(e["seq"], e["model"]) for e in log["requests"]] == [(2, "gpt-4o-mini"), (3, "gpt-4o")]
    assert log["dropped"] == 1
    assert [e["seq"] for e in (await logged(sim, since=2))["requests"]] == [3]
    assert (await logged(sim, since=3))["requests"] == []
    assert [e["seq"] for e in sim.requests_log(since=2)] == [3]
    assert sim.requests_dropped == 1

    async with httpx.AsyncClient(base_url=sim.root_url) as http:
        bad = await http.get("/_simulator/requests", params={"since": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
        assert (await http.post("/_simulator/reset")).status_code == 200
    assert await logged(sim) == {"enabled": True, "requests": [], "dropped": 0}

    # seq keeps counting after a reset, so `since` never sees a number twice.
    async with sdk(sim) as client:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert [e["seq"] for e in (await logged(sim))["requests"]] == [4]


async def test_request_log_is_off_by_default(simulator: LLMSimulator) -> None:
    async with sdk(simulator) as client:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert await logged(simulator) == {"enabled": False, "requests": [], "dropped": 0}
    assert simulator.requests_log() == []
    async with httpx.AsyncClient(base_url=simulator.root_url) as http:
        unknown = await http.get("/_simulator/nothing")
    assert unknown.status_code == 404
    assert "/_simulator/requests" in unknown.json()["error"]["message"]


def test_bad_request_log_size_fails_early() -> None:
    with pytest.raises(ValueError, match="request_log"):
        LLMSimulator(SimulatorConfig(request_log=-1))
