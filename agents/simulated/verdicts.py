"""The auditor's verdict and the recommender's choice, in the strict formats the pipeline parses.

To exercise the revision loop on purpose, the auditor asks for a revision in round 0 when
the request contains the word "revise".
"""

from __future__ import annotations

import re

from agents.options import option_label
from agents.prompts import (
    RECOMMEND_CARLOS,
    RECOMMEND_RONEI,
    VERDICT_APPROVED,
    VERDICT_NEEDS_REVISION,
)
from agents.simulated.catalog import CATALOG, compose, total
from agents.simulated.text import Context, subject

_REVISE_WORD = re.compile(r"\brevise\b", re.IGNORECASE)


def audit(ctx: Context) -> str:
    needs_revision = ctx.round == 0 and bool(_REVISE_WORD.search(ctx.request_text))
    catalog = CATALOG[ctx.cloud]
    o = ctx.options
    summary = (
        f"Both designs answer the request for {subject(ctx)} on "
        f"{option_label('cloud', ctx.cloud)} and address the "
        f"{option_label('reliability', o['reliability'])} target and "
        f"{option_label('compliance', o['compliance'])} compliance."
    )
    strengths = [
        "- Carlos: a small operational footprint built from managed services.",
        "- Ronei: portable, container-based delivery with fine-grained scaling.",
        "- Both: complete cost estimates and clear diagrams.",
    ]
    if needs_revision:
        verdict = VERDICT_NEEDS_REVISION
        summary += " Some material gaps must be closed before a recommendation."
        changes = [
            f"- Carlos: put the data services behind {catalog['private'].name} and disable "
            "public network access.",
            f"- Ronei: add {catalog['policy'].name} guardrails and pod security standards to "
            "the cluster.",
            "- Both: state RTO and RPO explicitly and show the backup schedule.",
        ]
    else:
        verdict = VERDICT_APPROVED
        if ctx.round > 0:
            summary += f" The round {ctx.round} revisions closed the gaps raised earlier."
        changes = ["- None"]
    lines = [
        f"VERDICT: {verdict}",
        f"SUMMARY: {summary}",
        "STRENGTHS:",
        *strengths,
        "REQUIRED CHANGES:",
        *changes,
    ]
    return "\n".join(lines) + "\n"


def _choice(ctx: Context) -> str:
    o = ctx.options
    if o["priority"] == "performance" or (
        o["reliability"] == "extreme" and o["priority"] != "cost"
    ):
        return RECOMMEND_RONEI
    return RECOMMEND_CARLOS


def recommend(ctx: Context) -> str:
    choice = _choice(ctx)
    carlos_total = total(compose(ctx, "carlos"))
    ronei_total = total(compose(ctx, "ronei"))
    o = ctx.options
    chosen, other = ("Carlos", "Ronei") if choice == RECOMMEND_CARLOS else ("Ronei", "Carlos")
    why = (
        f"With “{option_label('priority', o['priority'])}” and a "
        f"{option_label('reliability', o['reliability'])} target, {chosen}'s design fits "
        f"{subject(ctx)} best: "
        + (
            "managed services keep cost and operational effort low."
            if choice == RECOMMEND_CARLOS
            else "Kubernetes gives the headroom and control the performance target needs."
        )
    )
    return "\n".join(
        [
            f"RECOMMEND: {choice}",
            "",
            "## Why",
            why,
            "",
            "## Trade-offs",
            f"- Monthly cost: Carlos ${carlos_total:,.0f}, Ronei ${ronei_total:,.0f}.",
            "- Carlos needs less platform expertise; Ronei offers more portability and control.",
            "",
            "## Risks",
            "- Traffic assumptions must be validated with a load test before launch.",
            f"- {chosen}'s design depends on the team adopting its delivery pipeline.",
            "",
            "## When to choose the other design",
            f"Choose {other}'s design if "
            + (
                "you need fine-grained control over runtime and scaling, or portability."
                if other == "Ronei"
                else "cost and a small operations team matter more than control."
            ),
            "",
            "## Next steps",
            "1. Confirm the budget and traffic figures.",
            "2. Apply the Terraform to a staging environment.",
            "3. Run a load test and a failover drill.",
            "",
        ]
    )
