"""The requirements analyst: clarifying questions first, then the requirements summary."""

from __future__ import annotations

from agents.options import option_label
from agents.simulated.text import (
    BR_WORDS,
    EU_WORDS,
    WORKLOAD_TEXT,
    Context,
    answer_about,
    quote,
    regions,
    scale_phrase,
    subject,
    workload,
)

_QUESTION_TEMPLATES = {
    "traffic": "What peak traffic should {subject} handle (concurrent users or requests per "
    "second), and how fast do you expect it to grow in the first year?",
    "data": "How much data will {subject} hold at launch and after a year, how sensitive is "
    "it, and how long must it be retained?",
    "sla": "What availability SLA do you need ({reliability} was selected), and what downtime "
    "is acceptable for maintenance?",
    "budget": "What monthly budget should the {cloud} architecture stay within?",
    "regions": "Which regions must your users and data be served from, and are there "
    "data-residency rules?",
    "integrations": "Which existing systems must {subject} integrate with (identity provider, "
    "payments, CRM, on-premises services)?",
    "compliance": "Beyond {compliance} compliance, which regulations or audits apply to {subject}?",
}


def questions(ctx: Context) -> str:
    """3-5 numbered questions, skipping what the request already settles."""
    topics = list(_QUESTION_TEMPLATES)
    if EU_WORDS.search(ctx.request_text) or BR_WORDS.search(ctx.request_text):
        topics.remove("regions")
    if scale_phrase(ctx):
        topics.remove("traffic")
    count = 3 + ctx.seed % 3
    values = {
        "subject": subject(ctx),
        "cloud": option_label("cloud", ctx.cloud),
        "reliability": option_label("reliability", ctx.options["reliability"]),
        "compliance": option_label("compliance", ctx.options["compliance"]),
    }
    chosen = topics[:count]
    return "\n".join(
        f"{n}. {_QUESTION_TEMPLATES[topic].format(**values)}" for n, topic in enumerate(chosen, 1)
    )


def requirements(ctx: Context) -> str:
    """The structured summary, with the user's answers or explicit assumptions."""
    o = ctx.options
    scale = scale_phrase(ctx)
    traffic = answer_about(ctx, "traffic", "users", "requests") or (
        f"{scale} (from the request)" if scale else "assumed up to 500 requests per second at peak"
    )
    data = answer_about(ctx, "data", "retain") or "assumed under 1 TB in the first year"
    budget = answer_about(ctx, "budget") or "not stated: follow the cost-versus-performance option"
    integrations = answer_about(ctx, "integrat") or "none stated"
    region_text = answer_about(ctx, "region") or ", ".join(regions(ctx))
    words = ", ".join(ctx.keywords) or "(none)"
    lines = [
        "## Workload",
        f"{WORKLOAD_TEXT[workload(ctx)]}, for: “{quote(ctx.request_text)}”.",
        f"Key terms from the request: {words}.",
        "",
        "## Functional requirements",
        f"- Deliver the capabilities described in the request for {subject(ctx)}.",
        "- Authenticated access for users and administrators, with audit of changes.",
        f"- Integrations: {integrations}.",
        "",
        "## Non-functional requirements",
        f"- Traffic: {traffic}.",
        f"- Availability: {option_label('reliability', o['reliability'])}.",
        "- Latency: p95 under 300 ms for interactive requests.",
        f"- Data: {data}.",
        f"- Regions: {region_text}.",
        "",
        "## Compliance and security",
        f"- Level: {option_label('compliance', o['compliance'])}.",
        "- Encryption in transit (TLS 1.2+) and at rest everywhere; least-privilege access.",
        "",
        "## Constraints",
        f"- Cloud provider: {option_label('cloud', o['cloud'])}.",
        f"- Budget posture: {option_label('priority', o['priority'])}; budget: {budget}.",
        f"- Scenario preset: {option_label('scenario', o['scenario'])}.",
        f"- Design strictness: {option_label('strictness', o['strictness'])}.",
        "",
        "## Assumptions",
    ]
    skipped = [q for q, a in ctx.clarifications if not a]
    if skipped:
        lines += [f"- Not answered, assumed typical: {q}" for q in skipped]
    lines.append("- Managed services are preferred over self-hosted software where equivalent.")
    return "\n".join(lines) + "\n"
