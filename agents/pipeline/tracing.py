"""The pipeline's spans: a design, its stages and its agents (OpenTelemetry, no-ops while
telemetry is off).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace import Status as SpanStatus

from agents.pipeline.errors import AgentFailed, DesignLost, Drained, describe_error
from pools.engine import telemetry

# -- tracing -------------------------------------------------------------------------------

tracer = trace.get_tracer(telemetry.PIPELINE_TRACER_NAME)
DESIGN_ID = "carlos.design.id"
DESIGN_ATTEMPT = "carlos.design.attempt"
DESIGN_STATUS = "carlos.design.status"  # succeeded | failed | queued (stopped) | lost
STAGE = "carlos.stage"
ROUND = "carlos.round"
AGENT_POOL = "carlos.pool"
AGENT_RUN_ID = "carlos.agent_run.id"
STOPPED = "carlos.stopped"  # why a span ended without an outcome: Drained, DesignLost...
CHECKPOINT_REUSED = "checkpoint reused"
# Ends of a run that are no failure of the design: the design's status says what happened.
_STOPS = (Drained, DesignLost)


def record_end(span: Span, exc: BaseException) -> None:
    """A failure (an agent failed, a crash) is an error status naming only what the user is
    told (never an endpoint's words); a stop (drain, cancellation, lost lease) is no error."""
    if isinstance(exc, _STOPS) or not isinstance(exc, Exception):
        span.set_attribute(STOPPED, type(exc).__name__)
        return
    if isinstance(exc, AgentFailed):
        cause = exc.__cause__ or exc
        span.set_attribute(telemetry.ERROR_TYPE, type(cause).__name__)
        span.set_status(SpanStatus(StatusCode.ERROR, exc.message))
    else:
        span.set_attribute(telemetry.ERROR_TYPE, type(exc).__name__)
        span.set_status(SpanStatus(StatusCode.ERROR, describe_error(exc)))


@contextlib.contextmanager
def internal_span(name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    """An INTERNAL span, current for the block (and the tasks it starts), its end recorded."""
    with tracer.start_as_current_span(
        name,
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            if span.is_recording():
                record_end(span, exc)
            raise


def stage_span(name: str, round_number: int) -> contextlib.AbstractContextManager[Span]:
    """The span of one stage of the pipeline; the agents it runs are its children."""
    return internal_span(f"stage {name}", {STAGE: name, ROUND: round_number})


# What users are told about an endpoint's answer, by HTTP status: the endpoint's own text
