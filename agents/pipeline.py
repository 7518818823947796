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

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import openai
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace import Status as SpanStatus

from agents import leases, prompts
from agents.models import AgentRun, Design
from agents.options import AGENT_POOLS, ANALYST_AGENTS, DESIGN_AGENTS, validate_options
from agents.redaction import RedactSecrets, redact
from agents.schemas import ReportInvalid, validate_report
from pools.engine import telemetry
from pools.engine.exceptions import (
    CircuitOpen,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolTimeout,
    RateBudgetExceeded,
    RateLimited,
)
from pools.engine.registry import PoolRegistry
from pools.runtime import get_pool

logger = logging.getLogger("agents")
# Every failure the pipeline or the pages log passes through it: no key reaches the log,
# not even inside an unexpected exception's traceback.
if not any(isinstance(existing, RedactSecrets) for existing in logger.filters):
    logger.addFilter(RedactSecrets())

Status = Design.Status
RUNNABLE_STATUSES = (Status.QUEUED, Status.AWAITING_ANSWERS)
# What a process may start or resume while it holds the lease (or the lease is free).
CLAIMABLE_STATUSES = (*RUNNABLE_STATUSES, Status.RUNNING)
# Live token events are coalesced per agent to at most one per this many seconds, so the
# in-memory channel layer's 100-message capacity is never reached.
TOKEN_EVENT_INTERVAL_S = 0.05
# How often a streaming agent's text so far is saved: what a stop or a crash keeps, at one
# small write per agent per interval rather than one per token.
PARTIAL_SAVE_INTERVAL_S = 5.0
# A sibling that failed, a drain, a cancel or a crash: the design's own status says which.
STOPPED_ERROR = "stopped before it finished"
LOST_ERROR = "cancelled or taken over by another server"
JSON_RESPONSE_FORMAT = {"type": "json_object"}
# Failures of the endpoint, the pool or the answer's format: logged without a traceback.
EXPECTED_AGENT_ERRORS = (
    openai.OpenAIError,
    PoolError,
    httpx.HTTPError,
    TimeoutError,  # the pool engine's DeadlineExceeded (first token, idle, total)
    prompts.OutputFormatError,
)

# Answers the model stopped before they were whole: never accepted as a finished answer.
UNFINISHED_ANSWERS = {
    "length": "the answer was cut off at the model's output length limit before it was "
    "finished (finish reason 'length'); retry, or ask for a smaller system",
    "content_filter": "the endpoint's content filter stopped the answer before it was "
    "finished (finish reason 'content_filter'); rephrase the request and retry",
}

# The pools refusing to take a call (full, circuit open, over the rate budget, shutting
# down) rather than the model failing it: a caller in a request answers "try again later".
POOL_REFUSALS = (
    PoolExhausted,
    PoolTimeout,
    CircuitOpen,
    RateBudgetExceeded,
    RateLimited,
    PoolClosed,
)


def max_revisions() -> int:
    """How many revision rounds a NEEDS REVISION verdict may trigger (settings, default 1)."""
    return max(0, int(getattr(settings, "DESIGN_MAX_REVISIONS", 1)))


class DesignNotRunnable(ValueError):
    """The design is not in a state the requested operation can start from."""


class DesignLost(Exception):
    """This process no longer holds the design: another took it over, or it was cancelled."""


class Drained(Exception):
    """The process is draining: the design stops between agents and resumes elsewhere."""


class AgentFailed(Exception):
    """One agent failed; the design ends FAILED naming it."""

    def __init__(self, agent: str, message: str) -> None:
        super().__init__(f"{agent}: {message}")
        self.agent = agent
        self.message = message


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


def _record_end(span: Span, exc: BaseException) -> None:
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
def _span(name: str, attributes: dict[str, Any]) -> Iterator[Span]:
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
                _record_end(span, exc)
            raise


def _stage(name: str, round_number: int) -> contextlib.AbstractContextManager[Span]:
    """The span of one stage of the pipeline; the agents it runs are its children."""
    return _span(f"stage {name}", {STAGE: name, ROUND: round_number})


# What users are told about an endpoint's answer, by HTTP status: the endpoint's own text
# can quote the key it refused, so it only goes to the log (see `error_detail`).
STATUS_CATEGORIES = {
    400: "the model endpoint rejected the request",
    401: "the model endpoint refused the key",
    403: "the model endpoint refused access with this key",
    404: "the model endpoint does not know this model or deployment",
    408: "the model endpoint timed out",
    409: "the model endpoint reported a conflict",
    413: "the request is too large for the model endpoint",
    422: "the model endpoint could not process the request",
    429: "rate limited by the model endpoint",
}
# Error codes in a 400's body that say more than "rejected".
ERROR_CODE_CATEGORIES = {
    "content_filter": "the endpoint's content filter refused the request",
    "context_length_exceeded": "the request is too long for the model",
}
# Errors raised with the product's own sentences (the pool engine's refusals, deadlines and
# answer checks, the format checks): no endpoint text, so users read them as they are.
OWN_WORDS = (PoolError, TimeoutError, prompts.OutputFormatError)
INTERNAL_ERROR = "details in the server log"


def _status_category(status: int, code: object = None) -> str:
    if isinstance(code, str) and code in ERROR_CODE_CATEGORIES:
        return ERROR_CODE_CATEGORIES[code]
    if status in STATUS_CATEGORIES:
        return STATUS_CATEGORIES[status]
    if status >= 500:
        return "the model endpoint had a server error"
    return "the model endpoint rejected the request"


def _transport_category(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return "the model endpoint did not answer in time"
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        return "the connection to the model endpoint failed"
    if isinstance(exc, openai.APIResponseValidationError):
        return "the model endpoint sent an answer that could not be read"
    if isinstance(exc, openai.LengthFinishReasonError):
        return "the answer was cut off at the model's output length limit"
    if isinstance(exc, openai.ContentFilterFinishReasonError):
        return "the endpoint's content filter stopped the answer"
    return "the model endpoint failed"


def describe_error(exc: BaseException) -> str:
    """What the user is shown (design.error, AgentRun.error, the zip): one line, no secret.

    The endpoint's errors become a category ("the model endpoint refused the key", "rate
    limited by the model endpoint"...) because their text may quote the key; the product's
    own errors keep their sentence; anything else is an internal error named by its type.
    The whole detail, redacted, is logged by `error_detail`.
    """
    name = type(exc).__name__
    if isinstance(exc, openai.APIStatusError):
        return f"{name} (HTTP {exc.status_code}): {_status_category(exc.status_code, exc.code)}"
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return f"{name} (HTTP {status}): {_status_category(status)}"
    if isinstance(exc, openai.OpenAIError | httpx.HTTPError):
        return f"{name}: {_transport_category(exc)}"
    if isinstance(exc, OWN_WORDS):
        text = redact(str(exc).strip())
        return f"{name}: {text}" if text else name
    return f"{name} ({INTERNAL_ERROR})"


def error_detail(exc: BaseException) -> str:
    """For the log: what the user is shown, then the endpoint's own words and their cause,
    every key-like token redacted."""
    summary = describe_error(exc)
    parts = [summary]
    if isinstance(exc, openai.APIStatusError):
        parts.append(f"endpoint said: {exc.message}")
        if exc.request_id:
            parts.append(f"request id {exc.request_id}")
    elif str(exc).strip() and str(exc).strip() not in summary:
        parts.append(f"{type(exc).__name__}: {str(exc).strip()}")
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not isinstance(exc, OWN_WORDS):
        parts.append(f"caused by {type(cause).__name__}: {cause}")
    return redact("; ".join(parts))


# -- live events ---------------------------------------------------------------------------


class EventPublisher:
    """Sends `design.event` messages to the design's group; a failure never breaks a design."""

    def __init__(self, design_id: int) -> None:
        self.group = f"design-{design_id}"
        try:
            self._layer = get_channel_layer()
        except Exception:
            logger.warning(
                "no channel layer: design %s runs without live events", design_id, exc_info=True
            )
            self._layer = None

    async def send(self, event: dict[str, Any]) -> None:
        if self._layer is None:
            return
        try:
            await self._layer.group_send(self.group, {"type": "design.event", "event": event})
        except Exception:
            logger.warning(
                "could not publish %s to %s", event.get("kind"), self.group, exc_info=True
            )

    async def design_status(self, design: Design) -> None:
        await self.send(
            {
                "kind": "design_status",
                "status": design.status,
                "verdict": design.verdict,
                "recommendation": design.recommendation,
                "error": design.error,
                "failed_agent": design.failed_agent,
                "queue_place": await leases.queue_place(design),
            }
        )


class _LiveText:
    """One agent's text as it streams: sent to the page at most every TOKEN_EVENT_INTERVAL_S,
    saved to its run at most every PARTIAL_SAVE_INTERVAL_S, and kept whole for a stop."""

    def __init__(self, events: EventPublisher, run: AgentRun) -> None:
        self._events = events
        self._run = run
        self._parts: list[str] = []
        self._pending: list[str] = []
        self._last_sent = 0.0
        self._last_saved = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self._parts)

    async def add(self, chunk: str) -> None:
        self._parts.append(chunk)
        self._pending.append(chunk)
        now = time.monotonic()
        if now - self._last_sent >= TOKEN_EVENT_INTERVAL_S:
            await self.flush()
        if now - self._last_saved >= PARTIAL_SAVE_INTERVAL_S:
            self._last_saved = now
            await AgentRun.objects.filter(pk=self._run.pk, status=AgentRun.Status.RUNNING).aupdate(
                output_text=self.text
            )

    async def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._last_sent = time.monotonic()
        await self._events.send(
            {"kind": "tokens", "agent": self._run.agent, "round": self._run.round, "text": text}
        )


# -- agent calls ---------------------------------------------------------------------------


@dataclass
class AgentOutput:
    """What one finished agent produced, kept in memory for the prompts that read it."""

    run: AgentRun
    text: str
    json: dict | None = None


@dataclass
class _CallStats:
    text: str
    wait_ms: float
    overflow: bool
    ttft_ms: float | None
    tokens_in: int
    tokens_out: int
    finish_reason: str | None = None
    tokens_estimated: bool = False


async def complete_even_if_cancelled(awaitable: Awaitable[Any]) -> None:
    """Run a final write to its end although our task is being cancelled; caller re-raises."""
    task = asyncio.ensure_future(awaitable)
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            continue
        except Exception:
            logger.exception("final write after cancellation failed")
            return


async def _stream_call(
    registry: PoolRegistry,
    pool_name: str,
    messages: prompts.Messages,
    live: _LiveText | None,
    **create_kwargs: Any,
) -> _CallStats:
    """One streamed completion; the slot is held only for this call."""
    parts: list[str] = []
    async with registry.acquire(pool_name) as llm:
        wait_ms, overflow = llm.wait_ms, llm.overflow
        stream = llm.astream(messages, **create_kwargs)
        async for chunk in stream:
            parts.append(chunk)
            if live is not None:
                await live.add(chunk)
        usage = stream.usage
        ttft_ms = stream.first_token_ms
        finish_reason = stream.finish_reason
    if live is not None:
        await live.flush()
    return _CallStats(
        text="".join(parts),
        wait_ms=wait_ms,
        overflow=overflow,
        ttft_ms=ttft_ms,
        tokens_in=usage.prompt_tokens if usage else 0,
        tokens_out=usage.completion_tokens if usage else 0,
        finish_reason=finish_reason,
        tokens_estimated=bool(usage and usage.estimated),
    )


class DesignPipeline:
    """Runs the agents of one claimed design; `run()` raises AgentFailed on an agent failure.

    `checkpoints` are the design's finished agents, by (agent, round): `call` returns them
    as they are instead of calling the agent again.
    """

    def __init__(
        self,
        design: Design,
        registry: PoolRegistry,
        events: EventPublisher,
        *,
        owner: str,
        checkpoints: Mapping[tuple[str, int], AgentRun] | None = None,
    ) -> None:
        self.design = design
        self.registry = registry
        self.events = events
        self.owner = owner
        self.checkpoints = dict(checkpoints or {})
        self.brief = prompts.Brief.build(design.request_text, design.options, design.clarifications)

    async def run(self) -> None:
        brief = self.brief
        with _stage("requirements", 0):
            requirements = await self.call("requirements", 0, prompts.requirements_messages(brief))
        limit = max_revisions()
        round_number = 0
        previous: dict[str, str] = {}
        required_changes: str | None = None
        while True:
            with _stage("designs", round_number):
                designs = await self._designs(
                    requirements.text, round_number, previous, required_changes
                )
            with _stage("analyses", round_number):
                analyses = await self._analyses(requirements.text, designs, round_number)
            final_round = round_number >= limit
            with _stage("audit", round_number):
                audit = await self.call(
                    "auditor",
                    round_number,
                    prompts.auditor_messages(
                        brief,
                        requirements.text,
                        designs,
                        analyses,
                        round_number,
                        final_round=final_round,
                    ),
                    check=prompts.parse_verdict,
                )
            verdict = prompts.parse_verdict(audit.text)
            await self._update(verdict=verdict)
            if verdict != prompts.VERDICT_NEEDS_REVISION or final_round:
                break
            round_number += 1
            previous = designs
            required_changes = prompts.parse_required_changes(audit.text)
            await self._update(revisions=round_number)
        with _stage("recommendation", round_number):
            recommender = await self.call(
                "recommender",
                round_number,
                prompts.recommender_messages(brief, designs, analyses, audit.text),
                check=prompts.parse_recommendation,
            )
        choice = prompts.parse_recommendation(recommender.text)
        await self._update(recommendation=choice)
        chosen = designs["carlos" if choice == prompts.RECOMMEND_CARLOS else "ronei"]
        with _stage("terraform", round_number):
            await self.call(
                "terraform", round_number, prompts.terraform_messages(brief, choice, chosen)
            )

    async def _designs(
        self,
        requirements: str,
        round_number: int,
        previous: Mapping[str, str],
        required_changes: str | None,
    ) -> dict[str, str]:
        calls = {
            agent: prompts.design_messages(
                agent,
                self.brief,
                requirements,
                round_number=round_number,
                previous_design=previous.get(agent),
                required_changes=required_changes,
            )
            for agent in DESIGN_AGENTS
        }
        outputs = await self._parallel(calls, round_number)
        return {agent: output.text for agent, output in outputs.items()}

    async def _analyses(
        self, requirements: str, designs: Mapping[str, str], round_number: int
    ) -> dict[str, str]:
        calls = {
            agent: prompts.analyst_messages(agent, self.brief, requirements, designs, round_number)
            for agent in ANALYST_AGENTS
        }
        outputs = await self._parallel(calls, round_number, json_report=True)
        return {
            agent: prompts.analysis_text(output.json, output.text)
            for agent, output in outputs.items()
        }

    async def _parallel(
        self, calls: Mapping[str, prompts.Messages], round_number: int, *, json_report: bool = False
    ) -> dict[str, AgentOutput]:
        """Run sibling agents at once; the first failure cancels the others cleanly."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = {
                    agent: group.create_task(
                        self.call(agent, round_number, messages, json_report=json_report),
                        name=f"design-{self.design.pk}-{agent}",
                    )
                    for agent, messages in calls.items()
                }
        except* (AgentFailed, DesignLost, Drained) as failures:
            # The most telling first: the design is not ours any more, an agent failed, then
            # a drain (a sibling that still finished is a checkpoint all the same).
            first = sorted(
                failures.exceptions,
                key=lambda exc: [DesignLost, AgentFailed, Drained].index(type(exc)),
            )
            raise first[0] from None
        return {agent: task.result() for agent, task in tasks.items()}

    async def call(
        self,
        agent: str,
        round_number: int,
        messages: prompts.Messages,
        *,
        json_report: bool = False,
        check: Callable[[str], object] | None = None,
    ) -> AgentOutput:
        """One agent: a run row, a streamed call on its pool, validation, the finished row;
        or the stored output when the agent already finished in an earlier start (an event
        on the stage's span, where a called agent has a span of its own)."""
        stored = self.checkpoints.get((agent, round_number))
        if stored is not None:
            trace.get_current_span().add_event(
                CHECKPOINT_REUSED,
                {telemetry.GEN_AI_AGENT_NAME: agent, ROUND: round_number, AGENT_RUN_ID: stored.pk},
            )
            return AgentOutput(run=stored, text=stored.output_text, json=stored.output_json)
        if leases.draining():
            raise Drained(f"the server is stopping; {agent} starts where the design resumes")
        pool_name = AGENT_POOLS[agent]
        attributes = {
            telemetry.GEN_AI_OPERATION_NAME: telemetry.OPERATION_INVOKE_AGENT,
            telemetry.GEN_AI_AGENT_NAME: agent,
            telemetry.GEN_AI_PROVIDER_NAME: telemetry.PROVIDER_BY_ENDPOINT_KIND.get(
                self.registry.config.endpoint.kind, telemetry.PROVIDER_OPENAI
            ),
            ROUND: round_number,
            AGENT_POOL: pool_name,
        }
        with _span(f"invoke_agent {agent}", attributes) as span:
            return await self._run_agent(
                span, agent, round_number, messages, json_report=json_report, check=check
            )

    async def _run_agent(
        self,
        span: Span,
        agent: str,
        round_number: int,
        messages: prompts.Messages,
        *,
        json_report: bool,
        check: Callable[[str], object] | None,
    ) -> AgentOutput:
        pool_name = AGENT_POOLS[agent]
        pool_config = self.registry.config.pools[pool_name]
        run = await AgentRun.objects.acreate(
            design=self.design,
            agent=agent,
            round=round_number,
            attempt=self.design.attempts,
            pool=pool_name,
            model=pool_config.model,
            temperature=pool_config.temperature,
            status=AgentRun.Status.RUNNING,
            started_at=timezone.now(),
        )
        span.set_attribute(AGENT_RUN_ID, run.pk)
        await self.events.send(
            {
                "kind": "agent_started",
                "run_id": run.pk,
                "agent": agent,
                "round": round_number,
                "pool": pool_name,
                "model": pool_config.model,
            }
        )
        live = _LiveText(self.events, run)
        try:
            kwargs = {"response_format": JSON_RESPONSE_FORMAT} if json_report else {}
            stats = await _stream_call(self.registry, pool_name, messages, live, **kwargs)
            self._record(run, stats)
            run.output_text = stats.text
            if stats.finish_reason in UNFINISHED_ANSWERS:
                raise prompts.OutputFormatError(UNFINISHED_ANSWERS[stats.finish_reason])
            if not stats.text.strip():
                raise prompts.OutputFormatError(
                    f"empty answer (finish reason {stats.finish_reason or 'unknown'})"
                )
            if json_report:
                await self._validate_report(run, agent, messages, stats.text)
            if check is not None:
                check(run.output_text)
        except asyncio.CancelledError:
            run.output_text = run.output_text or live.text  # what the user saw arrive
            await complete_even_if_cancelled(
                self._finish_run(run, AgentRun.Status.STOPPED, STOPPED_ERROR)
            )
            raise
        except Exception as exc:
            message = describe_error(exc)
            if isinstance(exc, EXPECTED_AGENT_ERRORS):
                logger.warning("design %s: %s failed: %s", self.design.pk, agent, error_detail(exc))
            else:
                logger.exception(
                    "design %s: %s crashed: %s", self.design.pk, agent, error_detail(exc)
                )
            run.output_text = run.output_text or live.text
            await self._finish_run(run, AgentRun.Status.FAILED, message)
            raise AgentFailed(agent, message) from exc
        if not await self._checkpoint(run):
            await self._finish_run(run, AgentRun.Status.STOPPED, "stopped: " + LOST_ERROR)
            raise DesignLost(f"{agent} finished after the design was {LOST_ERROR}")
        self.checkpoints[(agent, round_number)] = run
        return AgentOutput(run=run, text=run.output_text, json=run.output_json)

    async def _checkpoint(self, run: AgentRun) -> bool:
        """Save a finished agent as SUCCEEDED, only while this process holds the design: a
        design taken over or cancelled meanwhile keeps no answer from here. False if not."""
        run.status, run.error, run.finished_at = AgentRun.Status.SUCCEEDED, "", timezone.now()
        saved = await AgentRun.objects.filter(
            pk=run.pk,
            design__lease_owner=self.owner,
            design__status=Status.RUNNING,
        ).aupdate(
            status=run.status,
            error="",
            finished_at=run.finished_at,
            output_text=run.output_text,
            output_json=run.output_json,
            json_error=run.json_error,
            wait_ms=run.wait_ms,
            overflow=run.overflow,
            ttft_ms=run.ttft_ms,
            tokens_in=run.tokens_in,
            tokens_out=run.tokens_out,
            tokens_estimated=run.tokens_estimated,
        )
        if saved:
            await self._announce_finished(run)
        return bool(saved)

    async def _validate_report(
        self, run: AgentRun, agent: str, messages: prompts.Messages, text: str
    ) -> None:
        """Validate the analyst's JSON; on failure ask once for a repair, then record."""
        try:
            run.output_json = validate_report(agent, text)
            return
        except ReportInvalid as first:
            problem = str(first)
        logger.info(
            "design %s: %s returned invalid JSON, asking once for a repair: %s",
            self.design.pk,
            agent,
            problem,
        )
        repair = prompts.repair_messages(messages, text, problem)
        stats = await _stream_call(
            self.registry, AGENT_POOLS[agent], repair, None, response_format=JSON_RESPONSE_FORMAT
        )
        run.tokens_in += stats.tokens_in
        run.tokens_out += stats.tokens_out
        run.tokens_estimated = run.tokens_estimated or stats.tokens_estimated
        run.overflow = run.overflow or stats.overflow
        run.output_text = stats.text
        try:
            run.output_json = validate_report(agent, stats.text)
        except ReportInvalid as second:
            run.json_error = (
                f"still invalid after one repair attempt: {second} (first answer {problem})"
            )

    @staticmethod
    def _record(run: AgentRun, stats: _CallStats) -> None:
        run.wait_ms = round(stats.wait_ms, 3)
        run.overflow = stats.overflow
        run.ttft_ms = round(stats.ttft_ms, 3) if stats.ttft_ms is not None else None
        run.tokens_in = stats.tokens_in
        run.tokens_out = stats.tokens_out
        run.tokens_estimated = stats.tokens_estimated

    async def _finish_run(self, run: AgentRun, status: str, error: str = "") -> None:
        run.status = status
        run.error = error
        run.finished_at = timezone.now()
        await run.asave()
        await self._announce_finished(run)

    async def _announce_finished(self, run: AgentRun) -> None:
        await self.events.send(
            {
                "kind": "agent_finished",
                "run_id": run.pk,
                "agent": run.agent,
                "round": run.round,
                "status": run.status,
                "duration_ms": run.duration_ms,
                "ttft_ms": run.ttft_ms,
                "wait_ms": run.wait_ms,
                "pool": run.pool,
                "overflow": run.overflow,
                "tokens_in": run.tokens_in,
                "tokens_out": run.tokens_out,
                "tokens_estimated": run.tokens_estimated,
                "error": run.error,
            }
        )

    async def _update(self, **fields: Any) -> None:
        """Write a few design fields now, so a reload sees the verdict as soon as it exists."""
        for name, value in fields.items():
            setattr(self.design, name, value)
        await Design.objects.filter(pk=self.design.pk, **self._held()).aupdate(**fields)

    def _held(self) -> dict[str, Any]:
        return {"lease_owner": self.owner, "status": Status.RUNNING}


# -- the public entry points ------------------------------------------------------------------


async def create_design(
    owner: Any,
    request_text: str,
    options: Mapping[str, Any] | None = None,
    clarifications: Sequence[Mapping[str, Any]] | None = None,
) -> Design:
    """A QUEUED design with validated options (ValueError names a bad option key), held by
    this process."""
    text = request_text.strip()
    if not text:
        raise ValueError("the request text is empty")
    return await Design.objects.acreate(
        owner=owner,
        request_text=text,
        options=validate_options(options),
        clarifications=[
            {"question": str(item["question"]), "answer": item.get("answer") or None}
            for item in (clarifications or ())
        ],
        # The creator holds it until it starts it: no sweeper takes it meanwhile.
        **leases.held_by(leases.this_instance()),
    )


async def _claim(design_id: int, owner: str, now: datetime) -> int:
    """Start (or resume) a design for `owner`, if it holds the lease or nobody does; how many
    rows changed (0 or 1). The first start sets `started_at`; a resume keeps it."""
    return (
        await Design.objects.filter(leases.mine_or_free(owner, now))
        .filter(pk=design_id, status__in=CLAIMABLE_STATUSES)
        .aupdate(
            status=Status.RUNNING,
            started_at=Coalesce(F("started_at"), Value(now)),
            finished_at=None,
            attempts=F("attempts") + 1,
            error="",
            failed_agent="",
            **leases.held_by(owner, now),
        )
    )


async def _checkpoints(design: Design) -> dict[tuple[str, int], AgentRun]:
    """The design's finished agents, the latest of each (agent, round)."""
    done: dict[tuple[str, int], AgentRun] = {}
    query = design.runs.filter(status=AgentRun.Status.SUCCEEDED).order_by("id")
    async for run in query:
        done[(run.agent, run.round)] = run
    return done


async def run_design(design_id: int, *, owner: str | None = None) -> None:
    """The pipeline for one design, from its last finished agent to a terminal status, or,
    when stopped, back to QUEUED with what its running agents had streamed saved."""
    owner = owner or leases.this_instance()
    now = timezone.now()
    try:
        claimed = await _claim(design_id, owner, now)
    except DatabaseError as exc:
        # Never leave a design queued forever: record why it could not start (best effort;
        # if even that fails, its lease expires and a sweeper takes it over).
        logger.exception("design %s: could not be started", design_id)
        with contextlib.suppress(DatabaseError):
            await Design.objects.filter(
                leases.mine_or_free(owner), pk=design_id, status__in=CLAIMABLE_STATUSES
            ).aupdate(
                status=Status.FAILED,
                finished_at=timezone.now(),
                error=f"internal error: could not start: {describe_error(exc)}",
                **leases.RELEASED,
            )
        raise
    if not claimed:
        current = await Design.objects.filter(pk=design_id).values("status", "lease_owner").afirst()
        raise DesignNotRunnable(
            f"design {design_id} cannot start: "
            + (
                "it does not exist"
                if current is None
                else f"its status is {current['status']!r}"
                + (", and another server holds it" if current["lease_owner"] else "")
            )
        )
    design = await Design.objects.aget(pk=design_id)
    # The design's trace: a new one at its first start, the stored one at every later start.
    with tracer.start_as_current_span(
        "design",
        context=telemetry.context_from_traceparent(design.trace_parent),
        kind=SpanKind.INTERNAL,
        attributes={DESIGN_ID: design.pk, DESIGN_ATTEMPT: design.attempts},
        record_exception=False,
        set_status_on_exception=False,
    ) as root:
        await _remember_trace(design, root)
        await _run_claimed(design, owner, root)


async def _remember_trace(design: Design, root: Span) -> None:
    """Store the first root span's traceparent on the design: later starts continue it."""
    if design.trace_parent:
        return
    traceparent = telemetry.traceparent_of(root)
    if traceparent:
        await Design.objects.filter(pk=design.pk, trace_parent="").aupdate(trace_parent=traceparent)
        design.trace_parent = traceparent


async def _run_claimed(design: Design, owner: str, root: Span) -> None:
    """The pipeline of a design this process just claimed, under its root span `root`."""
    design_id = design.pk
    events = EventPublisher(design_id)
    await events.design_status(design)
    checkpoints = await _checkpoints(design)
    logger.info(
        "design %s: pipeline %s (attempt %s, %d agent(s) already finished)",
        design_id,
        "resumed" if checkpoints else "started",
        design.attempts,
        len(checkpoints),
    )
    pipeline = DesignPipeline(design, get_pool(), events, owner=owner, checkpoints=checkpoints)
    finish = _Finisher(design, events, owner)
    try:
        await pipeline.run()
    except asyncio.CancelledError as exc:
        _end_root(root, Status.QUEUED, exc)
        await complete_even_if_cancelled(finish.stopped())
        raise
    except Drained as exc:
        _end_root(root, Status.QUEUED, exc)
        await finish.stopped()
    except DesignLost as lost:
        _end_root(root, "lost", lost)
        logger.info("design %s: stopped here: %s", design_id, lost)
    except AgentFailed as failure:
        _end_root(root, Status.FAILED, failure)
        await finish.ended(Status.FAILED, error=failure.message, failed_agent=failure.agent)
    except Exception as exc:
        _end_root(root, Status.FAILED, exc)
        logger.exception("design %s: pipeline crashed", design_id)
        await finish.ended(Status.FAILED, error=f"internal error: {describe_error(exc)}")
    else:
        _end_root(root, Status.SUCCEEDED)
        await finish.ended(Status.SUCCEEDED)


def _end_root(root: Span, status: str, exc: BaseException | None = None) -> None:
    """How this start of the design ended, on its root span (an error status when FAILED)."""
    if not root.is_recording():
        return
    root.set_attribute(DESIGN_STATUS, str(status))
    if exc is not None:
        _record_end(root, exc)


@dataclass
class _Finisher:
    """The last writes of a design's run, made only while `owner` still holds it."""

    design: Design
    events: EventPublisher
    owner: str

    def _held(self) -> Any:
        return Design.objects.filter(
            pk=self.design.pk, lease_owner=self.owner, status=Status.RUNNING
        )

    async def ended(self, status: str, *, error: str = "", failed_agent: str = "") -> None:
        """The terminal write; any run still marked running (a cancelled sibling) is closed."""
        now = timezone.now()
        written = await self._held().aupdate(
            status=status,
            error=error,
            failed_agent=failed_agent,
            finished_at=now,
            **leases.RELEASED,
        )
        if not written:
            logger.info("design %s: not ours any more; %s not recorded", self.design.pk, status)
            return
        if status != Status.SUCCEEDED:
            await AgentRun.objects.filter(
                design=self.design, status=AgentRun.Status.RUNNING
            ).aupdate(status=AgentRun.Status.FAILED, error=error or status, finished_at=now)
        await self._announce(status=status, error=error, failed_agent=failed_agent)
        logger.info("design %s: %s%s", self.design.pk, status, f" ({error})" if error else "")

    async def stopped(self) -> None:
        """Stopped before the end (cancelled, drained): QUEUED again, the lease released, so
        that this or another instance resumes it from its last finished agent at once."""
        written = await self._held().aupdate(status=Status.QUEUED, **leases.RELEASED)
        if written:
            # A run stopped before its agent's own handler ran (cancelled while its row was
            # being written) is closed here: it was ours, as the design was.
            await AgentRun.objects.filter(
                design=self.design, status=AgentRun.Status.RUNNING
            ).aupdate(
                status=AgentRun.Status.STOPPED, error=STOPPED_ERROR, finished_at=timezone.now()
            )
            await self._announce(status=Status.QUEUED, error="", failed_agent="")
            logger.info(
                "design %s: stopped; it resumes from its last finished agent", self.design.pk
            )

    async def _announce(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self.design, name, value)
        await self.events.design_status(self.design)


async def ask_clarifying_questions(design_id: int) -> list[str]:
    """Ask the requirements analyst (mini pool) for 3-5 questions and store them unanswered.

    The design becomes AWAITING_ANSWERS. Questions are optional: if the endpoint fails, the
    failure is logged, nothing is stored and [] is returned so the design can run as asked.
    A refusal by the pools (POOL_REFUSALS) is raised instead: the design's own agents would
    be refused too, so running it "as asked" would only make it fail.
    """
    design = await Design.objects.aget(pk=design_id)
    if design.status not in RUNNABLE_STATUSES:
        raise DesignNotRunnable(f"design {design_id} is {design.status}; it cannot ask questions")
    brief = prompts.Brief.build(design.request_text, design.options)
    registry = get_pool()
    try:
        stats = await _stream_call(
            registry, AGENT_POOLS["requirements"], prompts.questions_messages(brief), None
        )
    except POOL_REFUSALS:
        raise
    except (openai.OpenAIError, PoolError, httpx.HTTPError, TimeoutError) as exc:
        logger.warning("design %s: no clarifying questions: %s", design_id, error_detail(exc))
        return []
    questions = prompts.parse_questions(stats.text)
    await Design.objects.filter(pk=design_id, status__in=RUNNABLE_STATUSES).aupdate(
        clarifications=[{"question": question, "answer": None} for question in questions],
        status=Status.AWAITING_ANSWERS if questions else Status.QUEUED,
    )
    return questions


async def submit_answers(design_id: int, answers: Sequence[str | None]) -> Design:
    """Store the user's answers (blank or missing = skipped) beside their questions; QUEUED."""
    design = await Design.objects.aget(pk=design_id)
    if design.status not in RUNNABLE_STATUSES:
        raise DesignNotRunnable(f"design {design_id} is {design.status}; answers come too late")
    clarifications = []
    for index, item in enumerate(design.clarifications):
        answer = answers[index] if index < len(answers) else None
        answer = answer.strip() if isinstance(answer, str) else None
        clarifications.append({"question": item["question"], "answer": answer or None})
    design.clarifications = clarifications
    design.status = Status.QUEUED
    await design.asave(update_fields=["clarifications", "status"])
    return design
