"""The agent table (agents.specs): lookups, and the proof that a new agent is one spec.

The tenth agent below, a compliance analyst, is declared here and nowhere else: its spec,
its prompt builder, its report schema, its simulated answer and its template. Registered
for one test, it runs through the real pipeline against the simulator (through the real
pool engine), its report is validated and stored, the auditor reads it, and the design page
shows it under its own tab.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest
from django.test import AsyncClient
from pydantic import Field

from agents import prompts
from agents.models import AgentRun, Design
from agents.options import AGENTS
from agents.pipeline import create_design, run_design
from agents.schemas import ReportSchema
from agents.specs import (
    AGENT_SPECS,
    AgentSpec,
    Output,
    Stage,
    agent_choices,
    extra_spec,
    only_in_stage,
    registered,
    spec_for,
    specs_in_stage,
)
from pools.simulator import ChatRequest
from tests.agents.conftest import RecordingResponder, user_prompt

# -- the tenth agent, complete -------------------------------------------------------------


class ComplianceAssessment(ReportSchema):
    frameworks: list[str] = Field(min_length=1)
    gaps: list[str]
    ready_for_audit: bool
    evidence: Literal["none", "partial", "complete"]


class ComplianceReport(ReportSchema):
    carlos: ComplianceAssessment
    ronei: ComplianceAssessment
    summary: str = Field(min_length=1)


def compliance_messages(
    agent: str,
    brief: prompts.Brief,
    requirements: str,
    designs: Mapping[str, str],
    round_number: int,
) -> prompts.Messages:
    return prompts.analyst_prompt(
        agent,
        "You are the compliance analyst of Carlos the Architect's design team.",
        "Check each design against the compliance level: the frameworks it can be audited "
        "against, its gaps, whether it is ready for an audit and how complete its evidence is.",
        brief,
        requirements,
        designs,
        round_number,
    )


def simulated_compliance(request: ChatRequest) -> str:
    """What a model would answer: the strict frameworks when the options ask for them."""
    strict = "(compliance=strict)" in user_prompt(request)
    frameworks = ["HIPAA", "PCI DSS"] if strict else ["GDPR"]
    return json.dumps(
        {
            "carlos": {
                "frameworks": frameworks,
                "gaps": [],
                "ready_for_audit": True,
                "evidence": "complete",
            },
            "ronei": {
                "frameworks": frameworks,
                "gaps": ["no customer-managed keys on the cluster disks"],
                "ready_for_audit": False,
                "evidence": "partial",
            },
            "summary": "Carlos's design is audit-ready; Ronei's lacks customer-managed keys.",
        }
    )


COMPLIANCE_TEMPLATE = """\
<table class="data" id="compliance-report">
  <tr><th>Frameworks</th><td>{{ report.carlos.frameworks|join:", " }}</td>
      <td>{{ report.ronei.frameworks|join:", " }}</td></tr>
  <tr><th>Ready for audit</th><td>{{ report.carlos.ready_for_audit|yesno:"yes,no" }}</td>
      <td>{{ report.ronei.ready_for_audit|yesno:"yes,no" }}</td></tr>
  <tr><th>Gaps</th><td>{{ report.carlos.gaps|join:"; "|default:"none" }}</td>
      <td>{{ report.ronei.gaps|join:"; "|default:"none" }}</td></tr>
</table>
"""

COMPLIANCE = AgentSpec(
    key="compliance",
    label="Compliance analyst",
    tab="Compliance",
    pool="mini",
    stage=Stage.ANALYSES,
    messages=compliance_messages,
    output=Output.JSON,
    schema=ComplianceReport,
    template="tenth_agent/compliance.html",
    simulated=simulated_compliance,
    emulated_seconds=(5, 10),
)


@pytest.fixture
def compliance_template(settings, tmp_path: Path) -> Iterator[Path]:
    """The compliance analyst's template, in a template folder of the test's own."""
    (tmp_path / "tenth_agent").mkdir()
    (tmp_path / "tenth_agent" / "compliance.html").write_text(COMPLIANCE_TEMPLATE)
    engine = settings.TEMPLATES[0]
    settings.TEMPLATES = [{**engine, "DIRS": [*engine["DIRS"], tmp_path]}, *settings.TEMPLATES[1:]]
    yield tmp_path


# -- the table -------------------------------------------------------------------------------


def test_the_table_lists_the_nine_agents_in_pipeline_order():
    assert registered() == AGENT_SPECS
    assert [spec.key for spec in registered()] == list(AGENTS)
    stages = [spec.stage for spec in registered()]
    assert stages == sorted(stages, key=list(Stage).index)
    assert [spec.key for spec in specs_in_stage(Stage.DESIGNS)] == ["carlos", "ronei"]
    assert [spec.key for spec in specs_in_stage("analyses")] == ["security", "cost", "reliability"]
    assert only_in_stage(Stage.AUDIT).key == "auditor"
    assert spec_for("cost").schema_class.__name__ == "CostReport"
    with pytest.raises(KeyError, match="no agent 'nobody'"):
        spec_for("nobody")
    with pytest.raises(LookupError, match="has 2 agents"):
        only_in_stage(Stage.DESIGNS)
    with pytest.raises(LookupError, match="no report schema"):
        _ = spec_for("auditor").schema_class


def test_an_extra_spec_is_in_force_only_inside_its_block():
    with extra_spec(COMPLIANCE):
        keys = [spec.key for spec in registered()]
        assert keys == [*AGENTS[:6], "compliance", *AGENTS[6:]]  # last of its stage
        assert spec_for("compliance") is COMPLIANCE
        assert ("compliance", "Compliance analyst") in agent_choices()
        field_choices = AgentRun._meta.get_field("agent").choices
        assert ("compliance", "Compliance analyst") in list(field_choices)
        with pytest.raises(ValueError, match="already declared"), extra_spec(COMPLIANCE):
            pass
    assert registered() == AGENT_SPECS
    with pytest.raises(KeyError):
        spec_for("compliance")


def test_a_spec_that_cannot_be_run_is_refused():
    with pytest.raises(ValueError, match="needs a schema and a template"):
        replace(COMPLIANCE, key="broken", template=None)
    with (
        pytest.raises(ValueError, match="longer than 20"),
        extra_spec(replace(COMPLIANCE, key="x" * 21)),
    ):
        pass


# -- the tenth agent through the whole product -------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_tenth_agent_runs_with_the_analysts_and_shows_on_the_design_page(
    carlos_registry, recorder: RecordingResponder, owner, compliance_template
):
    with extra_spec(COMPLIANCE):
        design = await create_design(
            owner,
            "A patient portal for a clinic network",
            {
                "compliance": "strict",
            },
        )
        await run_design(design.pk)

        design = await Design.objects.aget(pk=design.pk)
        assert design.status == Design.Status.SUCCEEDED, design.error
        runs = [run async for run in design.runs.order_by("id")]
        assert sorted(run.agent for run in runs) == sorted([*AGENTS, "compliance"])
        by_agent = {run.agent: run for run in runs}
        compliance = by_agent["compliance"]
        assert compliance.status == AgentRun.Status.SUCCEEDED
        assert (compliance.pool, compliance.round, compliance.json_error) == ("mini", 0, "")
        assert compliance.output_json == json.loads(compliance.output_text)
        assert compliance.output_json["carlos"]["frameworks"] == ["HIPAA", "PCI DSS"]

        # It ran with the other analysts: after both designs, all at once, before the audit.
        analysts = [by_agent[key] for key in ("security", "cost", "reliability", "compliance")]
        designs_done = max(by_agent[key].finished_at for key in ("carlos", "ronei"))
        assert designs_done <= min(run.started_at for run in analysts)
        assert max(run.started_at for run in analysts) < min(run.finished_at for run in analysts)
        assert max(run.finished_at for run in analysts) <= by_agent["auditor"].started_at

        # Its prompt carried its own schema and both designs; the auditor and the
        # recommender read its report as they read the others.
        [asked] = recorder.for_agent("compliance")
        assert "ready_for_audit" in asked.messages[0]["content"]
        assert "## Carlos's design" in user_prompt(asked)
        assert "## Ronei's design" in user_prompt(asked)
        for reader in ("auditor", "recommender"):
            [prompt] = [user_prompt(request) for request in recorder.for_agent(reader)]
            assert "## Compliance analysis" in prompt and "PCI DSS" in prompt

        client = AsyncClient()
        await client.aforce_login(owner)
        page = await client.get(f"/designs/{design.pk}/")
        assert page.status_code == 200
        html = page.content.decode()
        tab = re.search(r'<button[^>]*id="tab-compliance"[^>]*>(.*?)</button>', html, re.DOTALL)
        assert tab is not None
        tab_text = re.sub(r"<[^>]+>", "", tab[1]).strip()  # what a reader hears: label, state
        assert tab_text == "Compliance, done", tab_text
        panel = html[html.index('id="panel-compliance"') :]
        panel = panel[: panel.index("</section>")]
        assert "<h2>Compliance analyst</h2>" in panel
        assert 'id="compliance-report"' in panel
        assert "HIPAA, PCI DSS" in panel
        assert "no customer-managed keys on the cluster disks" in panel
        # Its tab comes after the other analysts' and before the audit's.
        order = [html.index(f'id="tab-{key}"') for key in ("reliability", "compliance", "auditor")]
        assert order == sorted(order)

    # Once it is no longer declared, its stored run does not break the page.
    page = await client.get(f"/designs/{design.pk}/")
    assert page.status_code == 200
    assert 'id="tab-compliance"' not in page.content.decode()
