"""What each Carlos agent would plausibly say, for the offline LLM simulator.

`carlos_responder` (settings.LLM_SIMULATOR_RESPONDER) recognises the agent from the
`AGENT: <name>` line that opens every system prompt and answers in that agent's format,
deterministically, from the request text, the options and the clarifications in the prompt:
two differing 11-section designs naming real services of the chosen cloud, analyst JSON that
validates against agents/schemas.py, a strict verdict and recommendation line, Terraform in
four files, and 3-5 clarifying questions. So the whole product works, and can be tested,
with no model and no network.

To exercise the revision loop on purpose, the auditor asks for a revision in round 0 when
the request contains the word "revise".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from django.conf import settings

from agents.options import (
    DEFAULT_OPTIONS,
    OPTION_FIELDS,
    option_label,
)
from agents.prompts import DESIGN_SECTIONS, QUESTIONS_AGENT
from pools import runtime
from pools.engine.config import parse_config
from pools.engine.registry import PoolRegistry
from pools.simulator import LLMSimulator, Responder, SimulatorConfig
from pools.simulator.responders import ChatRequest, default_responder, message_text

_AGENT_LINE = re.compile(r"^AGENT:\s*([\w-]+)", re.MULTILINE)
_REQUEST = re.compile(r"<request>\n(.*?)\n</request>", re.DOTALL)
_OPTION = re.compile(r"^- [^\n]*\((\w+)=(\w+)\)", re.MULTILINE)
_ROUND = re.compile(r"^(?:Review|Revision) round: (\d+)", re.MULTILINE)
_RECOMMENDED = re.compile(r"^Recommended design: (CARLOS|RONEI)", re.MULTILINE)
_CHANGES = re.compile(r"^## Auditor's required changes\n(.*?)(?=^## |\Z)", re.MULTILINE | re.DOTALL)
_CLARIFICATION = re.compile(r"^Q: (.*)\nA: (.*)$", re.MULTILINE)
_REVISE_WORD = re.compile(r"\brevise\b", re.IGNORECASE)

_STOPWORDS = frozenset(
    """
    about above after again also because been before being below between both build cannot
    could create design does doing during each every from have having here into just like
    make many more most much need needs only other over please same should some such than
    that their them then there these they this those through under until very want wants
    were what when where which while with within without would your yours will shall able
    using used help system platform application solution company need team something
    """.split()  # noqa: SIM905 - a word list reads better as prose
)


def agent_of(request: ChatRequest) -> str | None:
    """The agent named on the `AGENT:` line of the system prompt, if any."""
    for message in request.messages:
        if message.get("role") in ("system", "developer"):
            match = _AGENT_LINE.search(message_text(message))
            if match:
                return match[1]
    return None


# -- what the prompt says ------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    agent: str
    request_text: str
    options: dict[str, str]
    clarifications: tuple[tuple[str, str | None], ...]
    round: int
    required_changes: str
    recommended: str | None
    seed: int
    keywords: tuple[str, ...] = field(default=())

    def pick(self, choices: list[str] | tuple[str, ...], salt: str = "") -> str:
        digest = hashlib.sha256(f"{self.seed}:{salt}".encode()).digest()
        return choices[int.from_bytes(digest[:4], "big") % len(choices)]

    @property
    def cloud(self) -> str:
        return self.options["cloud"]


def _first_user_text(request: ChatRequest) -> str:
    for message in request.messages:
        if message.get("role") == "user":
            return message_text(message)
    return ""


def _keywords(text: str, limit: int = 5) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for match in re.finditer(r"[A-Za-z][A-Za-z0-9+-]{3,}", text):
        word = match[0]
        key = word.lower()
        if key in _STOPWORDS or key in seen:
            continue
        seen[key] = word if word.isupper() else key
        if len(seen) == limit:
            break
    return tuple(seen.values())


def _context(request: ChatRequest, agent: str) -> _Context:
    prompt = _first_user_text(request)
    match = _REQUEST.search(prompt)
    request_text = match[1].strip() if match else prompt.strip()
    options = dict(DEFAULT_OPTIONS)
    options_section = prompt.split("## Options", 1)[-1].split("\n## ", 1)[0]
    for key, value in _OPTION.findall(options_section):
        if key in OPTION_FIELDS and value in OPTION_FIELDS[key][1].values:
            options[key] = value
    round_match = _ROUND.search(prompt)
    changes = _CHANGES.search(prompt)
    recommended = _RECOMMENDED.search(prompt)
    clarifications = tuple(
        (question.strip(), None if answer.startswith("(skipped") else answer.strip())
        for question, answer in _CLARIFICATION.findall(prompt)
    )
    round_number = int(round_match[1]) if round_match else 0
    blob = json.dumps([agent, request_text, options, round_number], sort_keys=True)
    return _Context(
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
        keywords=_keywords(request_text),
    )


def _subject(ctx: _Context) -> str:
    """A short name for the user's workload built from their own words."""
    words = list(ctx.keywords[:2])
    return f"the {' '.join(words)} workload" if words else "this workload"


def _quote(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return flat[: limit - 1].rsplit(" ", 1)[0] + "…"


_SCALE = re.compile(
    r"(\d[\d,.]*\s*(?:k|m|million|thousand)?\+?)\s*"
    r"(daily |monthly |concurrent |active )?"
    r"(users|visitors|customers|requests|orders|transactions|devices|events|messages|tb|gb)\b",
    re.IGNORECASE,
)


def _scale_phrase(ctx: _Context) -> str | None:
    match = _SCALE.search(ctx.request_text)
    if not match:
        return None
    return " ".join(part.strip() for part in match.groups() if part).strip()


def _answer_about(ctx: _Context, *topics: str) -> str | None:
    for question, answer in ctx.clarifications:
        if answer and any(topic in question.lower() for topic in topics):
            return answer
    return None


# -- the service catalogue ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Service:
    name: str
    sku: str
    monthly_usd: float
    category: str
    shape: str = "box"  # box, db or round (Mermaid node shape)


def _s(name: str, sku: str, usd: float, category: str, shape: str = "box") -> _Service:
    return _Service(name, sku, usd, category, shape)


CATALOG: dict[str, dict[str, _Service]] = {
    "azure": {
        "global": _s(
            "Azure Front Door Premium", "Premium, multi-region origins", 330, "networking"
        ),
        "edge": _s("Azure Front Door", "Standard", 35, "networking"),
        "gateway": _s("Azure Application Gateway", "WAF_v2, 2 instances", 320, "networking"),
        "web": _s("Azure App Service", "Premium v3 P1v3, 2 instances", 290, "compute"),
        "containers": _s("Azure Container Apps", "Consumption, 6 apps", 180, "compute"),
        "kubernetes": _s(
            "Azure Kubernetes Service (AKS)", "Standard tier, 3 x Standard_D4s_v5", 530, "compute"
        ),
        "functions": _s("Azure Functions", "Flex Consumption", 60, "compute"),
        "sql": _s(
            "Azure SQL Database", "General Purpose, 2 vCores, zone-redundant", 380, "data", "db"
        ),
        "nosql": _s("Azure Cosmos DB", "Autoscale 4,000 RU/s", 230, "data", "db"),
        "cache": _s("Azure Cache for Redis", "Standard C1", 100, "data", "db"),
        "storage": _s("Azure Blob Storage", "Hot tier, ZRS, 1 TB", 25, "data", "db"),
        "queue": _s("Azure Service Bus", "Standard", 10, "data"),
        "stream": _s("Azure Event Hubs", "Standard, 2 throughput units", 45, "data"),
        "etl": _s("Azure Data Factory", "Mapping data flows, 100 vCore-hours", 220, "compute"),
        "warehouse": _s(
            "Azure Synapse Analytics", "Serverless SQL pool, 10 TB scanned", 50, "data", "db"
        ),
        "registry": _s("Azure Container Registry", "Standard", 20, "operations"),
        "secrets": _s("Azure Key Vault", "Standard", 5, "security"),
        "identity": _s("Microsoft Entra ID", "P1 for administrators", 30, "security"),
        "monitoring": _s(
            "Azure Monitor and Application Insights",
            "Log Analytics, 50 GB/month",
            140,
            "operations",
        ),
        "backup": _s("Azure Backup", "GRS Recovery Services vault", 40, "operations"),
        "siem": _s("Microsoft Sentinel", "Pay-as-you-go, 5 GB/day", 300, "security"),
        "policy": _s(
            "Microsoft Defender for Cloud and Azure Policy", "Defender CSPM", 120, "security"
        ),
        "private": _s("Azure Private Link", "8 private endpoints", 60, "networking"),
    },
    "aws": {
        "global": _s(
            "Amazon Route 53 and AWS Global Accelerator",
            "Health-checked failover",
            60,
            "networking",
        ),
        "edge": _s("Amazon CloudFront", "1 TB egress", 85, "networking"),
        "gateway": _s(
            "Application Load Balancer with AWS WAF", "1 ALB, 10 WAF rules", 45, "networking"
        ),
        "web": _s("Amazon ECS on AWS Fargate", "4 tasks x 1 vCPU / 2 GB", 150, "compute"),
        "containers": _s(
            "Amazon ECS on AWS Fargate", "6 services x 2 tasks, 0.5 vCPU", 180, "compute"
        ),
        "kubernetes": _s(
            "Amazon EKS", "Control plane + 3 x m6i.xlarge managed nodes", 490, "compute"
        ),
        "functions": _s("AWS Lambda", "5M invocations, 512 MB", 40, "compute"),
        "sql": _s(
            "Amazon RDS for PostgreSQL", "db.m6g.large Multi-AZ, 200 GB gp3", 330, "data", "db"
        ),
        "nosql": _s("Amazon DynamoDB", "On-demand, 50M requests", 75, "data", "db"),
        "cache": _s("Amazon ElastiCache for Redis", "2 x cache.t4g.medium", 95, "data", "db"),
        "storage": _s("Amazon S3", "Standard, 1 TB", 23, "data", "db"),
        "queue": _s("Amazon SQS and Amazon SNS", "20M requests", 12, "data"),
        "stream": _s("Amazon Kinesis Data Streams", "4 shards", 60, "data"),
        "etl": _s("AWS Glue", "10 DPUs x 80 hours", 350, "compute"),
        "warehouse": _s("Amazon Redshift Serverless", "8 RPU base, 100 hours", 290, "data", "db"),
        "registry": _s("Amazon ECR", "50 GB", 5, "operations"),
        "secrets": _s("AWS Secrets Manager and AWS KMS", "20 secrets, 2 keys", 12, "security"),
        "identity": _s("Amazon Cognito", "10k monthly active users", 55, "security"),
        "monitoring": _s(
            "Amazon CloudWatch and AWS X-Ray", "50 GB logs, 20 alarms", 110, "operations"
        ),
        "backup": _s("AWS Backup", "500 GB warm storage", 30, "operations"),
        "siem": _s("Amazon GuardDuty and AWS Security Hub", "All accounts", 140, "security"),
        "policy": _s("AWS Config and AWS Organizations SCPs", "Conformance packs", 60, "security"),
        "private": _s("AWS PrivateLink", "8 interface endpoints x 2 AZs", 120, "networking"),
    },
    "gcp": {
        "global": _s(
            "Global external Application Load Balancer", "Multi-region backends", 60, "networking"
        ),
        "edge": _s("Cloud CDN", "1 TB egress", 80, "networking"),
        "gateway": _s(
            "External Application Load Balancer with Cloud Armor",
            "Standard policy",
            45,
            "networking",
        ),
        "web": _s("Cloud Run", "Min 2 instances, 1 vCPU / 2 GiB", 140, "compute"),
        "containers": _s("Cloud Run", "6 services, min 1 instance each", 170, "compute"),
        "kubernetes": _s(
            "Google Kubernetes Engine (GKE)", "Autopilot, ~6 vCPU / 24 GiB", 420, "compute"
        ),
        "functions": _s("Cloud Run functions", "5M invocations", 35, "compute"),
        "sql": _s("Cloud SQL for PostgreSQL", "db-custom-2-7680 HA, 200 GB SSD", 300, "data", "db"),
        "nosql": _s("Firestore", "Native mode, 50M operations", 60, "data", "db"),
        "cache": _s("Memorystore for Redis", "Standard tier, 5 GB", 180, "data", "db"),
        "storage": _s("Cloud Storage", "Standard, 1 TB", 20, "data", "db"),
        "queue": _s("Pub/Sub", "1 TiB/month", 40, "data"),
        "stream": _s("Pub/Sub", "Streaming ingestion, 2 TiB/month", 80, "data"),
        "etl": _s("Dataflow", "4 x n1-standard-4 workers", 380, "compute"),
        "warehouse": _s("BigQuery", "On-demand, 10 TiB scanned", 60, "data", "db"),
        "registry": _s("Artifact Registry", "50 GB", 5, "operations"),
        "secrets": _s("Secret Manager and Cloud KMS", "20 secrets, 2 keys", 8, "security"),
        "identity": _s("Identity Platform", "10k monthly active users", 25, "security"),
        "monitoring": _s(
            "Cloud Monitoring, Cloud Logging and Cloud Trace", "50 GiB logs", 30, "operations"
        ),
        "backup": _s("Backup and DR Service", "500 GB", 45, "operations"),
        "siem": _s("Security Command Center", "Premium", 250, "security"),
        "policy": _s(
            "Organization Policy Service and Cloud Audit Logs", "Data access logs", 40, "security"
        ),
        "private": _s("Private Service Connect", "6 endpoints", 45, "networking"),
    },
}

_NETWORK = {"azure": "Azure Virtual Network", "aws": "Amazon VPC", "gcp": "VPC network"}
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
_EU_WORDS = re.compile(
    r"\b(europe|european|eu|gdpr|germany|german|france|french|uk|london|ireland|dublin|"
    r"netherlands|amsterdam|frankfurt|paris|spain|italy|portugal)\b",
    re.IGNORECASE,
)
_BR_WORDS = re.compile(r"\b(brazil|brasil|s[aã]o paulo|latam|latin america)\b", re.IGNORECASE)
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


def _workload(ctx: _Context) -> str:
    """web, data or events: from the scenario preset, else from the user's own words."""
    scenario = ctx.options["scenario"]
    if scenario == "data_pipeline":
        return "data"
    if scenario == "microservices":
        return "events"
    if scenario == "web_app":
        return "web"
    data_hits = len(_DATA_WORDS.findall(ctx.request_text))
    event_hits = len(_EVENT_WORDS.findall(ctx.request_text))
    if data_hits > max(event_hits, 0) and data_hits >= 1:
        return "data"
    if event_hits >= 1:
        return "events"
    return "web"


def _regions(ctx: _Context) -> tuple[str, str]:
    text = ctx.request_text + " " + " ".join(a or "" for _, a in ctx.clarifications)
    area = "eu" if _EU_WORDS.search(text) else "br" if _BR_WORDS.search(text) else "us"
    if ctx.options["compliance"] != "standard" and area == "us" and "gdpr" in text.lower():
        area = "eu"
    return _REGIONS[area][ctx.cloud]


_ROLES = {
    ("carlos", "web"): [
        "edge",
        "gateway",
        "web",
        "sql",
        "cache",
        "storage",
        "secrets",
        "identity",
        "monitoring",
        "backup",
    ],
    ("carlos", "data"): [
        "stream",
        "functions",
        "storage",
        "etl",
        "warehouse",
        "secrets",
        "monitoring",
        "backup",
    ],
    ("carlos", "events"): [
        "gateway",
        "containers",
        "queue",
        "nosql",
        "cache",
        "secrets",
        "identity",
        "monitoring",
        "backup",
    ],
    ("ronei", "web"): [
        "edge",
        "gateway",
        "kubernetes",
        "sql",
        "cache",
        "storage",
        "registry",
        "secrets",
        "monitoring",
        "backup",
    ],
    ("ronei", "data"): [
        "stream",
        "kubernetes",
        "storage",
        "warehouse",
        "registry",
        "secrets",
        "monitoring",
        "backup",
    ],
    ("ronei", "events"): [
        "gateway",
        "kubernetes",
        "stream",
        "nosql",
        "registry",
        "secrets",
        "identity",
        "monitoring",
        "backup",
    ],
}
_RELIABILITY_FACTOR = {"normal": 1.0, "high": 1.35, "extreme": 2.0}
_PRIORITY_FACTOR = {"cost": 0.8, "balanced": 1.0, "performance": 1.35}


def _compose(ctx: _Context, architect: str, revised: bool) -> dict[str, _Service]:
    """The services of one architect's design, priced for the options."""
    roles = list(_ROLES[(architect, _workload(ctx))])
    compliance = ctx.options["compliance"]
    if compliance in ("regulated", "strict"):
        roles.append("policy")
    if compliance == "strict":
        roles += ["private", "siem"]
    if ctx.options["reliability"] == "extreme":
        roles = ["global" if role == "edge" else role for role in roles]
        if "global" not in roles:
            roles.insert(0, "global")
    if revised:
        roles += [role for role in ("private", "policy") if role not in roles]
    catalog = CATALOG[ctx.cloud]
    factor = (
        _RELIABILITY_FACTOR[ctx.options["reliability"]] * _PRIORITY_FACTOR[ctx.options["priority"]]
    )
    services: dict[str, _Service] = {}
    for role in dict.fromkeys(roles):
        service = catalog[role]
        if service.category in ("compute", "data"):
            service = replace(service, monthly_usd=round(service.monthly_usd * factor))
        services[role] = service
    return services


def _total(services: dict[str, _Service]) -> float:
    return float(sum(service.monthly_usd for service in services.values()))


def _is_revised(ctx: _Context) -> bool:
    return ctx.round > 0


# -- the requirements analyst ------------------------------------------------------------------

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


def _questions(ctx: _Context) -> str:
    topics = ["traffic", "data", "sla", "budget", "regions", "integrations", "compliance"]
    if _EU_WORDS.search(ctx.request_text) or _BR_WORDS.search(ctx.request_text):
        topics.remove("regions")
    if _scale_phrase(ctx):
        topics.remove("traffic")
    count = 3 + ctx.seed % 3
    values = {
        "subject": _subject(ctx),
        "cloud": option_label("cloud", ctx.cloud),
        "reliability": option_label("reliability", ctx.options["reliability"]),
        "compliance": option_label("compliance", ctx.options["compliance"]),
    }
    chosen = topics[:count]
    return "\n".join(
        f"{n}. {_QUESTION_TEMPLATES[topic].format(**values)}" for n, topic in enumerate(chosen, 1)
    )


_WORKLOAD_TEXT = {
    "web": "An internet-facing web application with a relational database, caching and "
    "static content delivery",
    "data": "A data platform: ingestion, processing, durable storage and analytics",
    "events": "Event-driven services that communicate through queues and events",
}


def _requirements(ctx: _Context) -> str:
    o = ctx.options
    scale = _scale_phrase(ctx)
    traffic = _answer_about(ctx, "traffic", "users", "requests") or (
        f"{scale} (from the request)" if scale else "assumed up to 500 requests per second at peak"
    )
    data = _answer_about(ctx, "data", "retain") or "assumed under 1 TB in the first year"
    budget = _answer_about(ctx, "budget") or "not stated: follow the cost-versus-performance option"
    integrations = _answer_about(ctx, "integrat") or "none stated"
    regions = _answer_about(ctx, "region") or ", ".join(_regions(ctx))
    words = ", ".join(ctx.keywords) or "(none)"
    lines = [
        "## Workload",
        f"{_WORKLOAD_TEXT[_workload(ctx)]}, for: “{_quote(ctx.request_text)}”.",
        f"Key terms from the request: {words}.",
        "",
        "## Functional requirements",
        f"- Deliver the capabilities described in the request for {_subject(ctx)}.",
        "- Authenticated access for users and administrators, with audit of changes.",
        f"- Integrations: {integrations}.",
        "",
        "## Non-functional requirements",
        f"- Traffic: {traffic}.",
        f"- Availability: {option_label('reliability', o['reliability'])}.",
        "- Latency: p95 under 300 ms for interactive requests.",
        f"- Data: {data}.",
        f"- Regions: {regions}.",
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


# -- the architects ------------------------------------------------------------------------------


def _node(role: str, service: _Service) -> str:
    label = service.name.replace('"', "'")
    if service.shape == "db":
        return f'{role}[("{label}")]'
    return f'{role}["{label}"]'


def _mermaid(ctx: _Context, services: dict[str, _Service], secondary: str) -> str:
    lines = ["flowchart TD"]
    workload = _workload(ctx)
    source = "sources" if workload == "data" else "users"
    lines.append('    sources(["Data sources"])' if source == "sources" else '    users(["Users"])')
    lines += [f"    {_node(role, service)}" for role, service in services.items()]
    compute = next(r for r in ("web", "containers", "kubernetes", "functions") if r in services)
    previous = source
    if workload == "data" and "stream" in services:
        lines.append(f"    {previous} --> stream")
        previous = "stream"
    for role in ("global", "edge", "gateway"):
        if role in services:
            lines.append(f"    {previous} --> {role}")
            previous = role
    lines.append(f"    {previous} --> {compute}")
    for role in ("sql", "nosql", "cache", "storage"):
        if role in services:
            lines.append(f"    {compute} --> {role}")
    if workload != "data" and "stream" in services:
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
    for role in ("secrets", "identity", "registry", "private", "policy"):
        if role in services:
            lines.append(f"    {compute} -.-> {role}")
    for role in ("monitoring", "backup", "siem"):
        if role in services:
            lines.append(f"    {role} -.-> {compute}")
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


def _design(ctx: _Context, architect: str) -> str:
    o = ctx.options
    revised = _is_revised(ctx)
    services = _compose(ctx, architect, revised)
    primary, secondary = _regions(ctx)
    cloud = option_label("cloud", ctx.cloud)
    title, approach, stance = _VOICE[architect]
    compute_role = next(
        r for r in ("web", "containers", "kubernetes", "functions") if r in services
    )
    compute = services[compute_role]
    words = ", ".join(ctx.keywords) or "your request"
    reliability = o["reliability"]
    multi_region = reliability == "extreme"
    zones = reliability != "normal" or architect == "ronei"
    total = _total(services)
    heading = [f"# {title} for {_subject(ctx)} on {cloud}"]
    if revised:
        heading.append(
            f"\n**Revision {ctx.round}.** This revision addresses the auditor's required changes:\n"
            + (ctx.required_changes or "- (none listed)")
        )
    sections: dict[str, list[str]] = {}
    sections["Executive Summary"] = [
        f"You asked for: “{_quote(ctx.request_text)}”.",
        f"{architect.capitalize()} proposes {approach} on {cloud} built around {words}. {stance}",
        f"It targets {option_label('reliability', reliability)} availability, "
        f"{option_label('compliance', o['compliance'])} compliance and the "
        f"“{option_label('priority', o['priority'])}” budget posture, for an estimated "
        f"**${total:,.0f} per month**.",
    ]
    clar = [
        f"- {question} → {answer if answer else 'skipped; assumed a typical value'}"
        for question, answer in ctx.clarifications
    ]
    sections["Requirements and Assumptions"] = [
        f"- Workload: {_WORKLOAD_TEXT[_workload(ctx)].lower()}.",
        f"- Scale: {_scale_phrase(ctx) or 'assumed up to 500 requests per second at peak'}.",
        f"- Scenario preset: {option_label('scenario', o['scenario'])}; design strictness: "
        f"{option_label('strictness', o['strictness'])}.",
        *(clar or ["- No clarifying questions were answered; typical values are assumed."]),
    ]
    sections["Architecture Overview"] = [
        f"Traffic enters through {_entry(services)} and reaches {compute.name}; state lives in "
        f"{_data_names(services)}. The primary region is {primary}"
        + (f", with a standby in {secondary}." if multi_region else "."),
        "",
        "```mermaid",
        _mermaid(ctx, services, secondary),
        "```",
    ]
    sections["Compute"] = _compute_lines(architect, services, compute)
    sections["Data and Storage"] = [
        f"- **{s.name}** ({s.sku}): {_purpose(role)}."
        for role, s in services.items()
        if role in ("sql", "nosql", "cache", "storage", "stream", "queue", "warehouse", "etl")
    ]
    sections["Networking"] = [
        f"- {_NETWORK[ctx.cloud]} `10.20.0.0/16` in {primary}: subnets for ingress "
        "(`10.20.0.0/24`), application (`10.20.1.0/24`) and data (`10.20.2.0/24`).",
        f"- Ingress only through {_entry(services)}; TLS 1.2+ terminates at the edge.",
        (
            f"- Data services have no public endpoints: {services['private'].name}."
            if "private" in services
            else "- Data services restrict access to the application subnet with firewall rules."
        ),
        *(
            [f"- A mirrored network in {secondary}, failover by {services['global'].name}."]
            if multi_region
            else []
        ),
    ]
    sections["Security"] = [
        f"- Secrets and keys in **{services['secrets'].name}**; workloads use managed identities.",
        *(
            [f"- Sign-in through **{services['identity'].name}**."]
            if "identity" in services
            else ["- Workload identity federation for pods; no long-lived credentials."]
        ),
        "- Encryption at rest with platform keys"
        + (" (customer-managed keys for regulated data)" if o["compliance"] != "standard" else "")
        + "; TLS in transit everywhere.",
        *([f"- Guardrails: **{services['policy'].name}**."] if "policy" in services else []),
        *([f"- Threat detection: **{services['siem'].name}**."] if "siem" in services else []),
        f"- Compliance level: {option_label('compliance', o['compliance'])}.",
    ]
    rto, rpo = {"normal": (4, 1), "high": (1, 0.25), "extreme": (0.25, 0.08)}[reliability]
    sections["Reliability"] = [
        f"- Target: {option_label('reliability', reliability)}.",
        f"- {_ZONES_TEXT[zones]} in {primary}.",
        *(
            [f"- Warm standby in {secondary}; failover through {services['global'].name}."]
            if multi_region
            else []
        ),
        f"- Backups with **{services['backup'].name}**; RTO {rto} h, RPO {rpo} h.",
        "- Health probes, retries with backoff and circuit breakers between services.",
    ]
    sections["Performance Efficiency"] = [
        f"- {compute.name} autoscales on CPU and request rate"
        + (" with a generous minimum for low latency." if o["priority"] == "performance" else "."),
        *(
            [f"- Hot reads served from **{services['cache'].name}**."]
            if "cache" in services
            else []
        ),
        *(
            [f"- Static content and caching at the edge with **{services['edge'].name}**."]
            if "edge" in services
            else []
        ),
        "- Load tests before launch against the traffic assumptions above.",
    ]
    table = ["| Service | SKU | Monthly (USD) |", "|---|---|---:|"]
    table += [f"| {s.name} | {s.sku} | ${s.monthly_usd:,.0f} |" for s in services.values()]
    table.append(f"| **Total** | | **${total:,.0f}** |")
    sections["Cost Estimate"] = [
        *table,
        "",
        f"Estimated **${total:,.0f}/month** (≈ ${total * 12:,.0f}/year), list prices in "
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


def _entry(services: dict[str, _Service]) -> str:
    names = [services[r].name for r in ("global", "edge", "gateway") if r in services]
    return " and ".join(names) if names else "the ingestion endpoint"


def _data_names(services: dict[str, _Service]) -> str:
    names = [
        services[r].name for r in ("sql", "nosql", "cache", "storage", "warehouse") if r in services
    ]
    return ", ".join(names) if names else "managed storage"


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


def _purpose(role: str) -> str:
    return _PURPOSES[role]


def _compute_lines(architect: str, services: dict[str, _Service], compute: _Service) -> list[str]:
    lines = [f"- **{compute.name}** ({compute.sku})."]
    if architect == "ronei":
        lines += [
            "- Separate node pools for system and application workloads; Horizontal Pod "
            "Autoscaler and cluster autoscaler.",
            "- Ingress controller behind the gateway; network policies isolate namespaces.",
        ]
        if "registry" in services:
            lines.append(f"- Images in **{services['registry'].name}**, signed and scanned.")
    else:
        lines += [
            "- Autoscale rules on CPU and request count; deployment slots for zero-downtime "
            "releases.",
            "- Background work runs in the same managed platform, triggered by queues.",
        ]
        if "functions" in services:
            lines.append(f"- Event handlers on **{services['functions'].name}**.")
    return lines


# -- the analysts -------------------------------------------------------------------------------


def _security(ctx: _Context) -> dict[str, Any]:
    revised = _is_revised(ctx)
    frameworks = ["CIS Benchmarks", f"{option_label('cloud', ctx.cloud)} security baseline"]
    if ctx.options["compliance"] in ("regulated", "strict"):
        frameworks += ["GDPR", "SOC 2"]
    if ctx.options["compliance"] == "strict":
        frameworks += ["HIPAA", "PCI DSS"]

    def assess(architect: str) -> dict[str, Any]:
        services = _compose(ctx, architect, revised)
        findings = []
        if "private" not in services:
            findings.append(
                {
                    "severity": "high" if ctx.options["compliance"] != "standard" else "medium",
                    "title": "Data services are reachable through public endpoints",
                    "recommendation": f"Add {CATALOG[ctx.cloud]['private'].name} and disable "
                    "public network access on the data services.",
                }
            )
        if "siem" not in services and ctx.options["compliance"] != "standard":
            findings.append(
                {
                    "severity": "medium",
                    "title": "No central threat detection",
                    "recommendation": f"Enable {CATALOG[ctx.cloud]['siem'].name}.",
                }
            )
        if architect == "ronei":
            findings.append(
                {
                    "severity": "medium",
                    "title": "Cluster hardening is not fully specified",
                    "recommendation": "Enforce pod security standards, workload identity and "
                    "signed images.",
                }
            )
        findings.append(
            {
                "severity": "low",
                "title": "Secret rotation is not scheduled",
                "recommendation": f"Rotate secrets in {services['secrets'].name} every 90 days.",
            }
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
            "frameworks": frameworks,
            "controls": controls,
            "encryption_at_rest": True,
            "encryption_in_transit": True,
            "network_segmentation": "private" in services or architect == "ronei",
        }

    carlos, ronei = assess("carlos"), assess("ronei")
    better = "Carlos" if carlos["score"] >= ronei["score"] else "Ronei"
    return {
        "carlos": carlos,
        "ronei": ronei,
        "summary": f"{better}'s design has the stronger security posture for {_subject(ctx)} "
        f"(scores {carlos['score']} vs {ronei['score']}). Both encrypt data at rest and in "
        "transit.",
    }


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


def _cost(ctx: _Context) -> dict[str, Any]:
    revised = _is_revised(ctx)
    answered = sum(1 for _, answer in ctx.clarifications if answer)
    confidence = "high" if answered >= 3 else "medium" if answered or _scale_phrase(ctx) else "low"

    def assess(architect: str) -> dict[str, Any]:
        services = _compose(ctx, architect, revised)
        total = _total(services)
        drivers = sorted(services.values(), key=lambda s: s.monthly_usd, reverse=True)[:3]
        return {
            "monthly_usd": total,
            "annual_usd": total * 12,
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
            "confidence": confidence,
        }

    carlos, ronei = assess("carlos"), assess("ronei")
    cheaper = "Carlos" if carlos["monthly_usd"] <= ronei["monthly_usd"] else "Ronei"
    return {
        "carlos": carlos,
        "ronei": ronei,
        "summary": f"{cheaper}'s design is cheaper: ${carlos['monthly_usd']:,.0f} vs "
        f"${ronei['monthly_usd']:,.0f} per month. Reservations cut the steady baseline further.",
    }


def _reliability(ctx: _Context) -> dict[str, Any]:
    target = ctx.options["reliability"]
    primary, secondary = _regions(ctx)
    rto, rpo = {"normal": (4.0, 1.0), "high": (1.0, 0.25), "extreme": (0.25, 0.08)}[target]

    def assess(architect: str) -> dict[str, Any]:
        services = _compose(ctx, architect, _is_revised(ctx))
        multi_az = target != "normal" or architect == "ronei"
        multi_region = target == "extreme"
        sla = {"normal": 99.9, "high": 99.95, "extreme": 99.99}[target]
        if architect == "ronei" and target == "normal":
            sla = 99.95
        spofs = [] if multi_region else [f"Single region ({primary})"]
        if not multi_az:
            spofs.append("Single availability zone for the application tier")
        compute = next(r for r in ("web", "containers", "kubernetes", "functions") if r in services)
        return {
            "estimated_sla_percent": sla,
            "single_points_of_failure": spofs,
            "rto_hours": rto,
            "rpo_hours": rpo,
            "multi_az": multi_az,
            "multi_region": multi_region,
            "monitoring": [services["monitoring"].name, "Synthetic availability probes"],
            "scaling": [f"{services[compute].name} autoscaling on CPU and request rate"]
            + (["Cluster autoscaler"] if architect == "ronei" else []),
            "backup": [services["backup"].name, "Point-in-time restore for databases"]
            + ([f"Geo-replicated copies in {secondary}"] if multi_region else []),
        }

    carlos, ronei = assess("carlos"), assess("ronei")
    return {
        "carlos": carlos,
        "ronei": ronei,
        "summary": f"Both designs aim at {option_label('reliability', target)}; estimated SLA "
        f"{carlos['estimated_sla_percent']}% (Carlos) and {ronei['estimated_sla_percent']}% "
        "(Ronei).",
    }


# -- auditor and recommender ------------------------------------------------------------------


def _audit(ctx: _Context) -> str:
    needs_revision = ctx.round == 0 and bool(_REVISE_WORD.search(ctx.request_text))
    catalog = CATALOG[ctx.cloud]
    o = ctx.options
    summary = (
        f"Both designs answer the request for {_subject(ctx)} on "
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
        verdict = "NEEDS REVISION"
        summary += " Some material gaps must be closed before a recommendation."
        changes = [
            f"- Carlos: put the data services behind {catalog['private'].name} and disable "
            "public network access.",
            f"- Ronei: add {catalog['policy'].name} guardrails and pod security standards to "
            "the cluster.",
            "- Both: state RTO and RPO explicitly and show the backup schedule.",
        ]
    else:
        verdict = "APPROVED"
        if ctx.round > 0:
            summary += f" The round {ctx.round} revisions closed the gaps raised earlier."
        changes = ["- None"]
    return (
        "\n".join(
            [
                f"VERDICT: {verdict}",
                f"SUMMARY: {summary}",
                "STRENGTHS:",
                *strengths,
                "REQUIRED CHANGES:",
                *changes,
            ]
        )
        + "\n"
    )


def _choice(ctx: _Context) -> str:
    o = ctx.options
    if o["priority"] == "performance" or (
        o["reliability"] == "extreme" and o["priority"] != "cost"
    ):
        return "RONEI"
    return "CARLOS"


def _recommend(ctx: _Context) -> str:
    choice = _choice(ctx)
    revised = _is_revised(ctx)
    carlos_total = _total(_compose(ctx, "carlos", revised))
    ronei_total = _total(_compose(ctx, "ronei", revised))
    o = ctx.options
    chosen, other = ("Carlos", "Ronei") if choice == "CARLOS" else ("Ronei", "Carlos")
    why = (
        f"With “{option_label('priority', o['priority'])}” and a "
        f"{option_label('reliability', o['reliability'])} target, {chosen}'s design fits "
        f"{_subject(ctx)} best: "
        + (
            "managed services keep cost and operational effort low."
            if choice == "CARLOS"
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


# -- Terraform ----------------------------------------------------------------------------------


def _slug(ctx: _Context) -> str:
    words = [re.sub(r"[^a-z0-9]", "", w.lower()) for w in ctx.keywords[:2]]
    slug = "-".join(w for w in words if w)[:20].strip("-")
    return slug or "carlos-app"


def _hcl_block(name: str, body: str) -> str:
    return f"### {name}\n\n```hcl\n{body.strip()}\n```\n"


_PROVIDERS = {
    "azure": ("azurerm", "hashicorp/azurerm", "~> 4.0"),
    "aws": ("aws", "hashicorp/aws", "~> 5.0"),
    "gcp": ("google", "hashicorp/google", "~> 6.0"),
}


def _versions_tf(cloud: str) -> str:
    name, source, version = _PROVIDERS[cloud]
    return f"""
terraform {{
  required_version = ">= 1.6.0"

  required_providers {{
    {name} = {{
      source  = "{source}"
      version = "{version}"
    }}
  }}
}}
"""


def _variables_tf(ctx: _Context) -> str:
    primary, secondary = _regions(ctx)
    region_var = {"azure": "location", "aws": "region", "gcp": "region"}[ctx.cloud]
    extra = ""
    if ctx.cloud == "gcp":
        extra += """
variable "project_id" {
  description = "Google Cloud project to deploy into."
  type        = string
}
"""
    if ctx.cloud == "azure":
        extra += """
variable "sql_admin_login" {
  description = "Administrator login of the database server."
  type        = string
  default     = "carlosadmin"
}

variable "sql_admin_password" {
  description = "Database administrator password; pass it as TF_VAR_sql_admin_password."
  type        = string
  sensitive   = true
}
"""
    if ctx.cloud == "gcp":
        extra += """
variable "container_image" {
  description = "Container image to run."
  type        = string
  default     = "us-docker.pkg.dev/cloudrun/container/hello"
}
"""
    return f"""
variable "project_name" {{
  description = "Short name used in every resource name."
  type        = string
  default     = "{_slug(ctx)}"
}}

variable "environment" {{
  description = "Deployment environment (dev, staging, prod)."
  type        = string
  default     = "prod"
}}

variable "{region_var}" {{
  description = "Primary region."
  type        = string
  default     = "{primary}"
}}

variable "secondary_{region_var}" {{
  description = "Standby region for disaster recovery."
  type        = string
  default     = "{secondary}"
}}

variable "tags" {{
  description = "Tags applied to every resource."
  type        = map(string)
  default = {{
    managed_by  = "terraform"
    reliability = "{ctx.options["reliability"]}"
    compliance  = "{ctx.options["compliance"]}"
  }}
}}
{extra}"""


def _azure_main(ctx: _Context, architect: str) -> tuple[str, str]:
    workload = _workload(ctx)
    if architect == "ronei":
        compute = """
resource "azurerm_kubernetes_cluster" "main" {
  name                = "aks-${local.name}"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  dns_prefix          = local.name
  sku_tier            = "Standard"
  tags                = local.tags

  default_node_pool {
    name       = "system"
    vm_size    = "Standard_D4s_v5"
    node_count = 3
    zones      = ["1", "2", "3"]
  }

  identity {
    type = "SystemAssigned"
  }

  oms_agent {
    log_analytics_workspace_id = azurerm_log_analytics_workspace.main.id
  }
}

resource "azurerm_container_registry" "main" {
  name                = replace("acr${local.name}", "-", "")
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  sku                 = "Standard"
  tags                = local.tags
}
"""
        outputs = """
output "kubernetes_cluster_name" {
  description = "Name of the AKS cluster."
  value       = azurerm_kubernetes_cluster.main.name
}

output "container_registry" {
  description = "Login server of the container registry."
  value       = azurerm_container_registry.main.login_server
}
"""
    else:
        compute = """
resource "azurerm_service_plan" "main" {
  name                = "asp-${local.name}"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  os_type             = "Linux"
  sku_name            = "P1v3"
  tags                = local.tags
}

resource "azurerm_linux_web_app" "main" {
  name                = "app-${local.name}"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  service_plan_id     = azurerm_service_plan.main.id
  https_only          = true
  tags                = local.tags

  identity {
    type = "SystemAssigned"
  }

  site_config {
    always_on           = true
    minimum_tls_version = "1.2"
  }
}
"""
        outputs = """
output "app_url" {
  description = "Public URL of the application."
  value       = "https://${azurerm_linux_web_app.main.default_hostname}"
}
"""
    if workload == "data":
        messaging = """
resource "azurerm_eventhub_namespace" "main" {
  name                = "evhns-${local.name}"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  sku                 = "Standard"
  capacity            = 2
  tags                = local.tags
}
"""
    elif workload == "events":
        messaging = """
resource "azurerm_servicebus_namespace" "main" {
  name                = "sb-${local.name}"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  sku                 = "Standard"
  tags                = local.tags
}
"""
    else:
        messaging = ""
    main = f"""
provider "azurerm" {{
  features {{}}
}}

data "azurerm_client_config" "current" {{}}

locals {{
  name = "${{var.project_name}}-${{var.environment}}"
  tags = merge(var.tags, {{ project = var.project_name, environment = var.environment }})
}}

resource "azurerm_resource_group" "main" {{
  name     = "rg-${{local.name}}"
  location = var.location
  tags     = local.tags
}}

resource "azurerm_log_analytics_workspace" "main" {{
  name                = "log-${{local.name}}"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  sku                 = "PerGB2018"
  retention_in_days   = 30
  tags                = local.tags
}}

resource "azurerm_key_vault" "main" {{
  name                       = substr(replace("kv-${{local.name}}", "_", "-"), 0, 24)
  location                   = azurerm_resource_group.main.location
  resource_group_name        = azurerm_resource_group.main.name
  tenant_id                  = data.azurerm_client_config.current.tenant_id
  sku_name                   = "standard"
  purge_protection_enabled   = true
  soft_delete_retention_days = 30
  tags                       = local.tags
}}

resource "azurerm_mssql_server" "main" {{
  name                          = "sql-${{local.name}}"
  location                      = azurerm_resource_group.main.location
  resource_group_name           = azurerm_resource_group.main.name
  version                       = "12.0"
  administrator_login           = var.sql_admin_login
  administrator_login_password  = var.sql_admin_password
  minimum_tls_version           = "1.2"
  public_network_access_enabled = false
  tags                          = local.tags
}}

resource "azurerm_mssql_database" "main" {{
  name           = "db-${{local.name}}"
  server_id      = azurerm_mssql_server.main.id
  sku_name       = "GP_Gen5_2"
  zone_redundant = true
  tags           = local.tags
}}

resource "azurerm_storage_account" "main" {{
  name                     = substr(replace("st${{local.name}}", "-", ""), 0, 24)
  location                 = azurerm_resource_group.main.location
  resource_group_name      = azurerm_resource_group.main.name
  account_tier             = "Standard"
  account_replication_type = "ZRS"
  min_tls_version          = "TLS1_2"
  tags                     = local.tags
}}
{compute}{messaging}"""
    outputs += """
output "resource_group" {
  description = "Resource group holding every resource."
  value       = azurerm_resource_group.main.name
}

output "key_vault_uri" {
  description = "URI of the Key Vault for application secrets."
  value       = azurerm_key_vault.main.vault_uri
}

output "sql_server_fqdn" {
  description = "Private FQDN of the database server."
  value       = azurerm_mssql_server.main.fully_qualified_domain_name
}
"""
    return main, outputs


def _aws_main(ctx: _Context, architect: str) -> tuple[str, str]:
    workload = _workload(ctx)
    if architect == "ronei":
        compute = """
resource "aws_iam_role" "cluster" {
  name = "${local.name}-eks-cluster"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "eks.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy_attachment" "cluster" {
  role       = aws_iam_role.cluster.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonEKSClusterPolicy"
}

resource "aws_eks_cluster" "main" {
  name     = local.name
  role_arn = aws_iam_role.cluster.arn

  vpc_config {
    subnet_ids              = [for subnet in aws_subnet.private : subnet.id]
    endpoint_private_access = true
    endpoint_public_access  = false
  }

  depends_on = [aws_iam_role_policy_attachment.cluster]
}

resource "aws_ecr_repository" "app" {
  name                 = local.name
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }
}
"""
        outputs = """
output "eks_cluster_name" {
  description = "Name of the EKS cluster."
  value       = aws_eks_cluster.main.name
}

output "ecr_repository_url" {
  description = "URL of the container image repository."
  value       = aws_ecr_repository.app.repository_url
}
"""
    else:
        compute = """
resource "aws_ecs_cluster" "main" {
  name = local.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "app" {
  name              = "/ecs/${local.name}"
  retention_in_days = 30
}
"""
        outputs = """
output "ecs_cluster_name" {
  description = "Name of the ECS cluster."
  value       = aws_ecs_cluster.main.name
}
"""
    if workload == "data":
        messaging = """
resource "aws_kinesis_stream" "ingest" {
  name             = "${local.name}-ingest"
  shard_count      = 4
  retention_period = 48
  encryption_type  = "KMS"
  kms_key_id       = "alias/aws/kinesis"
}
"""
    elif workload == "events":
        messaging = """
resource "aws_sqs_queue" "dead_letter" {
  name = "${local.name}-dlq"
}

resource "aws_sqs_queue" "commands" {
  name                      = "${local.name}-commands"
  sqs_managed_sse_enabled   = true
  message_retention_seconds = 345600
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letter.arn
    maxReceiveCount     = 5
  })
}
"""
    else:
        messaging = ""
    main = f"""
provider "aws" {{
  region = var.region

  default_tags {{
    tags = local.tags
  }}
}}

data "aws_availability_zones" "available" {{
  state = "available"
}}

locals {{
  name = "${{var.project_name}}-${{var.environment}}"
  tags = merge(var.tags, {{ project = var.project_name, environment = var.environment }})
  azs  = slice(data.aws_availability_zones.available.names, 0, 3)
}}

resource "aws_vpc" "main" {{
  cidr_block           = "10.20.0.0/16"
  enable_dns_hostnames = true
  enable_dns_support   = true
}}

resource "aws_subnet" "private" {{
  for_each          = toset(local.azs)
  vpc_id            = aws_vpc.main.id
  availability_zone = each.value
  cidr_block        = cidrsubnet(aws_vpc.main.cidr_block, 8, index(local.azs, each.value))
}}

resource "aws_db_subnet_group" "main" {{
  name       = local.name
  subnet_ids = [for subnet in aws_subnet.private : subnet.id]
}}

resource "aws_db_instance" "main" {{
  identifier                  = local.name
  engine                      = "postgres"
  engine_version              = "16"
  instance_class              = "db.m6g.large"
  allocated_storage           = 200
  storage_type                = "gp3"
  storage_encrypted           = true
  multi_az                    = true
  username                    = "carlosadmin"
  manage_master_user_password = true
  db_subnet_group_name        = aws_db_subnet_group.main.name
  backup_retention_period     = 14
  deletion_protection         = true
  skip_final_snapshot         = false
  final_snapshot_identifier   = "${{local.name}}-final"
}}

resource "aws_s3_bucket" "data" {{
  bucket_prefix = "${{local.name}}-data-"
}}

resource "aws_s3_bucket_versioning" "data" {{
  bucket = aws_s3_bucket.data.id

  versioning_configuration {{
    status = "Enabled"
  }}
}}

resource "aws_s3_bucket_public_access_block" "data" {{
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}}
{compute}{messaging}"""
    outputs += """
output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.main.id
}

output "database_endpoint" {
  description = "Endpoint of the PostgreSQL database."
  value       = aws_db_instance.main.endpoint
}

output "data_bucket" {
  description = "Name of the data bucket."
  value       = aws_s3_bucket.data.bucket
}
"""
    return main, outputs


def _gcp_main(ctx: _Context, architect: str) -> tuple[str, str]:
    workload = _workload(ctx)
    if architect == "ronei":
        compute = """
resource "google_container_cluster" "main" {
  name                = local.name
  location            = var.region
  enable_autopilot    = true
  deletion_protection = true

  release_channel {
    channel = "REGULAR"
  }
}

resource "google_artifact_registry_repository" "images" {
  location      = var.region
  repository_id = local.name
  format        = "DOCKER"
}
"""
        outputs = """
output "gke_cluster_name" {
  description = "Name of the GKE Autopilot cluster."
  value       = google_container_cluster.main.name
}

output "image_repository" {
  description = "Artifact Registry repository for images."
  value       = google_artifact_registry_repository.images.name
}
"""
    else:
        compute = """
resource "google_cloud_run_v2_service" "app" {
  name     = local.name
  location = var.region
  ingress  = "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"

  template {
    scaling {
      min_instance_count = 2
      max_instance_count = 20
    }

    containers {
      image = var.container_image
    }
  }
}
"""
        outputs = """
output "service_url" {
  description = "URL of the Cloud Run service."
  value       = google_cloud_run_v2_service.app.uri
}
"""
    if workload in ("data", "events"):
        messaging = """
resource "google_pubsub_topic" "events" {
  name                       = "${local.name}-events"
  message_retention_duration = "86400s"
}
"""
    else:
        messaging = ""
    availability = "REGIONAL" if ctx.options["reliability"] != "normal" else "ZONAL"
    main = f"""
provider "google" {{
  project = var.project_id
  region  = var.region
}}

locals {{
  name = "${{var.project_name}}-${{var.environment}}"
}}

resource "google_sql_database_instance" "main" {{
  name                = local.name
  database_version    = "POSTGRES_16"
  region              = var.region
  deletion_protection = true

  settings {{
    tier              = "db-custom-2-7680"
    availability_type = "{availability}"
    user_labels       = var.tags

    backup_configuration {{
      enabled                        = true
      point_in_time_recovery_enabled = true
    }}

    ip_configuration {{
      ipv4_enabled = false
    }}
  }}
}}

resource "google_storage_bucket" "data" {{
  name                        = "${{var.project_id}}-${{local.name}}-data"
  location                    = var.region
  uniform_bucket_level_access = true
  labels                      = var.tags

  versioning {{
    enabled = true
  }}
}}
{compute}{messaging}"""
    outputs += """
output "database_connection_name" {
  description = "Connection name of the Cloud SQL instance."
  value       = google_sql_database_instance.main.connection_name
}

output "data_bucket" {
  description = "Name of the data bucket."
  value       = google_storage_bucket.data.name
}
"""
    return main, outputs


_LOGIN = {
    "azure": "`az login` and `az account set --subscription <id>`",
    "aws": "`aws sso login` (or configure credentials for the target account)",
    "gcp": "`gcloud auth application-default login` and set `project_id` in terraform.tfvars",
}


def _terraform(ctx: _Context) -> str:
    architect = "ronei" if ctx.recommended == "RONEI" else "carlos"
    main, outputs = {"azure": _azure_main, "aws": _aws_main, "gcp": _gcp_main}[ctx.cloud](
        ctx, architect
    )
    who = "Ronei's" if architect == "ronei" else "Carlos's"
    secret_step = (
        "Export the database password: `export TF_VAR_sql_admin_password=...` (never commit it)."
        if ctx.cloud == "azure"
        else "The database password is generated and stored by the provider; nothing to commit."
    )
    return "\n".join(
        [
            f"## Terraform for {who} design on {option_label('cloud', ctx.cloud)}",
            f"Implements {_subject(ctx)} as recommended.",
            "",
            _hcl_block("versions.tf", _versions_tf(ctx.cloud)),
            _hcl_block("variables.tf", _variables_tf(ctx)),
            _hcl_block("main.tf", main),
            _hcl_block("outputs.tf", outputs),
            "## Deployment steps",
            f"1. Authenticate: {_LOGIN[ctx.cloud]}.",
            f"2. {secret_step}",
            "3. `terraform init` to download the pinned provider.",
            "4. `terraform plan -out tfplan` and review every change.",
            "5. `terraform apply tfplan`.",
            "6. Verify with `terraform output` and a smoke test against the endpoints.",
            "7. Wire the same steps into CI/CD with remote state and approvals.",
            "",
        ]
    )


# -- the responder ---------------------------------------------------------------------------


def carlos_responder(request: ChatRequest) -> str:
    """The answer the named agent would give; a plain paragraph for unknown callers."""
    agent = agent_of(request)
    if agent is None:
        return default_responder(request)
    ctx = _context(request, agent)
    if agent == QUESTIONS_AGENT:
        return _questions(ctx)
    if agent == "requirements":
        return _requirements(ctx)
    if agent in ("carlos", "ronei"):
        return _design(ctx, agent)
    if agent == "security":
        return json.dumps(_security(ctx))
    if agent == "cost":
        return json.dumps(_cost(ctx))
    if agent == "reliability":
        return json.dumps(_reliability(ctx))
    if agent == "auditor":
        return _audit(ctx)
    if agent == "recommender":
        return _recommend(ctx)
    if agent == "terraform":
        return _terraform(ctx)
    return default_responder(request)


@asynccontextmanager
async def in_process_endpoint(
    config: SimulatorConfig,
    responder: Responder = carlos_responder,
    pools_settings: Mapping[str, Any] | None = None,
) -> AsyncIterator[LLMSimulator]:
    """A simulator on a free port with a registry pointed at it, installed for the block.

    For commands that must work with no endpoint configured. `pools_settings` is a
    CARLOS_POOLS-style dict (default: the project's settings) whose endpoint is replaced.
    The caller warms and closes the installed registry; the previous one is restored after.
    """
    simulator = LLMSimulator(config, responder=responder)
    await simulator.start()
    raw = dict(pools_settings if pools_settings is not None else settings.CARLOS_POOLS)
    raw["ENDPOINT"] = {"SIMULATOR_URL": simulator.base_url}
    registry = PoolRegistry(parse_config(raw))
    previous = runtime.install(registry)
    try:
        yield simulator
    finally:
        runtime.install(previous)
        if not registry.closed:
            await registry.close()
        await simulator.stop()
