"""Injected faults: errors, resets, stalls, stream faults, and settings changed live.

Timing asserts are lower bounds only: the machine may be slow, never impossibly fast.
"""

import asyncio
import json
import random
import re
from typing import Any

import httpx
import httpx2
import openai
import pytest

from pools.simulator import (
    LLMSimulator,
    SimulatorConfig,
    default_responder,
    tokenize,
)
from tests.pools.simulator.helpers import (
    MESSAGES,
    chat_request,
    limit_headers,
    payload,
    sdk,
    sse_events,
    sse_exchange,
)

# --- faults -----------------------------------------------------------------------------------


async def test_capacity_gives_429_with_rate_limit_headers(simulator_factory: Any) -> None:
    sim = await simulator_factory(capacity=1, tokens_per_second=20, retry_after_s=2.0)
    async with sdk(sim) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        await anext(aiter(stream))  # hold it open mid-stream
        assert sim.stats.in_flight == 1
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        headers = info.value.response.headers
        assert headers["retry-after"] == "2"
        assert headers["retry-after-ms"] == "2000"
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "2s"
        assert int(headers["x-ratelimit-limit-tokens"]) > 0
        assert int(headers["x-ratelimit-remaining-tokens"]) >= 0
        assert info.value.code == "rate_limit_exceeded"
        await stream.close()

        # The abandoned stream frees its slot promptly.
        for _ in range(300):
            if not sim.stats.in_flight:
                break
            await asyncio.sleep(0.01)
        assert sim.stats.in_flight == 0
        sim.config.tokens_per_second = 0
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES
        )
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 0
    assert sim.stats.status_counts == {200: 2, 429: 1}
    assert sim.stats.peak_in_flight == 1


async def test_error_rate_one_gives_500(simulator_factory: Any) -> None:
    sim = await simulator_factory(error_rate=1.0)
    async with sdk(sim) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 500
    assert sim.stats.status_counts == {500: 1}
    assert sim.stats.in_flight == 0


async def test_reset_breaks_the_stream_mid_way(simulator_factory: Any) -> None:
    sim = await simulator_factory(reset_rate=1.0, tokens_per_second=100)
    received = 0
    async with sdk(sim) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                received += 1
    assert received >= 1
    assert sim.stats.resets == 1
    assert sim.stats.connections_open == 0


async def test_stall_triggers_client_read_timeout(simulator_factory: Any) -> None:
    sim = await simulator_factory(stall_rate=1.0, stall_seconds=1.0)
    timeout = httpx2.Timeout(5.0, read=0.3)
    async with sdk(sim, timeout=timeout) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        with pytest.raises(openai.APITimeoutError):
            async for _ in stream:
                pass
    assert sim.stats.stalls == 2


async def test_fault_draws_are_reproducible(simulator_factory: Any) -> None:
    async def outcomes(sim: LLMSimulator) -> list[int]:
        codes = []
        async with httpx.AsyncClient(base_url=sim.base_url) as http:
            for _ in range(12):
                body = {"model": "gpt-4o", "messages": MESSAGES}
                codes.append((await http.post("/chat/completions", json=body)).status_code)
        return codes

    first = await outcomes(await simulator_factory(error_rate=0.5, seed=7))
    second = await outcomes(await simulator_factory(error_rate=0.5, seed=7))
    assert first == second
    assert {200, 500} == set(first)


async def test_stream_fault_draws_are_reproducible_and_keep_the_old_sequence(
    simulator_factory: Any,
) -> None:
    async def outcomes(**config: Any) -> list[tuple[int, str | None]]:
        sim = await simulator_factory(seed=7, **config)
        results = []
        async with httpx.AsyncClient(base_url=sim.base_url) as http:
            for _ in range(12):
                response = await http.post("/chat/completions", json=payload())
                finish = None
                if response.status_code == 200:
                    finish = response.json()["choices"][0]["finish_reason"]
                results.append((response.status_code, finish))
        return results

    # The original three draws per request are untouched: the 500s fall where they always did.
    rng = random.Random(7)
    expected = []
    for _ in range(12):
        error_roll, _reset, _stall = rng.random(), rng.random(), rng.random()
        expected.append(500 if error_roll < 0.5 else 200)
    assert [status for status, _ in await outcomes(error_rate=0.5)] == expected
    with_cuts = await outcomes(error_rate=0.5, length_rate=0.5)
    assert [status for status, _ in with_cuts] == expected
    assert with_cuts == await outcomes(error_rate=0.5, length_rate=0.5)
    assert {finish for status, finish in with_cuts if status == 200} == {"stop", "length"}


# --- stream faults ----------------------------------------------------------------------------


async def test_truncated_stream_ends_cleanly_without_finish_or_done(
    simulator_factory: Any,
) -> None:
    sim = await simulator_factory(truncate_rate=1.0)
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        response, raw = await sse_exchange(http, stream_options={"include_usage": True})
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"  # and its terminator came
        events = sse_events(raw)
        assert len(events) == 3
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(e["choices"][0]["finish_reason"] is None for e in events)
        assert all(e["usage"] is None for e in events)  # no usage chunk
        assert b"[DONE]" not in raw

        # The SDK sees a stream that simply stops, with no finish_reason.
        async with sdk(sim) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True
            )
            chunks = [chunk async for chunk in stream]
        assert chunks and chunks[-1].choices[0].finish_reason is None

        sim.apply_faults({"truncate_rate": 0})
        _, raw = await sse_exchange(http)
        assert raw.endswith(b"data: [DONE]\n\n")
    assert sim.stats.truncations == 2
    assert sim.stats.connections_accepted == 2  # httpx reused its connection; the SDK had one


async def test_malformed_stream_sends_one_broken_event(simulator_factory: Any) -> None:
    sim = await simulator_factory(malformed_rate=1.0)
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        response, raw = await sse_exchange(http)
        assert response.status_code == 200
        assert re.fullmatch(rb'data: \{"id":"chatcmpl-[0-9a-f]{24}","object":"chat\.comp\n\n', raw)
        with pytest.raises(json.JSONDecodeError):
            json.loads(raw.removeprefix(b"data: "))
        sim.apply_faults({"malformed_rate": 0})
        _, raw = await sse_exchange(http)
        assert sse_events(raw)[-1] == "[DONE]"
    assert sim.stats.malformed == 1
    assert sim.stats.connections_accepted == 1


async def test_empty_answer(simulator_factory: Any) -> None:
    sim = await simulator_factory(empty_rate=1.0)
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        _, raw = await sse_exchange(http, stream_options={"include_usage": True})
        role, final, usage, done = sse_events(raw)
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert role["choices"][0]["finish_reason"] is None
        assert final["choices"][0]["delta"] == {}
        assert final["choices"][0]["finish_reason"] == "stop"
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 0
        assert done == "[DONE]"
        whole = (await http.post("/chat/completions", json=payload())).json()
    assert whole["choices"][0]["message"]["content"] == ""
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == 0
    assert sim.stats.empties == 2


@pytest.mark.parametrize(
    ("rate", "finish_reason", "divisor"),
    [("length_rate", "length", 2), ("content_filter_rate", "content_filter", 3)],
)
async def test_cut_answers(
    simulator_factory: Any, rate: str, finish_reason: str, divisor: int
) -> None:
    sim = await simulator_factory(**{rate: 1.0})
    full = tokenize(default_responder(chat_request()))
    kept = full[: len(full) // divisor]
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        whole = (await http.post("/chat/completions", json=payload())).json()
        _, raw = await sse_exchange(http)
    choice = whole["choices"][0]
    assert choice["message"]["content"] == "".join(kept)
    assert choice["finish_reason"] == finish_reason
    assert whole["usage"]["completion_tokens"] == len(kept)
    assert "content_filter_results" not in choice  # Azure's field, not OpenAI's

    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "".join(kept)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, finish_reason]

    async with httpx.AsyncClient(base_url=sim.root_url) as http:
        on_azure = await http.post(
            "/openai/deployments/gpt-4o/chat/completions",
            params={"api-version": "2024-10-21"},
            json={"messages": MESSAGES},
        )
    azure_choice = on_azure.json()["choices"][0]
    assert azure_choice["finish_reason"] == finish_reason
    if finish_reason == "content_filter":
        assert azure_choice["content_filter_results"]["violence"]["filtered"] is True


async def test_no_usage(simulator_factory: Any) -> None:
    sim = await simulator_factory(no_usage=1)
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        _, raw = await sse_exchange(http, stream_options={"include_usage": True})
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        assert all("usage" not in e for e in events[:-1])
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
    async with sdk(sim) as client:
        result = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert result.usage is None
    assert result.choices[0].message.content


# --- live settings ----------------------------------------------------------------------------


async def test_new_settings_change_live_through_the_control_endpoint(
    simulator: LLMSimulator,
) -> None:
    changes = {
        "retry_after_mode": "ms",
        "ratelimit_headers": "none",
        "next_429": 1,
        "fault_model": "gpt-4o",
        "retry_after_s": 40,
        "quota_rpm": 5,
        "no_usage": True,
        "keepalive_timeout_s": 5,
    }
    async with httpx.AsyncClient(base_url=simulator.root_url) as control:
        answer = await control.post("/_simulator/faults", json=changes)
        assert answer.status_code == 200
        settings = answer.json()
        assert {key: settings[key] for key in changes} == {**changes, "no_usage": 1}
        assert (await control.get("/_simulator/faults")).json() == settings
        async with httpx.AsyncClient(base_url=simulator.base_url) as http:
            refused = await http.post("/chat/completions", json=payload())
            served = await http.post("/chat/completions", json=payload())
        stats = (await control.get("/_simulator/stats")).json()
    assert refused.status_code == 429
    assert {k for k in refused.headers if k.startswith("retry-after")} == {"retry-after-ms"}
    assert refused.headers["retry-after-ms"] == "40000"
    assert limit_headers(refused) == limit_headers(served) == {}
    assert served.status_code == 200 and served.json()["usage"] is None
    assert stats["rate_limited"] == 1 and stats["status_counts"] == {"200": 1, "429": 1}
    assert simulator.config.next_429 == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"retry_after_mode": "sometimes"},
         'retry_after_mode must be one of both, seconds, ms, date, none; got "sometimes"'),
        ({"ratelimit_headers": 1}, "ratelimit_headers must be one of real, none, negative"),
        ({"no_usage": 2}, "no_usage must be 0 or 1, got 2"),
        ({"quota_window_s": 0}, "quota_window_s must be greater than 0"),
        ({"fault_model": 3}, "fault_model must be a string, got 3"),
        ({"truncate_rate": 1.5}, "truncate_rate is a fraction and must be between 0 and 1"),
        ({"quota_rpm": 2.5}, "quota_rpm must be a whole number, got 2.5"),
        ({"keepalive_timeout_s": -1}, "keepalive_timeout_s must be a finite number >= 0"),
        ({"next_429": "3"}, 'next_429 must be a number, got "3"'),
    ],
)  # fmt: skip
async def test_bad_live_settings_are_refused_with_a_clear_message(
    simulator: LLMSimulator, change: dict[str, Any], message: str
) -> None:
    async with httpx.AsyncClient(base_url=simulator.root_url) as http:
        response = await http.post("/_simulator/faults", json={"empty_rate": 1, **change})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert simulator.config.empty_rate == 0.0  # nothing applied from a rejected update
    with pytest.raises(ValueError, match=re.escape(message)):
        simulator.apply_faults(change)


def test_bad_choice_in_a_config_fails_early() -> None:
    with pytest.raises(ValueError, match="retry_after_mode must be one of"):
        LLMSimulator(SimulatorConfig(retry_after_mode="soon"))
