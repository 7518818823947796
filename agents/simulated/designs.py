"""The two architects' answers: an 11-section design with a Mermaid diagram and a cost table.

Carlos and Ronei compose different services (catalog.py) and speak in their own voice, so
the analysts, the auditor and the recommender always have two real alternatives to compare.
"""

from __future__ import annotations

from agents.options import option_label
from agents.prompts import DESIGN_SECTIONS
from agents.simulated.catalog import NETWORK, Service, compose, compute_role, total
from agents.simulated.facts import quoted
from agents.simulated.text import (
    RECOVERY_HOURS,
    Context,
    internal,
    quote,
    regions,
    scale_phrase,
    subject,
    workload,
    workload_text,
)


def _node(role: str, service: Service) -> str:
    label = service.name.replace('"', "'")
    if service.shape == "db":
        return f'{role}[("{label}")]'
    return f'{role}["{label}"]'


def _present(services: dict[str, Service], *roles: str) -> list[str]:
    """The roles, in this order, that the design has."""
    return [role for role in roles if role in services]


def _mermaid(ctx: Context, services: dict[str, Service], secondary: str) -> str:
    lines = ["flowchart TD"]
    kind = workload(ctx)
    source = "sources" if kind == "data" else "users"
    people = "Employees" if internal(ctx) else "Users"
    lines.append('    sources(["Data sources"])' if kind == "data" else f'    users(["{people}"])')
    lines += [f"    {_node(role, service)}" for role, service in services.items()]
    compute = compute_role(services)
    previous = source
    if kind == "data" and "stream" in services:
        lines.append(f"    {previous} --> stream")
        previous = "stream"
    for role in _present(services, *_ENTRY_ROLES):
        lines.append(f"    {previous} --> {role}")
        previous = role
    lines.append(f"    {previous} --> {compute}")
    lines += [
        f"    {compute} --> {r}" for r in _present(services, "sql", "nosql", "cache", "storage")
    ]
    if kind != "data" and "stream" in services:
        lines.append(f"    {compute} -- events --> stream")
        lines.append(f"    stream -- consumers --> {compute}")
    if "queue" in services:
        lines.append(f"    {compute} -- commands --> queue")
        lines.append(f"    queue -- workers --> {compute}")
    if "etl" in services:
        lines.append("    storage --> etl")
        lines.append("    etl --> warehouse" if "warehouse" in services else "    etl --> storage")
    elif "warehouse" in services:
        lines.append("    storage --> warehouse")
    if "warehouse" in services:
        lines.append('    warehouse --> bi(["Analysts and dashboards"])')
    controls = _present(services, "secrets", "identity", "sso", "registry", "private", "policy")
    lines += [f"    {compute} -.-> {role}" for role in controls]
    lines += [f"    {r} -.-> {compute}" for r in _present(services, "monitoring", "backup", "siem")]
    if "global" in services:
        lines.append(
            f'    global -. failover .-> standby["{services[compute].name} standby in {secondary}"]'
        )
    return "\n".join(lines)


_VOICE = {
    "carlos": (
        "Carlos's design",
        "a managed-services-first architecture",
        "Every component is a fully managed service, so a small team operates it without "
        "running servers or clusters.",
    ),
    "ronei": (
        "Ronei's design",
        "a cloud-native, Kubernetes-based architecture",
        "Workloads run as containers on managed Kubernetes with GitOps delivery, keeping the "
        "platform portable and giving fine-grained control over scaling and rollout.",
    ),
}
_ZONES_TEXT = {
    True: "Zone-redundant deployment across three availability zones",
    False: "Single-zone deployment with automatic instance recovery",
}
_PURPOSES = {
    "sql": "transactional data, point-in-time restore enabled",
    "nosql": "service-owned documents and idempotency keys",
    "cache": "sessions and hot reads",
    "storage": "files, exports and raw data, with lifecycle rules to cooler tiers",
    "stream": "event ingestion and fan-out",
    "queue": "commands between services with dead-letter queues",
    "warehouse": "analytics and reporting",
    "etl": "scheduled transformations",
}


def _if_present(services: dict[str, Service], role: str, line: str) -> list[str]:
    """`line` with `{name}` filled in by the role's service, or nothing without it."""
    return [line.format(name=services[role].name)] if role in services else []


def design(ctx: Context, architect: str) -> str:
    """The architect's complete design, in the section order the prompt asks for."""
    o = ctx.options
    services = compose(ctx, architect)
    primary, secondary = regions(ctx)
    cloud = option_label("cloud", ctx.cloud)
    title, approach, stance = _VOICE[architect]
    compute = services[compute_role(services)]
    reliability = o["reliability"]
    multi_region = reliability == "extreme"
    zones = reliability != "normal" or architect == "ronei"
    cost = total(services)
    heading = [f"# {title} for {subject(ctx)} on {cloud}"]
    if ctx.revised:
        heading.append(
            f"\n**Revision {ctx.round}.** This revision addresses the auditor's required changes:\n"
            + (ctx.required_changes or "- (none listed)")
        )
    sections: dict[str, list[str]] = {}
    scale = scale_phrase(ctx)
    sized = f", sized for {scale}" if scale else ""
    sections["Executive Summary"] = [
        f"You asked for {quoted(quote(ctx.request_text))}",
        f"{architect.capitalize()} proposes {approach} on {cloud} for {subject(ctx)}{sized}. "
        + stance,
        f"It targets {option_label('reliability', reliability)} availability, "
        f"{option_label('compliance', o['compliance'])} compliance and the "
        f"“{option_label('priority', o['priority'])}” budget posture, for an estimated "
        f"**${cost:,.0f} per month**.",
    ]
    clar = [
        f"- {question} → {answer if answer else 'skipped; assumed a typical value'}"
        for question, answer in ctx.clarifications
    ]
    sections["Requirements and Assumptions"] = [
        f"- Workload: {workload_text(ctx)[:1].lower()}{workload_text(ctx)[1:]}.",
        (
            f"- Scale: {scale}, as the request states."
            if scale
            else "- Scale: not stated; assumed up to 500 requests per second at peak."
        ),
        f"- Scenario preset: {option_label('scenario', o['scenario'])}; design strictness: "
        f"{option_label('strictness', o['strictness'])}.",
        *(clar or ["- No clarifying questions were answered; typical values are assumed."]),
    ]
    sections["Architecture Overview"] = [
        f"{_arrival(ctx, services, compute)}; state lives in {_data_names(services)}. The "
        f"primary region is {primary}"
        + (f", with a standby in {secondary}." if multi_region else "."),
        "",
        "```mermaid",
        _mermaid(ctx, services, secondary),
        "```",
    ]
    sections["Compute"] = _compute_lines(architect, services, compute)
    sections["Data and Storage"] = [
        f"- **{s.name}** ({s.sku}): {_PURPOSES[role]}."
        for role, s in services.items()
        if role in _PURPOSES
    ]
    mirrored = f"- A mirrored network in {secondary}, failover by {{name}}."
    sections["Networking"] = [
        f"- {NETWORK[ctx.cloud]} `10.20.0.0/16` in {primary}: subnets for ingress "
        "(`10.20.0.0/24`), application (`10.20.1.0/24`) and data (`10.20.2.0/24`).",
        _ingress(services),
        (
            f"- Data services are reachable only through private endpoints "
            f"({services['private'].name})."
            if "private" in services
            else "- Data services restrict access to the application subnet with firewall rules."
        ),
        *(_if_present(services, "global", mirrored) if multi_region else []),
    ]
    sections["Security"] = [
        f"- Secrets and keys in **{services['secrets'].name}**; workloads use managed identities.",
        *(
            _if_present(
                services,
                "sso",
                "- Single sign-on through **{name}**, with the corporate directory's groups "
                "mapped to roles.",
            )
            or _if_present(services, "identity", "- Sign-in through **{name}**.")
            or ["- Workload identity federation for pods; no long-lived credentials."]
        ),
        "- Encryption at rest with platform keys"
        + (" (customer-managed keys for regulated data)" if o["compliance"] != "standard" else "")
        + "; TLS in transit everywhere.",
        *_if_present(services, "policy", "- Guardrails: **{name}**."),
        *_if_present(services, "siem", "- Threat detection: **{name}**."),
        f"- Compliance level: {option_label('compliance', o['compliance'])}.",
    ]
    rto, rpo = RECOVERY_HOURS[reliability]
    sections["Reliability"] = [
        f"- Target: {option_label('reliability', reliability)}.",
        f"- {_ZONES_TEXT[zones]} in {primary}.",
        *(_standby(services, secondary) if multi_region else []),
        f"- Backups with **{services['backup'].name}**; RTO {rto} h, RPO {rpo} h.",
        "- Health probes, retries with backoff and circuit breakers between services.",
    ]
    sections["Performance Efficiency"] = [
        f"- {compute.name} autoscales on CPU and request rate"
        + (" with a generous minimum for low latency." if o["priority"] == "performance" else "."),
        *_if_present(services, "cache", "- Hot reads served from **{name}**."),
        *_if_present(services, "edge", "- Static content and caching at the edge with **{name}**."),
        (
            f"- Sized for {scale}; load tests before launch confirm the headroom."
            if scale
            else "- Load tests before launch against the traffic assumptions above."
        ),
    ]
    table = ["| Service | SKU | Monthly (USD) |", "|---|---|---:|"]
    table += [f"| {s.name} | {s.sku} | ${s.monthly_usd:,.0f} |" for s in services.values()]
    table.append(f"| **Total** | | **${cost:,.0f}** |")
    sections["Cost Estimate"] = [
        *table,
        "",
        f"Estimated **${cost:,.0f}/month** (≈ ${cost * 12:,.0f}/year), list prices in "
        f"{primary}, before reservations or savings plans.",
    ]
    sections["Operational Excellence"] = [
        "- Infrastructure as code with Terraform; every change through pull requests.",
        (
            "- CI/CD builds container images, pushes them to the registry and lets GitOps "
            "(Flux or Argo CD) roll them out."
            if architect == "ronei"
            else "- CI/CD deploys to a staging slot, runs smoke tests, then swaps to production."
        ),
        f"- Dashboards and alerts in **{services['monitoring'].name}**, with runbooks for the "
        "top five alerts.",
    ]
    body = [*heading, ""]
    for number, name in enumerate(DESIGN_SECTIONS, start=1):
        body.append(f"## {number}. {name}")
        body += sections[name]
        body.append("")
    return "\n".join(body)


_ENTRY_ROLES = ("vpn", "global", "edge", "gateway", "private_gateway")


def _entry(services: dict[str, Service]) -> str:
    names = [services[r].name for r in _present(services, *_ENTRY_ROLES)]
    return " and ".join(names) if names else "the ingestion endpoint"


def _arrival(ctx: Context, services: dict[str, Service], compute: Service) -> str:
    """How requests or data reach the code, for the overview's first sentence."""
    if workload(ctx) == "data":
        source = services["stream"].name if "stream" in services else "the ingestion endpoint"
        return f"Data arrives through {source} and is processed by {compute.name}"
    if "vpn" in services:
        return (
            f"Employees connect from the corporate network over {services['vpn'].name} to "
            f"{services['private_gateway'].name}, which forwards to {compute.name}"
        )
    return f"Traffic enters through {_entry(services)} and reaches {compute.name}"


def _ingress(services: dict[str, Service]) -> str:
    if "vpn" in services:
        return (
            "- No public ingress: the application is reachable only through "
            f"{services['private_gateway'].name}, over {services['vpn'].name} from the corporate "
            "network; TLS 1.2+ terminates at the private gateway."
        )
    if not _present(services, *_ENTRY_ROLES):
        return "- No inbound web traffic: producers write to the ingestion service over TLS 1.2+."
    return f"- Ingress only through {_entry(services)}; TLS 1.2+ terminates at the edge."


def _standby(services: dict[str, Service], secondary: str) -> list[str]:
    if "global" in services:
        return [f"- Warm standby in {secondary}; failover through {services['global'].name}."]
    return [f"- Warm standby in {secondary}, reached over a second VPN connection on failover."]


def _data_names(services: dict[str, Service]) -> str:
    roles = _present(services, "sql", "nosql", "cache", "storage", "warehouse")
    names = [services[r].name for r in roles]
    if not names:
        return "managed storage"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _compute_lines(architect: str, services: dict[str, Service], compute: Service) -> list[str]:
    lines = [f"- **{compute.name}** ({compute.sku})."]
    if architect == "ronei":
        lines += [
            "- Separate node pools for system and application workloads; Horizontal Pod "
            "Autoscaler and cluster autoscaler.",
            (
                "- Ingress controller behind the gateway; network policies isolate namespaces."
                if _present(services, *_ENTRY_ROLES)
                else "- Network policies isolate namespaces; the cluster has no public ingress."
            ),
            *_if_present(services, "registry", "- Images in **{name}**, signed and scanned."),
        ]
    else:
        lines += [
            "- Autoscale rules on CPU and request count; deployment slots for zero-downtime "
            "releases.",
            "- Background work runs in the same managed platform, triggered by queues.",
            *_if_present(services, "functions", "- Event handlers on **{name}**."),
        ]
    return lines
