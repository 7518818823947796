"""Which agent a request is for, and that agent's answer.

Every system prompt opens with an `AGENT: <name>` line (agents/prompts.py). The agent's spec
(agents/specs.py) names its simulated answer, one of the functions of the request below (or
any other, for an agent declared elsewhere), so a new agent needs no change here. An unknown
or missing name gets the simulator's default paragraph, so non-Carlos callers still work.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from agents.prompts import QUESTIONS_AGENT
from agents.simulated import analyses, designs, verdicts
from agents.simulated import requirements as _requirements
from agents.simulated import terraform as _terraform
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


def carlos_responder(request: ChatRequest) -> str:
    """The answer the named agent's spec gives; a plain paragraph for unknown callers."""
    agent = agent_of(request)
    if agent == QUESTIONS_AGENT:  # the requirements analyst's other role, not a table agent
        return questions(request)
    spec = find_spec(agent)
    answer = spec.simulated_answer if spec is not None else None
    return answer(request) if answer is not None else default_responder(request)


# -- the shipped agents' answers (each spec's `simulated` names one) ----------------------------


def _from_prompt(write: Callable[[Context], str]) -> Callable[[ChatRequest], str]:
    """An answer written from the prompt read back (its Context), as a function of the request."""

    def answer(request: ChatRequest) -> str:
        return write(read_context(request, agent_of(request) or ""))

    return answer


questions = _from_prompt(_requirements.questions)
requirements = _from_prompt(_requirements.requirements)
design = _from_prompt(lambda ctx: designs.design(ctx, ctx.agent))
analysis = _from_prompt(lambda ctx: json.dumps(analyses.report(ctx.agent, ctx)))
auditor = _from_prompt(verdicts.audit)
recommender = _from_prompt(verdicts.recommend)
terraform = _from_prompt(_terraform.terraform)
