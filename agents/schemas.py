"""The JSON the analysts must return, declared once and used to prompt and to validate.

Each analyst reviews both designs, so the recommender can compare them on the same scale:
a report holds one assessment for Carlos's design, one for Ronei's, and a short summary.
Which agent answers with which report is its spec's `schema` (agents.specs).
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.specs import spec_for


class ReportSchema(BaseModel):
    """The base of every report: a new analyst's schema derives from it too."""

    # Extra keys a model adds are dropped rather than failing an otherwise good report.
    model_config = ConfigDict(extra="ignore")


class SecurityFinding(ReportSchema):
    severity: Literal["critical", "high", "medium", "low"]
    title: str = Field(min_length=1)
    recommendation: str = Field(min_length=1)


class SecurityAssessment(ReportSchema):
    score: int = Field(ge=0, le=100, description="0 (insecure) to 100 (exemplary)")
    findings: list[SecurityFinding]
    frameworks: list[str] = Field(description="Compliance frameworks the design supports")
    controls: list[str] = Field(description="Security controls present in the design")
    encryption_at_rest: bool
    encryption_in_transit: bool
    network_segmentation: bool


class SecurityReport(ReportSchema):
    carlos: SecurityAssessment
    ronei: SecurityAssessment
    summary: str = Field(min_length=1)


class CostItem(ReportSchema):
    service: str = Field(min_length=1)
    sku: str
    quantity: float = Field(ge=0)
    monthly_usd: float = Field(ge=0)
    category: Literal["compute", "data", "networking", "security", "operations", "other"]


class CostAssessment(ReportSchema):
    monthly_usd: float = Field(ge=0)
    annual_usd: float = Field(ge=0)
    services: list[CostItem] = Field(min_length=1)
    cost_drivers: list[str] = Field(min_length=1)
    optimizations: list[str] = Field(min_length=3)
    confidence: Literal["low", "medium", "high"]


class CostReport(ReportSchema):
    carlos: CostAssessment
    ronei: CostAssessment
    summary: str = Field(min_length=1)


class ReliabilityAssessment(ReportSchema):
    estimated_sla_percent: float = Field(ge=90, le=100)
    single_points_of_failure: list[str]
    rto_hours: float = Field(ge=0, description="Recovery time objective")
    rpo_hours: float = Field(ge=0, description="Recovery point objective")
    multi_az: bool
    multi_region: bool
    monitoring: list[str]
    scaling: list[str]
    backup: list[str]


class ReliabilityReport(ReportSchema):
    carlos: ReliabilityAssessment
    ronei: ReliabilityAssessment
    summary: str = Field(min_length=1)


class ReportInvalid(ValueError):
    """The analyst's text is not JSON, or not JSON of the declared shape."""


_FENCE = re.compile(r"\A```(?:json)?\s*\n(.*)\n```\Z", re.DOTALL)


def schema_text(agent: str) -> str:
    """The JSON schema of `agent`'s report (its spec's schema), compact, for its prompt."""
    return json.dumps(spec_for(agent).schema_class.model_json_schema(), separators=(",", ":"))


def validate_report(agent: str, text: str) -> dict:
    """The report as plain JSON data, or ReportInvalid saying precisely what is wrong."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced[1].strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ReportInvalid(f"not valid JSON: {exc}") from exc
    try:
        report = spec_for(agent).schema_class.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ReportInvalid(f"does not match the {agent} report schema: {problems}") from exc
    return report.model_dump(mode="json")
