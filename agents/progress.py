"""Where a design stands as a whole: its stage, its elapsed and expected remaining time, and
its runs laid out on one time axis (the design page's progress bar and timeline).

The stages are the pipeline's (`agents.specs.Stage`). How long each takes is learned from the
finished runs of recent succeeded designs (the median of each stage's wall time over them,
all rounds of a stage counted), so the estimate follows the endpoint actually in use; before
there is any history it comes from the specs' documented latencies. Everything here is a pure
function of the design, its runs and the clock, except `stage_estimates`, which reads the
history (cached for ESTIMATES_CACHE_S, so a busy server asks once a minute, not per event).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from agents.models import AgentRun, Design
from agents.specs import STAGE_ORDER, Stage, find_spec, registered

# How many recent succeeded designs the stage estimates are learned from.
HISTORY_DESIGNS = 20
ESTIMATES_CACHE_S = 60.0
# A bar narrower than this (percent of the axis) would vanish: it is drawn this wide.
MIN_BAR_PERCENT = 0.6
AXIS_TICKS = 4

_cache: tuple[float, dict[Stage, float]] | None = None


def default_stage_seconds() -> dict[Stage, float]:
    """Each stage's expected seconds without history: the middle of its slowest agent's
    documented latency (agents in one stage run at once)."""
    seconds: dict[Stage, float] = dict.fromkeys(STAGE_ORDER, 0.0)
    for spec in registered():
        low, high = spec.emulated_seconds
        seconds[spec.stage] = max(seconds[spec.stage], (low + high) / 2)
    return seconds


def stage_seconds_from_runs(runs: Iterable[AgentRun]) -> dict[Stage, list[float]]:
    """Per stage, the wall seconds it took in each design (runs of several designs mixed):
    a stage's rounds each count from their first start to their last finish, added up."""
    spans: dict[tuple[int, Stage, int], tuple[datetime, datetime]] = {}
    for run in runs:
        spec = find_spec(run.agent)
        if spec is None or run.started_at is None or run.finished_at is None:
            continue
        key = (run.design_id, spec.stage, run.round)
        start, end = spans.get(key, (run.started_at, run.finished_at))
        spans[key] = (min(start, run.started_at), max(end, run.finished_at))
    per_design: dict[tuple[int, Stage], float] = defaultdict(float)
    for (design_id, stage, _round), (start, end) in spans.items():
        per_design[(design_id, stage)] += (end - start).total_seconds()
    seconds: dict[Stage, list[float]] = defaultdict(list)
    for (_design_id, stage), value in per_design.items():
        seconds[stage].append(value)
    return seconds


async def stage_estimates() -> dict[Stage, float]:
    """Each stage's expected seconds: the median over the last HISTORY_DESIGNS succeeded
    designs, the default for a stage they do not cover. Cached for ESTIMATES_CACHE_S."""
    global _cache
    now = time.monotonic()
    if _cache is not None and now - _cache[0] < ESTIMATES_CACHE_S:
        return _cache[1]
    recent = Design.objects.filter(status=Design.Status.SUCCEEDED).order_by("-finished_at")
    design_ids = [pk async for pk in recent.values_list("pk", flat=True)[:HISTORY_DESIGNS]]
    runs = AgentRun.objects.filter(design_id__in=design_ids, status=AgentRun.Status.SUCCEEDED).only(
        "design_id", "agent", "round", "started_at", "finished_at"
    )
    history = stage_seconds_from_runs([run async for run in runs])
    estimates = default_stage_seconds()
    for stage, values in history.items():
        estimates[stage] = statistics.median(values)
    _cache = (now, estimates)
    return estimates


def forget_estimates() -> None:
    """Drop the cached estimates (tests, and a history that was just changed)."""
    global _cache
    _cache = None


# -- the progress bar ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ProgressState:
    """The design's stage and times, as the progress bar shows them."""

    stage_number: int  # 1-based; 0 while it has not started
    stage_count: int
    stage_label: str
    stages_done: int
    percent: int  # stages done out of all, 100 once it succeeded
    round_number: int  # 1-based: 2 and more during a revision
    elapsed_ms: int | None  # since its first start (to its end once it ended)
    remaining_ms: int | None  # expected, while it is queued or running; None once it ended


def _stage_of(run: AgentRun) -> Stage | None:
    spec = find_spec(run.agent)
    return Stage(spec.stage) if spec is not None else None


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def design_progress(
    design: Design, runs: Sequence[AgentRun], estimates: Mapping[Stage, float], now: datetime
) -> ProgressState:
    """Where `design` stands: the stage of its latest agent (the next stage once that one's
    agents all finished), how long it has taken and how long it is expected to take still."""
    count = len(STAGE_ORDER)
    status = str(design.status)
    started = [run for run in runs if _stage_of(run) is not None]
    latest = started[-1] if started else None
    index, done, round_number = 0, 0, 1
    if latest is not None:
        stage = _stage_of(latest)
        assert stage is not None
        index, round_number = STAGE_ORDER.index(stage), latest.round + 1
        same = [r for r in started if _stage_of(r) == stage and r.round == latest.round]
        if any(run.status == AgentRun.Status.RUNNING for run in same):
            done = index
            started_at = min((r.started_at for r in same if r.started_at), default=now)
            in_stage = (now - started_at).total_seconds()
            remaining = max(estimates[stage] - in_stage, 0.0) + sum(
                estimates[later] for later in STAGE_ORDER[index + 1 :]
            )
        else:
            done = index + 1
            index = min(index + 1, count - 1)
            remaining = sum(estimates[later] for later in STAGE_ORDER[done:])
    else:
        remaining = sum(estimates.values())
    if status == Design.Status.SUCCEEDED:
        index, done = count - 1, count
    elapsed: int | None = None
    if design.started_at is not None:
        end = design.finished_at if design.is_terminal and design.finished_at else now
        elapsed = _ms((end - design.started_at).total_seconds())
    has_started = latest is not None or status == Design.Status.RUNNING
    return ProgressState(
        stage_number=index + 1 if has_started else 0,
        stage_count=count,
        stage_label=STAGE_ORDER[index].capitalize() if has_started else "",
        stages_done=done,
        percent=round(100 * done / count),
        round_number=round_number,
        elapsed_ms=elapsed,
        remaining_ms=None if design.is_terminal else _ms(remaining),
    )


# -- the timeline ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TimelineBar:
    """One run on the design's time axis; percentages are of the axis, or of the bar for the
    wait and the first-token mark within it."""

    run_id: int
    agent: str
    label: str
    status: str
    offset_ms: float
    duration_ms: float
    wait_ms: float | None
    first_token_ms: float | None  # from the run's start: its wait plus its time to first token
    left: float
    width: float
    wait_width: float
    first_token_at: float | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeline:
    total_ms: float
    running: bool
    bars: tuple[TimelineBar, ...]
    ticks: tuple[tuple[float, float], ...]  # (percent of the axis, milliseconds)


def _percent(part: float, whole: float) -> float:
    return round(min(max(part / whole * 100, 0.0), 100.0), 2) if whole > 0 else 0.0


def design_timeline(
    design: Design, runs: Sequence[AgentRun], labels: Mapping[str, str], now: datetime
) -> Timeline:
    """The design's runs as bars on one axis from its first start: offset, duration, the wait
    for a pooled connection and the first token. A run still going ends at `now`."""
    timed = [run for run in runs if run.started_at is not None]
    if not timed:
        return Timeline(total_ms=0.0, running=False, bars=(), ticks=())
    starts = [run.started_at for run in timed if run.started_at is not None]
    origin = min([*starts, *([design.started_at] if design.started_at else [])])
    ends = [run.finished_at or now for run in timed]
    total_ms = max((max(ends) - origin).total_seconds() * 1000, 1.0)
    rounds: dict[str, set[int]] = defaultdict(set)
    for run in timed:
        rounds[run.agent].add(run.round)
    bars = []
    for run in timed:
        assert run.started_at is not None
        offset = (run.started_at - origin).total_seconds() * 1000
        duration = max(((run.finished_at or now) - run.started_at).total_seconds() * 1000, 0.0)
        label = labels.get(run.agent, run.agent)
        if len(rounds[run.agent]) > 1:
            label = f"{label}, round {run.round + 1}"
        first_token = (run.wait_ms or 0.0) + run.ttft_ms if run.ttft_ms is not None else None
        bars.append(
            TimelineBar(
                run_id=run.pk,
                agent=run.agent,
                label=label,
                status=str(run.status),
                offset_ms=offset,
                duration_ms=duration,
                wait_ms=run.wait_ms,
                first_token_ms=first_token,
                left=_percent(offset, total_ms),
                width=max(_percent(duration, total_ms), MIN_BAR_PERCENT),
                wait_width=_percent(min(run.wait_ms or 0.0, duration), duration),
                first_token_at=(
                    _percent(first_token, duration) if first_token is not None else None
                ),
            )
        )
    ticks = tuple(
        (round(100 * step / AXIS_TICKS, 2), total_ms * step / AXIS_TICKS)
        for step in range(AXIS_TICKS + 1)
    )
    running = any(run.status == AgentRun.Status.RUNNING for run in timed)
    return Timeline(total_ms=total_ms, running=running, bars=tuple(bars), ticks=ticks)


def duration_text(ms: float | None) -> str:
    """A duration as people read it: 40 ms, 2.4 s, 12 s, 1:05 min (minutes and seconds)."""
    if ms is None:
        return ""
    if ms < 1000:
        return f"{max(ms, 0):.0f} ms"
    seconds = ms / 1000
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d} min"
