"""Which agent a request is for, and that agent's answer.

Every system prompt opens with an `AGENT: <name>` line (agents/prompts.py); an unknown or
missing name gets the simulator's default paragraph, so non-Carlos callers still work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

from agents.prompts import QUESTIONS_AGENT
from agents.simulated import analyses, designs, requirements, verdicts
from agents.simulated.terraform import terraform
from agents.simulated.text import AGENT_LINE, Context, read_context
from agents.specs import find_spec
from pools.simulator.responders import ChatRequest, default_responder, message_text


def agent_of(request: ChatRequest) -> str | None:
    """The agent named on the `AGENT:` line of the system prompt, if any."""
    for message in request.messages:
        if message.get("role") in ("system", "developer"):
            match = AGENT_LINE.search(message_text(message))
            if match:
                return match[1]
    return None


def _analysis_json(agent: str, ctx: Context) -> str:
    return json.dumps(analyses.report(agent, ctx))


_ANSWERS: dict[str, Callable[[Context], str]] = {
    QUESTIONS_AGENT: requirements.questions,
    "requirements": requirements.requirements,
    "carlos": lambda ctx: designs.design(ctx, "carlos"),
    "ronei": lambda ctx: designs.design(ctx, "ronei"),
    **{agent: partial(_analysis_json, agent) for agent in analyses.ANALYSTS},
    "auditor": verdicts.audit,
    "recommender": verdicts.recommend,
    "terraform": terraform,
}


def carlos_responder(request: ChatRequest) -> str:
    """The answer the named agent would give; a plain paragraph for unknown callers."""
    agent = agent_of(request)
    answer = _ANSWERS.get(agent) if agent else None
    if agent is None or answer is None:
        return _declared_answer(request, agent)
    return answer(read_context(request, agent))


def _declared_answer(request: ChatRequest, agent: str | None) -> str:
    """An agent this module does not know answers as its spec's `simulated` says (a new
    agent needs no change here); anyone else gets the default paragraph."""
    spec = find_spec(agent)
    answer = spec.simulated_answer if spec is not None else None
    return answer(request) if answer is not None else default_responder(request)
