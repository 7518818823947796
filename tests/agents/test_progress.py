"""Where a design stands (agents.progress): the stage, and time left learned from the stage
times of recent succeeded designs, with the specs' latencies before there is any history."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from agents.models import AgentRun, Design
from agents.progress import (
    default_stage_seconds,
    design_progress,
    forget_estimates,
    stage_estimates,
)
from agents.specs import STAGE_ORDER, Stage
from tests.agents.pages import make_design, make_user

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def fresh_estimates() -> Iterator[None]:
    forget_estimates()
    yield
    forget_estimates()


def run(design: Design, agent: str, begins: float, ends: float | None, **fields: Any) -> AgentRun:
    """A run of `design` from `begins` to `ends` seconds after T0 (None: still running)."""
    return AgentRun.objects.create(
        design=design,
        agent=agent,
        attempt=1,
        pool="main",
        model="gpt-4o",
        status=AgentRun.Status.RUNNING if ends is None else AgentRun.Status.SUCCEEDED,
        started_at=T0 + timedelta(seconds=begins),
        finished_at=None if ends is None else T0 + timedelta(seconds=ends),
        **fields,
    )


def succeeded_design(owner: Any, designs_seconds: float) -> Design:
    """A past design whose two architects took `designs_seconds` (in parallel)."""
    design = make_design(owner, status=Design.Status.SUCCEEDED, finished_at=T0)
    run(design, "requirements", 0, 2)
    run(design, "carlos", 2, 2 + designs_seconds)
    run(design, "ronei", 2.5, 2 + designs_seconds - 1)
    return design


def test_without_history_the_specs_latencies_are_the_estimate() -> None:
    defaults = default_stage_seconds()
    assert defaults[Stage.REQUIREMENTS] == 2.5 and defaults[Stage.DESIGNS] == 20.0
    assert async_to_sync(stage_estimates)() == defaults


def test_the_estimate_is_the_median_of_recent_designs_per_stage() -> None:
    owner = make_user("olivia")
    for seconds in (4.0, 6.0, 30.0):
        succeeded_design(owner, seconds)
    failed = make_design(owner, status=Design.Status.FAILED)
    run(failed, "carlos", 0, 500)  # not a succeeded design: not history
    estimates = async_to_sync(stage_estimates)()
    assert estimates[Stage.DESIGNS] == 6.0  # the median, not the mean
    assert estimates[Stage.REQUIREMENTS] == 2.0
    assert estimates[Stage.TERRAFORM] == default_stage_seconds()[Stage.TERRAFORM]


def test_a_running_design_is_at_its_latest_stage_with_the_rest_expected() -> None:
    owner = make_user("olivia")
    design = make_design(owner, status=Design.Status.RUNNING, started_at=T0)
    runs = [run(design, "requirements", 0, 2), run(design, "carlos", 2, None)]
    estimates = dict.fromkeys(STAGE_ORDER, 10.0)
    state = design_progress(design, runs, estimates, T0 + timedelta(seconds=5))
    assert (state.stage_number, state.stage_count, state.stage_label) == (2, 6, "Designs")
    assert (state.stages_done, state.percent, state.round_number) == (1, 17, 1)
    assert state.elapsed_ms == 5000
    assert state.remaining_ms == 7000 + 4 * 10000  # 3 s of this stage left, then four more
    # Between stages: the next one is about to start, nothing of it spent yet.
    runs[1].status, runs[1].finished_at = AgentRun.Status.SUCCEEDED, T0 + timedelta(seconds=9)
    state = design_progress(design, runs, estimates, T0 + timedelta(seconds=9))
    assert (state.stage_number, state.stages_done, state.remaining_ms) == (3, 2, 40000)


def test_a_revision_says_its_round_and_a_queued_design_expects_every_stage() -> None:
    owner = make_user("olivia")
    design = make_design(owner, status=Design.Status.RUNNING, started_at=T0)
    runs = [run(design, "carlos", 10, 20), run(design, "carlos", 30, None, round=1)]
    state = design_progress(design, runs, dict.fromkeys(STAGE_ORDER, 1.0), T0)
    assert (state.stage_number, state.round_number) == (2, 2)
    queued = make_design(owner, status=Design.Status.QUEUED)
    state = design_progress(queued, [], dict.fromkeys(STAGE_ORDER, 1.0), T0)
    assert (state.stage_number, state.elapsed_ms, state.remaining_ms) == (0, None, 6000)
