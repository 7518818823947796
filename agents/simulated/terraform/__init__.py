"""The Terraform coder: four files for the recommended design, rendered from template files.

The HCL lives in `<cloud>/*.tf.tmpl` beside this module (common files at the top), so it reads
and diffs as Terraform. Placeholders are `@name` (string.Template with an `@` delimiter), which
leaves Terraform's own `${...}` interpolation as written. A file is the blocks it is built from,
one blank line apart: the cloud's base, the architect's compute, the workload's messaging.
"""

from __future__ import annotations

import re
import string
from functools import cache
from importlib.resources import files

from agents.options import option_label
from agents.prompts import RECOMMEND_RONEI, TERRAFORM_FILES
from agents.simulated.text import Context, regions, subject, workload


class _HclTemplate(string.Template):
    delimiter = "@"


@cache
def _template(path: str) -> _HclTemplate:
    return _HclTemplate(files(__package__).joinpath(path).read_text(encoding="utf-8"))


def _render(paths: list[str], **values: str) -> str:
    """The templates, filled in strictly (a missing value is an error), one blank line apart."""
    return "\n".join(_template(f"{path}.tf.tmpl").substitute(values) for path in paths)


_PROVIDERS = {
    "azure": ("azurerm", "hashicorp/azurerm", "~> 4.0"),
    "aws": ("aws", "hashicorp/aws", "~> 5.0"),
    "gcp": ("google", "hashicorp/google", "~> 6.0"),
}
_REGION_VARIABLE = {"azure": "location", "aws": "region", "gcp": "region"}
_EXTRA_VARIABLES = {"azure": ["azure/variables"], "aws": [], "gcp": ["gcp/variables"]}
# The messaging service each cloud's template adds for a workload; web apps need none.
_MESSAGING = {
    ("azure", "data"): "eventhub",
    ("azure", "events"): "servicebus",
    ("aws", "data"): "kinesis",
    ("aws", "events"): "sqs",
    ("gcp", "data"): "pubsub",
    ("gcp", "events"): "pubsub",
}


def _slug(ctx: Context) -> str:
    words = [re.sub(r"[^a-z0-9]", "", w.lower()) for w in ctx.keywords[:2]]
    slug = "-".join(w for w in words if w)[:20].strip("-")
    return slug or "carlos-app"


def terraform_files(ctx: Context, architect: str) -> dict[str, str]:
    """versions.tf, variables.tf, main.tf and outputs.tf for the architect's design."""
    cloud = ctx.cloud
    provider, source, version = _PROVIDERS[cloud]
    primary, secondary = regions(ctx)
    messaging = _MESSAGING.get((cloud, workload(ctx)))
    bodies = {
        "versions.tf": _render(["versions"], provider=provider, source=source, version=version),
        "variables.tf": _render(
            ["variables", *_EXTRA_VARIABLES[cloud]],
            project_name=_slug(ctx),
            region_var=_REGION_VARIABLE[cloud],
            primary=primary,
            secondary=secondary,
            reliability=ctx.options["reliability"],
            compliance=ctx.options["compliance"],
        ),
        "main.tf": _render(
            [f"{cloud}/main", f"{cloud}/{architect}"]
            + ([f"{cloud}/{messaging}"] if messaging else []),
            availability="REGIONAL" if ctx.options["reliability"] != "normal" else "ZONAL",
        ),
        "outputs.tf": _render([f"{cloud}/{architect}.outputs", f"{cloud}/outputs"]),
    }
    return {name: bodies[name] for name in TERRAFORM_FILES}


_LOGIN = {
    "azure": "`az login` and `az account set --subscription <id>`",
    "aws": "`aws sso login` (or configure credentials for the target account)",
    "gcp": "`gcloud auth application-default login` and set `project_id` in terraform.tfvars",
}


def terraform(ctx: Context) -> str:
    """The coder's answer: a heading per file with its HCL, then the deployment steps."""
    architect = "ronei" if ctx.recommended == RECOMMEND_RONEI else "carlos"
    who = "Ronei's" if architect == "ronei" else "Carlos's"
    secret_step = (
        "Export the database password: `export TF_VAR_sql_admin_password=...` (never commit it)."
        if ctx.cloud == "azure"
        else "The database password is generated and stored by the provider; nothing to commit."
    )
    blocks = [
        f"### {name}\n\n```hcl\n{body.strip()}\n```\n"
        for name, body in terraform_files(ctx, architect).items()
    ]
    return "\n".join(
        [
            f"## Terraform for {who} design on {option_label('cloud', ctx.cloud)}",
            f"Implements {subject(ctx)} as recommended.",
            "",
            *blocks,
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
