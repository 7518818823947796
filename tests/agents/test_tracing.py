"""A design's OpenTelemetry trace: one trace across its starts, stages, agents and calls.

Designs run through the real pool engine against the real simulator; the spans are read
from an in-memory exporter (`otel`, see tests/pools/engine/test_telemetry.py), which is on for
the tests that take it only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from agents.models import AgentRun, Design
from agents.options import AGENT_POOLS, AGENTS, ANALYST_AGENTS, DESIGN_AGENTS
from agents.pipeline import create_design, run_design
from agents.simulated import carlos_responder
from agents.tasks import retry_design
from tests.agents.conftest import FAST_TTFT_MS, RecordingResponder
from tests.pools.engine.test_telemetry import OtelHarness

REQUEST = "A ticketing system for 300 support agents with SLA reports"
STAGES = {
    "requirements": ["requirements"],
    "designs": list(DESIGN_AGENTS),
    "analyses": list(ANALYST_AGENTS),
    "audit": ["auditor"],
    "recommendation": ["recommender"],
    "terraform": ["terraform"],
}
User = get_user_model()


@pytest.fixture
def otel() -> Iterator[OtelHarness]:
    """Telemetry on for this test, read in memory."""
    with OtelHarness.on() as harness:
        yield harness


@pytest.fixture
async def traced(simulator_factory, make_registry, install_registry, recorder):
    """The Carlos simulator logging each request's traceparent, and its registry installed."""
    simulator = await simulator_factory(responder=recorder, ttft_ms=FAST_TTFT_MS, request_log=100)
    install_registry(make_registry(simulator))
    return simulator


class TraceIds(logging.Handler):
    """The trace id current when each `agents` log line is written."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        context = trace.get_current_span().get_span_context()
        self.seen.append((record.getMessage(), context.trace_id))


@pytest.fixture
def log_trace_ids() -> Iterator[TraceIds]:
    handler = TraceIds()
    logger = logging.getLogger("agents")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [
        span
        for span in spans
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]


def traceparent_ids(traceparent: str) -> tuple[int, int]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def check_start(
    spans: list[ReadableSpan], root: ReadableSpan, called: set[str], reused: set[str]
) -> None:
    """One start of a design under `root`: its stages, the agents it called (each with one
    chat span on the agent's model) and the checkpoints it re-used (events on the stage)."""
    stages = {span.attributes["carlos.stage"]: span for span in children(spans, root)}
    assert list(stages) == list(STAGES)  # in the pipeline's order
    for stage, agents in STAGES.items():
        span = stages[stage]
        assert span.name == f"stage {stage}" and span.kind is SpanKind.INTERNAL
        assert span.attributes["carlos.round"] == 0
        agent_spans = {
            child.attributes["gen_ai.agent.name"]: child for child in children(spans, span)
        }
        assert set(agent_spans) == {agent for agent in agents if agent in called}
        reused_here = {
            event.attributes["gen_ai.agent.name"]
            for event in span.events
            if event.name == "checkpoint reused"
        }
        assert reused_here == {agent for agent in agents if agent in reused}
        for agent, agent_span in agent_spans.items():
            assert agent_span.name == f"invoke_agent {agent}"
            assert agent_span.attributes["gen_ai.operation.name"] == "invoke_agent"
            assert agent_span.attributes["carlos.pool"] == AGENT_POOLS[agent]
            assert agent_span.attributes["carlos.round"] == 0
            (chat,) = children(spans, agent_span)  # exactly one call per agent
            assert chat.kind is SpanKind.CLIENT
            assert chat.attributes["carlos.pool.name"] == AGENT_POOLS[agent]
            assert chat.name == f"chat {chat.attributes['gen_ai.request.model']}"


@pytest.mark.django_db(transaction=True)
async def test_one_design_is_one_trace_of_stages_agents_and_calls(
    otel: OtelHarness, traced, owner, log_trace_ids
) -> None:
    design = await create_design(owner, REQUEST)
    await run_design(design.pk)
    design = await Design.objects.aget(pk=design.pk)
    assert design.status == Design.Status.SUCCEEDED, design.error

    spans = otel.finished()
    (root,) = by_name(spans, "design")
    assert root.parent is None and root.kind is SpanKind.INTERNAL
    assert dict(root.attributes) == {
        "carlos.design.id": design.pk,
        "carlos.design.attempt": 1,
        "carlos.design.status": "succeeded",
    }
    assert {span.context.trace_id for span in spans} == {root.context.trace_id}
    assert traceparent_ids(design.trace_parent) == (root.context.trace_id, root.context.span_id)
    assert design.trace_id == f"{root.context.trace_id:032x}"
    check_start(spans, root, called=set(AGENTS), reused=set())
    assert len(by_name(spans, "invoke_agent carlos")) == 1
    assert len([span for span in spans if span.name.startswith("chat ")]) == len(AGENTS)

    # The parallel siblings ran at once, each under the same stage span.
    carlos, ronei = (by_name(spans, f"invoke_agent {agent}")[0] for agent in DESIGN_AGENTS)
    assert carlos.parent.span_id == ronei.parent.span_id
    assert max(carlos.start_time, ronei.start_time) < min(carlos.end_time, ronei.end_time)

    # Each chat span's tokens are what the run recorded (the simulator's usage), and each
    # request the simulator received carried that chat span's traceparent.
    chats = {span.context.span_id: span for span in spans if span.name.startswith("chat ")}
    async for run in AgentRun.objects.filter(design=design):
        (agent_span,) = by_name(spans, f"invoke_agent {run.agent}")
        assert agent_span.attributes["carlos.agent_run.id"] == run.pk
        (chat,) = children(spans, agent_span)
        assert chat.attributes["gen_ai.usage.input_tokens"] == run.tokens_in
        assert chat.attributes["gen_ai.usage.output_tokens"] == run.tokens_out
    logged = traced.requests_log()
    assert len(logged) == len(AGENTS)
    for entry in logged:
        trace_id, span_id = traceparent_ids(entry["traceparent"])
        assert trace_id == root.context.trace_id and span_id in chats

    # The design's log lines were written with its trace current.
    mine = [
        trace_id for message, trace_id in log_trace_ids.seen if f"design {design.pk}" in message
    ]
    assert mine and set(mine) == {root.context.trace_id}


@pytest.mark.django_db(transaction=True)
async def test_a_failure_is_an_error_and_the_retry_continues_the_same_trace(
    otel: OtelHarness, simulator_factory, make_registry, install_registry, owner
) -> None:
    def auditor_fails_once(request: Any, index: int) -> str:
        return "I cannot decide." if index == 0 else carlos_responder(request)

    recorder = RecordingResponder({"auditor": auditor_fails_once})
    simulator = await simulator_factory(responder=recorder, ttft_ms=FAST_TTFT_MS)
    install_registry(make_registry(simulator))
    design = await create_design(owner, REQUEST)
    await run_design(design.pk)
    design = await Design.objects.aget(pk=design.pk)
    assert (design.status, design.failed_agent) == (Design.Status.FAILED, "auditor")
    first_parent = design.trace_parent

    spans = otel.finished()
    (first,) = by_name(spans, "design")
    assert first.attributes["carlos.design.status"] == "failed"
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == design.error
    (auditor,) = by_name(spans, "invoke_agent auditor")
    assert auditor.status.status_code is StatusCode.ERROR
    assert auditor.attributes["error.type"] == "OutputFormatError"
    (audit_stage,) = by_name(spans, "stage audit")
    assert audit_stage.status.status_code is StatusCode.ERROR
    assert by_name(spans, "stage recommendation") == []
    (chat,) = children(spans, auditor)  # the call itself succeeded: the answer was unusable
    assert chat.status.status_code is StatusCode.UNSET

    await (await retry_design(design.pk))
    design = await Design.objects.aget(pk=design.pk)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert design.trace_parent == first_parent  # stored once, at the first start

    spans = otel.finished()
    first_root, second_root = sorted(by_name(spans, "design"), key=lambda span: span.start_time)
    assert first_root.context == first.context
    # The retry's root is a child of the first start's root: one trace for the design.
    assert second_root.context.trace_id == first.context.trace_id
    assert second_root.parent is not None and second_root.parent.is_remote
    assert second_root.parent.span_id == first.context.span_id
    assert second_root.attributes["carlos.design.attempt"] == 2
    assert second_root.attributes["carlos.design.status"] == "succeeded"
    assert second_root.status.status_code is StatusCode.UNSET
    assert {span.context.trace_id for span in spans} == {first.context.trace_id}
    retried = {"auditor", "recommender", "terraform"}
    check_start(spans, second_root, called=retried, reused=set(AGENTS) - retried)


def make_user(username: str, *, staff: bool = False) -> Any:
    return User.objects.create_user(username, password="a-long-test-password", is_staff=staff)


@pytest.mark.django_db
def test_staff_see_the_trace_id_on_the_design_page_and_in_the_admin() -> None:
    owner = make_user("ada")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    design = Design.objects.create(
        owner=owner,
        request_text=REQUEST,
        status=Design.Status.SUCCEEDED,
        trace_parent=f"00-{trace_id}-00f067aa0ba902b7-01",
    )
    as_owner = Client()
    as_owner.force_login(owner)
    page = as_owner.get(f"/designs/{design.pk}/")
    assert page.status_code == 200 and trace_id not in page.content.decode()

    staff = make_user("sam", staff=True)
    staff.user_permissions.add(
        Permission.objects.get(codename="view_design"),
    )
    as_staff = Client()
    as_staff.force_login(User.objects.get(pk=staff.pk))
    page = as_staff.get(f"/designs/{design.pk}/").content.decode()
    assert f"Trace ID: <code>{trace_id}</code>" in page
    listing = as_staff.get("/admin/agents/design/").content.decode()
    assert trace_id in listing
    found = as_staff.get("/admin/agents/design/", {"q": trace_id}).content.decode()
    assert f"/admin/agents/design/{design.pk}/change/" in found
    detail = as_staff.get(f"/admin/agents/design/{design.pk}/change/").content.decode()
    assert trace_id in detail


@pytest.mark.django_db
def test_a_design_without_a_trace_shows_none() -> None:
    staff = make_user("sam", staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_design"))
    design = Design.objects.create(owner=staff, request_text=REQUEST)
    as_staff = Client()
    as_staff.force_login(User.objects.get(pk=staff.pk))
    assert "Trace ID" not in as_staff.get(f"/designs/{design.pk}/").content.decode()
    assert design.trace_id == ""
