"""The request form's options, shared by the pipeline, the web and the CLI.

The original product collected five options and then silently dropped them; keeping them as
enumerations with one validator means every caller stores the same keys and values, and the
prompts can always render them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from django.db import models

from agents.specs import AGENT_SPECS, Stage

# One value of an option: (value, label, what it asks of the architects, so that a prompt
# says more than a bare label).
Value = tuple[str, str, str]


class Option(NamedTuple):
    key: str
    label: str  # the form's
    default: str
    choices: type[models.TextChoices]
    guidance: dict[str, str]  # value -> what it asks of the architects


def _option(key: str, label: str, default: str, *values: Value) -> Option:
    """An option described once: its key, form label and default, then its values."""
    members = [(value.upper(), (value, name)) for value, name, _ in values]
    choices = models.TextChoices(key.capitalize(), members)
    return Option(key, label, default, choices, {value: text for value, _, text in values})


# The request form's options, in the order the form and the prompts show them.
_OPTIONS = (
    _option(
        "scenario",
        "Scenario preset",
        "custom",
        ("custom", "Custom", "No preset: infer the workload from the request."),
        (
            "web_app",
            "Public web app",
            "A public, internet-facing web application with a relational database, caching, "
            "a CDN and user sign-in.",
        ),
        (
            "data_pipeline",
            "Data pipeline",
            "A data pipeline: ingestion, processing (batch and/or streaming), storage and an "
            "analytics warehouse.",
        ),
        (
            "microservices",
            "Event-driven microservices",
            "Event-driven microservices: independently deployable services communicating "
            "through queues and an event bus.",
        ),
    ),
    _option(
        "priority",
        "Cost vs performance",
        "balanced",
        (
            "cost",
            "Optimise cost",
            "Prefer the cheapest services and SKUs that meet the requirements; use serverless "
            "and autoscale-to-zero where possible.",
        ),
        ("balanced", "Balanced", "Balance cost and performance; justify every premium SKU."),
        (
            "performance",
            "Optimise performance",
            "Prefer low latency and headroom over cost; premium SKUs are acceptable.",
        ),
    ),
    _option(
        "compliance",
        "Compliance",
        "standard",
        ("standard", "Standard", "Baseline security best practices."),
        (
            "regulated",
            "Regulated (GDPR, SOC 2)",
            "GDPR and SOC 2 controls: data residency, audit logging, access reviews.",
        ),
        (
            "strict",
            "Strict (HIPAA, PCI DSS)",
            "HIPAA / PCI DSS controls: private networking only, customer-managed keys, full "
            "audit trails, no public data endpoints.",
        ),
    ),
    _option(
        "reliability",
        "Reliability target",
        "normal",
        ("normal", "Normal (99.5-99.9%)", "Target 99.5-99.9% availability in a single region."),
        (
            "high",
            "High (99.95%+, multi-zone)",
            "Target 99.95% or better: zone-redundant services in one region.",
        ),
        (
            "extreme",
            "Extreme (multi-region)",
            "Target 99.99%: active-active or warm standby across two regions.",
        ),
    ),
    _option(
        "strictness",
        "Design strictness",
        "balanced",
        ("flexible", "Flexible", "Creative freedom: propose alternatives where they help."),
        ("balanced", "Balanced", "Follow the requirements; deviate only with a stated reason."),
        ("strict", "Strict", "Follow the requirements to the letter; no unrequested components."),
    ),
    _option(
        "cloud",
        "Cloud provider",
        "azure",
        ("azure", "Azure", "Use Microsoft Azure services only."),
        ("aws", "AWS", "Use Amazon Web Services only."),
        ("gcp", "Google Cloud", "Use Google Cloud services only."),
    ),
)

# Option key -> (form label, choices).
OPTION_FIELDS: dict[str, tuple[str, type[models.TextChoices]]] = {
    option.key: (option.label, option.choices) for option in _OPTIONS
}
DEFAULT_OPTIONS: dict[str, str] = {option.key: option.default for option in _OPTIONS}
OPTION_GUIDANCE: dict[str, dict[str, str]] = {option.key: option.guidance for option in _OPTIONS}


# The shipped roster as constants, for callers that want a fixed list (tests, reports); the
# pipeline and the pages read agents.specs, where a test may register an extra agent.
AGENTS: tuple[str, ...] = tuple(spec.key for spec in AGENT_SPECS)
DESIGN_AGENTS: tuple[str, ...] = tuple(s.key for s in AGENT_SPECS if s.stage == Stage.DESIGNS)
ANALYST_AGENTS: tuple[str, ...] = tuple(s.key for s in AGENT_SPECS if s.stage == Stage.ANALYSES)
AGENT_POOLS: dict[str, str] = {spec.key: spec.pool for spec in AGENT_SPECS}


def validate_options(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """A complete options dict (defaults filled in); ValueError names the first bad key."""
    raw = raw or {}
    unknown = sorted(set(raw) - set(OPTION_FIELDS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; expected one of {list(OPTION_FIELDS)}")
    clean = dict(DEFAULT_OPTIONS)
    for key, value in raw.items():
        if value is None or value == "":
            continue
        choices = OPTION_FIELDS[key][1]
        if value not in choices.values:
            raise ValueError(
                f"option {key!r} cannot be {value!r}; expected one of {choices.values}"
            )
        clean[key] = str(value)
    return clean


def option_label(key: str, value: str) -> str:
    """The human label of one option value (e.g. 'Extreme (multi-region)')."""
    choices = OPTION_FIELDS[key][1]
    return str(choices(value).label)
