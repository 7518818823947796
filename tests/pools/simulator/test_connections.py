"""Connections on the wire: keep-alive and its expiry, TLS, RTT, resets and shutdown.

Timing asserts are lower bounds only: the machine may be slow, never impossibly fast.
"""

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest

from pools.simulator import (
    LLMSimulator,
)
from tests.pools.simulator.helpers import (
    MESSAGES,
    raw_exchange,
    sdk,
    wait_for,
)

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
