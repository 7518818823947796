"""Offline OpenAI-compatible LLM simulator (plain asyncio, no Django).

Lets the pools and agents be developed and tested without a network or a real model, with
reproducible latency and faults. Run it with `python -m pools.simulator` (or
`manage.py llm_simulator`, which adds the project's settings as defaults).
"""

from pools.simulator.config import FAULT_FIELDS, SimulatorConfig, SimulatorStats
from pools.simulator.responders import (
    ChatRequest,
    Responder,
    count_prompt_tokens,
    default_responder,
    tokenize,
)
from pools.simulator.server import LLMSimulator

__all__ = [
    "FAULT_FIELDS",
    "ChatRequest",
    "LLMSimulator",
    "Responder",
    "SimulatorConfig",
    "SimulatorStats",
    "count_prompt_tokens",
    "default_responder",
    "tokenize",
]
