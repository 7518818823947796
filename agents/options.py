"""The request form's options, shared by the pipeline, the web and the CLI.

The original product collected five options and then silently dropped them; keeping them as
enumerations with one validator means every caller stores the same keys and values, and the
prompts can always render them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import models

from agents.specs import AGENT_SPECS, Stage


class Scenario(models.TextChoices):
    CUSTOM = "custom", "Custom"
    WEB_APP = "web_app", "Public web app"
    DATA_PIPELINE = "data_pipeline", "Data pipeline"
    MICROSERVICES = "microservices", "Event-driven microservices"


class Priority(models.TextChoices):
    COST = "cost", "Optimise cost"
    BALANCED = "balanced", "Balanced"
    PERFORMANCE = "performance", "Optimise performance"


class Compliance(models.TextChoices):
    STANDARD = "standard", "Standard"
    REGULATED = "regulated", "Regulated (GDPR, SOC 2)"
    STRICT = "strict", "Strict (HIPAA, PCI DSS)"


class Reliability(models.TextChoices):
    NORMAL = "normal", "Normal (99.5-99.9%)"
    HIGH = "high", "High (99.95%+, multi-zone)"
    EXTREME = "extreme", "Extreme (multi-region)"


class Strictness(models.TextChoices):
    FLEXIBLE = "flexible", "Flexible"
    BALANCED = "balanced", "Balanced"
    STRICT = "strict", "Strict"


class Cloud(models.TextChoices):
    AZURE = "azure", "Azure"
    AWS = "aws", "AWS"
    GCP = "gcp", "Google Cloud"


# Option key -> (form label, choices), in the order the form and the prompts show them.
OPTION_FIELDS: dict[str, tuple[str, type[models.TextChoices]]] = {
    "scenario": ("Scenario preset", Scenario),
    "priority": ("Cost vs performance", Priority),
    "compliance": ("Compliance", Compliance),
    "reliability": ("Reliability target", Reliability),
    "strictness": ("Design strictness", Strictness),
    "cloud": ("Cloud provider", Cloud),
}

DEFAULT_OPTIONS: dict[str, str] = {
    "scenario": Scenario.CUSTOM.value,
    "priority": Priority.BALANCED.value,
    "compliance": Compliance.STANDARD.value,
    "reliability": Reliability.NORMAL.value,
    "strictness": Strictness.BALANCED.value,
    "cloud": Cloud.AZURE.value,
}

# What each option value asks of the architects, so a prompt says more than a bare label.
OPTION_GUIDANCE: dict[str, dict[str, str]] = {
    "scenario": {
        "custom": "No preset: infer the workload from the request.",
        "web_app": "A public, internet-facing web application with a relational database, "
        "caching, a CDN and user sign-in.",
        "data_pipeline": "A data pipeline: ingestion, processing (batch and/or streaming), "
        "storage and an analytics warehouse.",
        "microservices": "Event-driven microservices: independently deployable services "
        "communicating through queues and an event bus.",
    },
    "priority": {
        "cost": "Prefer the cheapest services and SKUs that meet the requirements; "
        "use serverless and autoscale-to-zero where possible.",
        "balanced": "Balance cost and performance; justify every premium SKU.",
        "performance": "Prefer low latency and headroom over cost; premium SKUs are acceptable.",
    },
    "compliance": {
        "standard": "Baseline security best practices.",
        "regulated": "GDPR and SOC 2 controls: data residency, audit logging, access reviews.",
        "strict": "HIPAA / PCI DSS controls: private networking only, customer-managed keys, "
        "full audit trails, no public data endpoints.",
    },
    "reliability": {
        "normal": "Target 99.5-99.9% availability in a single region.",
        "high": "Target 99.95% or better: zone-redundant services in one region.",
        "extreme": "Target 99.99%: active-active or warm standby across two regions.",
    },
    "strictness": {
        "flexible": "Creative freedom: propose alternatives where they help.",
        "balanced": "Follow the requirements; deviate only with a stated reason.",
        "strict": "Follow the requirements to the letter; no unrequested components.",
    },
    "cloud": {
        "azure": "Use Microsoft Azure services only.",
        "aws": "Use Amazon Web Services only.",
        "gcp": "Use Google Cloud services only.",
    },
}


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
