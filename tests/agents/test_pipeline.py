"""The design pipeline against the real simulator, through the real pool engine.

Each test runs whole designs over sockets with the Carlos responder (recorded, or made to
misbehave for one agent) and checks what was persisted, what was published and what each
agent was actually asked.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from channels.layers import get_channel_layer

from agents import leases, prompts
from agents.events import DESIGN_EVENT, as_json, design_group, from_json
from agents.models import AgentRun, Design
from agents.options import AGENT_POOLS, AGENTS, OPTION_FIELDS, option_label
from agents.pipeline import (
    TOKEN_EVENT_INTERVAL_S,
    DesignNotRunnable,
    ask_clarifying_questions,
    create_design,
    run_design,
    submit_answers,
)
from agents.simulated import carlos_responder
from agents.tasks import retry_design, start_design, wait_design
from agents.terraform import split_terraform
from carlos import serving
from pools.simulator import tokenize
from tests.agents.conftest import FAST_TTFT_MS, RecordingResponder, user_prompt

pytestmark = pytest.mark.django_db(transaction=True)

REQUEST = "An online bookstore for 20k daily users with search and a loyalty programme"
OPTIONS = {
    "scenario": "web_app",
    "priority": "performance",
    "compliance": "strict",
    "reliability": "extreme",
    "strictness": "strict",
    "cloud": "gcp",
}


async def runs_of(design: Design) -> list[AgentRun]:
    return [run async for run in AgentRun.objects.filter(design=design).order_by("id")]


async def reload(design: Design) -> Design:
    return await Design.objects.aget(pk=design.pk)


def overlap(runs: list[AgentRun]) -> bool:
    """True when every run started before any of them finished: they ran at the same time."""
    return max(run.started_at for run in runs) < min(run.finished_at for run in runs)


def one(runs: list[AgentRun], agent: str, round_number: int = 0) -> AgentRun:
    [run] = [r for r in runs if r.agent == agent and r.round == round_number]
    return run


async def collect_events(design_id: int) -> tuple[asyncio.Task[None], list[dict]]:
    """Join the design's group as the WebSocket consumer would; collect until terminal."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(design_group(design_id), channel)
    events: list[dict] = []

    async def drain() -> None:
        while True:
            message = await layer.receive(channel)
            assert message["type"] == DESIGN_EVENT
            event = message["event"]
            assert as_json(from_json(event)) == event  # one of the typed events, exactly
            events.append(event)
            if event["kind"] == "design_status" and event["status"] in Design.TERMINAL_STATUSES:
                return

    return asyncio.create_task(drain()), events


@pytest.fixture
def run_one(simulator_factory, make_registry, install_registry, owner):
    """`design, simulator = await run_one(responder, **simulator_options)`: one design of
    REQUEST run to its end against a new simulator (first tokens fast unless `ttft_ms` says
    otherwise), on the default pools or `pools`; the design comes back reloaded."""

    async def run(responder, pools=None, **simulator_options):
        simulator_options.setdefault("ttft_ms", FAST_TTFT_MS)
        simulator = await simulator_factory(responder=responder, **simulator_options)
        install_registry(make_registry(simulator, pools))
        design = await create_design(owner, REQUEST)
        await run_design(design.pk)
        return await reload(design), simulator

    return run


async def test_agents_run_in_order_with_parallel_stages_timings_and_events(carlos_registry, owner):
    design = await create_design(owner, REQUEST, {"cloud": "aws", "priority": "cost"})
    collector, events = await collect_events(design.pk)

    await run_design(design.pk)
    await asyncio.wait_for(collector, 10)

    design = await reload(design)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert (design.verdict, design.recommendation, design.revisions) == ("APPROVED", "CARLOS", 0)
    assert design.started_at <= design.finished_at
    runs = await runs_of(design)
    assert [run.agent for run in runs] == list(AGENTS)
    for run in runs:
        assert run.status == AgentRun.Status.SUCCEEDED, run.error
        assert run.pool == AGENT_POOLS[run.agent]
        assert run.model == ("gpt-4o-mini" if run.pool == "mini" else "gpt-4o")
        assert run.temperature == (0.9 if run.pool == "ronei" else 0.7)
        assert run.ttft_ms >= FAST_TTFT_MS * 0.9
        assert run.wait_ms is not None and run.wait_ms >= 0
        assert run.overflow is False
        assert run.tokens_in > 0
        assert run.tokens_out == len(tokenize(run.output_text))
        assert run.started_at < run.finished_at

    def by(agent: str) -> AgentRun:
        return one(runs, agent)

    designs = [by("carlos"), by("ronei")]
    analysts = [by("security"), by("cost"), by("reliability")]
    assert overlap(designs)
    assert overlap(analysts)
    assert by("requirements").finished_at <= min(run.started_at for run in designs)
    assert max(run.finished_at for run in designs) <= min(run.started_at for run in analysts)
    assert max(run.finished_at for run in analysts) <= by("auditor").started_at
    assert by("auditor").finished_at <= by("recommender").started_at
    assert by("recommender").finished_at <= by("terraform").started_at
    for analyst in analysts:
        assert analyst.output_json is not None and analyst.json_error == ""
    assert list(split_terraform(by("terraform").output_text)) == [
        "versions.tf",
        "variables.tf",
        "main.tf",
        "outputs.tf",
    ]

    # Live events: each agent started and finished once, its real chunks in between.
    kinds = [(event["kind"], event.get("agent")) for event in events]
    assert kinds[0] == ("design_status", None) and events[0]["status"] == "running"
    assert events[-1]["kind"] == "design_status" and events[-1]["status"] == "succeeded"
    for run in runs:
        started = kinds.index(("agent_started", run.agent))
        finished = kinds.index(("agent_finished", run.agent))
        assert events[started]["run_id"] == events[finished]["run_id"] == run.pk
        streamed = [
            e["text"]
            for e in events[started:finished]
            if e["kind"] == "tokens" and e["agent"] == run.agent
        ]
        assert "".join(streamed) == run.output_text
        # Coalesced: at most one event per interval (plus the final flush), however fast.
        assert 0 < len(streamed) <= run.duration_ms / (TOKEN_EVENT_INTERVAL_S * 1000) + 2
        if run.agent in ("carlos", "ronei"):
            assert len(streamed) < run.tokens_out / 2
        finish = events[finished]
        assert finish["status"] == "succeeded" and finish["pool"] == run.pool
        assert finish["ttft_ms"] == run.ttft_ms and finish["tokens_out"] == run.tokens_out


async def test_every_option_and_the_request_reach_every_prompt(carlos_registry, owner, recorder):
    design = await create_design(owner, REQUEST, OPTIONS)
    await run_design(design.pk)

    assert (await reload(design)).status == Design.Status.SUCCEEDED
    agents_asked = {request.messages[0]["content"].split("\n")[0] for request in recorder.requests}
    assert agents_asked == {f"AGENT: {agent}" for agent in AGENTS}
    for request in recorder.requests:
        prompt = user_prompt(request)
        assert REQUEST in prompt
        for key, (label, _choices) in OPTION_FIELDS.items():
            value = OPTIONS[key]
            assert f"- {label}: {option_label(key, value)} ({key}={value})." in prompt, (
                request.messages[0]["content"][:20],
                key,
            )
    # ...and the simulated agents used them: Google Cloud services, Ronei for performance.
    runs = await runs_of(design)
    assert "Cloud SQL for PostgreSQL" in one(runs, "carlos").output_text
    assert "Google Kubernetes Engine (GKE)" in one(runs, "ronei").output_text
    assert (await reload(design)).recommendation == "RONEI"


async def test_clarifying_answers_travel_with_their_questions(carlos_registry, owner, recorder):
    design = await create_design(owner, "A booking site for yoga studios", {"cloud": "azure"})

    questions = await ask_clarifying_questions(design.pk)

    assert 3 <= len(questions) <= 5
    design = await reload(design)
    assert design.status == Design.Status.AWAITING_ANSWERS
    assert design.clarifications == [{"question": q, "answer": None} for q in questions]
    [asked] = recorder.for_agent(prompts.QUESTIONS_AGENT)
    assert asked.model == "gpt-4o-mini"  # the requirements analyst's pool
    assert "A booking site for yoga studios" in user_prompt(asked)

    answers = ["About 2,000 requests per second at peak", "  ", "Only in Germany"]
    await submit_answers(design.pk, answers)
    assert (await reload(design)).status == Design.Status.QUEUED
    await run_design(design.pk)

    assert (await reload(design)).status == Design.Status.SUCCEEDED
    pipeline_requests = [
        r
        for r in recorder.requests
        if r.messages[0]["content"].split("\n")[0] != "AGENT: questions"
    ]
    assert len(pipeline_requests) == len(AGENTS)
    for request in pipeline_requests:
        prompt = user_prompt(request)
        assert f"Q: {questions[0]}\nA: About 2,000 requests per second at peak" in prompt
        assert f"Q: {questions[1]}\nA: (skipped by the user" in prompt
        assert f"Q: {questions[2]}\nA: Only in Germany" in prompt
        for unasked in questions[3:]:
            assert f"Q: {unasked}\nA: (skipped by the user" in prompt


async def test_invalid_analyst_json_is_repaired_once(run_one):
    invalid = '{"carlos": {"score": 80, "findings": ['

    def security(request, index):
        return invalid if index == 0 else carlos_responder(request)

    recorder = RecordingResponder({"security": security})
    design, _ = await run_one(recorder)

    assert design.status == Design.Status.SUCCEEDED
    first, repair = recorder.for_agent("security")
    assert first.response_format == {"type": "json_object"}
    assert repair.response_format == {"type": "json_object"}
    assert repair.messages[:2] == first.messages
    assert repair.messages[2] == {"role": "assistant", "content": invalid}
    assert "not valid JSON" in repair.messages[3]["content"]
    run = one(await runs_of(design), "security")
    repaired = carlos_responder(repair)
    assert run.status == AgentRun.Status.SUCCEEDED
    assert run.output_text == repaired
    assert run.output_json == json.loads(repaired)
    assert run.json_error == ""
    assert run.tokens_out == len(tokenize(invalid)) + len(tokenize(repaired))


async def test_json_still_invalid_after_repair_is_kept_raw_and_the_design_goes_on(run_one):
    wrong_shape = '{"carlos": {"monthly_usd": -5}}'
    recorder = RecordingResponder({"cost": lambda request, index: wrong_shape})
    design, _ = await run_one(recorder)

    assert design.status == Design.Status.SUCCEEDED
    assert len(recorder.for_agent("cost")) == 2  # the answer and exactly one repair attempt
    runs = await runs_of(design)
    cost = one(runs, "cost")
    assert cost.status == AgentRun.Status.SUCCEEDED
    assert cost.output_json is None
    assert cost.output_text == wrong_shape
    assert "still invalid after one repair attempt" in cost.json_error
    assert "does not match the cost report schema" in cost.json_error
    [audit] = recorder.for_agent("auditor")
    assert f"(invalid JSON, raw text follows)\n{wrong_shape}" in user_prompt(audit)
    assert one(runs, "security").output_json is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("VERDICT: APPROVED\nSUMMARY: fine", "APPROVED"),
        ("Intro\n**VERDICT: NEEDS REVISION**\nREQUIRED CHANGES:\n- x", "NEEDS REVISION"),
        ("## VERDICT:  needs   revision", "NEEDS REVISION"),
        ("VERDICT: APPROVED\nlater: VERDICT: APPROVED", "APPROVED"),
    ],
)
def test_verdict_lines_that_parse(text, expected):
    assert prompts.parse_verdict(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The design is approved.",
        "VERDICT: NOT APPROVED",
        "VERDICT: APPROVED WITH CONDITIONS",
        "VERDICT: APPROVED\nVERDICT: NEEDS REVISION",
        "Summary: VERDICT: APPROVED",
        "",
    ],
)
def test_verdict_anything_else_is_an_error(text):
    with pytest.raises(prompts.OutputFormatError):
        prompts.parse_verdict(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("RECOMMEND: CARLOS\n## Why", "CARLOS"), ("**RECOMMEND: ronei**", "RONEI")],
)
def test_recommendation_lines_that_parse(text, expected):
    assert prompts.parse_recommendation(text) == expected


@pytest.mark.parametrize(
    "text", ["I recommend Carlos.", "RECOMMEND: CARLOS OR RONEI", "RECOMMEND: BOTH", "CARLOS"]
)
def test_recommendation_anything_else_is_an_error(text):
    with pytest.raises(prompts.OutputFormatError):
        prompts.parse_recommendation(text)


async def test_an_unparseable_verdict_fails_the_design_at_the_auditor(run_one):
    vague = "SUMMARY: Looks approved to me, ship it."
    design, _ = await run_one(RecordingResponder({"auditor": lambda request, index: vague}))

    assert design.status == Design.Status.FAILED
    assert design.failed_agent == "auditor"
    assert "no VERDICT line" in design.error
    runs = await runs_of(design)
    assert [run.agent for run in runs] == list(AGENTS[:7])  # nothing after the auditor
    auditor = one(runs, "auditor")
    assert auditor.status == AgentRun.Status.FAILED and auditor.output_text == vague
    assert all(run.status == AgentRun.Status.SUCCEEDED for run in runs[:-1])


async def test_an_empty_answer_is_a_failure_not_an_empty_design(run_one):
    empty = RecordingResponder({"requirements": lambda request, index: ""})
    design, simulator = await run_one(empty)

    assert (design.status, design.failed_agent) == ("failed", "requirements")
    assert design.error == "EmptyResponse: the model finished without any text"
    assert simulator.stats.chat_requests == 3  # retried like a transport error (MAX_RETRIES 2)
    [run] = await runs_of(design)
    assert (run.status, run.error) == ("failed", design.error)


async def test_revision_rounds_are_capped_carry_the_changes_and_keep_prompts_bounded(
    run_one, settings
):
    settings.DESIGN_MAX_REVISIONS = 2

    def always_revise(request, index):
        return (
            "VERDICT: NEEDS REVISION\nSUMMARY: Not yet.\nSTRENGTHS:\n- Clear diagrams\n"
            f"REQUIRED CHANGES:\n- Add a private admin path (audit {index})\n"
        )

    recorder = RecordingResponder({"auditor": always_revise})
    design, _ = await run_one(recorder)

    assert design.status == Design.Status.SUCCEEDED
    assert (design.verdict, design.revisions) == ("NEEDS REVISION", 2)
    runs = await runs_of(design)
    rounds = [(run.agent, run.round) for run in runs]
    for agent in ("carlos", "ronei", "security", "cost", "reliability", "auditor"):
        assert [r for a, r in rounds if a == agent] == [0, 1, 2]
    assert rounds[-2:] == [("recommender", 2), ("terraform", 2)]
    auditor_prompts = [user_prompt(r) for r in recorder.for_agent("auditor")]
    assert "(final: no further revision is possible)" in auditor_prompts[2]
    assert "(final" not in auditor_prompts[0] + auditor_prompts[1]
    carlos_prompts = [user_prompt(r) for r in recorder.for_agent("carlos")]
    assert "Revision round" not in carlos_prompts[0]
    for round_number in (1, 2):
        prompt = carlos_prompts[round_number]
        assert f"Revision round: {round_number}" in prompt
        assert f"- Add a private admin path (audit {round_number - 1})" in prompt
        previous = one(runs, "carlos", round_number - 1).output_text
        assert f"## Your previous design\n{previous.strip()}" in prompt
    # Only the latest audit's changes are carried; earlier ones are not accumulated.
    assert "(audit 0)" not in carlos_prompts[2].split("## Auditor's required changes")[1]

    # No self-appending history: every prompt is built afresh from its specific inputs.
    for request in recorder.requests:
        assert [m["role"] for m in request.messages] == ["system", "user"]
        assert user_prompt(request).count("<request>") == 1
    requirements = one(runs, "requirements").output_text.strip()
    requirements_system = recorder.for_agent("requirements")[0].messages[0]["content"]
    for prompt in auditor_prompts:
        assert prompt.count(requirements) == 1
        assert requirements_system not in prompt
    final_audit = auditor_prompts[2]
    assert one(runs, "carlos", 2).output_text.strip() in final_audit
    for earlier in (0, 1):
        assert one(runs, "carlos", earlier).output_text.strip() not in final_audit
        assert one(runs, "auditor", earlier).output_text.strip() not in final_audit
    assert len(final_audit) < 1.5 * len(auditor_prompts[0])


async def test_a_failing_agent_fails_the_design_and_keeps_completed_outputs(run_one, recorder):
    # The endpoint does not know Ronei's deployment: a real 404, not retried by the SDK.
    pools = {
        "main": {"model": "gpt-4o"},
        "ronei": {"model": "gpt-4o-ronei-missing", "temperature": 0.9},
        "mini": {"model": "gpt-4o-mini"},
    }
    design, _ = await run_one(recorder, pools, ttft_ms=300, deployments=("gpt-4o", "gpt-4o-mini"))

    assert design.status == Design.Status.FAILED
    assert design.failed_agent == "ronei"
    assert design.error == (
        "NotFoundError (HTTP 404): the model endpoint does not know this model or deployment"
    )
    runs = {run.agent: run for run in await runs_of(design)}
    assert set(runs) == {"requirements", "carlos", "ronei"}
    assert runs["requirements"].status == AgentRun.Status.SUCCEEDED
    assert runs["requirements"].output_text
    assert runs["ronei"].status == AgentRun.Status.FAILED
    assert runs["ronei"].error == design.error
    # Carlos was still streaming: stopped cleanly, not left running.
    assert runs["carlos"].status == AgentRun.Status.STOPPED
    assert "stopped" in runs["carlos"].error
    assert all(run.finished_at is not None for run in runs.values())


async def wait_for_running(design: Design, agent: str) -> None:
    """Until `agent` has a running row (a fail-safe limit only, not a timing assertion)."""
    for _ in range(2000):
        if await AgentRun.objects.filter(design=design, agent=agent, status="running").aexists():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{agent} never started")


async def test_a_cancelled_browser_does_not_stop_the_design(carlos_registry, owner):
    design = await create_design(owner, REQUEST)
    task = start_design(design.pk)
    browser = asyncio.create_task(wait_design(task))
    await wait_for_running(design, "requirements")

    browser.cancel()
    await asyncio.gather(browser, return_exceptions=True)

    assert browser.cancelled()
    assert not task.done()
    await task
    assert (await reload(design)).status == Design.Status.SUCCEEDED


async def test_designs_past_the_running_limit_wait_queued_in_order(
    carlos_registry, owner, settings
):
    settings.MAX_RUNNING_DESIGNS = 1
    first = await create_design(owner, REQUEST)
    second = await create_design(owner, REQUEST)
    tasks = [start_design(first.pk), start_design(second.pk)]
    await wait_for_running(first, "requirements")
    assert (await reload(second)).status == Design.Status.QUEUED
    assert await runs_of(second) == []
    await asyncio.gather(*tasks)
    first, second = await reload(first), await reload(second)
    assert first.status == second.status == Design.Status.SUCCEEDED
    assert second.started_at >= first.finished_at


async def test_a_design_stopped_while_waiting_its_turn_stays_queued_for_another(
    carlos_registry, owner, settings
):
    settings.MAX_RUNNING_DESIGNS = 1
    first = await create_design(owner, REQUEST)
    waiting = await create_design(owner, REQUEST)
    await Design.objects.filter(pk=waiting.pk).aupdate(**leases.held_by(leases.this_instance()))
    running = start_design(first.pk)
    queued = start_design(waiting.pk)
    await wait_for_running(first, "requirements")
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    waiting = await reload(waiting)
    assert waiting.status == Design.Status.QUEUED
    assert (waiting.lease_owner, waiting.lease_expires_at, waiting.error) == ("", None, "")
    await running
    assert (await reload(first)).status == Design.Status.SUCCEEDED


async def test_a_stopped_design_keeps_the_text_its_agent_had_streamed_and_goes_back_queued(
    simulator_factory, make_registry, install_registry, owner, recorder, monkeypatch
):
    """Defect: an agent streaming at shutdown was stored with 0 characters, and the design
    ended INTERRUPTED. Now the text streams into its run in batches, is saved whole when the
    agent stops, and the design goes back QUEUED with its lease released, to resume."""
    monkeypatch.setattr("agents.pipeline.live.PARTIAL_SAVE_INTERVAL_S", 0.05)
    simulator = await simulator_factory(responder=recorder, ttft_ms=5, tokens_per_second=150)
    install_registry(make_registry(simulator))
    design = await create_design(owner, REQUEST)
    collector, events = await collect_events(design.pk)
    task = start_design(design.pk)

    async def carlos_saved_text() -> str:
        run = await AgentRun.objects.filter(design=design, agent="carlos").afirst()
        return run.output_text if run is not None else ""

    for _ in range(4000):  # until carlos's first batch is saved (a fail-safe limit only)
        if await carlos_saved_text():
            break
        await asyncio.sleep(0.005)
    saved_while_streaming = await carlos_saved_text()
    assert saved_while_streaming
    carlos = await AgentRun.objects.aget(design=design, agent="carlos")
    assert carlos.status == AgentRun.Status.RUNNING  # saved before the agent finished

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(2000):  # until the hand-back's status event arrives (a fail-safe limit only)
        if events and events[-1]["kind"] == "design_status":
            break
        await asyncio.sleep(0.005)
    collector.cancel()

    design = await reload(design)
    assert design.status == Design.Status.QUEUED
    assert (design.lease_owner, design.lease_expires_at, design.finished_at) == ("", None, None)
    carlos = await AgentRun.objects.aget(pk=carlos.pk)
    assert carlos.status == AgentRun.Status.STOPPED and carlos.partial
    assert carlos.finished_at is not None
    whole = carlos_responder(recorder.for_agent("carlos")[0])
    assert carlos.output_text.startswith(saved_while_streaming)
    assert whole.startswith(carlos.output_text) and len(carlos.output_text) < len(whole)
    shown = "".join(e["text"] for e in events if e["kind"] == "tokens" and e["agent"] == "carlos")
    assert shown and carlos.output_text.startswith(shown)  # all the page showed is kept
    runs = await runs_of(design)
    assert not [run for run in runs if run.status == AgentRun.Status.RUNNING]
    assert one(runs, "requirements").status == AgentRun.Status.SUCCEEDED
    assert events[-1]["kind"] == "design_status" and events[-1]["status"] == "queued"


async def test_a_retry_resumes_from_the_first_unfinished_agent(carlos_registry, owner, recorder):
    """Defect: Retry re-ran every agent from the start, paying again for each finished one.
    Now each finished agent is a checkpoint: only the auditor, which failed, is asked again."""

    def auditor_fails_once(request, index):
        return "I cannot decide." if index == 0 else carlos_responder(request)

    recorder.overrides["auditor"] = auditor_fails_once
    design = await create_design(owner, REQUEST)
    await run_design(design.pk)
    design = await reload(design)
    assert (design.status, design.failed_agent) == (Design.Status.FAILED, "auditor")
    before = {run.pk: run.output_text for run in await runs_of(design)}

    with pytest.raises(DesignNotRunnable):
        await retry_design((await create_design(owner, "Not failed")).pk)
    await (await retry_design(design.pk))

    design = await reload(design)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert (design.attempts, design.error, design.failed_agent) == (2, "", "")
    assert recorder.calls == {agent: 2 if agent == "auditor" else 1 for agent in AGENTS}
    runs = await runs_of(design)
    for run in runs[: len(before)]:  # the first attempt's runs are kept as they were
        assert before[run.pk] == run.output_text
    assert [run.agent for run in runs if run.attempt == 2] == [
        "auditor",
        "recommender",
        "terraform",
    ]
    carlos = await design.aoutput("carlos")
    assert carlos is not None and carlos.attempt == 1  # re-used, not redone


async def test_a_design_streams_while_the_loop_that_started_it_is_blocked(
    simulator_thread, make_registry, install_registry, owner
):
    """Designs run on the LLM loop: a page render or any slow callback on the serving loop
    does not hold up their streams (nor does streaming hold up the serving loop)."""
    simulator_thread.responder = carlos_responder
    simulator_thread.config.ttft_ms = FAST_TTFT_MS
    install_registry(make_registry(simulator_thread))
    design = await create_design(owner, REQUEST)
    task = start_design(design.pk)
    await wait_for_running(design, "requirements")
    # This loop is blocked from here on: no await until every agent has been asked.
    give_up = time.monotonic() + 60  # a fail-safe limit only, not a timing assertion
    while simulator_thread.stats.chat_requests < len(AGENTS) and time.monotonic() < give_up:
        time.sleep(0.01)  # noqa: ASYNC251 (blocking this loop is the point)
    assert simulator_thread.stats.chat_requests >= len(AGENTS)
    await task
    assert (await reload(design)).status == Design.Status.SUCCEEDED


async def test_shutting_down_hands_running_designs_back_and_closes_their_connections(
    carlos_registry, carlos_simulator, owner
):
    """What `manage.py serve` does on SIGTERM after the drain (and the lifespan shutdown):
    designs go back QUEUED, lease released, their finished outputs kept, and every upstream
    socket closes."""
    design = await create_design(owner, REQUEST)
    task = start_design(design.pk)
    await wait_for_running(design, "carlos")

    await serving.shut_down(carlos_registry)

    with pytest.raises(asyncio.CancelledError):
        await task
    design = await reload(design)
    assert design.status == Design.Status.QUEUED and design.lease_owner == ""
    runs = await runs_of(design)
    assert one(runs, "requirements").status == AgentRun.Status.SUCCEEDED
    assert not [run for run in runs if run.status == AgentRun.Status.RUNNING]
    assert not serving.llm_loop().running and carlos_registry.closed
    assert carlos_registry.stats().http.connections_open == 0
    for _ in range(500):  # the server sees the closes (a fail-safe limit only)
        if carlos_simulator.stats.connections_open == 0:
            break
        await asyncio.sleep(0.01)
    assert carlos_simulator.stats.connections_open == 0


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"truncate_rate": 1.0}, "TruncatedResponse: the endpoint's stream ended without"),
        ({"length_rate": 1.0}, "OutputFormatError: the answer was cut off at the model's"),
        ({"content_filter_rate": 1.0}, "OutputFormatError: the endpoint's content filter"),
    ],
)
async def test_a_cut_answer_fails_the_agent_and_is_never_recommended(run_one, fault, expected):
    """Reproduces: Carlos's design cut to 36 of 536 characters "succeeded" and was
    recommended; finish_reason "length" was accepted silently."""
    design, _ = await run_one(RecordingResponder(), fault_model="gpt-4o", **fault)

    assert design.status == "failed" and design.failed_agent in ("carlos", "ronei")
    assert design.error.startswith(expected), design.error
    assert design.recommendation == ""
    runs = {run.agent: run for run in await runs_of(design)}
    assert runs[design.failed_agent].status == "failed"


async def test_a_server_without_usage_records_estimated_tokens(run_one):
    """Reproduces: a server that sends no usage recorded 0 -> 0 tokens."""
    design, _ = await run_one(RecordingResponder(), no_usage=1)

    runs = await runs_of(design)
    assert runs and all(run.tokens_estimated for run in runs)
    assert all(run.tokens_in > 0 and run.tokens_out > 0 for run in runs)
