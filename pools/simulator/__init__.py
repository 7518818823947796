"""Offline OpenAI-compatible LLM simulator (plain asyncio, no Django).

Lets the pools and agents be developed and tested without a network or a real model, with
reproducible latency and faults.
"""

from pools.simulator.responders import (
    ChatRequest,
    Responder,
    count_prompt_tokens,
    default_responder,
    tokenize,
)
from pools.simulator.server import FAULT_FIELDS, LLMSimulator, SimulatorConfig, SimulatorStats

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
