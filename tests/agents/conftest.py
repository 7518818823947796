"""Fixtures for the pipeline tests: the Carlos simulator, an installed registry, a user.

Every pipeline test talks to the real offline simulator over sockets, through the real pool
engine; only the simulator's responder is adapted (recorded, or made to misbehave) per test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from agents.simulated import agent_of, carlos_responder
from pools import runtime
from pools.engine.registry import PoolRegistry
from pools.simulator import ChatRequest, LLMSimulator

# Small but real latency, so parallel calls genuinely overlap in time.
FAST_TTFT_MS = 30.0

Override = Callable[[ChatRequest, int], str]


class RecordingResponder:
    """carlos_responder that records every request and lets a test replace one agent's answer.

    An override receives the request and how many times that agent was called before.
    """

    def __init__(self, overrides: dict[str, Override] | None = None) -> None:
        self.requests: list[ChatRequest] = []
        self.overrides = overrides or {}
        self.calls: dict[str, int] = {}

    def __call__(self, request: ChatRequest) -> str:
        self.requests.append(request)
        agent = agent_of(request) or ""
        index = self.calls.get(agent, 0)
        self.calls[agent] = index + 1
        override = self.overrides.get(agent)
        if override is not None:
            return override(request, index)
        return carlos_responder(request)

    def for_agent(self, agent: str) -> list[ChatRequest]:
        return [request for request in self.requests if agent_of(request) == agent]


def user_prompt(request: ChatRequest) -> str:
    """The user message of a [system, user] prompt (the first one of a repair conversation)."""
    return next(m["content"] for m in request.messages if m["role"] == "user")


@pytest.fixture
def install_registry() -> Iterator[Callable[[PoolRegistry], PoolRegistry]]:
    """Install a registry as the process registry; the previous one is restored afterwards."""
    previous: list[PoolRegistry | None] = []

    def install(registry: PoolRegistry) -> PoolRegistry:
        before = runtime.install(registry)
        if not previous:
            previous.append(before)
        return registry

    yield install
    if previous:
        runtime.install(previous[0])


@pytest.fixture
def recorder() -> RecordingResponder:
    return RecordingResponder()


@pytest.fixture
async def carlos_simulator(simulator_factory, recorder) -> LLMSimulator:
    """The simulator answering as the Carlos agents, recording what it is asked."""
    return await simulator_factory(responder=recorder, ttft_ms=FAST_TTFT_MS)


@pytest.fixture
async def carlos_registry(carlos_simulator, make_registry, install_registry) -> PoolRegistry:
    """The default three pools against the Carlos simulator, installed for the pipeline."""
    return install_registry(make_registry(carlos_simulator))


@pytest.fixture
async def owner(transactional_db) -> AsyncIterator[Any]:
    yield await get_user_model().objects.acreate_user("ada", password="not-used-here")


@pytest.fixture
def alice(client: Any) -> Any:
    """A logged-in user of the test client."""
    from tests.agents.pages import make_user

    user = make_user("alice")
    client.force_login(user)
    return user
