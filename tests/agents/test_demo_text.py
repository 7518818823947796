"""The offline simulator's prose reads as written for the request, not as a filled template.

Each request goes through the real prompts (agents/prompts.py), agent after agent, as the
pipeline chains them, for every cloud and with either architect recommended. The checks are
about the text a user reads: sentences end once, no template braces or `@` placeholders are
left, the thing is named as the user named it ("the ride-sharing app", never "the
ride-sharing million workload"), the figures the user gave appear as they gave them, and an
internal application is never called internet-facing or given a public edge.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest

from agents import prompts
from tests.agents.test_simulated import ask


@dataclass(frozen=True)
class Case:
    text: str
    scenario: str
    name: str  # how the designs must name the thing
    figures: tuple[str, ...]  # the request's own figures, to be quoted as written
    internal: bool = False


CASES = {
    "ride-sharing": Case(
        "A public ride-sharing app for a million users",
        "custom",
        "ride-sharing app",
        ("a million users",),
    ),
    "hr-portal": Case(
        "An internal HR portal for 500 employees",
        "web_app",
        "HR portal",
        ("500 employees",),
        internal=True,
    ),
    "iot": Case(
        "An IoT telemetry pipeline for 20,000 devices sending 5,000 events per second",
        "data_pipeline",
        "IoT telemetry pipeline",
        ("20,000 devices", "5,000 events per second"),
    ),
    "blog": Case("A small blog for a bakery", "web_app", "blog for a bakery", ()),
    "analytics": Case(
        "A data-analytics platform over 20 TB of sales data",
        "custom",
        "data-analytics platform",
        ("20 TB of sales data",),
    ),
}
PRIORITY_FOR = {"CARLOS": "cost", "RONEI": "performance"}
CLOUD_LABELS = {"aws": "AWS", "azure": "Azure", "gcp": "Google Cloud"}
# How each cloud's HCL says an entry point is private.
PRIVATE_ENTRY = {
    "aws": r"internal\s+= true",
    "azure": r"private_ip_address\s+= ",
    "gcp": r"load_balancing_scheme\s+= \"INTERNAL_MANAGED\"",
}


def run_chain(brief: prompts.Brief) -> dict[str, str]:
    """Every agent's answer to the real prompts, in the pipeline's order."""
    out = {"questions": ask(prompts.questions_messages(brief))}
    out["requirements"] = ask(prompts.requirements_messages(brief))
    designs = {
        a: ask(prompts.design_messages(a, brief, out["requirements"])) for a in ("carlos", "ronei")
    }
    out.update(designs)
    analyses = {
        a: ask(prompts.analyst_messages(a, brief, out["requirements"], designs, 0))
        for a in ("security", "cost", "reliability")
    }
    out.update(analyses)
    out["auditor"] = ask(
        prompts.auditor_messages(brief, out["requirements"], designs, analyses, 0, final_round=True)
    )
    out["recommender"] = ask(prompts.recommender_messages(brief, designs, analyses, out["auditor"]))
    choice = prompts.parse_recommendation(out["recommender"])
    chosen = designs["carlos" if choice == prompts.RECOMMEND_CARLOS else "ronei"]
    out["terraform"] = ask(prompts.terraform_messages(brief, choice, chosen))
    out["choice"] = choice
    return out


def json_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in json_strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in json_strings(item)]
    return []


def prose(agent: str, text: str) -> str:
    """What a reader reads as sentences: code fences, tables and JSON syntax removed."""
    if agent in ("security", "cost", "reliability"):
        return "\n".join(json_strings(json.loads(text)))
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "code", text)  # `export TF_VAR_x=...` is code, not a sentence
    return "\n".join(line for line in text.splitlines() if not line.startswith("|"))


def grammar_problems(text: str) -> list[str]:
    checks = {
        "doubled full stop": r"\.\.",
        "full stop after a closing quote that ends a sentence": r"[.!?]”\.",
        "space before punctuation": r" [.,;:]",
        "template brace": r"[{}]",
        "template placeholder": r"@\w",
        "doubled word": r"\b(\w+) \1\b",
        "keyword-bag subject": r"\b(?:million|thousand|users|employees|\d[\d,]*) workload\b",
        "list of bare keywords": r"built around \w+, \w+",
        "two colons in one clause": r": [^.\n:;→]*: ",
    }
    return [
        f"{name}: …{text[max(0, m.start() - 40) : m.end() + 40]}…"
        for name, pattern in checks.items()
        for m in re.finditer(pattern, text, re.IGNORECASE if name != "doubled word" else 0)
    ]


@pytest.fixture(scope="module")
def outputs() -> dict[tuple[str, str, str], dict[str, str]]:
    """Every case on every cloud with either architect recommended, computed once."""
    results = {}
    for key, case in CASES.items():
        for cloud in CLOUD_LABELS:
            for choice, priority in PRIORITY_FOR.items():
                options = {"cloud": cloud, "scenario": case.scenario, "priority": priority}
                results[(key, cloud, choice)] = run_chain(prompts.Brief.build(case.text, options))
    return results


PARAMS = [(k, c, a) for k in CASES for c in CLOUD_LABELS for a in PRIORITY_FOR]


@pytest.mark.parametrize(("key", "cloud", "choice"), PARAMS)
def test_the_text_is_grammatical_and_names_the_thing_as_the_user_did(outputs, key, cloud, choice):
    case = CASES[key]
    out = outputs[(key, cloud, choice)]
    assert out["choice"] == choice
    problems = {
        agent: found
        for agent, text in out.items()
        if agent != "choice" and (found := grammar_problems(prose(agent, text)))
    }
    assert not problems
    assert not re.search(r"@\w", out["terraform"]), "a template placeholder was left in the HCL"
    for architect in ("Carlos", "Ronei"):
        title = out[architect.lower()].splitlines()[0]
        assert title == f"# {architect}'s design for the {case.name} on {CLOUD_LABELS[cloud]}"
    assert f"the {case.name}" in out["questions"] + out["requirements"]
    assert f"the {case.name}" in out["auditor"] and f"the {case.name}" in out["recommender"]


@pytest.mark.parametrize(("key", "cloud", "choice"), PARAMS)
def test_the_requests_figures_appear_as_the_user_wrote_them(outputs, key, cloud, choice):
    case = CASES[key]
    out = outputs[(key, cloud, choice)]
    for figure in case.figures:
        assert figure in out["requirements"], figure
        for architect in ("carlos", "ronei"):
            assert figure in out[architect], (architect, figure)
    if case.figures:
        assert "not stated" not in out["carlos"].split("## 3.")[0]
        assert "assumed up to 500 requests per second" not in out["requirements"] or not any(
            word in " ".join(case.figures) for word in ("users", "employees", "per second")
        )


@pytest.mark.parametrize(("key", "cloud", "choice"), PARAMS)
def test_internal_apps_are_private_and_public_apps_face_the_internet(outputs, key, cloud, choice):
    case = CASES[key]
    out = outputs[(key, cloud, choice)]
    designs = out["carlos"] + out["ronei"]
    everything = "\n".join(prose(agent, text) for agent, text in out.items() if agent != "choice")
    if case.internal:
        assert not re.search(r"internet-facing|the public\b|public (?:users|web|app)", everything)
        assert not re.search(r"CloudFront|Front Door|Cloud CDN|Cognito", designs)
        assert 'users(["Employees"])' in designs and "VPN" in designs
        assert "single sign-on" in out["requirements"] and "Single sign-on" in designs
        assert "No public ingress" in designs
        main_tf = out["terraform"].split("### main.tf", 1)[1].split("### outputs.tf", 1)[0]
        assert re.search(PRIVATE_ENTRY[cloud], main_tf)
        assert not re.search(r"aws_cloudfront|internal\s+= false|azurerm_cdn_frontdoor", main_tf)
    elif case.scenario != "data_pipeline" and "pipeline" not in case.name:
        assert "internet-facing" in out["requirements"] or "analytics" in case.name


def test_users_answers_keep_one_full_stop():
    brief = prompts.Brief.build(
        CASES["ride-sharing"].text,
        {"cloud": "aws"},
        [
            {"question": "What peak traffic?", "answer": "About 3,000 requests per second."},
            {"question": "Which integrations?", "answer": "Stripe and Twilio."},
            {"question": "What monthly budget?", "answer": "$20k a month."},
            {"question": "Which regions?", "answer": None},
        ],
    )
    out = run_chain(brief)
    assert "- Traffic: About 3,000 requests per second.\n" in out["requirements"]
    assert "- Integrations: Stripe and Twilio.\n" in out["requirements"]
    for agent in ("requirements", "carlos", "ronei", "recommender", "terraform"):
        assert not grammar_problems(prose(agent, out[agent])), agent


def test_a_request_that_names_no_kind_of_thing_still_reads_well():
    out = run_chain(prompts.Brief.build("Payroll for 40 staff", {"cloud": "azure"}))
    assert out["carlos"].startswith("# Carlos's design for the payroll system on Azure")
    assert "40 staff" in out["requirements"]
    for agent in ("questions", "requirements", "carlos", "ronei", "auditor", "recommender"):
        assert not grammar_problems(prose(agent, out[agent])), agent


def test_the_issues_example_names_the_app_not_a_keyword_bag():
    """Issue 15 saw "the ride-sharing million workload" for a request shaped like this one."""
    out = run_chain(prompts.Brief.build("Ride-sharing app for 1 million users", {"cloud": "gcp"}))
    text = "\n".join(value for key, value in out.items() if key != "choice")
    assert "million workload" not in text
    assert out["carlos"].startswith("# Carlos's design for the ride-sharing app on Google Cloud")
    assert "1 million users, as the request states" in out["requirements"]
