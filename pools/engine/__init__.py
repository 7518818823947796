"""The pool engine: named pools of keep-alive LLM connections, in plain asyncio.

Nothing here imports Django (ruff's banned-api enforces it: `pools/engine/ruff.toml`), so
the engine reads and tests like a library; `pools.runtime` builds it from Django settings.
The names below are the public surface; the modules behind them are implementation.

    registry = PoolRegistry(parse_config({...}))
    async with registry.get_main_llm() as llm:
        result = await llm.ainvoke(messages)
"""

from pools.engine.config import (
    ConfigErrors,
    EndpointConfig,
    PoolConfig,
    PoolsConfig,
    parse_config,
)
from pools.engine.events import EventBus, EventKind, PoolEvent
from pools.engine.exceptions import (
    POOL_REFUSALS,
    BadResponse,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    EmptyResponse,
    MalformedResponse,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolTimeout,
    RateBudgetExceeded,
    RateLimited,
    TruncatedResponse,
    UnknownPool,
)
from pools.engine.handle import LLMHandle, LLMResult, LLMStream, TokenUsage
from pools.engine.intervals import percentile
from pools.engine.registry import PoolRegistry
from pools.engine.resilience import BreakerState

__all__ = [
    "POOL_REFUSALS",
    "BadResponse",
    "BreakerState",
    "CircuitOpen",
    "ConfigError",
    "ConfigErrors",
    "DeadlineExceeded",
    "EmptyResponse",
    "EndpointConfig",
    "EventBus",
    "EventKind",
    "LLMHandle",
    "LLMResult",
    "LLMStream",
    "MalformedResponse",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolEvent",
    "PoolExhausted",
    "PoolRegistry",
    "PoolTimeout",
    "PoolsConfig",
    "RateBudgetExceeded",
    "RateLimited",
    "TokenUsage",
    "TruncatedResponse",
    "UnknownPool",
    "parse_config",
    "percentile",
]
