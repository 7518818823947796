"""The design pipeline: nine agents over the pooled LLM connections, persisted as they go.

Order (ANCHORS.md section 1): requirements -> (Carlos || Ronei) -> (security || cost ||
reliability) -> auditor -> at most DESIGN_MAX_REVISIONS revision rounds back to the designs
-> recommender -> Terraform. Every agent holds a pool slot only while its own call streams,
each AgentRun row is written when the agent starts and again when it finishes, and every
design ends in a terminal status, whatever happens (FAILED with the agent and error, or
INTERRUPTED when the task is cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import openai
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError
from django.db.models import F
from django.utils import timezone

from agents import prompts
from agents.models import AgentRun, Design
from agents.options import AGENT_POOLS, ANALYST_AGENTS, DESIGN_AGENTS, validate_options
from agents.redaction import RedactSecrets, redact
from agents.schemas import ReportInvalid, validate_report
from pools.exceptions import (
    CircuitOpen,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolTimeout,
    RateBudgetExceeded,
    RateLimited,
)
from pools.registry import PoolRegistry
from pools.runtime import get_pool

logger = logging.getLogger("agents")
# Every failure the pipeline or the pages log passes through it: no key reaches the log,
# not even inside an unexpected exception's traceback.
if not any(isinstance(existing, RedactSecrets) for existing in logger.filters):
    logger.addFilter(RedactSecrets())

Status = Design.Status
RUNNABLE_STATUSES = (Status.QUEUED, Status.AWAITING_ANSWERS)
# Live token events are coalesced per agent to at most one per this many seconds, so the
# in-memory channel layer's 100-message capacity is never reached.
TOKEN_EVENT_INTERVAL_S = 0.05
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


class AgentFailed(Exception):
    """One agent failed; the design ends FAILED naming it."""

    def __init__(self, agent: str, message: str) -> None:
        super().__init__(f"{agent}: {message}")
        self.agent = agent
        self.message = message


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
            }
        )


class _TokenCoalescer:
    """Buffers one agent's chunks and sends them at most every TOKEN_EVENT_INTERVAL_S."""

    def __init__(self, events: EventPublisher, agent: str, round_number: int) -> None:
        self._events = events
        self._agent = agent
        self._round = round_number
        self._pending: list[str] = []
        self._last_sent = 0.0

    async def add(self, chunk: str) -> None:
        self._pending.append(chunk)
        if time.monotonic() - self._last_sent >= TOKEN_EVENT_INTERVAL_S:
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._last_sent = time.monotonic()
        await self._events.send(
            {"kind": "tokens", "agent": self._agent, "round": self._round, "text": text}
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


async def _complete_even_if_cancelled(awaitable: Awaitable[Any]) -> None:
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
    coalescer: _TokenCoalescer | None,
    **create_kwargs: Any,
) -> _CallStats:
    """One streamed completion; the slot is held only for this call."""
    parts: list[str] = []
    async with registry.acquire(pool_name) as llm:
        wait_ms, overflow = llm.wait_ms, llm.overflow
        stream = llm.astream(messages, **create_kwargs)
        async for chunk in stream:
            parts.append(chunk)
            if coalescer is not None:
                await coalescer.add(chunk)
        usage = stream.usage
        ttft_ms = stream.first_token_ms
        finish_reason = stream.finish_reason
    if coalescer is not None:
        await coalescer.flush()
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
    """Runs the agents of one claimed design; `run()` raises AgentFailed on an agent failure."""

    def __init__(self, design: Design, registry: PoolRegistry, events: EventPublisher) -> None:
        self.design = design
        self.registry = registry
        self.events = events
        self.brief = prompts.Brief.build(design.request_text, design.options, design.clarifications)

    async def run(self) -> None:
        brief = self.brief
        requirements = await self.call("requirements", 0, prompts.requirements_messages(brief))
        limit = max_revisions()
        round_number = 0
        previous: dict[str, str] = {}
        required_changes: str | None = None
        while True:
            designs = await self._designs(
                requirements.text, round_number, previous, required_changes
            )
            analyses = await self._analyses(requirements.text, designs, round_number)
            final_round = round_number >= limit
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
        recommender = await self.call(
            "recommender",
            round_number,
            prompts.recommender_messages(brief, designs, analyses, audit.text),
            check=prompts.parse_recommendation,
        )
        choice = prompts.parse_recommendation(recommender.text)
        await self._update(recommendation=choice)
        chosen = designs["carlos" if choice == prompts.RECOMMEND_CARLOS else "ronei"]
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
        except* AgentFailed as failures:
            raise failures.exceptions[0] from None
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
        """One agent: a run row, a streamed call on its pool, validation, the finished row."""
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
        try:
            coalescer = _TokenCoalescer(self.events, agent, round_number)
            kwargs = {"response_format": JSON_RESPONSE_FORMAT} if json_report else {}
            stats = await _stream_call(self.registry, pool_name, messages, coalescer, **kwargs)
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
            await _complete_even_if_cancelled(
                self._finish_run(run, AgentRun.Status.FAILED, "cancelled before it finished")
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
            await self._finish_run(run, AgentRun.Status.FAILED, message)
            raise AgentFailed(agent, message) from exc
        await self._finish_run(run, AgentRun.Status.SUCCEEDED)
        return AgentOutput(run=run, text=run.output_text, json=run.output_json)

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
        await Design.objects.filter(pk=self.design.pk).aupdate(**fields)


# -- the public entry points ------------------------------------------------------------------


async def create_design(
    owner: Any,
    request_text: str,
    options: Mapping[str, Any] | None = None,
    clarifications: Sequence[Mapping[str, Any]] | None = None,
) -> Design:
    """A QUEUED design with validated options (ValueError names a bad option key)."""
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
    )


async def _claim(design_id: int, now: datetime) -> int:
    """Move a runnable design to RUNNING for a new attempt; how many rows changed (0 or 1)."""
    return await Design.objects.filter(pk=design_id, status__in=RUNNABLE_STATUSES).aupdate(
        status=Status.RUNNING,
        started_at=now,
        finished_at=None,
        attempts=F("attempts") + 1,
        verdict="",
        recommendation="",
        revisions=0,
        error="",
        failed_agent="",
    )


async def run_design(design_id: int) -> None:
    """The whole pipeline for one QUEUED (or AWAITING_ANSWERS) design, to a terminal status."""
    now = timezone.now()
    try:
        claimed = await _claim(design_id, now)
    except DatabaseError as exc:
        # Never leave a design queued forever: record why it could not start (best effort;
        # if even that fails, the next server start marks it interrupted).
        logger.exception("design %s: could not be started", design_id)
        with contextlib.suppress(DatabaseError):
            await Design.objects.filter(pk=design_id, status__in=RUNNABLE_STATUSES).aupdate(
                status=Status.FAILED,
                finished_at=timezone.now(),
                error=f"internal error: could not start: {describe_error(exc)}",
            )
        raise
    if not claimed:
        current = (
            await Design.objects.filter(pk=design_id).values_list("status", flat=True).afirst()
        )
        raise DesignNotRunnable(
            f"design {design_id} cannot start: "
            + ("it does not exist" if current is None else f"its status is {current!r}")
        )
    design = await Design.objects.aget(pk=design_id)
    events = EventPublisher(design_id)
    await events.design_status(design)
    logger.info("design %s: pipeline started (attempt %s)", design_id, design.attempts)
    try:
        await DesignPipeline(design, get_pool(), events).run()
    except asyncio.CancelledError:
        await _complete_even_if_cancelled(
            _finish_design(
                design,
                events,
                Status.INTERRUPTED,
                error="interrupted: the pipeline task was cancelled",
            )
        )
        raise
    except AgentFailed as failure:
        await _finish_design(
            design, events, Status.FAILED, error=failure.message, failed_agent=failure.agent
        )
    except Exception as exc:
        logger.exception("design %s: pipeline crashed", design_id)
        await _finish_design(
            design, events, Status.FAILED, error=f"internal error: {describe_error(exc)}"
        )
    else:
        await _finish_design(design, events, Status.SUCCEEDED)


async def _finish_design(
    design: Design, events: EventPublisher, status: str, *, error: str = "", failed_agent: str = ""
) -> None:
    """The terminal write; any run still marked running (a cancelled sibling) is closed too."""
    now = timezone.now()
    if status != Status.SUCCEEDED:
        await AgentRun.objects.filter(design=design, status=AgentRun.Status.RUNNING).aupdate(
            status=AgentRun.Status.FAILED, error=error or f"the design {status}", finished_at=now
        )
    design.status, design.error, design.failed_agent, design.finished_at = (
        status,
        error,
        failed_agent,
        now,
    )
    await Design.objects.filter(pk=design.pk).aupdate(
        status=status, error=error, failed_agent=failed_agent, finished_at=now
    )
    await events.design_status(design)
    logger.info("design %s: %s%s", design.pk, status, f" ({error})" if error else "")


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
