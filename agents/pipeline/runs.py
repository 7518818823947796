"""Starting, resuming and ending designs: the claim on a design, its root span, its end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import openai
from django.db import DatabaseError
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from opentelemetry.trace import Span, SpanKind

from agents import leases, prompts
from agents.models import AgentRun, Design
from agents.options import validate_options
from agents.pipeline.errors import (
    CLAIMABLE_STATUSES,
    POOL_REFUSALS,
    RUNNABLE_STATUSES,
    STOPPED_ERROR,
    AgentFailed,
    DesignLost,
    DesignNotRunnable,
    Drained,
    Status,
    describe_error,
    error_detail,
)
from agents.pipeline.flow import DesignPipeline, complete_even_if_cancelled, stream_call
from agents.pipeline.live import EventPublisher
from agents.pipeline.tracing import DESIGN_ATTEMPT, DESIGN_ID, DESIGN_STATUS, record_end, tracer
from agents.specs import Stage, only_in_stage
from pools.engine import telemetry
from pools.engine.exceptions import (
    PoolError,
)
from pools.runtime import get_pool

logger = logging.getLogger("agents")

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
    """The pipeline of a design this process just claimed, under its root span `root`; pages
    that join meanwhile are given its running agents' text so far."""
    events = EventPublisher(design.pk)
    async with events.answering():
        await _run_with_events(design, owner, root, events)


async def _run_with_events(design: Design, owner: str, root: Span, events: EventPublisher) -> None:
    design_id = design.pk
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
        record_end(root, exc)


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
        stats = await stream_call(
            registry,
            only_in_stage(Stage.REQUIREMENTS).pool,
            prompts.questions_messages(brief),
            None,
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
