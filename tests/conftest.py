"""Shared fixtures: the offline simulator in the test's loop, and pool registries wired to it."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from carlos import serving
from pools import runtime
from pools.engine.config import parse_config
from pools.engine.registry import PoolRegistry
from pools.simulator import LLMSimulator, SimulatorConfig

SimulatorFactory = Callable[..., Awaitable[LLMSimulator]]


@pytest.fixture(autouse=True)
def stopped_llm_loop() -> Iterator[None]:
    """After each test, the LLM loop stops as a server's does (what still runs there is
    cancelled), so no test's designs or clients reach into the next test."""
    yield
    if serving.llm_loop().running:
        asyncio.run(serving.llm_loop().stop())


@pytest.fixture(autouse=True)
def fresh_database_lanes() -> Iterator[None]:
    """After each test, the served application's request threads (carlos.middleware lanes)
    end: each holds its database connection, which must not reach into the next test."""
    yield
    served = sys.modules.get("carlos.asgi")
    if served is not None:
        served.django_asgi_app.lanes.close()


@pytest.fixture
async def simulator() -> AsyncIterator[LLMSimulator]:
    """A started simulator on 127.0.0.1 with a free port and the default (fault-free) config."""
    sim = LLMSimulator(SimulatorConfig(host="127.0.0.1", port=0))
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def simulator_factory() -> AsyncIterator[SimulatorFactory]:
    """`sim = await simulator_factory(ttft_ms=..., tls=True, responder=...)`; all stopped after.

    Keyword arguments are SimulatorConfig fields, plus an optional `responder`.
    """
    started: list[LLMSimulator] = []

    async def factory(**options: Any) -> LLMSimulator:
        responder = options.pop("responder", None)
        options.setdefault("host", "127.0.0.1")
        options.setdefault("port", 0)
        sim = LLMSimulator(SimulatorConfig(**options), responder=responder)
        await sim.start()
        started.append(sim)
        return sim

    try:
        yield factory
    finally:
        for sim in started:
            await sim.stop()


async def probe(path: str, method: str = "GET") -> httpx.Response:
    """A request through the real ASGI application, as Daphne passes it (health probes are
    answered in front of Django, so Django's test client does not reach them)."""
    from carlos.asgi import application

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.request(method, path)


def registry_config(base_url: str, pools: dict[str, dict[str, Any]] | None = None, **http: Any):
    """A `PoolsConfig` for the simulator at `base_url`; `pools` overrides the default three."""
    raw: dict[str, Any] = {
        "ENDPOINT": {"SIMULATOR_URL": base_url},
        "HTTP": {key.upper(): value for key, value in http.items()},
    }
    if pools is not None:
        raw["POOLS"] = {name: {k.upper(): v for k, v in o.items()} for name, o in pools.items()}
    return parse_config(raw)


@pytest.fixture
async def make_registry() -> AsyncIterator[Callable[..., PoolRegistry]]:
    """Build registries against a simulator; each is closed (clients and all) afterwards."""
    made: list[PoolRegistry] = []

    def build(simulator: Any, pools: dict[str, dict[str, Any]] | None = None, **http: Any):
        registry = PoolRegistry(registry_config(simulator.base_url, pools, **http))
        made.append(registry)
        return registry

    yield build
    for registry in made:
        await registry.close()


@pytest.fixture
async def installed_registry(make_registry, simulator) -> AsyncIterator[PoolRegistry]:
    """The default three pools against the simulator, installed as the process registry."""
    registry = make_registry(simulator)
    previous = runtime.install(registry)
    yield registry
    runtime.install(previous)


@pytest.fixture
def simulator_thread():
    """A simulator on its own loop in a background thread, for tests that make their own loops."""
    loop = asyncio.new_event_loop()
    simulator = LLMSimulator(SimulatorConfig())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(simulator.start(), loop).result(10)
    yield simulator
    asyncio.run_coroutine_threadsafe(simulator.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
