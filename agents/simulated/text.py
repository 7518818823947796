"""What the prompt says: the request's facts and wording, read back from the real prompt.

The markers come from agents/prompts.py, so the simulator reads what the pipeline writes and
cannot drift from it. Everything here is deterministic in the prompt's text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from agents.options import DEFAULT_OPTIONS, OPTION_FIELDS
from agents.prompts import (
    AGENT_MARKER,
    CLARIFICATION_ANSWER,
    CLARIFICATION_QUESTION,
    OPTIONS_HEADING,
    RECOMMEND_CARLOS,
    RECOMMEND_RONEI,
    RECOMMENDED_DESIGN,
    REQUEST_CLOSE,
    REQUEST_OPEN,
    REQUIRED_CHANGES_SECTION,
    REVIEW_ROUND,
    REVISION_ROUND,
    SKIPPED_ANSWER,
)
from agents.simulated.facts import read_facts
from pools.simulator.responders import ChatRequest, message_text

AGENT_LINE = re.compile(rf"^{re.escape(AGENT_MARKER)}\s*([\w-]+)", re.MULTILINE)
_REQUEST = re.compile(rf"{re.escape(REQUEST_OPEN)}\n(.*?)\n{re.escape(REQUEST_CLOSE)}", re.DOTALL)
_OPTION = re.compile(r"^- [^\n]*\((\w+)=(\w+)\)", re.MULTILINE)
_ROUND = re.compile(
    rf"^(?:{re.escape(REVIEW_ROUND)}|{re.escape(REVISION_ROUND)}) (\d+)", re.MULTILINE
)
_RECOMMENDED = re.compile(
    rf"^{re.escape(RECOMMENDED_DESIGN)} ({RECOMMEND_CARLOS}|{RECOMMEND_RONEI})", re.MULTILINE
)
_CHANGES = re.compile(
    rf"^## {re.escape(REQUIRED_CHANGES_SECTION)}\n(.*?)(?=^## |\Z)", re.MULTILINE | re.DOTALL
)
_CLARIFICATION = re.compile(
    rf"^{re.escape(CLARIFICATION_QUESTION)} (.*)\n{re.escape(CLARIFICATION_ANSWER)} (.*)$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Context:
    """One agent call as the simulator sees it: the brief, the round and what came before."""

    agent: str
    request_text: str
    options: dict[str, str]
    clarifications: tuple[tuple[str, str | None], ...]
    round: int
    required_changes: str
    recommended: str | None
    seed: int
    design_text: str = ""  # the design the Terraform coder implements (after its marker line)

    @property
    def cloud(self) -> str:
        return self.options["cloud"]

    @property
    def revised(self) -> bool:
        """Revision rounds add the controls the auditor asks for."""
        return self.round > 0


def _first_user_text(request: ChatRequest) -> str:
    for message in request.messages:
        if message.get("role") == "user":
            return message_text(message)
    return ""


def read_context(request: ChatRequest, agent: str) -> Context:
    """Parse the user message the pipeline built for `agent` back into its parts."""
    prompt = _first_user_text(request)
    match = _REQUEST.search(prompt)
    request_text = match[1].strip() if match else prompt.strip()
    options = dict(DEFAULT_OPTIONS)
    options_section = prompt.split(OPTIONS_HEADING, 1)[-1].split("\n## ", 1)[0]
    for key, value in _OPTION.findall(options_section):
        if key in OPTION_FIELDS and value in OPTION_FIELDS[key][1].values:
            options[key] = value
    round_match = _ROUND.search(prompt)
    changes = _CHANGES.search(prompt)
    recommended = _RECOMMENDED.search(prompt)
    clarifications = tuple(
        (question.strip(), None if answer.startswith(SKIPPED_ANSWER) else answer.strip())
        for question, answer in _CLARIFICATION.findall(prompt)
    )
    round_number = int(round_match[1]) if round_match else 0
    blob = json.dumps([agent, request_text, options, round_number], sort_keys=True)
    return Context(
        agent=agent,
        request_text=request_text,
        options=options,
        clarifications=clarifications,
        round=round_number,
        required_changes="\n".join(
            line for line in (changes[1] if changes else "").splitlines() if line.startswith("- ")
        ),
        recommended=recommended[1] if recommended else None,
        seed=int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big"),
        design_text=prompt[recommended.end() :] if recommended else "",
    )


# -- wording taken from the request ------------------------------------------------------------


def subject(ctx: Context) -> str:
    """What the user is building, named as they named it: "the ride-sharing app"."""
    return read_facts(ctx.request_text).subject


def quote(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return flat[: limit - 1].rsplit(" ", 1)[0] + "…"


def scale_phrase(ctx: Context) -> str | None:
    """The figures the request states, as the user wrote them ("a million users")."""
    return read_facts(ctx.request_text).scale.summary()


def internal(ctx: Context) -> bool:
    """An application for the organisation's own people, reached from its private network."""
    return read_facts(ctx.request_text).internal


def answer_about(ctx: Context, *topics: str) -> str | None:
    """The user's answer to the first clarifying question about any of `topics`."""
    for question, answer in ctx.clarifications:
        if answer and any(topic in question.lower() for topic in topics):
            return answer
    return None


# -- facts inferred from the request -------------------------------------------------------------

_REGIONS = {
    "eu": {
        "azure": ("westeurope", "northeurope"),
        "aws": ("eu-west-1", "eu-central-1"),
        "gcp": ("europe-west1", "europe-west4"),
    },
    "us": {
        "azure": ("eastus2", "centralus"),
        "aws": ("us-east-1", "us-west-2"),
        "gcp": ("us-central1", "us-east1"),
    },
    "br": {
        "azure": ("brazilsouth", "eastus2"),
        "aws": ("sa-east-1", "us-east-1"),
        "gcp": ("southamerica-east1", "us-east1"),
    },
}
EU_WORDS = re.compile(
    r"\b(europe|european|eu|gdpr|germany|german|france|french|uk|london|ireland|dublin|"
    r"netherlands|amsterdam|frankfurt|paris|spain|italy|portugal)\b",
    re.IGNORECASE,
)
BR_WORDS = re.compile(r"\b(brazil|brasil|s[aã]o paulo|latam|latin america)\b", re.IGNORECASE)
_DATA_WORDS = re.compile(
    r"\b(data|pipeline|etl|elt|analytics|warehouse|lake|ingest\w*|stream\w*|telemetry|iot|"
    r"sensor\w*|batch|reporting|dashboards?|bi)\b",
    re.IGNORECASE,
)
_EVENT_WORDS = re.compile(
    r"\b(microservices?|event\w*|queues?|messag\w*|kafka|async\w*|orders?|workflow\w*|"
    r"notifications?|services)\b",
    re.IGNORECASE,
)
_SCENARIO_WORKLOADS = {"data_pipeline": "data", "microservices": "events", "web_app": "web"}


def workload(ctx: Context) -> str:
    """web, data or events: from the scenario preset, else from the user's own words."""
    preset = _SCENARIO_WORKLOADS.get(ctx.options["scenario"])
    if preset:
        return preset
    data_hits = len(_DATA_WORDS.findall(ctx.request_text))
    event_hits = len(_EVENT_WORDS.findall(ctx.request_text))
    if data_hits > max(event_hits, 0) and data_hits >= 1:
        return "data"
    if event_hits >= 1:
        return "events"
    return "web"


def regions(ctx: Context) -> tuple[str, str]:
    """Primary and standby regions of the chosen cloud, near the users the request names."""
    text = ctx.request_text + " " + " ".join(a or "" for _, a in ctx.clarifications)
    area = "eu" if EU_WORDS.search(text) else "br" if BR_WORDS.search(text) else "us"
    if ctx.options["compliance"] != "standard" and area == "us" and "gdpr" in text.lower():
        area = "eu"
    return _REGIONS[area][ctx.cloud]


_WORKLOAD_TEXT = {
    "web": "An internet-facing web application with a relational database, caching and "
    "static content delivery",
    "internal web": "An internal web application for the organisation's own people, reached "
    "only from the corporate network over VPN, with single sign-on and a relational database",
    "data": "A data platform for ingestion, processing, durable storage and analytics",
    "events": "Event-driven services that communicate through queues and events",
}


def workload_text(ctx: Context) -> str:
    """The kind of system, in a phrase that never calls an internal tool internet-facing."""
    kind = workload(ctx)
    return _WORKLOAD_TEXT[f"internal {kind}" if kind == "web" and internal(ctx) else kind]


# Reliability target -> (RTO, RPO) in hours, as the designs and the analyst state them.
RECOVERY_HOURS = {"normal": (4, 1), "high": (1, 0.25), "extreme": (0.25, 0.08)}
