"""The live events (agents.events): one JSON shape each, fragments the same as the page's own
and escaped, announcements that name agents by their label, and the JSON read back as the
same typed event."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from agents.events import (
    EVENT_TYPES,
    AgentFinished,
    AgentStarted,
    LiveProgress,
    Pong,
    SocketError,
    TextSoFar,
    Tokens,
    as_json,
    design_event,
    from_json,
    live_design,
    read_progress,
    run_event,
    snapshot,
)
from agents.models import AgentRun, Design

pytestmark = pytest.mark.django_db(transaction=True)

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def make_design(**fields: Any) -> Design:
    owner = get_user_model().objects.filter(username="olivia").first()
    if owner is None:
        owner = get_user_model().objects.create_user("olivia", password="a-long-test-password")
    return Design.objects.create(owner=owner, request_text="A data lake", **fields)


def make_run(design: Design, **fields: Any) -> AgentRun:
    now = timezone.now()
    values: dict[str, Any] = {
        "agent": "security",
        "attempt": 1,
        "status": "succeeded",
        "pool": "mini",
        "model": "gpt-4o-mini",
        "started_at": now - timedelta(milliseconds=1500),
        "finished_at": now,
        "ttft_ms": 90.4,
        "wait_ms": 3.2,
        "tokens_in": 120,
        "tokens_out": 480,
    }
    return AgentRun.objects.create(design=design, **(values | fields))


def progress_of(design: Design) -> LiveProgress:
    return async_to_sync(read_progress)(design)


def test_every_kind_reads_back_as_the_same_event_after_json() -> None:
    design = make_design(status=Design.Status.FAILED, error="boom", failed_agent="cost")
    run = make_run(design)
    state = async_to_sync(snapshot)(design.pk)
    assert state is not None
    every_kind = [
        design_event(design, None, progress_of(design)),
        run_event(run, AgentStarted, progress_of(design)),
        Tokens(agent="carlos", round=1, run_id=run.pk, offset=120, text="## Overview\n"),
        TextSoFar(agent="carlos", round=1, run_id=run.pk, text="# Carlos\n## Overview\n"),
        run_event(run, AgentFinished, progress_of(design)),
        Pong(),
        SocketError(error="send ping or snapshot"),
        state,
    ]
    assert {type(event) for event in every_kind} == set(EVENT_TYPES.values())
    for event in every_kind:
        sent = json.loads(json.dumps(as_json(event)))
        assert next(iter(sent)) == "kind" and sent["kind"] == event.kind
        assert from_json(sent) == event, event.kind
    # Streamed text is cheap: its fields only, nothing rendered.
    assert as_json(every_kind[2]) == {
        "kind": "tokens",
        "agent": "carlos",
        "round": 1,
        "run_id": run.pk,
        "offset": 120,
        "text": "## Overview\n",
    }


def test_events_announce_changes_naming_agents_by_their_label() -> None:
    design = make_design(status=Design.Status.SUCCEEDED)
    run = make_run(design, agent="carlos", status="running", finished_at=None)
    assert run_event(run, AgentStarted, progress_of(design)).announcement == (
        "Carlos (lead architect) started"
    )
    run.status = "failed"
    finished = run_event(run, AgentFinished, progress_of(design))
    assert finished.announcement == "Carlos (lead architect) failed"
    assert (finished.label, finished.title) == ("Carlos", "Carlos (lead architect)")
    status = design_event(design, None, progress_of(design))
    assert status.announcement == "Design succeeded"
    assert status.progress.percent == 100 and 'value="6"' in status.progress.progress_html


def test_a_design_state_says_what_follows_from_its_status() -> None:
    queued = live_design(make_design(status=Design.Status.QUEUED), 2)
    assert (queued.status_label, queued.terminal, queued.retryable) == ("Queued", False, False)
    assert '<span id="queue-place" class="muted small">2 in line</span>' in queued.status_html
    cancelled = live_design(make_design(status=Design.Status.CANCELLED, verdict="APPROVED"))
    assert (cancelled.terminal, cancelled.retryable) == (True, True)
    assert (
        ">Cancelled</span>" in cancelled.status_html and "Audit: APPROVED" in cancelled.status_html
    )
    assert "This design was cancelled" in cancelled.failure_html
    assert "No cause was recorded." in cancelled.failure_html
    succeeded = live_design(make_design(status=Design.Status.SUCCEEDED))
    assert (succeeded.terminal, succeeded.retryable) == (True, False)


def test_model_and_user_text_is_escaped_in_every_fragment() -> None:
    design = make_design(
        status=Design.Status.FAILED, error=HOSTILE, failed_agent=HOSTILE, verdict=HOSTILE
    )
    run = make_run(design, status="failed", model=HOSTILE, pool=HOSTILE, error=HOSTILE)
    state, row = live_design(design), run_event(run, AgentFinished, progress_of(design))
    for html in (state.status_html, state.failure_html, row.row_html):
        assert "<script" not in html and "<img" not in html
        assert "&lt;script&gt;" in html
    assert row.error == HOSTILE  # the data itself is sent as it is (the page sets it as text)


def test_the_page_and_the_events_render_the_same_fragments() -> None:
    """One template per fragment: what the page shows on load is what an event swaps in."""
    design = make_design(
        status=Design.Status.FAILED, error="APIConnectionError", failed_agent="cost"
    )
    make_run(design, agent="requirements", pool="mini", tokens_estimated=True)
    make_run(design, agent="cost", status="failed", error="timed out")
    client = Client()
    client.force_login(design.owner)
    page = client.get(f"/designs/{design.pk}/").content.decode()

    state = async_to_sync(snapshot)(design.pk)
    assert state is not None and len(state.runs) == 2
    fragments = [state.design.status_html, state.design.failure_html]
    fragments += [state.progress.timeline_html, state.progress.progress_html]
    for html in [*fragments, *(run.row_html for run in state.runs)]:
        assert html in page
    assert "<td>Requirements</td>" in state.runs[0].row_html
    assert '<span class="badge failed">failed</span>' in state.runs[1].row_html
