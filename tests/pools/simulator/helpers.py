"""What the simulator tests share: clients pointed at a simulator, requests, SSE and sockets."""

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai

from pools.simulator import ChatRequest, LLMSimulator

MESSAGES = [
    {"role": "system", "content": "You are a cloud architect."},
    {"role": "user", "content": "Design a resilient payments platform on Kubernetes."},
]
REPO = Path(__file__).resolve().parents[3]


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


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER_MESSAGES = [{"role": "user", "content": "And the disaster recovery plan?"}]


async def logged(sim: LLMSimulator, **params: Any) -> dict[str, Any]:
    """GET /_simulator/requests, as a test in another process would."""
    async with httpx.AsyncClient(base_url=sim.root_url) as http:
        response = await http.get("/_simulator/requests", params=params)
    assert response.status_code == 200, response.text
    return response.json()
