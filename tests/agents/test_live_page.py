"""The design page as the server renders it, and the events that keep it live: rounds only
after a revision, one h1, agent state in words, an announcer for screen readers, diagrams
with a text alternative, the progress bar and the timeline drawn on a time axis."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import Client
from django.utils import timezone

from agents.events import snapshot
from agents.models import AgentRun, Design
from tests.agents.pages import add_run as add_finished_run
from tests.agents.pages import failed_design, finished_design, make_design

pytestmark = pytest.mark.django_db


def add_run(design: Design, agent: str, text: str = "", **fields: Any) -> AgentRun:
    """A run of `design` as `tests.agents.pages.add_run` makes it, any field overridden."""
    now = timezone.now()
    values: dict[str, Any] = {
        "status": AgentRun.Status.SUCCEEDED,
        "attempt": design.attempts,
        "pool": "main",
        "model": "gpt-4o",
        "started_at": now - timedelta(seconds=3),
        "finished_at": now,
        "ttft_ms": 120.0,
        "wait_ms": 1.5,
        "output_text": text,
    }
    return AgentRun.objects.create(design=design, agent=agent, **(values | fields))


def page_of(client: Client, design: Design) -> str:
    response = client.get(f"/designs/{design.pk}/")
    assert response.status_code == 200
    return response.content.decode()


def revised_design(owner: Any) -> Design:
    """A design whose auditor asked for a revision: both architects ran twice."""
    design = make_design(owner, status=Design.Status.RUNNING, attempts=1, revisions=1)
    add_run(design, "requirements", "## Requirements", pool="mini")
    for round_number in (0, 1):
        add_finished_run(design, "carlos", f"# Carlos, take {round_number}", round=round_number)
        add_finished_run(design, "ronei", f"# Ronei, take {round_number}", round=round_number)
    return design


def test_rounds_are_not_shown_without_a_revision(client: Client, alice: Any) -> None:
    """The defect: "Round 0" on every agent, although no agent ran a second round."""
    html = page_of(client, finished_design(alice))
    assert not re.search(r"Round 0|round 0|Round 1\b|round 1\b", html), re.findall(
        r".{40}[Rr]ound \d.{40}", html
    )


def test_rounds_are_numbered_from_one_once_a_revision_happened(client: Client, alice: Any) -> None:
    design = revised_design(alice)
    html = page_of(client, design)
    # The tab shows the latest output, the revision: the second round.
    carlos_panel = html.split('id="panel-carlos"')[1].split("</section>")[0]
    assert "Round 2 (a revision)" in carlos_panel and "Round 1" not in carlos_panel
    # The timeline names both rounds of an agent that ran twice, and none of the others'.
    chart = html.split('id="timeline-chart"')[1].split("</ol>")[0]
    assert "Carlos, round 1" in chart and "Carlos, round 2" in chart
    assert "Requirements, round" not in chart
    assert "<td>Carlos (round 2)</td>" in html and "<td>Carlos</td>" in html


def test_the_page_has_one_h1_and_agent_headings_sit_under_their_tab(
    client: Client, alice: Any
) -> None:
    """The defect: an agent's `# Title` became a second h1 on the page."""
    html = page_of(client, finished_design(alice))
    assert html.count("<h1") == 1
    assert "<h3>Carlos design</h3>" in html  # under the tab's own h2
    fragment = client.get(
        f"/designs/{Design.objects.get().pk}/runs/{AgentRun.objects.get(agent='ronei').pk}/"
    ).json()["html"]
    assert "<h1" not in fragment and "<h2" not in fragment and "<h3>Ronei design</h3>" in fragment


def test_agent_state_is_in_words_beside_its_dot(client: Client, alice: Any) -> None:
    design = failed_design(alice, "timed out", failed_agent="cost")
    add_run(design, "requirements", "## Requirements", pool="mini")
    add_run(design, "cost", status=AgentRun.Status.FAILED, error="timed out", pool="mini")
    html = page_of(client, design)

    def tab(agent: str) -> str:
        return html.split(f'id="tab-{agent}"')[1].split("</button>")[0]

    assert re.search(r'class="dot succeeded" aria-hidden="true">.*>done<', tab("requirements"))
    assert re.search(r'class="dot failed" aria-hidden="true">.*>failed<', tab("cost"))
    assert ">not started<" in tab("terraform")
    # The words come from the page's data too, for the script to use as states change.
    data = json.loads(html.split('id="design-data" type="application/json">')[1].split("<")[0])
    assert data["state_text"]["running"] == "running"


def test_a_polite_live_region_announces_agents_and_the_design(client: Client, alice: Any) -> None:
    """The defect: status changes were shown but never announced."""
    html = page_of(client, finished_design(alice))
    region = re.search(r'<div id="announcer"[^>]*>', html)
    assert region, "no announcer on the design page"
    assert 'aria-live="polite"' in region[0] and 'role="status"' in region[0]


def test_failures_name_the_agent_by_its_label(client: Client, alice: Any) -> None:
    design = failed_design(alice, "timed out", failed_agent="reliability")
    html = page_of(client, design)
    assert 'This design failed</strong><span id="failure-agent"> at Reliability analyst' in html
    assert "reliability agent" not in html


def test_a_diagram_has_a_caption_naming_what_it_shows(client: Client, alice: Any) -> None:
    html = page_of(client, finished_design(alice))
    assert '<figure class="mermaid-figure"><pre class="mermaid-source">' in html
    assert "<figcaption>Flowchart of Users, Front Door</figcaption></figure>" in html


def test_the_progress_bar_says_the_stage_the_time_and_what_is_left(
    client: Client, alice: Any
) -> None:
    now = timezone.now()
    design = make_design(
        alice, status=Design.Status.RUNNING, attempts=1, started_at=now - timedelta(seconds=30)
    )
    add_run(design, "requirements", "## Requirements", pool="mini")
    add_run(design, "carlos", status=AgentRun.Status.RUNNING, finished_at=None)
    html = page_of(client, design)
    box = html.split('id="design-progress-box"')[1].split("</progress>")[0]
    assert "Stage 2 of 6: Designs" in box
    assert re.search(r'data-clock="elapsed">3\d s</span> elapsed', box)
    assert re.search(r'about <span data-clock="remaining">[^<]+</span> left', box)
    assert '<progress id="design-progress" max="6" value="1"' in box
    # The events carry the same fragment, to swap in as the design moves on.
    state = async_to_sync(snapshot)(design.pk)
    assert state is not None
    assert state.progress.stage_number == 2 and state.progress.stages_done == 1


def test_a_succeeded_design_fills_the_progress_bar(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    design.started_at = timezone.now() - timedelta(seconds=75)
    design.finished_at = timezone.now()
    design.save()
    box = page_of(client, design).split('id="design-progress-box"')[1].split("</progress>")[0]
    assert "All 6 stages done" in box
    assert '<progress id="design-progress" max="6" value="6"' in box and "100 %" in box
    assert '<span data-clock="elapsed">1:15 min</span> in all' in box


def test_the_timeline_draws_each_run_on_one_time_axis(client: Client, alice: Any) -> None:
    start = timezone.now() - timedelta(seconds=10)
    design = make_design(alice, status=Design.Status.SUCCEEDED, attempts=1, started_at=start)

    def run(agent: str, begins: float, ends: float, **fields: Any) -> AgentRun:
        return add_run(
            design,
            agent,
            "text",
            started_at=start + timedelta(seconds=begins),
            finished_at=start + timedelta(seconds=ends),
            **fields,
        )

    run("requirements", 0, 2, wait_ms=500.0, ttft_ms=500.0)
    run("carlos", 2, 10, wait_ms=0.0, ttft_ms=800.0)
    html = page_of(client, design)
    chart = html.split('id="timeline-chart"')[1].split("</ol>")[0]
    assert "Total: <strong>10 s</strong>" in chart
    # Bars: offset and width in percent of the 10 s axis; the wait and first token inside.
    assert 'style="left: 0.00%; width: 20.00%"' in chart
    assert 'class="tl-wait" style="width: 25.00%"' in chart  # 0.5 s of a 2 s run
    assert 'class="tl-first" style="left: 50.00%"' in chart  # after 0.5 + 0.5 s
    assert 'style="left: 20.00%; width: 80.00%"' in chart
    # The same figures in words, for whoever does not see the bars.
    waited = "waited 500 ms for a connection"
    assert f"starts at 0 ms, took 2.0 s, {waited}, first token after 1.0 s" in chart
    assert "starts at 2.0 s, took 8.0 s, first token after 800 ms" in chart
