"""What people read names an agent by its label ("Carlos (lead architect)"), never by its key
("carlos"), which stays for machines (`Design.failed_agent`, `AgentRun.agent`, the log).

Reproduces (issue 15): "This design failed at the carlos agent", "(last at the carlos agent)"
in a design's error, "carlos: ..." as an agent failure's text.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from agents.events import live_design
from agents.models import AgentRun, Design
from agents.pipeline import AgentFailed
from agents.tasks import DesignSupervisor
from tests.agents.pages import failed_design, make_design, make_user

LABEL = "Carlos (lead architect)"


def test_an_agent_failure_names_the_agent_by_its_label() -> None:
    failure = AgentFailed("carlos", "the model endpoint timed out")
    assert str(failure) == f"{LABEL}: the model endpoint timed out"
    assert failure.agent == "carlos"  # the key, for machines


@pytest.mark.django_db
def test_the_failure_notice_names_the_agent_by_its_label() -> None:
    owner = make_user("ada")
    for status, title in (
        (Design.Status.FAILED, "This design failed"),
        (Design.Status.CANCELLED, "This design was cancelled"),
    ):
        design = make_design(owner, status=status, error="boom", failed_agent="carlos")
        html = live_design(design).failure_html  # what the page shows and the socket sends
        assert f'{title}</strong><span id="failure-agent"> at {LABEL}</span>.' in html
        assert "carlos agent" not in html


@pytest.mark.django_db
def test_the_design_page_names_the_failed_agent_by_its_label(client: Client) -> None:
    owner = make_user("ada")
    client.force_login(owner)
    design = failed_design(owner, "RateLimited: ...", failed_agent="cost")
    html = client.get(f"/designs/{design.pk}/").content.decode()
    assert 'This design failed</strong><span id="failure-agent"> at Cost analyst' in html
    assert "cost agent" not in html


@pytest.mark.django_db(transaction=True)
async def test_a_design_given_up_after_crashes_names_the_last_agent_by_its_label(
    carlos_registry: Any, owner: Any, settings: Any
) -> None:
    settings.DESIGN_MAX_TAKEOVERS = 2
    design = await Design.objects.acreate(
        owner=owner,
        request_text="A web shop for 10k users",
        status=Design.Status.RUNNING,
        attempts=1,
        takeovers=2,
        lease_owner="a-dead-server:1",
        lease_expires_at=timezone.now() - timedelta(seconds=5),
    )
    await AgentRun.objects.acreate(
        design=design, agent="carlos", pool="main", model="gpt-4o", status="stopped"
    )
    await DesignSupervisor().sweep()
    design = await Design.objects.aget(pk=design.pk)
    assert (design.status, design.failed_agent) == (Design.Status.FAILED, "carlos")
    assert f"stopped 3 times while it ran, the last time at {LABEL};" in design.error
