"""The offline simulator's Carlos content: each agent's format, the chosen cloud, the user's words.

These call the responder directly with the real prompts, since its answers must satisfy the
same parsers and schemas the pipeline applies to a real model.
"""

from __future__ import annotations

import json
import re

import hcl2
import pytest
from django.conf import settings
from django.utils.module_loading import import_string

from agents import prompts
from agents.schemas import validate_report
from agents.simulated import agent_of, carlos_responder
from agents.terraform import deployment_steps, split_terraform
from pools.simulator import ChatRequest

SERVICES = {
    "azure": ("Azure App Service", "Azure Kubernetes Service (AKS)", "Azure SQL Database"),
    "aws": ("Amazon ECS on AWS Fargate", "Amazon EKS", "Amazon RDS for PostgreSQL"),
    "gcp": ("Cloud Run", "Google Kubernetes Engine (GKE)", "Cloud SQL for PostgreSQL"),
}
FOREIGN = {
    "azure": ("Amazon", "Google", "GKE"),
    "aws": ("Azure", "Google", "GKE"),
    "gcp": ("Azure", "Amazon", "AWS"),
}
PROVIDERS = {"azure": "azurerm", "aws": "aws", "gcp": "google"}
REQUEST = "A veterinary clinic scheduling system with SMS reminders for 3,000 pet owners"


def ask(messages: prompts.Messages) -> str:
    return carlos_responder(
        ChatRequest(
            model="gpt-4o",
            messages=messages,
            temperature=0.7,
            max_tokens=None,
            stream=True,
            include_usage=True,
            response_format=None,
            deployment=None,
            body={},
        )
    )


def brief(text: str = REQUEST, **options: str) -> prompts.Brief:
    return prompts.Brief.build(text, options)


def team(b: prompts.Brief, round_number: int = 0) -> dict[str, str]:
    """Requirements, both designs and the three analyses, as the pipeline would chain them."""
    requirements = ask(prompts.requirements_messages(b))
    designs = {
        agent: ask(prompts.design_messages(agent, b, requirements, round_number=round_number))
        for agent in ("carlos", "ronei")
    }
    analyses = {
        agent: ask(prompts.analyst_messages(agent, b, requirements, designs, round_number))
        for agent in ("security", "cost", "reliability")
    }
    return {"requirements": requirements, **designs, **analyses}


def mermaid_of(design: str) -> list[str]:
    match = re.search(r"```mermaid\n(.*?)\n```", design, re.DOTALL)
    assert match, "no mermaid fence"
    return match[1].splitlines()


def test_settings_use_the_carlos_responder():
    assert import_string(settings.LLM_SIMULATOR_RESPONDER) is carlos_responder


def test_every_prompt_names_its_agent():
    b = brief()
    designs = {"carlos": "x", "ronei": "y"}
    built = {
        prompts.QUESTIONS_AGENT: prompts.questions_messages(b),
        "requirements": prompts.requirements_messages(b),
        "carlos": prompts.design_messages("carlos", b, "r"),
        "ronei": prompts.design_messages("ronei", b, "r"),
        "security": prompts.analyst_messages("security", b, "r", designs, 0),
        "cost": prompts.analyst_messages("cost", b, "r", designs, 0),
        "reliability": prompts.analyst_messages("reliability", b, "r", designs, 0),
        "auditor": prompts.auditor_messages(b, "r", designs, {}, 0, final_round=False),
        "recommender": prompts.recommender_messages(b, designs, {}, "a"),
        "terraform": prompts.terraform_messages(b, "CARLOS", "d"),
    }
    for agent, messages in built.items():
        request = ChatRequest("m", messages, None, None, False, False, None, None, {})
        assert agent_of(request) == agent


@pytest.mark.parametrize("cloud", ["azure", "aws", "gcp"])
def test_two_differing_well_architected_designs_on_the_chosen_cloud(cloud):
    outputs = team(brief(cloud=cloud, scenario="web_app"))
    carlos, ronei = outputs["carlos"], outputs["ronei"]
    paas, kubernetes, database = SERVICES[cloud]
    assert paas in carlos and kubernetes not in carlos
    assert kubernetes in ronei
    assert database in carlos and database in ronei
    for design in (carlos, ronei):
        headings = re.findall(r"^## (\d+)\. (.+)$", design, re.MULTILINE)
        assert headings == [(str(n), t) for n, t in enumerate(prompts.DESIGN_SECTIONS, 1)]
        assert mermaid_of(design)[0] == "flowchart TD"
        assert re.search(r"^\| \*\*Total\*\* \| \| \*\*\$[\d,]+\*\* \|$", design, re.MULTILINE)
        for foreign in FOREIGN[cloud]:
            assert foreign not in design


def test_designs_use_the_users_words_and_answers():
    b = prompts.Brief.build(
        REQUEST,
        {"cloud": "azure"},
        [
            {"question": "What traffic?", "answer": "200 bookings an hour"},
            {"question": "Budget?", "answer": None},
        ],
    )
    requirements = ask(prompts.requirements_messages(b))
    design = ask(prompts.design_messages("carlos", b, requirements))
    assert f"“{REQUEST}”" in design
    assert "veterinary" in design and "veterinary" in requirements
    assert "3,000 pet owners" in requirements
    assert "What traffic? → 200 bookings an hour" in design
    assert "Budget? → skipped" in design


@pytest.mark.parametrize("scenario", ["web_app", "data_pipeline", "microservices", "custom"])
def test_mermaid_diagrams_only_link_declared_nodes(scenario):
    outputs = team(brief(scenario=scenario, reliability="extreme", compliance="strict"))
    for agent in ("carlos", "ronei"):
        lines = mermaid_of(outputs[agent])[1:]
        declared = {m[1] for line in lines if (m := re.fullmatch(r"\s+(\w+)[\[(].*", line))}
        edges = [line for line in lines if "->" in line]
        assert edges
        for line in edges:
            unlabelled = re.sub(r"-- [^>]+? -->", "-->", re.sub(r"-\. [^>]+? \.->", "-.->", line))
            ends = re.split(r"\s+(?:-->|-\.->)\s+", unlabelled.strip())
            assert len(ends) == 2, line
            source, target = (re.match(r"\w+", end)[0] for end in ends)
            assert source in declared, line
            # A target may be declared inline, as the standby and BI nodes are.
            assert target in declared or re.fullmatch(r"\w+[\[(].+[\])]", ends[1]), line


@pytest.mark.parametrize(
    ("cloud", "scenario"),
    [("azure", "web_app"), ("aws", "data_pipeline"), ("gcp", "microservices")],
)
def test_analyst_reports_validate_and_match_the_designs(cloud, scenario):
    outputs = team(brief(cloud=cloud, scenario=scenario, compliance="regulated"))
    reports = {a: validate_report(a, outputs[a]) for a in ("security", "cost", "reliability")}
    for agent in ("carlos", "ronei"):
        total = re.search(r"\| \*\*Total\*\* \| \| \*\*\$([\d,]+)\*\* \|", outputs[agent])[1]
        assert reports["cost"][agent]["monthly_usd"] == float(total.replace(",", ""))
        assert reports["cost"][agent]["annual_usd"] == 12 * float(total.replace(",", ""))
        assert "GDPR" in reports["security"][agent]["frameworks"]
    assert reports["cost"]["carlos"] != reports["cost"]["ronei"]


def test_the_auditor_approves_unless_asked_to_revise_in_round_zero():
    plain = brief("A blog for a bakery")
    revise = brief("A blog for a bakery; please revise the first drafts")
    looks_alike = brief("A blog about revised recipes")

    def verdict(b: prompts.Brief, round_number: int) -> str:
        designs = {"carlos": "c", "ronei": "r"}
        messages = prompts.auditor_messages(b, "req", designs, {}, round_number, final_round=False)
        return prompts.parse_verdict(ask(messages))

    assert verdict(plain, 0) == "APPROVED"
    assert verdict(looks_alike, 0) == "APPROVED"
    assert verdict(revise, 0) == "NEEDS REVISION"
    assert verdict(revise, 1) == "APPROVED"
    designs = {"carlos": "c", "ronei": "r"}
    audit = ask(prompts.auditor_messages(revise, "req", designs, {}, 0, final_round=False))
    changes = prompts.parse_required_changes(audit)
    assert changes.startswith("- Carlos:") and len(changes.splitlines()) == 3


def test_revised_designs_say_what_they_changed():
    b = brief("A blog for a bakery; please revise the first drafts")
    changes = "- Carlos: add private endpoints.\n- Both: state RTO."
    revised = ask(
        prompts.design_messages(
            "carlos", b, "req", round_number=1, previous_design="old", required_changes=changes
        )
    )
    assert "**Revision 1.**" in revised and changes in revised


@pytest.mark.parametrize(("priority", "expected"), [("cost", "CARLOS"), ("performance", "RONEI")])
def test_the_recommendation_follows_the_priority(priority, expected):
    b = brief(priority=priority)
    text = ask(prompts.recommender_messages(b, {"carlos": "c", "ronei": "r"}, {}, "audit"))
    assert prompts.parse_recommendation(text) == expected
    for heading in ("## Why", "## Trade-offs", "## Risks", "## When to choose", "## Next steps"):
        assert heading in text


@pytest.mark.parametrize("cloud", ["azure", "aws", "gcp"])
@pytest.mark.parametrize("choice", ["CARLOS", "RONEI"])
@pytest.mark.parametrize("scenario", ["web_app", "data_pipeline", "microservices"])
def test_terraform_is_four_parseable_files_for_the_recommended_design(cloud, choice, scenario):
    """A design text naming no catalogue service gets the architect's usual services, in four
    files that parse as HCL (tests/agents/test_terraform_design.py checks real designs)."""
    b = brief(cloud=cloud, scenario=scenario)
    text = ask(prompts.terraform_messages(b, choice, "the design"))
    files = split_terraform(text)
    assert list(files) == ["versions.tf", "variables.tf", "main.tf", "outputs.tf"]
    parsed = {name: hcl2.loads(body) for name, body in files.items()}
    provider = PROVIDERS[cloud]
    assert provider in json.dumps(parsed["versions.tf"]["terraform"])
    resources = json.dumps(parsed["main.tf"]["resource"])
    kubernetes = {
        "azure": "azurerm_kubernetes_cluster",
        "aws": "aws_eks_cluster",
        "gcp": "google_container_cluster",
    }[cloud]
    assert (kubernetes in resources) == (choice == "RONEI")
    assert all(
        o.get("description") for block in parsed["outputs.tf"]["output"] for o in block.values()
    )
    steps = deployment_steps(text)
    assert "terraform init" in steps and "terraform apply" in steps


def test_clarifying_questions_are_three_to_five_numbered_lines_about_the_request():
    seen_counts = set()
    for text in (REQUEST, "A data lake for retail sales", "Chat app", "Payroll for 40 staff"):
        answer = ask(prompts.questions_messages(brief(text)))
        lines = answer.splitlines()
        assert 3 <= len(lines) <= 5
        assert [line.split(".")[0] for line in lines] == [str(n) for n in range(1, len(lines) + 1)]
        assert prompts.parse_questions(answer) == [line.split(". ", 1)[1] for line in lines]
        seen_counts.add(len(lines))
    assert "veterinary" in ask(prompts.questions_messages(brief()))
    assert len(seen_counts) > 1  # the number varies with the request


def test_answers_are_deterministic():
    messages = prompts.design_messages("ronei", brief(cloud="aws"), "requirements")
    assert ask(messages) == ask(messages)


def test_an_unknown_caller_gets_the_default_paragraph():
    text = ask([{"role": "user", "content": "Tell me about connection pools"}])
    assert "pools" in text.lower() and "VERDICT" not in text


def test_split_terraform_accepts_common_heading_and_fence_styles():
    text = (
        '### `main.tf`\n\n~~~hcl\nresource "x" "y" {}\n~~~\n'
        '## variables.tf:\n```terraform\nvariable "a" {}\n```\n'
        "### notes.tf\nno fence here\n"
        "## Deployment steps\n1. terraform init\n## Other\nignored\n"
    )
    assert split_terraform(text) == {
        "main.tf": 'resource "x" "y" {}\n',
        "variables.tf": 'variable "a" {}\n',
    }
    assert deployment_steps(text) == "1. terraform init"
    assert deployment_steps("no steps") == ""
