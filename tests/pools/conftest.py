"""Fixtures that run the offline LLM simulator inside the test's event loop."""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from pools.simulator import LLMSimulator, SimulatorConfig

SimulatorFactory = Callable[..., Awaitable[LLMSimulator]]


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
