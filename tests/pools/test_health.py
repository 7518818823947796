"""GET /health: the design note's JSON, live values, honest status codes, no secrets."""

from __future__ import annotations

import asyncio

import httpx

from pools import runtime
from pools.registry import PoolRegistry
from tests.conftest import probe, registry_config

HELLO = [{"role": "user", "content": "hello"}]


async def test_health_is_degraded_until_the_pools_are_warm(installed_registry):
    response = await probe("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded"
    assert response.json()["reason"] == "pools not initialized"
    assert "no-store" in response.headers["Cache-Control"]


async def test_health_shape_after_warm_up(installed_registry):
    await installed_registry.initialize()
    response = await probe("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert "no-store" in response.headers["Cache-Control"]
    assert set(body["pools"]) == {"main", "ronei", "mini"}
    for name, size in {"main": 10, "ronei": 5, "mini": 10}.items():
        pool = body["pools"][name]
        assert (pool["total"], pool["in_use"], pool["available"]) == (size, 0, size)
        assert pool["connections_num"] == size
        for key in (
            "overflow_in_use",
            "waiting",
            "requests_num",
            "requests_overflow",
            "requests_queued",
            "requests_wait_ms",
            "requests_errors",
            "usage_ms",
            "connections_closed",
        ):
            assert key in pool
    assert body["http"]["connections_open"] == 25


async def test_health_reflects_a_call_in_flight(installed_registry, simulator):
    await installed_registry.initialize()
    simulator.config.ttft_ms = 400
    started = asyncio.Event()

    async def slow_call() -> None:
        async with installed_registry.get_main_llm() as llm:
            started.set()
            await llm.ainvoke(HELLO)

    task = asyncio.create_task(slow_call())
    await started.wait()
    body = (await probe("/health")).json()
    assert body["pools"]["main"]["in_use"] == 1
    assert body["pools"]["main"]["available"] == 9
    await task
    body = (await probe("/health")).json()
    assert body["pools"]["main"]["in_use"] == 0
    assert body["pools"]["main"]["requests_num"] == 1


async def test_health_is_degraded_after_close(installed_registry):
    await installed_registry.initialize()
    await installed_registry.close()
    response = await probe("/health")
    assert response.status_code == 503
    assert response.json()["reason"] == "pools closed"


async def test_health_never_shows_secrets(simulator):
    secret = "sk-very-secret-key-123"
    config = registry_config(simulator.base_url)
    from dataclasses import replace

    endpoint = replace(
        config.endpoint,
        kind="openai",
        api_key=secret,
        base_url=simulator.base_url.replace("http://", f"http://user:{secret}@"),
    )
    registry = PoolRegistry(replace(config, endpoint=endpoint))
    previous = runtime.install(registry)
    try:
        response = await probe("/health")
        assert secret not in response.content.decode()
        assert "user" not in response.json()["endpoint"]["url"]
    finally:
        runtime.install(previous)
        await registry.close()


async def test_health_only_answers_get(installed_registry):
    response = await probe("/health", "POST")
    assert response.status_code == 405


async def test_a_start_up_outage_makes_health_503_and_clears_by_itself(
    simulator_factory, monkeypatch
):
    """Reproduces: with the endpoint down at start-up, /health stayed 503 after it came
    back, until some design happened to succeed (never, behind a readiness-gated balancer)."""
    import socket

    from pools import registry as registry_module

    monkeypatch.setattr(registry_module, "REPROBE_FIRST_S", 0.05)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    registry = PoolRegistry(
        registry_config(f"http://127.0.0.1:{dead_port}/v1", {"main": {"size": 2}})
    )
    previous = runtime.install(registry)
    try:
        await registry.initialize()
        response = await probe("/health")
        assert response.status_code == 503
        assert "could not be reached at warm-up" in response.json()["reason"]
        sim = await simulator_factory(port=dead_port)  # the endpoint comes back; no call made
        for _ in range(200):
            if (await probe("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert (await probe("/health")).status_code == 200
        assert sim.stats.chat_requests == 0
        assert sim.stats.requests_total == 1  # one probe request, however many slots
        assert sim.stats.connections_open == 2  # and the slots warm again
    finally:
        runtime.install(previous)
        await registry.close()


async def test_probes_are_answered_in_front_of_django(installed_registry):
    # No middleware: a Host outside ALLOWED_HOSTS is no reason to fail a probe by address,
    # HEAD gets the status without the body, and every other path still reaches Django.
    from carlos.asgi import application

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://10.1.2.3:8000") as client:
        live = await client.get("/health/live")
        assert live.status_code == 200 and live.json() == {"status": "alive"}
        head = await client.head("/health")
        assert head.status_code == 503 and head.content == b""
        assert (await client.get("/health?scope=galaxy")).status_code == 400
        assert (await client.get("/metrics")).status_code == 400  # Django: disallowed host
