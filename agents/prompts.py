"""Every agent's prompt, built from the request and the specific prior outputs it needs.

Why this shape: the original appended the whole conversation to itself at every step, and
dropped the form's options on the way. Here each call is exactly [system, user]: the user
message is assembled from the request, all the options, the answered clarifications and only
the outputs that agent reads, so prompt size is bounded by the inputs, never by history.

Each system prompt starts with `AGENT: <key>` (the agent's key in agents.specs, which names
the builder here that each agent is prompted with), a stable marker that logs and the
offline simulator use to tell the agents apart. The strict output formats (verdict, recommendation,
numbered questions) are parsed here too, next to the instructions that ask for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.options import OPTION_FIELDS, OPTION_GUIDANCE, option_label, validate_options
from agents.schemas import schema_text
from agents.specs import Stage, specs_in_stage

Messages = list[dict[str, str]]

QUESTIONS_AGENT = "questions"  # the requirements analyst in its clarifying-questions role

DESIGN_SECTIONS: tuple[str, ...] = (
    "Executive Summary",
    "Requirements and Assumptions",
    "Architecture Overview",
    "Compute",
    "Data and Storage",
    "Networking",
    "Security",
    "Reliability",
    "Performance Efficiency",
    "Cost Estimate",
    "Operational Excellence",
)

VERDICT_APPROVED = "APPROVED"
VERDICT_NEEDS_REVISION = "NEEDS REVISION"
RECOMMEND_CARLOS = "CARLOS"
RECOMMEND_RONEI = "RONEI"
TERRAFORM_FILES: tuple[str, ...] = ("versions.tf", "variables.tf", "main.tf", "outputs.tf")

MIN_QUESTIONS = 3
MAX_QUESTIONS = 5


class OutputFormatError(ValueError):
    """An agent's answer lacks the exact line the pipeline must read from it."""


@dataclass(frozen=True)
class Brief:
    """What the user asked: the text, every form option, and the clarifications answered."""

    request_text: str
    options: dict[str, str]
    clarifications: tuple[tuple[str, str | None], ...] = field(default_factory=tuple)

    @classmethod
    def build(
        cls,
        request_text: str,
        options: Mapping[str, Any] | None,
        clarifications: Sequence[Mapping[str, Any]] | None = None,
    ) -> Brief:
        pairs = tuple(
            (str(item.get("question", "")), item.get("answer") or None)
            for item in (clarifications or ())
            if item.get("question")
        )
        return cls(request_text.strip(), validate_options(options), pairs)

    @property
    def cloud_label(self) -> str:
        return option_label("cloud", self.options["cloud"])


# -- shared blocks -----------------------------------------------------------------------


def brief_block(brief: Brief) -> str:
    """The request, all six options (label, value and what it asks) and the clarifications."""
    lines = ["## Request", "<request>", brief.request_text, "</request>", "", "## Options"]
    for key, (label, _choices) in OPTION_FIELDS.items():
        value = brief.options[key]
        guidance = OPTION_GUIDANCE[key][value]
        lines.append(f"- {label}: {option_label(key, value)} ({key}={value}). {guidance}")
    if brief.clarifications:
        lines += ["", "## Clarifications"]
        for question, answer in brief.clarifications:
            lines.append(f"Q: {question}")
            lines.append(
                f"A: {answer}"
                if answer
                else "A: (skipped by the user: state a reasonable assumption instead)"
            )
    return "\n".join(lines)


def _system(agent: str, role: str, body: str) -> dict[str, str]:
    return {"role": "system", "content": f"AGENT: {agent}\n{role}\n\n{body.strip()}"}


def _user(*blocks: str) -> dict[str, str]:
    return {"role": "user", "content": "\n\n".join(block.strip() for block in blocks if block)}


def _section(title: str, text: str) -> str:
    return f"## {title}\n{text.strip()}"


def _sections_list() -> str:
    return "\n".join(f"{n}. {title}" for n, title in enumerate(DESIGN_SECTIONS, start=1))


# -- requirements analyst ----------------------------------------------------------------


def questions_messages(brief: Brief) -> Messages:
    """Ask the requirements analyst for 3-5 clarifying questions, one per numbered line."""
    return [
        _system(
            QUESTIONS_AGENT,
            "You are the requirements analyst of Carlos the Architect's design team.",
            f"""
Before the architects start, ask the user between {MIN_QUESTIONS} and {MAX_QUESTIONS}
short clarifying questions that would most change the architecture. Cover the gaps among:
expected traffic, availability SLA, compliance, budget, regions, integrations and data
(volume, retention, sensitivity). Do not ask about what the request or the options already
settle. Answer with the questions only, one per line, numbered "1." to "{MAX_QUESTIONS}.".
""",
        ),
        _user(brief_block(brief)),
    ]


def requirements_messages(brief: Brief) -> Messages:
    return [
        _system(
            "requirements",
            "You are the requirements analyst of Carlos the Architect's design team.",
            """
Turn the request into a structured requirements summary the architects can design from.
Use these markdown headings: Workload, Functional requirements, Non-functional requirements
(traffic, availability, latency, data), Compliance and security, Constraints (cloud provider,
budget posture, strictness), Assumptions. Respect every option; where a clarification was
skipped or something is unknown, state an explicit assumption. Be concise and concrete.
""",
        ),
        _user(brief_block(brief)),
    ]


# -- architects ----------------------------------------------------------------------------

_ARCHITECTS = {
    "carlos": (
        "You are Carlos, the lead cloud architect: pragmatic, managed-services first.",
        "Favour fully managed PaaS and serverless services that a small team can run.",
    ),
    "ronei": (
        "You are Ronei, the rival cloud architect: cloud-native and Kubernetes-leaning.",
        "Favour containers on managed Kubernetes, GitOps and portable open-source components, "
        "and make your design genuinely different from a PaaS-first one.",
    ),
}


def design_messages(
    agent: str,
    brief: Brief,
    requirements: str,
    *,
    round_number: int = 0,
    previous_design: str | None = None,
    required_changes: str | None = None,
) -> Messages:
    """An architect's prompt; in a revision round it carries its own previous design and the
    auditor's required changes, nothing else from earlier rounds."""
    role, stance = _ARCHITECTS[agent]
    system = _system(
        agent,
        role,
        f"""
{stance}
Write a complete Well-Architected design in markdown with exactly these 11 numbered
sections (as "## 1. Executive Summary" and so on):
{_sections_list()}
Name concrete {brief.cloud_label} services and SKUs, the network layout and the regions.
Section 3 must contain a Mermaid diagram in a ```mermaid fence starting with "flowchart TD".
Section 10 must contain a monthly cost estimate in USD as a table, with a total.
Honour every option below; say explicitly how the design meets the reliability target and
the compliance level.
""",
    )
    blocks = [brief_block(brief), _section("Requirements summary", requirements)]
    if round_number > 0:
        blocks.append(f"Revision round: {round_number}")
        if previous_design:
            blocks.append(_section("Your previous design", previous_design))
        blocks.append(
            _section(
                "Auditor's required changes",
                required_changes or "(none listed: tighten the weak points)",
            )
        )
        blocks.append("Return the complete revised design, addressing every required change.")
    return [system, _user(*blocks)]


# -- analysts --------------------------------------------------------------------------------

_ANALYSTS = {
    "security": (
        "You are the security analyst of Carlos the Architect's design team.",
        "Assess each design's security posture against the compliance level: score 0-100, "
        "findings by severity with a recommendation each, supported frameworks, controls, "
        "and whether data is encrypted at rest and in transit and the network segmented.",
    ),
    "cost": (
        "You are the cost analyst of Carlos the Architect's design team.",
        "Estimate each design's monthly and annual cost in USD from its services (SKU, "
        "quantity, monthly cost, category), name the cost drivers, give at least three "
        "concrete optimisations and your confidence (low, medium or high).",
    ),
    "reliability": (
        "You are the reliability analyst of Carlos the Architect's design team.",
        "Assess each design against the reliability target: estimated composite SLA in "
        "percent, single points of failure, RTO and RPO in hours, multi-AZ and multi-region "
        "flags, monitoring, scaling and backup.",
    ),
}


def analyst_messages(
    agent: str, brief: Brief, requirements: str, designs: Mapping[str, str], round_number: int
) -> Messages:
    role, task = _ANALYSTS[agent]
    return analyst_prompt(agent, role, task, brief, requirements, designs, round_number)


def analyst_prompt(
    agent: str,
    role: str,
    task: str,
    brief: Brief,
    requirements: str,
    designs: Mapping[str, str],
    round_number: int,
) -> Messages:
    """Any analyst's prompt: its role and task, both designs, and its spec's JSON schema."""
    system = _system(
        agent,
        role,
        f"""
{task}
Review both designs: put Carlos's under "carlos", Ronei's under "ronei", and a two-sentence
comparison under "summary". Answer with one JSON object only, no prose and no code fence,
valid against this JSON schema:
{schema_text(agent)}
""",
    )
    return [
        system,
        _user(
            brief_block(brief),
            _section("Requirements summary", requirements),
            f"Review round: {round_number}",
            _section("Carlos's design", designs["carlos"]),
            _section("Ronei's design", designs["ronei"]),
        ),
    ]


def repair_messages(messages: Messages, invalid_text: str, error: str) -> Messages:
    """The one repair attempt: the same prompt, the invalid answer and what was wrong."""
    return [
        *messages,
        {"role": "assistant", "content": invalid_text},
        {
            "role": "user",
            "content": "REPAIR: your answer was rejected because it "
            f"{error}\nReturn the corrected JSON object only, valid against the schema.",
        },
    ]


def analysis_text(output_json: Any, output_text: str) -> str:
    """An analyst's report for a later prompt: compact JSON, or its raw text if invalid."""
    if output_json is None:
        return f"(invalid JSON, raw text follows)\n{output_text}"
    return json.dumps(output_json, separators=(",", ":"))


# -- auditor, recommender, Terraform ------------------------------------------------------------

_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _in_words(number: int) -> str:
    """A small count in words ("three"), as prose writes it; larger ones in digits."""
    return _NUMBER_WORDS[number] if number < len(_NUMBER_WORDS) else str(number)


def auditor_messages(
    brief: Brief,
    requirements: str,
    designs: Mapping[str, str],
    analyses: Mapping[str, str],
    round_number: int,
    *,
    final_round: bool,
) -> Messages:
    analysts = _in_words(len(specs_in_stage(Stage.ANALYSES)))
    system = _system(
        "auditor",
        "You are the auditor of Carlos the Architect's design team.",
        f"""
Check both designs against the requirements, every option and the {analysts} analysts' reports.
Approve when both designs are sound enough to recommend one; ask for a revision only for
concrete, material problems. Answer in exactly this format:
VERDICT: APPROVED            (or: VERDICT: NEEDS REVISION, on a line of its own)
SUMMARY: one paragraph.
STRENGTHS:
- one bullet per strength
REQUIRED CHANGES:
- one bullet per change the architects must make ("- None" when approved)
""",
    )
    blocks = [
        brief_block(brief),
        _section("Requirements summary", requirements),
        f"Review round: {round_number}"
        + (" (final: no further revision is possible)" if final_round else ""),
        _section("Carlos's design", designs["carlos"]),
        _section("Ronei's design", designs["ronei"]),
    ]
    blocks += [_section(f"{name.capitalize()} analysis", text) for name, text in analyses.items()]
    return [system, _user(*blocks)]


def recommender_messages(
    brief: Brief, designs: Mapping[str, str], analyses: Mapping[str, str], audit: str
) -> Messages:
    system = _system(
        "recommender",
        "You are the recommender of Carlos the Architect's design team.",
        """
Choose the design the user should build, weighing the options (above all cost vs
performance, reliability target and compliance) and the analysts' reports. The first line
of your answer must be exactly "RECOMMEND: CARLOS" or "RECOMMEND: RONEI". Then, in markdown:
## Why, ## Trade-offs, ## Risks, ## When to choose the other design, ## Next steps.
""",
    )
    blocks = [
        brief_block(brief),
        _section("Carlos's design", designs["carlos"]),
        _section("Ronei's design", designs["ronei"]),
    ]
    blocks += [_section(f"{name.capitalize()} analysis", text) for name, text in analyses.items()]
    blocks.append(_section("Auditor's report", audit))
    return [system, _user(*blocks)]


def terraform_messages(brief: Brief, recommendation: str, design: str) -> Messages:
    files = ", ".join(f"`{name}`" for name in TERRAFORM_FILES)
    system = _system(
        "terraform",
        "You are the Terraform coder of Carlos the Architect's design team.",
        f"""
Write Terraform for the recommended design on {brief.cloud_label}: the files {files}.
Put each file under a heading "### <file name>" followed by one ```hcl fenced block.
Pin provider versions in versions.tf, declare every input with a description in
variables.tf and expose the useful endpoints and IDs in outputs.tf. Never hard-code
secrets. Finish with "## Deployment steps": a numbered list from `terraform init` to
verification.
""",
    )
    return [
        system,
        _user(
            brief_block(brief),
            f"Recommended design: {recommendation}",
            _section("Design to implement", design),
        ),
    ]


# -- strict parsing of the formats asked for above -----------------------------------------------

_DECORATION = " \t*_#>`"
_VERDICT_LINE = re.compile(r"VERDICT\s*:\s*(.*)", re.IGNORECASE)
_RECOMMEND_LINE = re.compile(r"RECOMMEND\s*:\s*(.*)", re.IGNORECASE)


def _keyword_lines(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Values of the `KEY: value` lines, allowing markdown emphasis around the whole line."""
    values = []
    for raw in text.splitlines():
        line = raw.strip(_DECORATION)
        match = pattern.fullmatch(line)
        if match:
            values.append(" ".join(match[1].strip(_DECORATION).split()).upper())
    return values


def _one_of(text: str, pattern: re.Pattern[str], key: str, allowed: tuple[str, ...]) -> str:
    values = _keyword_lines(text, pattern)
    expected = " or ".join(f"'{key}: {value}'" for value in allowed)
    if not values:
        raise OutputFormatError(f"no {key} line; expected a line {expected}")
    distinct = set(values)
    if len(distinct) > 1:
        raise OutputFormatError(f"conflicting {key} lines: {sorted(distinct)}")
    value = values[0]
    if value not in allowed:
        raise OutputFormatError(f"unrecognised {key} {value!r}; expected a line {expected}")
    return value


def parse_verdict(text: str) -> str:
    """APPROVED or NEEDS REVISION from the auditor's own line; anything else is an error."""
    return _one_of(text, _VERDICT_LINE, "VERDICT", (VERDICT_APPROVED, VERDICT_NEEDS_REVISION))


def parse_recommendation(text: str) -> str:
    """CARLOS or RONEI from the recommender's own line; anything else is an error."""
    return _one_of(text, _RECOMMEND_LINE, "RECOMMEND", (RECOMMEND_CARLOS, RECOMMEND_RONEI))


_HEADING = re.compile(r"^[A-Z][A-Z ]+:\s*$|^#{1,6}\s")


def parse_required_changes(audit: str) -> str:
    """The bullets under REQUIRED CHANGES (the revision carries these), or the whole audit."""
    lines = audit.splitlines()
    for index, raw in enumerate(lines):
        if raw.strip(_DECORATION).upper().startswith("REQUIRED CHANGES"):
            body: list[str] = []
            for line in lines[index + 1 :]:
                if _HEADING.match(line.strip()):
                    break
                body.append(line)
            text = "\n".join(body).strip()
            if text:
                return text
    return audit.strip()


_QUESTION_LINE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*])\s+(.+?)\s*$")


def parse_questions(text: str) -> list[str]:
    """The numbered (or bulleted) questions, at most five; other lines are ignored."""
    questions = []
    for line in text.splitlines():
        match = _QUESTION_LINE.match(line)
        if match and match[1].strip(_DECORATION):
            questions.append(match[1].strip())
    return questions[:MAX_QUESTIONS]


# -- the prompts' fixed wording, for code that reads prompts back (the offline simulator) ------

AGENT_MARKER = "AGENT:"
REQUEST_OPEN = "<request>"
REQUEST_CLOSE = "</request>"
OPTIONS_HEADING = "## Options"
CLARIFICATION_QUESTION = "Q:"
CLARIFICATION_ANSWER = "A:"
SKIPPED_ANSWER = "(skipped by the user: state a reasonable assumption instead)"
REVIEW_ROUND = "Review round:"
REVISION_ROUND = "Revision round:"
REQUIRED_CHANGES_SECTION = "Auditor's required changes"
RECOMMENDED_DESIGN = "Recommended design:"
