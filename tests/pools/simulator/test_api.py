"""The OpenAI and Azure surface: answers, streams, models, auth, defaults and errors."""

import json
import time
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from pools.simulator import (
    LLMSimulator,
    count_prompt_tokens,
    default_responder,
    tokenize,
)
from tests.pools.simulator.helpers import (
    MESSAGES,
    azure,
    chat_request,
    limit_headers,
    payload,
    sdk,
    sse_events,
    sse_exchange,
)

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
