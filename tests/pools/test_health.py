"""GET /health: the design note's JSON, live values, honest status codes, no secrets."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import AsyncClient, override_settings

from pools import runtime
from pools.engine.registry import PoolRegistry
from tests.conftest import probe, registry_config

HELLO = [{"role": "user", "content": "hello"}]
OUTSIDE = "203.0.113.7"  # a client address that is neither loopback nor allowed


async def probe_from(address: str, path: str = "/health", **headers: str) -> httpx.Response:
    """`probe`, from another client address and with request headers."""
    from carlos.asgi import application

    transport = httpx.ASGITransport(app=application, client=(address, 40123))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers=headers
    ) as client:
        return await client.get(path)


def shows_details(response: httpx.Response) -> bool:
    """Whether the answer carries operator details (degraded answers then give a reason)."""
    return "reason" in response.json() or "endpoint" in response.json()


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

    from pools.engine import registry as registry_module

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


# --- who sees the operator details -------------------------------------------------------------


async def test_outsiders_see_only_the_public_shape(installed_registry, simulator):
    """Reproduces: /health showed the endpoint host, model names and host:pid to anyone."""
    await installed_registry.initialize()
    response = await probe_from(OUTSIDE)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"status", "pools"} and body["status"] == "healthy"
    main = body["pools"]["main"]
    assert (main["total"], main["in_use"], main["available"]) == (10, 0, 10)
    assert main["requests_num"] == 0 and main["connections_num"] == 10
    for detail in ("gpt-4o", str(simulator.port), installed_registry.instance, "breaker"):
        assert detail not in response.text


async def test_outsiders_see_degraded_without_the_reason(installed_registry):
    response = await probe_from(OUTSIDE)
    assert response.status_code == 503
    assert response.json()["status"] == "degraded"
    assert not shows_details(response)
    assert shows_details(await probe("/health"))  # the machine itself does (loopback)


async def test_outsiders_cannot_ask_for_the_cluster_view(installed_registry):
    response = await probe_from(OUTSIDE, "/health?scope=cluster")
    assert response.status_code == 403
    assert "METRICS_TOKEN" in response.json()["error"]


@override_settings(METRICS_TOKEN="s3cret-token")
async def test_the_metrics_token_shows_the_details(installed_registry):
    assert shows_details(await probe_from(OUTSIDE, Authorization="Bearer s3cret-token"))
    assert not shows_details(await probe_from(OUTSIDE, Authorization="Bearer wrong"))
    assert not shows_details(await probe_from(OUTSIDE))
    # Once a token is set it is the rule, as for /metrics: loopback alone no longer does.
    assert not shows_details(await probe_from("127.0.0.1"))


@override_settings(METRICS_ALLOWED_IPS=["10.0.0.0/8"])
async def test_an_allowed_address_sees_the_details(installed_registry):
    assert shows_details(await probe_from("10.1.2.3"))
    assert shows_details(await probe_from("::ffff:10.1.2.3"))
    assert not shows_details(await probe_from(OUTSIDE))
    assert not shows_details(await probe_from("127.0.0.1"))  # the list replaces the default


@override_settings(BEHIND_PROXY=True)
async def test_behind_a_proxy_loopback_is_not_an_operator(installed_registry):
    # Every request reaches Carlos from the proxy, so loopback says nothing about who asked.
    assert not shows_details(await probe("/health"))


@pytest.mark.django_db(transaction=True)
async def test_a_staff_session_sees_the_details(installed_registry):
    users = get_user_model().objects
    staff = await users.acreate_user("operator", password="not-used-here", is_staff=True)
    member = await users.acreate_user("ada", password="not-used-here")
    for user, shown in ((staff, True), (member, False)):
        client = AsyncClient()
        await client.aforce_login(user)
        cookie = (
            f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
        )
        assert shows_details(await probe_from(OUTSIDE, Cookie=cookie)) is shown
        await client.alogout()  # the session is gone: so are the details
        assert not shows_details(await probe_from(OUTSIDE, Cookie=cookie))
    forged = f"{settings.SESSION_COOKIE_NAME}=not-a-session-of-anyone"
    assert not shows_details(await probe_from(OUTSIDE, Cookie=forged))
