"""The design page's live events: one type per kind, one JSON shape, one group per design.

The pipeline publishes them to `design_group(design_id)` on the channel layer (`publish`),
the WebSocket consumer relays them as they are and sends a `Snapshot` on connect, and
`manage.py design` prints them. Whatever the page shows of a design or a run comes rendered
from the same templates as the full page (`agents/_design_status.html`,
`agents/_design_failure.html`, `agents/_timeline_row.html`, `agents/_progress.html`,
`agents/_timeline.html`, autoescaped), so the page swaps fragments in rather than knowing
columns or status labels; what the page announces to screen readers comes as a sentence
(`announcement`). Streamed text (`Tokens`) stays plain text, rendered by nothing, because it
is the one event sent many times a second; each carries the offset of its first character in
the run's text, so a page that joined mid-answer and was sent the text so far (`TextSoFar`,
see `agents.pipeline.live`) appends only what it does not have yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from django.template.loader import render_to_string
from django.utils import timezone

from agents import leases
from agents.models import AgentRun, Design
from agents.progress import ProgressState, design_progress, design_timeline, stage_estimates
from agents.specs import Stage, find_spec, tab_labels

# The channel-layer message type of a live event (`DesignConsumer.design_event` handles it).
DESIGN_EVENT = "design.event"


def design_group(design_id: int) -> str:
    """The channel-layer group every live event of one design is published to."""
    return f"design-{design_id}"


# An agent's state as words, beside the coloured dot that shows it (by AgentRun status, and
# "pending" before it ran): the page reads them from its data.
AGENT_STATE_TEXT = {
    "pending": "not started",
    "running": "running",
    "succeeded": "done",
    "failed": "failed",
    "stopped": "stopped",
}


# -- what the page shows ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class DesignState:
    """The design's own fields the page keeps live (status, verdict, cause of failure, its
    place in line while queued) and what follows from them."""

    design_id: int
    status: str
    status_label: str
    verdict: str
    recommendation: str
    revisions: int
    error: str
    failed_agent: str
    failed_agent_label: str  # the agent's label, as every message names it
    queue_place: int | None
    terminal: bool  # nothing more will happen to it: the page stops following
    retryable: bool  # it ended without success: the page shows why, and Retry


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveDesign(DesignState):
    """A design state with its fragments rendered, ready to swap into the page."""

    status_html: str
    failure_html: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RunState:
    """One agent run as the page's timeline shows it (one row per run: a resumed agent
    gets a row of its own)."""

    run_id: int
    agent: str
    label: str  # its tab's short name
    title: str  # its full label (messages and announcements name agents by it)
    round: int
    status: str
    pool: str
    model: str
    overflow: bool
    wait_ms: float | None
    ttft_ms: float | None
    duration_ms: float | None
    tokens_in: int
    tokens_out: int
    tokens_estimated: bool
    error: str


# What a run's state copies from the run as it is (AgentRun has an attribute of each name).
_RUN_OWN_FIELDS = tuple(
    field.name
    for field in dataclasses.fields(RunState)
    if field.name not in {"run_id", "label", "title"}
)


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveRun(RunState):
    """A run with its timeline row rendered."""

    row_html: str


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveProgress(ProgressState):
    """The design's progress with its bar and its timeline rendered."""

    progress_html: str
    timeline_html: str


# -- the events --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Snapshot:
    """Everything the page shows live, at once: on connect, on a resync and when asked."""

    kind: ClassVar[str] = "snapshot"
    design: LiveDesign
    runs: tuple[LiveRun, ...]
    progress: LiveProgress


@dataclass(frozen=True, kw_only=True, slots=True)
class DesignStatus(LiveDesign):
    """The design's status changed (started, ended, stopped and queued again)."""

    kind: ClassVar[str] = "design_status"
    announcement: str
    progress: LiveProgress


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentStarted(LiveRun):
    kind: ClassVar[str] = "agent_started"
    announcement: str
    progress: LiveProgress


@dataclass(frozen=True, kw_only=True, slots=True)
class Tokens:
    """Text one agent streamed since the last such event (coalesced by the pipeline);
    `offset` is where its first character is in the run's text (in characters)."""

    kind: ClassVar[str] = "tokens"
    agent: str
    round: int
    run_id: int
    offset: int
    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TextSoFar:
    """A running agent's whole text so far, for a page that joined mid-answer (sent to that
    page's socket alone, by the process running the design)."""

    kind: ClassVar[str] = "text"
    agent: str
    round: int
    run_id: int
    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentFinished(LiveRun):
    """A run ended: succeeded (the page then fetches its rendered output), failed or
    stopped."""

    kind: ClassVar[str] = "agent_finished"
    announcement: str
    progress: LiveProgress


@dataclass(frozen=True, kw_only=True, slots=True)
class Pong:
    """The answer to the page's `ping` (which keeps proxies from idling the socket out)."""

    kind: ClassVar[str] = "pong"


@dataclass(frozen=True, kw_only=True, slots=True)
class SocketError:
    """Why the server is about to close the socket (Daphne sends no close reason)."""

    kind: ClassVar[str] = "error"
    error: str


Event = (
    Snapshot | DesignStatus | AgentStarted | Tokens | TextSoFar | AgentFinished | Pong | SocketError
)
EVENT_TYPES: dict[str, type[Event]] = {
    event_type.kind: event_type
    for event_type in (
        Snapshot,
        DesignStatus,
        AgentStarted,
        Tokens,
        TextSoFar,
        AgentFinished,
        Pong,
        SocketError,
    )
}


# -- the one serialiser, and its inverse -------------------------------------------------------


def as_json(value: Any) -> Any:
    """An event (or a part of one) as the JSON sent over the socket and the channel layer:
    an object with its `kind` first, then its fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        payload: dict[str, Any] = {"kind": value.kind} if hasattr(value, "kind") else {}
        for field in dataclasses.fields(value):
            payload[field.name] = as_json(getattr(value, field.name))
        return payload
    if isinstance(value, (tuple, list)):
        return [as_json(item) for item in value]
    return value


def from_json(payload: dict[str, Any]) -> Event:
    """The event a JSON object describes; KeyError or TypeError if it is not one."""
    event_type = EVENT_TYPES[payload["kind"]]
    fields = {name: value for name, value in payload.items() if name != "kind"}
    if "progress" in fields:
        fields["progress"] = LiveProgress(**fields["progress"])
    if event_type is Snapshot:
        return Snapshot(
            design=LiveDesign(**fields["design"]),
            runs=tuple(LiveRun(**run) for run in fields["runs"]),
            progress=fields["progress"],
        )
    return event_type(**fields)


def group_message(event: Event) -> dict[str, Any]:
    """The channel-layer message that carries `event` to the design's sockets."""
    return {"type": DESIGN_EVENT, "event": as_json(event)}


async def publish(layer: Any, design_id: int, event: Event) -> None:
    """Send `event` to every socket following the design (in every process sharing `layer`)."""
    await layer.group_send(design_group(design_id), group_message(event))


# -- building them from the models -------------------------------------------------------------


def design_state(design: Design, queue_place: int | None = None) -> DesignState:
    status = str(design.status)
    terminal = status in Design.TERMINAL_STATUSES
    return DesignState(
        design_id=design.pk,
        status=status,
        status_label=str(Design.Status(status).label),
        verdict=design.verdict,
        recommendation=design.recommendation,
        revisions=design.revisions,
        error=design.error,
        failed_agent=design.failed_agent,
        failed_agent_label=agent_label(design.failed_agent) if design.failed_agent else "",
        queue_place=queue_place,
        terminal=terminal,
        retryable=terminal and status != Design.Status.SUCCEEDED,
    )


def live_design[Kind: LiveDesign](
    design: Design, queue_place: int | None = None, kind: type[Kind] = LiveDesign, **extra: Any
) -> Kind:
    """The design's state with the page's fragments of it rendered from that state (and, for
    an event, its `extra` fields: announcement, progress)."""
    state = design_state(design, queue_place)
    context = {"state": state}
    return kind(
        **_fields_of(state),
        status_html=render_to_string("agents/_design_status.html", context),
        failure_html=render_to_string("agents/_design_failure.html", context),
        **extra,
    )


def design_announcement(design: Design) -> str:
    """What a screen reader is told when the design's status changes."""
    if design.status == Design.Status.RUNNING:
        return "Design started"
    return f"Design {Design.Status(design.status).label.lower()}"


def run_state(run: AgentRun) -> RunState:
    return RunState(
        run_id=run.pk,
        label=agent_tab_label(run.agent),
        title=agent_label(run.agent),
        **{name: getattr(run, name) for name in _RUN_OWN_FIELDS},
    )


def live_run[Kind: LiveRun](run: AgentRun, kind: type[Kind] = LiveRun, **extra: Any) -> Kind:
    """The run's state with its timeline row rendered from that state (and, for an event,
    its `extra` fields: announcement, progress)."""
    state = run_state(run)
    row = render_to_string("agents/_timeline_row.html", {"run": state})
    return kind(**_fields_of(state), row_html=row, **extra)


RUN_ANNOUNCEMENTS = {
    AgentRun.Status.RUNNING: "started",
    AgentRun.Status.SUCCEEDED: "finished",
    AgentRun.Status.FAILED: "failed",
    AgentRun.Status.STOPPED: "stopped",
}


def run_announcement(run: AgentRun) -> str:
    """What a screen reader is told when an agent starts or ends: "Auditor started"."""
    return f"{agent_label(run.agent)} {RUN_ANNOUNCEMENTS.get(run.status, str(run.status))}"


def live_progress(
    design: Design,
    runs: Sequence[AgentRun],
    estimates: Mapping[Stage, float],
    now: datetime | None = None,
) -> LiveProgress:
    """The design's progress bar and timeline, rendered from its runs (in start order) and
    the stage estimates (`agents.progress.stage_estimates`)."""
    now = now or timezone.now()
    state = design_progress(design, runs, estimates, now)
    timeline = design_timeline(design, runs, tab_labels(), now)
    return LiveProgress(
        **_fields_of(state),
        progress_html=render_to_string(
            "agents/_progress.html", {"progress": state, "status": design.status}
        ),
        timeline_html=render_to_string("agents/_timeline.html", {"timeline": timeline}),
    )


async def read_progress(design: Design) -> LiveProgress:
    """`live_progress` with the design's runs and the estimates read now."""
    runs = [run async for run in design.runs.order_by("id")]
    return live_progress(design, runs, await stage_estimates())


def design_event(design: Design, queue_place: int | None, progress: LiveProgress) -> DesignStatus:
    """The event of a change in the design's status."""
    return live_design(
        design,
        queue_place,
        DesignStatus,
        announcement=design_announcement(design),
        progress=progress,
    )


def run_event[Kind: AgentStarted | AgentFinished](
    run: AgentRun, kind: type[Kind], progress: LiveProgress
) -> Kind:
    """The event of a run that started or ended, with the design's progress as it is now."""
    return live_run(run, kind, announcement=run_announcement(run), progress=progress)


async def snapshot(design_id: int) -> Snapshot | None:
    """The design and all its runs (a resume's and those before it); None if it is gone."""
    design = await Design.objects.filter(pk=design_id).afirst()
    if design is None:
        return None
    runs = [run async for run in design.runs.order_by("id")]
    return Snapshot(
        design=live_design(design, await leases.queue_place(design)),
        runs=tuple(live_run(run) for run in runs),
        progress=live_progress(design, runs, await stage_estimates()),
    )


def agent_tab_label(agent: str) -> str:
    """The agent's short name, as its tab on the design page shows it (from its spec)."""
    return tab_labels().get(agent, agent)


def agent_label(agent: str) -> str:
    """The agent's full label ("Cost analyst"), as messages name it (from its spec)."""
    spec = find_spec(agent)
    return spec.label if spec is not None else agent


def _fields_of(state: DesignState | RunState | ProgressState) -> dict[str, Any]:
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
