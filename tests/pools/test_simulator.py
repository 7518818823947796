"""The offline LLM simulator, exercised through the real OpenAI SDK and raw sockets.

Timing asserts are lower bounds only: the machine may be slow, never impossibly fast.
"""

import asyncio
import contextlib
import email.utils
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from django.core.management.base import CommandError
from pydantic import BaseModel

from pools.management.commands.llm_simulator import Command as LLMSimulatorCommand
from pools.simulator import (
    ChatRequest,
    LLMSimulator,
    SimulatorConfig,
    count_prompt_tokens,
    default_responder,
    tokenize,
)
from pools.simulator.server import QUOTA_DEFAULT_MAX_TOKENS

MESSAGES = [
    {"role": "system", "content": "You are a cloud architect."},
    {"role": "user", "content": "Design a resilient payments platform on Kubernetes."},
]
REPO = Path(__file__).resolve().parents[2]


def sdk(sim: LLMSimulator, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0, **kwargs)


def azure(sim: LLMSimulator, **kwargs: Any) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=sim.root_url,
        api_key="x",
        api_version="2024-10-21",
        max_retries=0,
        **kwargs,
    )


def chat_request(**overrides: Any) -> ChatRequest:
    fields: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "temperature": None,
        "max_tokens": None,
        "stream": False,
        "include_usage": False,
        "response_format": None,
        "deployment": None,
        "body": {},
    }
    fields.update(overrides)
    return ChatRequest(**fields)


def payload(**overrides: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": MESSAGES, **overrides}


async def sse_exchange(http: httpx.AsyncClient, **overrides: Any) -> tuple[httpx.Response, bytes]:
    """POST a streamed chat request and return the response with its raw body, as sent."""
    async with http.stream(
        "POST", "/chat/completions", json=payload(stream=True, **overrides)
    ) as r:
        raw = await r.aread()
    return r, raw


def sse_events(raw: bytes) -> list[Any]:
    """Every event of an SSE body: the parsed JSON of each `data:` line, or "[DONE]"."""
    events: list[Any] = []
    for block in raw.split(b"\n\n"):
        if block:
            assert block.startswith(b"data: "), block
            data = block.removeprefix(b"data: ")
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def limit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    """Poll a condition the server reaches on its own (no event to wait on)."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def raw_exchange(sim: LLMSimulator, payload: bytes) -> bytes:
    """Send bytes on a fresh socket and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


# --- responder and tokenisation -------------------------------------------------------------


def test_tokenize_round_trips_and_keeps_leading_space() -> None:
    text = "Hello, world!  Two spaces\nand a newline. "
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert tokens[:4] == ["Hello", ",", " world", "!"]


def test_default_responder_is_deterministic_and_echoes_the_request() -> None:
    first = default_responder(chat_request())
    assert first == default_responder(chat_request())
    assert "payments" in first or "Kubernetes" in first
    other = default_responder(chat_request(messages=[{"role": "user", "content": "Serverless?"}]))
    assert other != first


def test_default_responder_returns_json_when_asked() -> None:
    text = default_responder(chat_request(response_format={"type": "json_object"}))
    assert isinstance(json.loads(text)["answer"], str)
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "components": {"type": "array", "items": {"$ref": "#/$defs/C"}},
            "tier": {"enum": ["small", "large"]},
        },
        "$defs": {"C": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    data = json.loads(default_responder(chat_request(response_format=fmt)))
    assert set(data) == {"title", "components", "tier"}
    assert data["tier"] in ("small", "large")
    assert all(isinstance(c["name"], str) for c in data["components"])


# --- OpenAI surface ---------------------------------------------------------------------------


async def test_non_streaming_completion_with_usage(simulator: LLMSimulator) -> None:
    async with sdk(simulator) as client:
        result = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    content = result.choices[0].message.content
    assert result.object == "chat.completion"
    assert result.model == "gpt-4o"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason == "stop"
    assert content
    assert result.usage is not None
    assert result.usage.completion_tokens == len(tokenize(content))
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert simulator.stats.chat_requests == 1
    assert simulator.stats.status_counts == {200: 1}


async def test_max_tokens_truncates_with_length(simulator: LLMSimulator) -> None:
    async with sdk(simulator) as client:
        result = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=4
        )
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 4


async def test_structured_output_parses(simulator: LLMSimulator) -> None:
    class Plan(BaseModel):
        summary: str
        services: list[str]
        replicas: int

    async with sdk(simulator) as client:
        result = await client.chat.completions.parse(
            model="gpt-4o", messages=MESSAGES, response_format=Plan
        )
    plan = result.choices[0].message.parsed
    assert isinstance(plan, Plan)
    assert plan.summary and plan.services


async def test_streaming_with_usage(simulator: LLMSimulator) -> None:
    async with sdk(simulator) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    content_chunks = [c for c in chunks if c.choices]
    assert len(content_chunks) > 3
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == default_responder(chat_request())


async def test_stream_is_paced(simulator_factory: Any) -> None:
    sim = await simulator_factory(ttft_ms=200, tokens_per_second=50)
    async with sdk(sim) as client:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=6
        )
        arrivals = [time.monotonic() - started async for _ in stream]
    assert len(arrivals) == 6
    assert arrivals[0] >= 0.18
    # Five more tokens at 50/s: the last cannot be sent before ~0.2 + 0.1 s.
    assert arrivals[-1] >= 0.28


async def test_azure_path(simulator: LLMSimulator) -> None:
    async with azure(simulator) as client:
        result = await client.chat.completions.create(model="my-gpt4o", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="my-gpt4o", messages=MESSAGES, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert result.model == "my-gpt4o"
    assert result.choices[0].message.content
    assert chunks and chunks[-1].choices[0].finish_reason == "stop"


async def test_azure_requires_api_version(simulator: LLMSimulator) -> None:
    async with httpx.AsyncClient(base_url=simulator.root_url) as http:
        response = await http.post(
            "/openai/deployments/gpt-4o/chat/completions", json={"messages": MESSAGES}
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "api-version"


async def test_models_list(simulator_factory: Any) -> None:
    default = await simulator_factory()
    async with sdk(default) as client:
        assert [m.id async for m in client.models.list()] == ["gpt-4o", "gpt-4o-mini"]
    configured = await simulator_factory(deployments=("main", "mini"))
    async with azure(configured) as client:
        assert [m.id async for m in client.models.list()] == ["main", "mini"]


async def test_api_key_required(simulator_factory: Any) -> None:
    sim = await simulator_factory(api_key="sk-right")
    async with sdk(sim) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    good = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-right", max_retries=0)
    async with good:
        assert (await good.chat.completions.create(model="gpt-4o", messages=MESSAGES)).choices
    good_azure = openai.AsyncAzureOpenAI(
        azure_endpoint=sim.root_url, api_key="sk-right", api_version="2024-10-21", max_retries=0
    )
    async with good_azure:
        assert (await good_azure.chat.completions.create(model="d", messages=MESSAGES)).choices


async def test_unknown_deployment_is_404(simulator_factory: Any) -> None:
    sim = await simulator_factory(deployments=("gpt-4o",))
    async with azure(sim) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="nope", messages=MESSAGES)
        assert info.value.code == "DeploymentNotFound"
        assert (await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).choices
    async with sdk(sim) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=MESSAGES)


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


# --- defaults ---------------------------------------------------------------------------------


async def test_default_settings_send_what_they_always_sent(simulator: LLMSimulator) -> None:
    assert simulator.fault_settings() == {
        "error_rate": 0.0,
        "reset_rate": 0.0,
        "stall_rate": 0.0,
        "stall_seconds": 30.0,
        "capacity": 0,
        "ttft_ms": 0.0,
        "tokens_per_second": 0.0,
        "rtt_ms": 0.0,
        "retry_after_s": 1.0,
        "quota_rpm": 0,
        "quota_tpm": 0,
        "quota_window_s": 60.0,
        "ttft_per_request_ms": 0.0,
        "retry_after_mode": "both",
        "ratelimit_headers": "real",
        "next_429": 0,
        "fault_model": "",
        "truncate_rate": 0.0,
        "malformed_rate": 0.0,
        "empty_rate": 0.0,
        "length_rate": 0.0,
        "content_filter_rate": 0.0,
        "no_usage": 0,
        "keepalive_timeout_s": 120.0,
    }
    prompt = count_prompt_tokens(MESSAGES)
    async with httpx.AsyncClient(base_url=simulator.base_url) as http:
        response = await http.post("/chat/completions", json=payload())
        assert list(response.headers) == [
            "date",
            "server",
            "x-request-id",
            "content-type",
            "content-length",
            "openai-processing-ms",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ]
        assert limit_headers(response) == {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",  # this request is in flight
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "300000000",
            "x-ratelimit-remaining-tokens": str(300_000_000 - prompt - 256),
            "x-ratelimit-reset-tokens": "1s",
        }
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
        assert response.json()["usage"]["completion_tokens"] == len(
            tokenize(choice["message"]["content"])
        )

        _, raw = await sse_exchange(http, stream_options={"include_usage": True})
        events = sse_events(raw)
        assert raw.endswith(b"data: [DONE]\n\n") and events[-1] == "[DONE]"
        content, usage = events[:-2], events[-2]
        assert all(e["usage"] is None for e in content)
        assert [e["choices"][0]["finish_reason"] for e in content] == [None] * (
            len(content) - 1
        ) + ["stop"]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(content)

        _, raw = await sse_exchange(http)
        assert all("usage" not in e for e in sse_events(raw)[:-1])
        models = await http.get("/models")
        assert models.headers["x-ratelimit-remaining-requests"] == "10000"
    stats = simulator.stats.as_dict()
    assert json.loads(json.dumps(stats)) == stats
    for name in ("rate_limited", "quota_rejections", "truncations", "malformed", "empties"):
        assert stats[name] == 0
    assert stats["idle_closes"] == 0


# --- quotas, 429s and rate-limit headers ------------------------------------------------------


async def test_quota_rpm_is_per_key_and_model_with_the_exact_wait(simulator_factory: Any) -> None:
    window = 0.8
    sim = await simulator_factory(quota_rpm=3, quota_window_s=window)
    one = httpx.AsyncClient(base_url=sim.base_url, headers={"authorization": "Bearer key-one"})
    two = httpx.AsyncClient(base_url=sim.base_url, headers={"authorization": "Bearer key-two"})
    async with one, two:
        before_first = time.monotonic()
        first = await one.post("/chat/completions", json=payload())
        after_first = time.monotonic()
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "3"
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        reset = first.headers["x-ratelimit-reset-requests"]  # until the oldest entry leaves
        assert re.fullmatch(r"\d+ms", reset) and 0 < int(reset[:-2]) <= 800
        # Every API request counts: a models list (against each of the key's models) ...
        listed = await one.get("/models")
        assert listed.status_code == 200
        assert listed.headers["x-ratelimit-remaining-requests"] == "1"
        # ... and a model lookup.
        looked_up = await one.get("/models/gpt-4o")
        assert looked_up.headers["x-ratelimit-remaining-requests"] == "0"

        before_refused = time.monotonic()
        refused = await one.post("/chat/completions", json=payload())
        after_refused = time.monotonic()
        assert refused.status_code == 429
        retry_ms = int(refused.headers["retry-after-ms"])
        # The exact wait until the first request leaves the window; the server's clock
        # readings lie between ours.
        low = (before_first + window - after_refused) * 1000
        high = (after_first + window - before_refused) * 1000 + 1
        assert low <= retry_ms <= high
        assert refused.headers["retry-after"] == str(math.ceil(retry_ms / 1000))
        assert refused.headers["x-ratelimit-limit-requests"] == "3"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        error = refused.json()["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        assert "on requests per min (RPM): Limit 3, Used 3, Requested 1" in error["message"]
        assert (await one.get("/models")).status_code == 429

        # Another key, and another model of the same key, have their own quotas.
        other_key = await two.post("/chat/completions", json=payload())
        assert other_key.status_code == 200
        assert other_key.headers["x-ratelimit-remaining-requests"] == "2"
        other_model = await one.post("/chat/completions", json=payload(model="gpt-4o-mini"))
        assert other_model.status_code == 200
        assert other_model.headers["x-ratelimit-remaining-requests"] == "1"  # the list counted

        await asyncio.sleep(retry_ms / 1000 + 0.02)
        assert (await one.post("/chat/completions", json=payload())).status_code == 200
    assert sim.stats.quota_rejections == 2
    assert sim.stats.rate_limited == 2
    assert sim.stats.status_counts == {200: 6, 429: 2}


async def test_quota_tpm_charges_prompt_and_max_tokens_on_arrival(simulator_factory: Any) -> None:
    prompt = count_prompt_tokens(MESSAGES)
    limit = 3 * prompt + 1200
    sim = await simulator_factory(quota_tpm=limit, quota_window_s=30)
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        small = await http.post("/chat/completions", json=payload(max_tokens=100))
        assert small.status_code == 200
        assert small.headers["x-ratelimit-limit-tokens"] == str(limit)
        assert small.headers["x-ratelimit-remaining-tokens"] == str(limit - prompt - 100)
        assert small.headers["x-ratelimit-limit-requests"] == "10000"  # no RPM quota set

        big = await http.post("/chat/completions", json=payload(max_tokens=limit - 50 - prompt))
        assert big.status_code == 429
        assert big.headers["x-ratelimit-remaining-tokens"] == "0"
        assert big.headers["x-ratelimit-remaining-requests"] != "0"
        assert 29_000 <= int(big.headers["retry-after-ms"]) <= 30_000  # until `small` leaves
        assert big.headers["retry-after"] == "30"
        error = big.json()["error"]
        assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
        assert (
            f"(TPM): Limit {limit}, Used {prompt + 100}, Requested {limit - 50}"
            in (error["message"])
        )

        # The refused request took nothing: a small one still fits ...
        again = await http.post("/chat/completions", json=payload(max_tokens=100))
        assert again.headers["x-ratelimit-remaining-tokens"] == str(limit - 2 * (prompt + 100))
        # ... and no max_tokens is charged at the default.
        unset = await http.post("/chat/completions", json=payload())
        assert unset.status_code == 200
        assert QUOTA_DEFAULT_MAX_TOKENS == 1000
        assert unset.headers["x-ratelimit-remaining-tokens"] == "0"

        never = await http.post("/chat/completions", json=payload(max_tokens=limit + 1))
        assert never.status_code == 429
        assert "Request too large" in never.json()["error"]["message"]
        assert never.headers["retry-after-ms"] == "30000"
    assert sim.stats.quota_rejections == 2


async def test_quota_429_is_azure_shaped_on_deployment_paths(simulator_factory: Any) -> None:
    sim = await simulator_factory(quota_rpm=1, quota_window_s=30)
    async with azure(sim) as client:
        await client.chat.completions.create(model="main", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="main", messages=MESSAGES)
        # Another deployment has its own quota.
        assert (await client.chat.completions.create(model="other", messages=MESSAGES)).choices
        sim.apply_faults({"quota_rpm": 0, "quota_tpm": 100})
        with pytest.raises(openai.RateLimitError) as tokens_info:
            await client.chat.completions.create(model="third", messages=MESSAGES)
    response = info.value.response
    assert response.headers["retry-after"] == "30"
    assert response.json() == {
        "error": {
            "code": "429",
            "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
            "version 2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing "
            "tier. Please retry after 30 seconds. Please go here: "
            "https://aka.ms/oai/quotaincrease if you would like to further increase the "
            "default rate limit.",
        }
    }
    assert info.value.code == "429"
    assert "have exceeded token rate limit" in tokens_info.value.response.json()["error"]["message"]


@pytest.mark.parametrize("mode", ["real", "none", "negative"])
async def test_ratelimit_header_modes(simulator_factory: Any, mode: str) -> None:
    sim = await simulator_factory(
        quota_rpm=1, quota_tpm=5000, quota_window_s=30, ratelimit_headers=mode
    )
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        ok = await http.post("/chat/completions", json=payload())
        refused = await http.post("/chat/completions", json=payload())
    assert (ok.status_code, refused.status_code) == (200, 429)
    assert "retry-after" in refused.headers
    left = str(5000 - count_prompt_tokens(MESSAGES) - QUOTA_DEFAULT_MAX_TOKENS)
    if mode == "none":
        assert limit_headers(ok) == limit_headers(refused) == {}
        return
    for response in (ok, refused):
        headers = limit_headers(response)
        assert len(headers) == 6
        assert re.fullmatch(r"\d+(\.\d+)?m?s", headers["x-ratelimit-reset-requests"])
        numbers = [
            headers[f"x-ratelimit-{name}-{kind}"]
            for name in ("limit", "remaining")
            for kind in ("requests", "tokens")
        ]
        if mode == "negative":
            assert numbers == ["-1"] * 4
        else:
            assert numbers == ["1", "5000", "0", left]  # tokens not exhausted on the 429


RETRY_HEADERS = {
    "both": {"retry-after", "retry-after-ms"},
    "seconds": {"retry-after"},
    "ms": {"retry-after-ms"},
    "date": {"retry-after"},
    "none": set(),
}


@pytest.mark.parametrize("mode", list(RETRY_HEADERS))
async def test_retry_after_mode_applies_to_every_429(simulator_factory: Any, mode: str) -> None:
    sim = await simulator_factory(
        retry_after_mode=mode,
        retry_after_s=40,
        next_429=1,
        quota_rpm=2,
        quota_window_s=30,
        capacity=1,
        tokens_per_second=20,
    )
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        scripted = await http.post("/chat/completions", json=payload())
        async with http.stream("POST", "/chat/completions", json=payload(stream=True)) as held:
            await anext(held.aiter_bytes())  # in flight, and charged to the quota
            capacity = await http.post("/chat/completions", json=payload())
        await wait_for(lambda: sim.stats.in_flight == 0)
        sim.config.tokens_per_second = 0
        assert (await http.post("/chat/completions", json=payload())).status_code == 200
        quota = await http.post("/chat/completions", json=payload())
    for response in (scripted, capacity, quota):
        assert response.status_code == 429
        assert {k for k in response.headers if k.startswith("retry-after")} == RETRY_HEADERS[mode]
    assert sim.stats.rate_limited == 3 and sim.stats.quota_rejections == 1
    if mode == "date":
        when = email.utils.parsedate_to_datetime(scripted.headers["retry-after"])
        assert 35 <= when.timestamp() - time.time() <= 41
        assert (
            0
            < email.utils.parsedate_to_datetime(quota.headers["retry-after"]).timestamp()
            - (time.time())
            <= 31
        )
    if mode in ("both", "seconds"):
        assert scripted.headers["retry-after"] == capacity.headers["retry-after"] == "40"
        assert quota.headers["retry-after"] == "30"
    if mode in ("both", "ms"):
        assert scripted.headers["retry-after-ms"] == capacity.headers["retry-after-ms"] == "40000"
        assert 29_000 <= int(quota.headers["retry-after-ms"]) <= 30_000


async def test_next_429_and_faults_hit_only_the_fault_model(simulator_factory: Any) -> None:
    sim = await simulator_factory(
        next_429=2, retry_after_s=0, fault_model="gpt-4o-mini", error_rate=1.0
    )
    async with sdk(sim) as client:
        assert (await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).choices
        assert sim.config.next_429 == 2  # the other model does not count down
        for left in (1, 0):
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert sim.config.next_429 == left
            assert info.value.response.headers["retry-after"] == "0"
            assert info.value.response.headers["retry-after-ms"] == "0"
            assert info.value.code == "rate_limit_exceeded"
            assert "gpt-4o-mini" in info.value.message
        # Then the model's other faults: error_rate applies to it, and only to it.
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert (await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).choices
    assert sim.stats.rate_limited == 2
    assert sim.stats.status_counts == {200: 2, 429: 2, 500: 1}


async def test_latency_rises_with_concurrency_and_capacity_changes_live(
    simulator_factory: Any,
) -> None:
    sim = await simulator_factory(capacity=2, ttft_per_request_ms=250, tokens_per_second=20)
    streams = []

    async def first_token_after() -> float:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        streams.append(stream)
        await anext(aiter(stream))
        return time.monotonic() - started

    async with sdk(sim) as client:
        alone = await first_token_after()
        second = await first_token_after()  # one request already in flight
        assert second > alone
        assert second >= 0.24
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        sim.apply_faults({"capacity": 3})
        third = await first_token_after()  # two in flight: twice the extra wait
        assert third > second
        assert third >= 0.49
        assert sim.stats.peak_in_flight == 3
        for stream in streams:
            await stream.close()


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


# --- keep-alive expiry ------------------------------------------------------------------------


async def test_idle_connections_are_closed_with_a_fin_after_a_live_timeout_change(
    simulator: LLMSimulator,
) -> None:
    async with httpx.AsyncClient(base_url=simulator.base_url) as http:
        assert (await http.get("/models")).status_code == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", simulator.port)
        try:
            # Both connections are already idle under the default 120 s: the new limit
            # applies to them too.
            simulator.apply_faults({"keepalive_timeout_s": 0.2})
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # end of stream: a FIN, not a reset
        finally:
            writer.close()
        await wait_for(
            lambda: simulator.stats.idle_closes == 2 and simulator.stats.connections_open == 0
        )
        await asyncio.sleep(0.05)  # let the client's socket see the FIN too
        simulator.apply_faults({"keepalive_timeout_s": 120})
        assert (await http.get("/models")).status_code == 200
    # The client's idle connection had been closed: it needed a new one.
    assert simulator.stats.connections_accepted == 3
    assert simulator.stats.idle_closes == 2


# --- TLS --------------------------------------------------------------------------------------


async def test_tls_trusted_and_untrusted_clients(simulator_factory: Any, tmp_path: Path) -> None:
    sim = await simulator_factory(tls=True)
    assert sim.base_url.startswith("https://127.0.0.1:")
    http = httpx2.AsyncClient(verify=sim.client_ssl_context())
    async with http, sdk(sim, http_client=http) as client:
        result = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert result.choices[0].message.content
    async with sdk(sim) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    ca_file = tmp_path / "ca.pem"
    sim.write_ca_pem(ca_file)
    assert ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert sim.stats.connections_accepted == 1  # the failed handshake never counts


# --- connections ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client_cls", [httpx.AsyncClient, httpx2.AsyncClient], ids=["httpx", "httpx2"]
)
async def test_keep_alive_reuses_one_connection(
    simulator: LLMSimulator, client_cls: type[Any]
) -> None:
    async with client_cls() as http, sdk(simulator, http_client=http) as client:
        for _ in range(5):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert simulator.stats.requests_total == 5
    assert simulator.stats.connections_accepted == 1


async def test_rtt_is_added_per_connection_and_per_request(simulator_factory: Any) -> None:
    sim = await simulator_factory(rtt_ms=60)
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        started = time.monotonic()
        await http.get("/models")
        first = time.monotonic() - started
        started = time.monotonic()
        response = await http.get("/models")
        second = time.monotonic() - started
    assert int(response.headers["x-ratelimit-remaining-requests"]) > 0
    assert first >= 0.11  # connection + request
    assert second >= 0.055  # request only, on the kept-alive connection
    assert sim.stats.connections_accepted == 1


async def test_concurrent_streams_use_separate_connections(simulator_factory: Any) -> None:
    sim = await simulator_factory(tokens_per_second=20)
    async with httpx.AsyncClient() as http, sdk(sim, http_client=http) as client:
        streams = await asyncio.gather(
            *(
                client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
                for _ in range(5)
            )
        )
        for stream in streams:
            await anext(aiter(stream))
        assert sim.stats.connections_accepted == 5
        assert sim.stats.connections_open == 5
        assert sim.stats.peak_in_flight == 5
        for stream in streams:
            await stream.close()


async def test_connection_close_is_honoured(simulator: LLMSimulator) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    response = await raw_exchange(simulator, request)  # returns only once the server closes
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in response.lower()


async def test_idle_keep_alive_connections_are_closed(simulator_factory: Any) -> None:
    sim = await simulator_factory(keepalive_timeout_s=0.2)
    response = await raw_exchange(sim, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 ")
    assert sim.stats.connections_open == 0


async def test_garbage_bytes_get_400_and_server_keeps_serving(simulator: LLMSimulator) -> None:
    response = await raw_exchange(simulator, b"\x16\x03\x01\x00\xa5 not http at all\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    async with sdk(simulator) as client:
        assert (await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).choices
    assert simulator.stats.status_counts == {400: 1, 200: 1}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, None),
        ("POST", "/v1/chat/completions", b'{"model": "gpt-4o"}', 400, "messages"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "model"),
        ("POST", "/v1/chat/completions", b'{"model": "m", "messages": [{"role": "x"}]}', 400,
         "messages[0].role"),
        ("GET", "/v1/chat/completions", b"", 405, None),
        ("GET", "/v1/nowhere", b"", 404, None),
        ("POST", "/_simulator/faults", b'{"error_rate": 2}', 400, None),
    ],
)  # fmt: skip
async def test_bad_input_gets_openai_style_errors(
    simulator: LLMSimulator, method: str, path: str, body: bytes, status: int, param: str | None
) -> None:
    async with httpx.AsyncClient(base_url=simulator.root_url) as http:
        response = await http.request(method, path, content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and "code" in error
    if param:
        assert error["param"] == param


async def test_runtime_fault_endpoints(simulator: LLMSimulator) -> None:
    async with httpx.AsyncClient(base_url=simulator.root_url) as http:
        bad = await http.post("/_simulator/faults", json={"error_rate": 1, "bogus": 3})
        assert bad.status_code == 400
        assert "bogus" in bad.json()["error"]["message"]
        assert simulator.config.error_rate == 0.0  # nothing applied from a rejected update

        ok = await http.post("/_simulator/faults", json={"error_rate": 1, "capacity": 3})
        assert ok.status_code == 200
        assert ok.json()["error_rate"] == 1.0 and simulator.config.capacity == 3

        async with sdk(simulator) as client:
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stats = (await http.get("/_simulator/stats")).json()
        assert stats["status_counts"] == {"500": 1}
        # The control connection itself stays out of the counters.
        assert stats["connections_accepted"] == 1
        assert stats["requests_total"] == 1

        await http.post("/_simulator/faults", json={"error_rate": 0})
        reset = await http.post("/_simulator/reset")
        assert reset.json()["requests_total"] == 0
    assert simulator.stats.chat_requests == 0


async def test_stop_closes_everything(simulator_factory: Any) -> None:
    sim = await simulator_factory(tokens_per_second=5)
    before = asyncio.all_tasks()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", sim.port)
    async with sdk(sim) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        await anext(aiter(stream))
        assert sim.stats.connections_open == 2
        await sim.stop()
        assert sim.stats.connections_open == 0
        assert sim.stats.in_flight == 0
        assert asyncio.all_tasks() <= before
        assert await idle_reader.read() == b""
        idle_writer.close()
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                pass
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", sim.port)
    await sim.stop()  # idempotent
    sim.config.tokens_per_second = 0
    port = sim.port
    await sim.start()  # restartable, on the same port so clients can reconnect
    assert sim.port == port
    async with sdk(sim) as client:
        assert (await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).choices


# --- request log ------------------------------------------------------------------------------

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER_MESSAGES = [{"role": "user", "content": "And the disaster recovery plan?"}]


async def logged(sim: LLMSimulator, **params: Any) -> dict[str, Any]:
    """GET /_simulator/requests, as a test in another process would."""
    async with httpx.AsyncClient(base_url=sim.root_url) as http:
        response = await http.get("/_simulator/requests", params=params)
    assert response.status_code == 200, response.text
    return response.json()


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


# --- management command -----------------------------------------------------------------------


@contextlib.contextmanager
def llm_simulator_command(*args: str) -> Iterator[str]:
    """Run `manage.py llm_simulator --port 0 ARGS`; yield its base URL; stop it with SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "llm_simulator", "--port", "0", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("LLM simulator listening on http://127.0.0.1:"), line
        base_url = line.rsplit(" ", 1)[1]
        assert base_url.endswith("/v1") and not base_url.endswith(":0/v1")
        yield base_url
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_management_command_serves_and_stops_on_sigterm() -> None:
    with (
        llm_simulator_command("--ttft-ms", "1", "--request-log", "3") as base_url,
        openai.OpenAI(base_url=base_url, api_key="x", max_retries=0) as client,
    ):
        result = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        log = httpx.get(base_url.removesuffix("/v1") + "/_simulator/requests").json()
    assert result.choices[0].message.content
    assert log["enabled"] is True
    assert [(e["model"], e["messages"], e["outcome"]) for e in log["requests"]] == [
        ("gpt-4o", MESSAGES, "completed")
    ]


def test_management_command_sets_every_mode() -> None:
    flags = [
        *("--quota-rpm", "7", "--quota-tpm", "9000", "--quota-window", "2.5"),
        *("--ttft-per-request-ms", "15", "--retry-after", "40", "--next-429", "2"),
        *("--retry-after-mode", "date", "--ratelimit-headers", "negative"),
        *("--truncate-rate", "0.1", "--malformed-rate", "0.2", "--empty-rate", "0.3"),
        *("--length-rate", "0.4", "--content-filter-rate", "0.5", "--no-usage"),
        *("--fault-model", "gpt-4o-mini", "--keepalive-timeout", "4"),
    ]
    with llm_simulator_command(*flags) as base_url:
        settings = httpx.get(base_url.removesuffix("/v1") + "/_simulator/faults").json()
    assert (
        settings
        | {
            "quota_rpm": 7,
            "quota_tpm": 9000,
            "quota_window_s": 2.5,
            "ttft_per_request_ms": 15.0,
            "retry_after_s": 40.0,
            "next_429": 2,
            "retry_after_mode": "date",
            "ratelimit_headers": "negative",
            "truncate_rate": 0.1,
            "malformed_rate": 0.2,
            "empty_rate": 0.3,
            "length_rate": 0.4,
            "content_filter_rate": 0.5,
            "no_usage": 1,
            "fault_model": "gpt-4o-mini",
            "keepalive_timeout_s": 4.0,
        }
        == settings
    )


def test_management_command_refuses_an_unknown_mode() -> None:
    parser = LLMSimulatorCommand().create_parser("manage.py", "llm_simulator")
    with pytest.raises(CommandError, match="invalid choice: 'soon'"):
        parser.parse_args(["--retry-after-mode", "soon"])
    with pytest.raises(CommandError, match="must be greater than 0"):
        parser.parse_args(["--quota-window", "0"])
