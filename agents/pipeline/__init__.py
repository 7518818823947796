"""The design pipeline: nine agents over the pooled LLM connections, persisted as they go.

Order (ANCHORS.md section 1): requirements -> (Carlos || Ronei) -> (security || cost ||
reliability) -> auditor -> at most DESIGN_MAX_REVISIONS revision rounds back to the designs
-> recommender -> Terraform. Every agent holds a pool slot only while its own call streams,
each AgentRun row is written when the agent starts, every few seconds while it streams, and
when it finishes.

Each finished agent is a checkpoint: a design that starts again (after a crash, a drain or
the user's Retry) replays the flow with the stored outputs and calls only the agents that
did not finish, so no finished answer is paid for twice. The process works on a design only
while it holds its lease (agents.leases): the pipeline ends SUCCEEDED or FAILED; when it is
stopped (the task cancelled, the server draining) it saves what the running agents streamed
and hands the design back QUEUED, to resume here or on another instance.

Each start of a design is traced (OpenTelemetry, tracer `carlos.pipeline`; no-ops while
telemetry is off): a root span `design`, a span per stage (`stage requirements`, `stage
designs`...) and one per agent called (`invoke_agent <agent>`), under which the pool engine
puts its `chat <model>` spans (`pools.engine.telemetry`). The first start stores the root's
traceparent on the design; every later start (a resume, a take-over, a retry) is a child of
it, so a design is one trace however often it starts.
"""

from agents.pipeline.errors import (
    POOL_REFUSALS,
    AgentFailed,
    DesignLost,
    DesignNotRunnable,
    Drained,
    describe_error,
    error_detail,
)
from agents.pipeline.flow import DesignPipeline, complete_even_if_cancelled
from agents.pipeline.live import TOKEN_EVENT_INTERVAL_S, EventPublisher
from agents.pipeline.runs import (
    ask_clarifying_questions,
    create_design,
    run_design,
    submit_answers,
)

__all__ = [
    "POOL_REFUSALS",
    "TOKEN_EVENT_INTERVAL_S",
    "AgentFailed",
    "DesignLost",
    "DesignNotRunnable",
    "DesignPipeline",
    "Drained",
    "EventPublisher",
    "ask_clarifying_questions",
    "complete_even_if_cancelled",
    "create_design",
    "describe_error",
    "error_detail",
    "run_design",
    "submit_answers",
]
