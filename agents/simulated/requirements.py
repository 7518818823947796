"""The requirements analyst: clarifying questions first, then the requirements summary."""

from __future__ import annotations

from agents.options import option_label
from agents.simulated.facts import quoted, read_facts, sentence
from agents.simulated.text import (
    BR_WORDS,
    EU_WORDS,
    Context,
    answer_about,
    internal,
    quote,
    regions,
    subject,
    workload,
    workload_text,
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
    scale = read_facts(ctx.request_text).scale
    if scale.people or scale.rate:
        topics.remove("traffic")
    if scale.data:
        topics.remove("data")
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


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _traffic(ctx: Context) -> str:
    answered = answer_about(ctx, "traffic", "users", "requests")
    if answered:
        return sentence(answered)
    scale = read_facts(ctx.request_text).scale
    stated = [part for part in (scale.people, scale.rate) if part]
    if stated:
        return f"{' and '.join(stated)}, as the request states; confirm the peak with a load test."
    return "assumed up to 500 requests per second at peak."


def _audience(ctx: Context) -> str:
    if workload(ctx) == "data":
        return "- Consumers: analysts, dashboards and downstream services."
    if internal(ctx):
        return (
            "- Audience: the organisation's own people, signing in with single sign-on from the "
            "corporate network or over VPN; nothing is exposed to the internet."
        )
    return "- Audience: the public, over the internet, on web and mobile clients."


def requirements(ctx: Context) -> str:
    """The structured summary, with the user's answers or explicit assumptions."""
    o = ctx.options
    scale = read_facts(ctx.request_text).scale
    data = answer_about(ctx, "data", "retain")
    data_text = (
        sentence(data)
        if data
        else f"{scale.data}, as the request states."
        if scale.data
        else "assumed under 1 TB in the first year."
    )
    budget = answer_about(ctx, "budget")
    budget_text = (
        f"budget: {sentence(budget)}"
        if budget
        else "no budget stated, so this option guides the choices."
    )
    integrations = answer_about(ctx, "integrat")
    region_text = answer_about(ctx, "region") or ", ".join(regions(ctx))
    lines = [
        "## Workload",
        f"{_capitalised(subject(ctx))}: {workload_text(ctx)[:1].lower()}{workload_text(ctx)[1:]}.",
        f"The request: {quoted(quote(ctx.request_text))}",
        _audience(ctx),
        "",
        "## Functional requirements",
        f"- Deliver what the request describes for {subject(ctx)}.",
        (
            "- Employees sign in through the corporate identity provider; administrators' "
            "changes are audited."
            if internal(ctx)
            else "- Authenticated access for users and administrators, with audit of changes."
        ),
        f"- Integrations: {sentence(integrations) if integrations else 'none stated.'}",
        "",
        "## Non-functional requirements",
        f"- Traffic: {_traffic(ctx)}",
        *([f"- Devices: {scale.devices}, as the request states."] if scale.devices else []),
        f"- Availability: {option_label('reliability', o['reliability'])}.",
        "- Latency: p95 under 300 ms for interactive requests.",
        f"- Data: {data_text}",
        f"- Regions: {sentence(region_text)}",
        "",
        "## Compliance and security",
        f"- Level: {option_label('compliance', o['compliance'])}.",
        "- Encryption in transit (TLS 1.2+) and at rest everywhere; least-privilege access.",
        "",
        "## Constraints",
        f"- Cloud provider: {option_label('cloud', o['cloud'])}.",
        f"- Budget posture: {option_label('priority', o['priority'])}; {budget_text}",
        f"- Scenario preset: {option_label('scenario', o['scenario'])}.",
        f"- Design strictness: {option_label('strictness', o['strictness'])}.",
        "",
        "## Assumptions",
    ]
    skipped = [q for q, a in ctx.clarifications if not a]
    if skipped:
        lines += [f"- Not answered, so a typical value is assumed: {q}" for q in skipped]
    lines.append("- Managed services are preferred over self-hosted software where equivalent.")
    return "\n".join(lines) + "\n"
