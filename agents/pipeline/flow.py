"""The flow of one design: the stages in order, each agent called once per round, its run
written as it goes, a finished agent's answer reused instead of asked again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.utils import timezone
from opentelemetry import trace
from opentelemetry.trace import Span

from agents import leases, prompts
from agents.events import (
    AgentFinished,
    AgentStarted,
    agent_label,
)
from agents.models import AgentRun, Design
from agents.pipeline.errors import (
    EXPECTED_AGENT_ERRORS,
    JSON_RESPONSE_FORMAT,
    LOST_ERROR,
    STOPPED_ERROR,
    UNFINISHED_ANSWERS,
    AgentFailed,
    DesignLost,
    Drained,
    Status,
    describe_error,
    error_detail,
    max_revisions,
)
from agents.pipeline.live import EventPublisher, LiveText
from agents.pipeline.tracing import (
    AGENT_POOL,
    AGENT_RUN_ID,
    CHECKPOINT_REUSED,
    ROUND,
    internal_span,
    stage_span,
)
from agents.schemas import ReportInvalid, validate_report
from agents.specs import Output, Stage, only_in_stage, spec_for, specs_in_stage
from pools.engine import telemetry
from pools.engine.registry import PoolRegistry

logger = logging.getLogger("agents")

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


async def stream_call(
    registry: PoolRegistry,
    pool_name: str,
    messages: prompts.Messages,
    live: LiveText | None,
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
        with stage_span("requirements", 0):
            requirements = await self._ask(Stage.REQUIREMENTS, 0, brief)
        limit = max_revisions()
        round_number = 0
        previous: dict[str, str] = {}
        required_changes: str | None = None
        while True:
            with stage_span("designs", round_number):
                designs = await self._designs(
                    requirements.text, round_number, previous, required_changes
                )
            with stage_span("analyses", round_number):
                analyses = await self._analyses(requirements.text, designs, round_number)
            final_round = round_number >= limit
            with stage_span("audit", round_number):
                audit = await self._ask(
                    Stage.AUDIT,
                    round_number,
                    brief,
                    requirements.text,
                    designs,
                    analyses,
                    round_number,
                    final_round=final_round,
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
        with stage_span("recommendation", round_number):
            recommender = await self._ask(
                Stage.RECOMMENDATION,
                round_number,
                brief,
                designs,
                analyses,
                audit.text,
                check=prompts.parse_recommendation,
            )
        choice = prompts.parse_recommendation(recommender.text)
        await self._update(recommendation=choice)
        chosen = designs["carlos" if choice == prompts.RECOMMEND_CARLOS else "ronei"]
        with stage_span("terraform", round_number):
            await self._ask(Stage.TERRAFORM, round_number, brief, choice, chosen)

    async def _ask(
        self,
        stage: Stage,
        round_number: int,
        *args: Any,
        check: Callable[[str], object] | None = None,
        **kwargs: Any,
    ) -> AgentOutput:
        """The one agent of a sequential stage, prompted by its spec's message builder (with
        `args` and `kwargs`); `check` reads the line the flow needs from its answer."""
        spec = only_in_stage(stage)
        return await self.call(
            spec.key, round_number, spec.build_messages(*args, **kwargs), check=check
        )

    async def _designs(
        self,
        requirements: str,
        round_number: int,
        previous: Mapping[str, str],
        required_changes: str | None,
    ) -> dict[str, str]:
        calls = {
            spec.key: spec.build_messages(
                spec.key,
                self.brief,
                requirements,
                round_number=round_number,
                previous_design=previous.get(spec.key),
                required_changes=required_changes,
            )
            for spec in specs_in_stage(Stage.DESIGNS)
        }
        outputs = await self._parallel(calls, round_number)
        return {agent: output.text for agent, output in outputs.items()}

    async def _analyses(
        self, requirements: str, designs: Mapping[str, str], round_number: int
    ) -> dict[str, str]:
        calls = {
            spec.key: spec.build_messages(spec.key, self.brief, requirements, designs, round_number)
            for spec in specs_in_stage(Stage.ANALYSES)
        }
        outputs = await self._parallel(calls, round_number)
        return {
            agent: prompts.analysis_text(output.json, output.text)
            for agent, output in outputs.items()
        }

    async def _parallel(
        self, calls: Mapping[str, prompts.Messages], round_number: int
    ) -> dict[str, AgentOutput]:
        """Run sibling agents at once; the first failure cancels the others cleanly."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = {
                    agent: group.create_task(
                        self.call(agent, round_number, messages),
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
            raise Drained(
                f"the server is stopping; {agent_label(agent)} starts where the design resumes"
            )
        pool_name = spec_for(agent).pool
        attributes = {
            telemetry.GEN_AI_OPERATION_NAME: telemetry.OPERATION_INVOKE_AGENT,
            telemetry.GEN_AI_AGENT_NAME: agent,
            telemetry.GEN_AI_PROVIDER_NAME: telemetry.PROVIDER_BY_ENDPOINT_KIND.get(
                self.registry.config.endpoint.kind, telemetry.PROVIDER_OPENAI
            ),
            ROUND: round_number,
            AGENT_POOL: pool_name,
        }
        with internal_span(f"invoke_agent {agent}", attributes) as span:
            return await self._run_agent(span, agent, round_number, messages, check=check)

    async def _run_agent(
        self,
        span: Span,
        agent: str,
        round_number: int,
        messages: prompts.Messages,
        *,
        check: Callable[[str], object] | None,
    ) -> AgentOutput:
        spec = spec_for(agent)
        pool_name = spec.pool
        json_report = spec.output == Output.JSON
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
        await self.events.run_changed(run, AgentStarted)
        live = self.events.live_text(run)
        try:
            kwargs = {"response_format": JSON_RESPONSE_FORMAT} if json_report else {}
            stats = await stream_call(self.registry, pool_name, messages, live, **kwargs)
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
        stats = await stream_call(
            self.registry, spec_for(agent).pool, repair, None, response_format=JSON_RESPONSE_FORMAT
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
        await self.events.run_changed(run, AgentFinished)

    async def _update(self, **fields: Any) -> None:
        """Write a few design fields now, so a reload sees the verdict as soon as it exists."""
        for name, value in fields.items():
            setattr(self.design, name, value)
        await Design.objects.filter(pk=self.design.pk, **self._held()).aupdate(**fields)

    def _held(self) -> dict[str, Any]:
        return {"lease_owner": self.owner, "status": Status.RUNNING}
