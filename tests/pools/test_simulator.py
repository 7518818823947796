"""The offline LLM simulator, exercised through the real OpenAI SDK and raw sockets.

Timing asserts are lower bounds only: the machine may be slow, never impossibly fast.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from pydantic import BaseModel

from pools.simulator import (
    ChatRequest,
    LLMSimulator,
    default_responder,
    tokenize,
)

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


# --- management command -----------------------------------------------------------------------


def test_management_command_serves_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "llm_simulator", "--port", "0", "--ttft-ms", "1"],
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
        with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
            result = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert result.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
