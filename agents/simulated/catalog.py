"""The service catalogue and how each architect composes a priced design from it.

The catalogue itself is data (catalog.toml); the architects differ in the roles they pick:
Carlos managed services, Ronei Kubernetes. Options add controls and scale the prices; an
internal application is reached over a VPN through a private gateway with single sign-on,
never through a public edge.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from importlib.resources import files

from agents.simulated.facts import read_facts
from agents.simulated.text import Context, workload


@dataclass(frozen=True)
class Service:
    name: str
    sku: str
    monthly_usd: float
    category: str
    shape: str = "box"  # box, db or round (Mermaid node shape)
    terraform: str = ""  # terraform/<cloud>/<this>.tf.tmpl; "" when set up outside Terraform


def _load_catalog() -> dict[str, dict[str, Service]]:
    raw = tomllib.loads(files(__package__).joinpath("catalog.toml").read_text(encoding="utf-8"))
    return {
        cloud: {role: Service(*fields) for role, fields in services.items()}
        for cloud, services in raw.items()
    }


CATALOG: dict[str, dict[str, Service]] = _load_catalog()
NETWORK = {"azure": "Azure Virtual Network", "aws": "Amazon VPC", "gcp": "VPC network"}
COMPUTE_ROLES = ("web", "containers", "kubernetes", "functions")


def _roles(names: str) -> tuple[str, ...]:
    return tuple(names.split())


_ROLES = {
    ("carlos", "web"): _roles(
        "edge gateway web sql cache storage secrets identity monitoring backup"
    ),
    ("carlos", "data"): _roles("stream functions storage etl warehouse secrets monitoring backup"),
    ("carlos", "events"): _roles(
        "gateway containers queue nosql cache secrets identity monitoring backup"
    ),
    ("ronei", "web"): _roles(
        "edge gateway kubernetes sql cache storage registry secrets monitoring backup"
    ),
    ("ronei", "data"): _roles(
        "stream kubernetes storage warehouse registry secrets monitoring backup"
    ),
    ("ronei", "events"): _roles(
        "gateway kubernetes stream nosql registry secrets identity monitoring backup"
    ),
}
_RELIABILITY_FACTOR = {"normal": 1.0, "high": 1.35, "extreme": 2.0}
_PRIORITY_FACTOR = {"cost": 0.8, "balanced": 1.0, "performance": 1.35}


def _internal(roles: list[str]) -> list[str]:
    """An internal application's roles: no public edge; VPN, private gateway and SSO instead."""
    swapped = {"gateway": "private_gateway", "identity": "sso"}
    kept = [swapped.get(role, role) for role in roles if role not in ("edge", "global")]
    if "private_gateway" not in kept:
        kept.insert(0, "private_gateway")
    kept.insert(0, "vpn")
    kept += [role for role in ("sso", "private") if role not in kept]
    return kept


def compose(ctx: Context, architect: str) -> dict[str, Service]:
    """The services of one architect's design, priced for the options."""
    roles = list(_ROLES[(architect, workload(ctx))])
    if read_facts(ctx.request_text).internal:
        roles = _internal(roles)
    compliance = ctx.options["compliance"]
    if compliance in ("regulated", "strict"):
        roles.append("policy")
    if compliance == "strict":
        roles += ["private", "siem"]
    if ctx.options["reliability"] == "extreme" and "vpn" not in roles:
        roles = ["global" if role == "edge" else role for role in roles]
        if "global" not in roles:
            roles.insert(0, "global")
    if ctx.revised:
        roles += [role for role in ("private", "policy") if role not in roles]
    catalog = CATALOG[ctx.cloud]
    factor = (
        _RELIABILITY_FACTOR[ctx.options["reliability"]] * _PRIORITY_FACTOR[ctx.options["priority"]]
    )
    services: dict[str, Service] = {}
    for role in dict.fromkeys(roles):
        service = catalog[role]
        if service.category in ("compute", "data"):
            service = replace(service, monthly_usd=round(service.monthly_usd * factor))
        services[role] = service
    return services


def total(services: dict[str, Service]) -> float:
    return float(sum(service.monthly_usd for service in services.values()))


def compute_role(services: dict[str, Service]) -> str:
    """The role that runs the application code in this design."""
    return next(role for role in COMPUTE_ROLES if role in services)
