"""The three analysts' JSON reports (security, cost, reliability) on both designs.

Each report assesses Carlos's and Ronei's designs the same way and compares them in a
summary; the shape validates against agents/schemas.py, as a real model's answer must.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents.options import option_label
from agents.simulated.catalog import CATALOG, compose, compute_role, total
from agents.simulated.text import RECOVERY_HOURS, Context, regions, scale_phrase, subject

Assessment = dict[str, Any]


def _finding(severity: str, title: str, recommendation: str) -> dict[str, str]:
    return {"severity": severity, "title": title, "recommendation": recommendation}


# -- security -----------------------------------------------------------------------------------


def _frameworks(ctx: Context) -> list[str]:
    frameworks = ["CIS Benchmarks", f"{option_label('cloud', ctx.cloud)} security baseline"]
    if ctx.options["compliance"] in ("regulated", "strict"):
        frameworks += ["GDPR", "SOC 2"]
    if ctx.options["compliance"] == "strict":
        frameworks += ["HIPAA", "PCI DSS"]
    return frameworks


def _security_of(ctx: Context, architect: str) -> Assessment:
    services = compose(ctx, architect)
    regulated = ctx.options["compliance"] != "standard"
    findings = []
    if "private" not in services:
        findings.append(
            _finding(
                "high" if regulated else "medium",
                "Data services are reachable through public endpoints",
                f"Add {CATALOG[ctx.cloud]['private'].name} and disable "
                "public network access on the data services.",
            )
        )
    if "siem" not in services and regulated:
        findings.append(
            _finding(
                "medium",
                "No central threat detection",
                f"Enable {CATALOG[ctx.cloud]['siem'].name}.",
            )
        )
    if architect == "ronei":
        findings.append(
            _finding(
                "medium",
                "Cluster hardening is not fully specified",
                "Enforce pod security standards, workload identity and signed images.",
            )
        )
    findings.append(
        _finding(
            "low",
            "Secret rotation is not scheduled",
            f"Rotate secrets in {services['secrets'].name} every 90 days.",
        )
    )
    controls = [services["secrets"].name, "TLS 1.2+ everywhere", "Managed identities"]
    controls += [
        services[role].name
        for role in ("gateway", "identity", "policy", "private", "siem")
        if role in services
    ]
    penalty = sum({"high": 12, "medium": 6, "low": 2}[f["severity"]] for f in findings)
    return {
        "score": max(0, min(100, 96 - penalty + (3 if architect == "carlos" else 0))),
        "findings": findings,
        "frameworks": _frameworks(ctx),
        "controls": controls,
        "encryption_at_rest": True,
        "encryption_in_transit": True,
        "network_segmentation": "private" in services or architect == "ronei",
    }


def _security_summary(ctx: Context, carlos: Assessment, ronei: Assessment) -> str:
    better = "Carlos" if carlos["score"] >= ronei["score"] else "Ronei"
    return (
        f"{better}'s design has the stronger security posture for {subject(ctx)} "
        f"(scores {carlos['score']} vs {ronei['score']}). Both encrypt data at rest and in "
        "transit."
    )


# -- cost ---------------------------------------------------------------------------------------

_OPTIMISATIONS = {
    "azure": [
        "Buy 1-year Azure Reservations for the steady compute baseline",
        "Apply an Azure Savings Plan for compute to variable workloads",
        "Move blobs older than 30 days to the Cool tier and archive after 180 days",
        "Scale non-production environments to zero outside working hours",
    ],
    "aws": [
        "Commit to a 1-year Compute Savings Plan for the steady baseline",
        "Run stateless tasks on Fargate Spot or Spot instances where interruptions are fine",
        "Add S3 Intelligent-Tiering and lifecycle rules for older objects",
        "Schedule non-production environments to stop outside working hours",
    ],
    "gcp": [
        "Use 1-year committed use discounts for the steady baseline",
        "Let Cloud Run scale to zero for low-traffic services",
        "Apply Cloud Storage lifecycle rules to Nearline and Coldline",
        "Use Spot VMs for fault-tolerant batch work",
    ],
}


def _confidence(ctx: Context) -> str:
    answered = sum(1 for _, answer in ctx.clarifications if answer)
    return "high" if answered >= 3 else "medium" if answered or scale_phrase(ctx) else "low"


def _cost_of(ctx: Context, architect: str) -> Assessment:
    services = compose(ctx, architect)
    monthly = total(services)
    drivers = sorted(services.values(), key=lambda s: s.monthly_usd, reverse=True)[:3]
    return {
        "monthly_usd": monthly,
        "annual_usd": monthly * 12,
        "services": [
            {
                "service": s.name,
                "sku": s.sku,
                "quantity": 1,
                "monthly_usd": float(s.monthly_usd),
                "category": s.category,
            }
            for s in services.values()
        ],
        "cost_drivers": [f"{s.name} (${s.monthly_usd:,.0f}/month)" for s in drivers],
        "optimizations": _OPTIMISATIONS[ctx.cloud][: 3 if architect == "carlos" else 4],
        "confidence": _confidence(ctx),
    }


def _cost_summary(ctx: Context, carlos: Assessment, ronei: Assessment) -> str:
    cheaper = "Carlos" if carlos["monthly_usd"] <= ronei["monthly_usd"] else "Ronei"
    return (
        f"{cheaper}'s design is cheaper: ${carlos['monthly_usd']:,.0f} vs "
        f"${ronei['monthly_usd']:,.0f} per month. Reservations cut the steady baseline further."
    )


# -- reliability ----------------------------------------------------------------------------------

_SLA_PERCENT = {"normal": 99.9, "high": 99.95, "extreme": 99.99}


def _reliability_of(ctx: Context, architect: str) -> Assessment:
    target = ctx.options["reliability"]
    primary, secondary = regions(ctx)
    rto, rpo = RECOVERY_HOURS[target]
    services = compose(ctx, architect)
    multi_az = target != "normal" or architect == "ronei"
    multi_region = target == "extreme"
    sla = 99.95 if architect == "ronei" and target == "normal" else _SLA_PERCENT[target]
    spofs = [] if multi_region else [f"Single region ({primary})"]
    if not multi_az:
        spofs.append("Single availability zone for the application tier")
    return {
        "estimated_sla_percent": sla,
        "single_points_of_failure": spofs,
        "rto_hours": float(rto),
        "rpo_hours": float(rpo),
        "multi_az": multi_az,
        "multi_region": multi_region,
        "monitoring": [services["monitoring"].name, "Synthetic availability probes"],
        "scaling": [f"{services[compute_role(services)].name} autoscaling on CPU and request rate"]
        + (["Cluster autoscaler"] if architect == "ronei" else []),
        "backup": [services["backup"].name, "Point-in-time restore for databases"]
        + ([f"Geo-replicated copies in {secondary}"] if multi_region else []),
    }


def _reliability_summary(ctx: Context, carlos: Assessment, ronei: Assessment) -> str:
    target = option_label("reliability", ctx.options["reliability"])
    return (
        f"Both designs aim at {target}; estimated SLA "
        f"{carlos['estimated_sla_percent']}% (Carlos) and {ronei['estimated_sla_percent']}% "
        "(Ronei)."
    )


# -- the report ---------------------------------------------------------------------------------

Assess = Callable[[Context, str], Assessment]
Summarise = Callable[[Context, Assessment, Assessment], str]
_ANALYSTS: dict[str, tuple[Assess, Summarise]] = {
    "security": (_security_of, _security_summary),
    "cost": (_cost_of, _cost_summary),
    "reliability": (_reliability_of, _reliability_summary),
}
ANALYSTS = tuple(_ANALYSTS)


def report(agent: str, ctx: Context) -> dict[str, Any]:
    """The analyst's report: both architects assessed alike, then compared in a summary."""
    assess, summary = _ANALYSTS[agent]
    carlos, ronei = assess(ctx, "carlos"), assess(ctx, "ronei")
    return {"carlos": carlos, "ronei": ronei, "summary": summary(ctx, carlos, ronei)}
