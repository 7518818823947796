"""An in-process simulator answering as the Carlos agents, for commands with no endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from django.conf import settings

from agents.simulated.dispatch import carlos_responder
from pools import runtime
from pools.engine.config import parse_config
from pools.engine.registry import PoolRegistry
from pools.simulator import LLMSimulator, Responder, SimulatorConfig


@asynccontextmanager
async def in_process_endpoint(
    config: SimulatorConfig,
    responder: Responder = carlos_responder,
    pools_settings: Mapping[str, Any] | None = None,
) -> AsyncIterator[LLMSimulator]:
    """A simulator on a free port with a registry pointed at it, installed for the block.

    For commands that must work with no endpoint configured. `pools_settings` is a
    CARLOS_POOLS-style dict (default: the project's settings) whose endpoint is replaced.
    The caller warms and closes the installed registry; the previous one is restored after.
    """
    simulator = LLMSimulator(config, responder=responder)
    await simulator.start()
    raw = dict(pools_settings if pools_settings is not None else settings.CARLOS_POOLS)
    raw["ENDPOINT"] = {"SIMULATOR_URL": simulator.base_url}
    registry = PoolRegistry(parse_config(raw))
    previous = runtime.install(registry)
    try:
        yield simulator
    finally:
        runtime.install(previous)
        if not registry.closed:
            await registry.close()
        await simulator.stop()
