"""Builders for the page tests: users, designs and runs as the pipeline leaves them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.utils import timezone

from agents.models import AgentRun, Design
from agents.options import DEFAULT_OPTIONS

User = get_user_model()

TERRAFORM_ANSWER = """Here is the Terraform.

### versions.tf
```hcl
terraform {
  required_version = ">= 1.6"
}
```

### variables.tf
```hcl
variable "location" { default = "westeurope" }
```

### main.tf
```hcl
resource "azurerm_resource_group" "app" {
  name     = "rg-app"
  location = var.location
}
```

### outputs.tf
```hcl
output "resource_group" { value = azurerm_resource_group.app.name }
```

## Deployment steps
1. `terraform init`
2. `terraform apply`
"""

SECURITY_REPORT = {
    "carlos": {
        "score": 82,
        "findings": [
            {
                "severity": "high",
                "title": "Public SQL endpoint",
                "recommendation": "Use a private endpoint",
            }
        ],
        "frameworks": ["ISO 27001"],
        "controls": ["WAF", "Key Vault"],
        "encryption_at_rest": True,
        "encryption_in_transit": True,
        "network_segmentation": True,
    },
    "ronei": {
        "score": 74,
        "findings": [],
        "frameworks": ["SOC 2"],
        "controls": ["Network policies"],
        "encryption_at_rest": True,
        "encryption_in_transit": False,
        "network_segmentation": False,
    },
    "summary": "Carlos's design is **stronger** on network isolation.",
}


def make_user(username: str, *, staff: bool = False) -> Any:
    return User.objects.create_user(username, password="a-long-test-password", is_staff=staff)


def make_design(owner: Any, text: str = "A web shop for 10k users", **fields: Any) -> Design:
    fields.setdefault("options", dict(DEFAULT_OPTIONS))
    return Design.objects.create(owner=owner, request_text=text, **fields)


def add_run(design: Design, agent: str, text: str = "", **fields: Any) -> AgentRun:
    now = timezone.now()
    fields.setdefault("status", AgentRun.Status.SUCCEEDED)
    fields.setdefault("attempt", design.attempts)
    return AgentRun.objects.create(
        design=design,
        agent=agent,
        pool="main",
        model="gpt-4o",
        started_at=now - timedelta(seconds=3),
        finished_at=now,
        ttft_ms=120.0,
        wait_ms=1.5,
        tokens_in=300,
        tokens_out=900,
        output_text=text,
        **fields,
    )


def finished_design(owner: Any) -> Design:
    """A succeeded design with an output for every agent, as the pipeline leaves it."""
    design = make_design(
        owner,
        status=Design.Status.SUCCEEDED,
        attempts=1,
        verdict="APPROVED",
        recommendation="CARLOS",
    )
    add_run(design, "requirements", "## Requirements\n- 10k users")
    add_run(
        design,
        "carlos",
        "# Carlos design\n\n```mermaid\nflowchart TD\n  A[Users] --> B[Front Door]\n```\n"
        "<script>alert('x')</script>",
    )
    add_run(design, "ronei", "# Ronei design\nAKS everywhere.")
    add_run(design, "security", "{}", output_json=SECURITY_REPORT)
    add_run(design, "auditor", "APPROVED\n\nSolid.")
    add_run(design, "recommender", "RECOMMEND: CARLOS")
    add_run(design, "terraform", TERRAFORM_ANSWER)
    return design


def failed_design(owner: Any, error: str = "boom", **fields: Any) -> Design:
    """A design that failed at its first attempt, with `error`."""
    return make_design(owner, status=Design.Status.FAILED, attempts=1, error=error, **fields)


def valid_form(**overrides: str) -> dict[str, str]:
    return {"request_text": "An internal wiki for 200 staff", **DEFAULT_OPTIONS, **overrides}


async def logged_in(async_client: Any, username: str = "alice") -> Any:
    """A new user, logged in on the async test client."""
    user = await User.objects.acreate_user(username, password="a-long-test-password")
    await async_client.aforce_login(user)
    return user
