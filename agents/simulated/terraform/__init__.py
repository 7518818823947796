"""The Terraform coder: four files provisioning the services of the design it was given.

The coder's prompt carries the recommended design (agents/prompts.py, after the
"Recommended design:" line); the services it names, read from its cost table (or, lacking
one, from its text), are looked up in the catalogue, whose last column names each service's
template. The HCL lives in `<cloud>/<template>.tf.tmpl` beside this module, with optional
`.variables.tf.tmpl` and `.outputs.tf.tmpl` companions, so it reads and diffs as Terraform.
A file is the cloud's base (provider, network) followed by one block per service, one blank
line apart. Placeholders are `@name` (string.Template with an `@` delimiter), which leaves
Terraform's own `${...}` interpolation as written. A service with no template (a tenant- or
organisation-level one) is named in the answer as left to be configured outside.
"""

from __future__ import annotations

import re
import string
from functools import cache
from importlib.resources import files

from agents.options import option_label
from agents.prompts import RECOMMEND_RONEI, TERRAFORM_FILES
from agents.simulated.catalog import CATALOG, Service, compose
from agents.simulated.facts import read_facts
from agents.simulated.text import Context, regions, subject


class _HclTemplate(string.Template):
    delimiter = "@"


def _exists(path: str) -> bool:
    return files(__package__).joinpath(f"{path}.tf.tmpl").is_file()


@cache
def _template(path: str) -> _HclTemplate:
    return _HclTemplate(files(__package__).joinpath(f"{path}.tf.tmpl").read_text(encoding="utf-8"))


def _render(paths: list[str], **values: str) -> str:
    """The templates, filled in strictly (a missing value is an error), one blank line apart."""
    return "\n".join(_template(path).substitute(values) for path in paths)


_VARIABLE_BLOCK = re.compile(r'^variable "(\w+)" \{\n.*?^\}\n', re.MULTILINE | re.DOTALL)


def _variables(paths: list[str], **values: str) -> str:
    """The variable blocks of the templates, each name declared once (services may share one)."""
    blocks: dict[str, str] = {}
    for match in _VARIABLE_BLOCK.finditer(_render(paths, **values)):
        blocks.setdefault(match[1], match[0])
    return "\n".join(blocks.values())


_PROVIDERS = {
    "azure": ("azurerm", "hashicorp/azurerm", "~> 4.0"),
    "aws": ("aws", "hashicorp/aws", "~> 5.0"),
    "gcp": ("google", "hashicorp/google", "~> 6.0"),
}
_REGION_VARIABLE = {"azure": "location", "aws": "region", "gcp": "region"}
_COST_ROW = re.compile(r"^\|\s*([^|*\s][^|]*?)\s*\|[^|\n]*\|\s*\$[\d,.]+\s*\|\s*$", re.MULTILINE)


def designed_services(ctx: Context, architect: str) -> list[Service]:
    """The services of the design in the prompt, in catalogue order, each template once.

    The cost table is the design's bill of materials; without one, any catalogue name in
    the text counts (longest first, so "Azure Front Door Premium" is not also "Azure Front
    Door"). A prompt naming no known service gets the architect's usual composition.
    """
    catalog = CATALOG[ctx.cloud]
    rows = set(_COST_ROW.findall(ctx.design_text))
    named: set[str] = set()
    if rows:
        named = {service.name for service in catalog.values() if service.name in rows}
    else:
        text = ctx.design_text
        for service in sorted(catalog.values(), key=lambda s: len(s.name), reverse=True):
            if service.name in text:
                named.add(service.name)
                text = text.replace(service.name, " ")
    chosen = [service for service in catalog.values() if service.name in named]
    if not chosen:
        chosen = list(compose(ctx, architect).values())
    unique: dict[str, Service] = {}
    for service in chosen:
        unique.setdefault(service.terraform or service.name, service)
    return list(unique.values())


def _slug(ctx: Context) -> str:
    name = read_facts(ctx.request_text).name.lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name)[:20].strip("-")
    return slug or "carlos-app"


def terraform_files(ctx: Context, services: list[Service]) -> dict[str, str]:
    """versions.tf, variables.tf, main.tf and outputs.tf provisioning `services`."""
    cloud = ctx.cloud
    provider, source, version = _PROVIDERS[cloud]
    primary, secondary = regions(ctx)
    blocks = [f"{cloud}/{service.terraform}" for service in services if service.terraform]
    internal = read_facts(ctx.request_text).internal
    values = {
        "internal": "true" if internal else "false",
        "public_access": "false" if internal else "true",
        "availability": "REGIONAL" if ctx.options["reliability"] != "normal" else "ZONAL",
        "project_name": _slug(ctx),
        "region_var": _REGION_VARIABLE[cloud],
        "primary": primary,
        "secondary": secondary,
        "reliability": ctx.options["reliability"],
        "compliance": ctx.options["compliance"],
    }
    bodies = {
        "versions.tf": _render(["versions"], provider=provider, source=source, version=version),
        "variables.tf": _variables(
            ["variables", f"{cloud}/variables"]
            + [f"{block}.variables" for block in blocks if _exists(f"{block}.variables")],
            **values,
        ),
        "main.tf": _render([f"{cloud}/main", *blocks], **values),
        "outputs.tf": _render(
            [f"{cloud}/outputs"]
            + [f"{block}.outputs" for block in blocks if _exists(f"{block}.outputs")],
            **values,
        ),
    }
    return {name: bodies[name] for name in TERRAFORM_FILES}


_LOGIN = {
    "azure": "`az login` and `az account set --subscription <id>`",
    "aws": "`aws sso login` (or configure credentials for the target account)",
    "gcp": "`gcloud auth application-default login` and set `project_id` in terraform.tfvars",
}
_SENSITIVE = re.compile(r'^variable "(\w+)" \{[^}]*?sensitive\s*=\s*true', re.MULTILINE)
_REQUIRED = re.compile(r'^variable "(\w+)" \{\n(?:(?!^\}|  default).*\n)*^\}', re.MULTILINE)


def _inputs_step(variables: str) -> str:
    secrets = _SENSITIVE.findall(variables)
    required = [name for name in _REQUIRED.findall(variables) if name not in secrets]
    steps = []
    if required:
        quoted = [f"`{name}`" for name in required]
        names = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
        steps.append(f"Set {names} in terraform.tfvars.")
    if secrets:
        exports = ", ".join(f"`export TF_VAR_{name}=...`" for name in secrets)
        steps.append(f"Pass the secrets from the environment: {exports} (never commit them).")
    else:
        steps.append("No secrets to pass: database passwords are generated and kept by the cloud.")
    return " ".join(steps)


def _names(services: list[Service]) -> str:
    return "; ".join(service.name for service in services)


def terraform(ctx: Context) -> str:
    """The coder's answer: what it provisions, a heading per file with its HCL, the steps."""
    architect = "ronei" if ctx.recommended == RECOMMEND_RONEI else "carlos"
    who = "Ronei's" if architect == "ronei" else "Carlos's"
    services = designed_services(ctx, architect)
    provisioned = [service for service in services if service.terraform]
    outside = [service for service in services if not service.terraform]
    generated = terraform_files(ctx, services)
    blocks = [f"### {name}\n\n```hcl\n{body.strip()}\n```\n" for name, body in generated.items()]
    left_out = (
        [
            f"Configured outside this Terraform, at the tenant or organisation level: "
            f"{_names(outside)}.",
            "",
        ]
        if outside
        else []
    )
    return "\n".join(
        [
            f"## Terraform for {who} design on {option_label('cloud', ctx.cloud)}",
            f"Provisions {subject(ctx)} as recommended, one block per service of the design:",
            *(f"- {service.name}" for service in provisioned),
            "",
            *left_out,
            *blocks,
            "## Deployment steps",
            f"1. Authenticate: {_LOGIN[ctx.cloud]}.",
            f"2. {_inputs_step(generated['variables.tf'])}",
            "3. `terraform init` to download the pinned provider.",
            "4. `terraform plan -out tfplan` and review every change.",
            "5. `terraform apply tfplan`.",
            "6. Verify with `terraform output` and a smoke test against the endpoints.",
            "7. Wire the same steps into CI/CD with remote state and approvals.",
            "",
        ]
    )
