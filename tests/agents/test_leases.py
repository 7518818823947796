"""Durable designs: leases in the database, the sweeper's take-overs, the drain, cancels.

Real designs against the real simulator through the real pool engine; "another process" is
a lease owner name that is not this process's, written as that process would write it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from django.utils import timezone

from agents import leases, pipeline, tasks
from agents.models import AgentRun, Design
from agents.options import AGENTS
from agents.pipeline import create_design
from agents.tasks import DesignSupervisor, DrainReport, cancel_design, start_design
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.django_db(transaction=True)

REQUEST = "A ticketing system for 300 venues with seat maps and a resale market"
OTHER = "other-host:4242:feedbeef"
SETTLE_LIMIT_S = 30.0  # a fail-safe limit for what happens in the background, not a timing check


async def reload(design: Design) -> Design:
    return await Design.objects.aget(pk=design.pk)


async def runs_of(design: Design) -> list[AgentRun]:
    return [run async for run in AgentRun.objects.filter(design=design).order_by("id")]


def has_written(design: Design, agent: str) -> Callable[[], Awaitable[bool]]:
    """Whether `agent`'s run of `design` has saved some text yet (a condition to wait for)."""

    async def written() -> bool:
        run = await AgentRun.objects.filter(design=design, agent=agent).afirst()
        return run is not None and bool(run.output_text)

    return written


async def drained(design: Design, seconds: float) -> tuple[DrainReport, Design]:
    """Drain this process (up to `seconds`); its report and the design, handed back to the
    queue with no lease."""
    try:
        report = await tasks.drain(seconds)
    finally:
        leases.end_draining()
    design = await reload(design)
    assert (design.status, design.lease_owner) == (Design.Status.QUEUED, "")
    return report, design


@pytest.fixture
def started(simulator_factory, make_registry, install_registry, owner, recorder):
    """`design, task = await started(**simulator_options)`: a design of REQUEST held by this
    process and started in the background, against a new simulator answering with `recorder`."""

    async def start(**simulator_options) -> tuple[Design, asyncio.Task[None]]:
        simulator = await simulator_factory(responder=recorder, **simulator_options)
        install_registry(make_registry(simulator))
        design = await create_design(owner, REQUEST)
        return design, start_design(design.pk)

    return start


@pytest.fixture
async def carlos_writing(started, monkeypatch) -> tuple[Design, asyncio.Task[None]]:
    """A design started in the background, returned once Carlos has saved some of his answer
    (partial answers saved every 0.05 s)."""
    monkeypatch.setattr("agents.pipeline.live.PARTIAL_SAVE_INTERVAL_S", 0.05)
    design, task = await started(ttft_ms=5, tokens_per_second=60)
    await eventually(has_written(design, "carlos"), SETTLE_LIMIT_S, what="carlos wrote")
    return design, task


async def left_by_a_dead_process(owner, *, expired: bool = True, finished=("requirements",)):
    """A design as a killed server leaves it: RUNNING, its lease in OTHER's name, some agents
    finished (their answers as the simulator gives them) and one agent cut mid-answer."""
    design = await create_design(owner, REQUEST)
    until_ = timezone.now() + timedelta(seconds=-5 if expired else 60)
    await Design.objects.filter(pk=design.pk).aupdate(
        status=Design.Status.RUNNING,
        attempts=1,
        started_at=timezone.now(),
        lease_owner=OTHER,
        lease_expires_at=until_,
    )
    design = await reload(design)
    text = {"requirements": "## Requirements\n\n- 300 venues\n- seat maps\n- a resale market\n"}
    for agent in finished:
        await AgentRun.objects.acreate(
            design=design,
            agent=agent,
            pool="mini",
            model="gpt-4o-mini",
            status=AgentRun.Status.SUCCEEDED,
            output_text=text[agent],
            started_at=timezone.now(),
            finished_at=timezone.now(),
        )
    cut = await AgentRun.objects.acreate(
        design=design,
        agent="carlos",
        pool="main",
        model="gpt-4o",
        status=AgentRun.Status.RUNNING,
        output_text="## Carlos's design\n\nThe first lines of",
        started_at=timezone.now(),
    )
    return design, cut


# -- the sweeper -------------------------------------------------------------------------------


async def test_a_design_whose_lease_is_alive_is_never_taken_or_marked(carlos_registry, owner):
    """Defect: a second server starting on the same database marked the live server's running
    designs interrupted. Now a live lease is left alone, whatever else happens."""
    design, cut = await left_by_a_dead_process(owner, expired=False)

    assert await DesignSupervisor().sweep() == 0

    design = await reload(design)
    assert (design.status, design.lease_owner, design.takeovers) == ("running", OTHER, 0)
    assert (await AgentRun.objects.aget(pk=cut.pk)).status == AgentRun.Status.RUNNING


async def test_the_sweeper_takes_over_an_expired_lease_and_resumes_without_repeating(
    carlos_registry, owner, recorder
):
    """Defect: a dead instance's designs stayed "running" while the cluster ran. Now a
    sweeper takes them over once their lease expired and resumes from the last checkpoint."""
    design, cut = await left_by_a_dead_process(owner)

    assert await DesignSupervisor().sweep() == 1
    await tasks.running_task(design.pk)

    design = await reload(design)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert (design.takeovers, design.attempts, design.lease_owner) == (1, 2, "")
    assert "requirements" not in recorder.calls  # finished before the crash: not asked again
    assert recorder.calls == {agent: 1 for agent in AGENTS if agent != "requirements"}
    cut = await AgentRun.objects.aget(pk=cut.pk)
    assert cut.status == AgentRun.Status.STOPPED and cut.partial
    assert "resumed elsewhere" in cut.error
    runs = await runs_of(design)
    assert [r.agent for r in runs if r.status == AgentRun.Status.SUCCEEDED] == list(AGENTS)


async def test_a_released_design_is_taken_at_once_without_counting_a_crash(
    carlos_registry, owner, recorder
):
    design = await create_design(owner, REQUEST)
    await leases.release(leases.this_instance(), design.pk)  # as a drain leaves it
    assert await DesignSupervisor().sweep() == 1
    await tasks.running_task(design.pk)
    design = await reload(design)
    assert (design.status, design.takeovers) == (Design.Status.SUCCEEDED, 0)


async def test_a_design_that_keeps_killing_its_server_ends_failed_saying_so(
    carlos_registry, owner, recorder, settings
):
    settings.DESIGN_MAX_TAKEOVERS = 2
    design, _ = await left_by_a_dead_process(owner)
    await Design.objects.filter(pk=design.pk).aupdate(takeovers=2)

    assert await DesignSupervisor().sweep() == 0

    design = await reload(design)
    assert design.status == Design.Status.FAILED
    assert design.takeovers == 3 and design.failed_agent == "carlos"
    assert "stopped 3 times while it ran, the last time at Carlos (lead architect);" in design.error
    assert recorder.requests == []  # not resumed again


async def test_unanswered_questions_time_out_and_the_design_goes_on(
    carlos_registry, owner, recorder, settings
):
    """Defect: a design awaiting answers waited forever."""
    settings.QUESTIONS_TIMEOUT = 60
    questions = [{"question": "How many users?", "answer": None}]
    fresh = await create_design(owner, REQUEST, clarifications=questions)
    stale = await create_design(owner, REQUEST, clarifications=questions)
    await Design.objects.filter(pk__in=[fresh.pk, stale.pk]).aupdate(
        status=Design.Status.AWAITING_ANSWERS
    )
    await Design.objects.filter(pk=stale.pk).aupdate(
        created_at=timezone.now() - timedelta(seconds=61)
    )

    assert await DesignSupervisor().sweep() == 1
    await tasks.running_task(stale.pk)

    stale, fresh = await reload(stale), await reload(fresh)
    assert stale.status == Design.Status.SUCCEEDED
    assert stale.clarifications == [{"question": "How many users?", "answer": None}]
    assert "How many users?" in recorder.for_agent("requirements")[0].messages[-1]["content"]
    assert fresh.status == Design.Status.AWAITING_ANSWERS


# -- the lease keeper --------------------------------------------------------------------------


async def test_a_process_that_lost_the_lease_stops_and_writes_nothing_more(started, settings):
    settings.DESIGN_LEASE_SECONDS = 1.5  # renewed every 0.5 s
    # Held by this process, its lease kept by the LLM loop's keeper.
    design, task = await started(ttft_ms=5, tokens_per_second=100)

    async def carlos_running() -> bool:
        return await AgentRun.objects.filter(
            design=design, agent="carlos", status="running"
        ).aexists()

    await eventually(carlos_running, SETTLE_LIMIT_S, what="carlos started")
    # Another process took the design over (this one stalled past its lease).
    await Design.objects.filter(pk=design.pk).aupdate(
        lease_owner=OTHER, lease_expires_at=timezone.now() + timedelta(seconds=60)
    )
    with pytest.raises(asyncio.CancelledError):
        await task
    design = await reload(design)
    assert (design.status, design.lease_owner) == (Design.Status.RUNNING, OTHER)  # untouched
    runs = await runs_of(design)
    assert not [run for run in runs if run.status == AgentRun.Status.RUNNING]
    assert not [run for run in runs if run.agent == "carlos" and run.status == "succeeded"]


async def test_a_finished_agent_is_not_saved_once_the_design_is_taken_over(
    carlos_registry, owner, monkeypatch
):
    """The last line of defence: an answer that arrives after a take-over is no checkpoint."""
    design = await create_design(owner, REQUEST)
    original = pipeline.DesignPipeline._checkpoint

    async def taken_over_before_saving(self, run):
        await Design.objects.filter(pk=design.pk).aupdate(lease_owner=OTHER)
        return await original(self, run)

    monkeypatch.setattr(pipeline.DesignPipeline, "_checkpoint", taken_over_before_saving)
    await pipeline.run_design(design.pk)
    design = await reload(design)
    assert (design.status, design.lease_owner) == (Design.Status.RUNNING, OTHER)
    [run] = await runs_of(design)
    assert run.status == AgentRun.Status.STOPPED and run.output_text


# -- the drain -----------------------------------------------------------------------------------


async def test_a_drain_lets_running_agents_finish_then_hands_the_design_back(started, recorder):
    design, _ = await started(ttft_ms=300)

    async def designs_running() -> bool:
        return await AgentRun.objects.filter(design=design, agent="ronei").aexists()

    await eventually(designs_running, SETTLE_LIMIT_S, what="the architects started")
    report, design = await drained(design, 30)
    assert (report.finished, report.stopped) == (1, 0)
    runs = await runs_of(design)
    assert [(r.agent, r.status) for r in runs] == [
        ("requirements", "succeeded"),
        ("carlos", "succeeded"),
        ("ronei", "succeeded"),
    ]  # the running agents finished; no new one started
    assert set(recorder.calls) == {"requirements", "carlos", "ronei"}


async def test_a_drain_past_its_time_stops_agents_keeping_their_text(carlos_writing):
    design, _ = carlos_writing
    report, design = await drained(design, 0.2)
    assert (report.finished, report.stopped) == (0, 1)
    carlos = await AgentRun.objects.aget(design=design, agent="carlos")
    assert carlos.status == AgentRun.Status.STOPPED and carlos.partial


# -- the user's controls -------------------------------------------------------------------------


async def test_cancelling_a_running_design_ends_it_cancelled_keeping_what_it_made(
    carlos_writing,
):
    design, task = carlos_writing
    assert await cancel_design(design.pk)
    await asyncio.gather(task, return_exceptions=True)

    design = await reload(design)
    assert design.status == Design.Status.CANCELLED and design.finished_at is not None
    assert design.is_terminal
    runs = {run.agent: run for run in await runs_of(design)}
    assert runs["requirements"].status == AgentRun.Status.SUCCEEDED
    assert runs["carlos"].status == AgentRun.Status.STOPPED and runs["carlos"].output_text
    assert not await cancel_design(design.pk)  # once
    assert await DesignSupervisor().sweep() == 0  # and never resumed


async def test_cancelling_a_design_another_process_runs_takes_effect_there_too(
    carlos_registry, owner
):
    design, cut = await left_by_a_dead_process(owner, expired=False)
    assert await cancel_design(design.pk)
    design = await reload(design)
    assert (design.status, design.lease_owner) == (Design.Status.CANCELLED, "")
    assert (await AgentRun.objects.aget(pk=cut.pk)).status == AgentRun.Status.STOPPED
    # That process's next renewal finds it lost, so it stops there.
    assert await leases.renew(OTHER, {design.pk}) == {design.pk}


async def test_a_queued_design_knows_its_place_in_line(owner):
    first, second, third = [await create_design(owner, f"{REQUEST} {n}") for n in range(3)]
    await Design.objects.filter(pk=first.pk).aupdate(status=Design.Status.RUNNING)
    assert await leases.queue_place(await reload(first)) is None
    assert await leases.queue_place(await reload(second)) == 1
    assert await leases.queue_place(await reload(third)) == 2
