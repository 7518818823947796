"""Who may see a design and who may act on it: Django permissions, never the staff flag alone.

Viewing (the page, its run fragments, both zips, the history of everyone) needs ownership or
`agents.view_design`; acting (answering the questions, retrying) needs ownership or
`agents.change_design`. A design the user may not see is a 404 whether it exists or not; a
design they may see but not act on answers 403 and stays exactly as it was.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from agents.models import Design
from agents.options import DEFAULT_OPTIONS
from tests.agents.pages import add_run, failed_design, finished_design, make_design, make_user

pytestmark = pytest.mark.django_db

WAITING = [{"question": "How many users at peak?", "answer": None}]


def grant(user: Any, *codenames: str) -> Any:
    """The user with the given `agents` permissions, reloaded (permissions are cached)."""
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="agents", codename__in=codenames)
    )
    return type(user).objects.get(pk=user.pk)


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def others_designs() -> tuple[Design, Design, Design]:
    """Mallory's finished, failed and waiting designs."""
    mallory = make_user("mallory")
    failed = failed_design(mallory)
    add_run(failed, "requirements")
    waiting = make_design(mallory, status=Design.Status.AWAITING_ANSWERS, clarifications=WAITING)
    return finished_design(mallory), failed, waiting


def state(design: Design) -> tuple[Any, ...]:
    design.refresh_from_db()
    return design.status, design.attempts, design.clarifications, design.error


def test_staff_status_alone_shows_no_one_elses_design() -> None:
    """Reproduces: staff without permissions answered, retried and downloaded others' designs."""
    finished, failed, waiting = others_designs()
    before = [state(design) for design in (finished, failed, waiting)]
    staff = logged_in(make_user("sam", staff=True))
    own = make_design(make_user("sam-colleague"))  # nobody's design is visible to sam...
    carlos = finished.runs.get(agent="carlos")
    for url in (
        f"/designs/{finished.pk}/",
        f"/designs/{finished.pk}/download/",
        f"/designs/{finished.pk}/terraform.zip",
        f"/designs/{finished.pk}/runs/{carlos.pk}/",
        f"/designs/{own.pk}/",
    ):
        assert staff.get(url).status_code == 404, url
    assert staff.post(f"/designs/{failed.pk}/retry/").status_code == 404
    answer = staff.post(f"/designs/{waiting.pk}/answers/", {"answer_0": "a million"})
    assert answer.status_code == 404
    history = staff.get("/designs/").content.decode()
    assert "No designs yet." in history and "<th>Owner</th>" not in history
    assert [state(design) for design in (finished, failed, waiting)] == before


def test_the_view_permission_shows_everything_and_acts_on_nothing() -> None:
    finished, failed, waiting = others_designs()
    before = [state(design) for design in (finished, failed, waiting)]
    auditor = logged_in(grant(make_user("vera"), "view_design"))  # not even staff
    page = auditor.get(f"/designs/{finished.pk}/")
    assert page.status_code == 200
    assert "Owner: mallory" in page.content.decode()
    carlos = finished.runs.get(agent="carlos")
    for url in (
        f"/designs/{finished.pk}/download/",
        f"/designs/{finished.pk}/terraform.zip",
        f"/designs/{finished.pk}/runs/{carlos.pk}/",
    ):
        assert auditor.get(url).status_code == 200, url
    history = auditor.get("/designs/").content.decode()
    assert "<th>Owner</th>" in history and "All designs" in history
    assert len(re.findall(r"<tr data-design-id=", history)) == 3

    # The pages offer no action they would refuse...
    failed_page = auditor.get(f"/designs/{failed.pk}/").content.decode()
    assert "This design failed" in failed_page
    assert f'action="/designs/{failed.pk}/retry/"' not in failed_page
    assert "only its owner can retry it" in failed_page
    waiting_page = auditor.get(f"/designs/{waiting.pk}/").content.decode()
    assert "How many users at peak?" in waiting_page
    assert 'name="answer_0"' not in waiting_page
    # ...and the actions themselves are refused in words, with nothing changed.
    retry = auditor.post(f"/designs/{failed.pk}/retry/")
    assert retry.status_code == 403
    assert "Only the owner of this design can retry it" in retry.content.decode()
    answer = auditor.post(f"/designs/{waiting.pk}/answers/", {"answer_0": "a million"})
    assert answer.status_code == 403
    assert "Only the owner of this design can answer its questions" in answer.content.decode()
    assert auditor.post(f"/designs/{waiting.pk}/answers/", {"skip": "1"}).status_code == 403
    assert [state(design) for design in (finished, failed, waiting)] == before


def test_staff_with_the_view_permission_see_everyone_but_still_act_on_nothing() -> None:
    _, failed, _ = others_designs()
    before = state(failed)
    staff = logged_in(grant(make_user("sam", staff=True), "view_design"))
    assert staff.get(f"/designs/{failed.pk}/").status_code == 200
    assert staff.post(f"/designs/{failed.pk}/retry/").status_code == 403
    assert state(failed) == before


def test_a_superuser_sees_and_may_act_on_every_design() -> None:
    _, failed, waiting = others_designs()
    root = make_user("root")
    root.is_superuser = True
    root.save()
    admin = logged_in(root)
    page = admin.get(f"/designs/{waiting.pk}/").content.decode()
    assert 'name="answer_0"' in page and "Owner: mallory" in page
    assert (
        f'action="/designs/{failed.pk}/retry/"'
        in admin.get(f"/designs/{failed.pk}/").content.decode()
    )


def test_the_owner_needs_no_permission() -> None:
    owner = make_user("olga")
    waiting = make_design(owner, status=Design.Status.AWAITING_ANSWERS, clarifications=WAITING)
    client = logged_in(owner)
    page = client.get(f"/designs/{waiting.pk}/").content.decode()
    assert 'name="answer_0"' in page and "Owner:" not in page
    response = client.post(f"/designs/{waiting.pk}/answers/", {"answer_0": "x" * 1001})
    assert response.status_code == 400  # reached the form: the owner may answer


@pytest.mark.django_db(transaction=True)
async def test_the_change_permission_lets_another_user_answer_and_start_a_design(
    async_client: Any, carlos_registry: Any
) -> None:
    from asgiref.sync import sync_to_async

    from agents import tasks

    mallory = await sync_to_async(make_user)("mallory")
    waiting = await Design.objects.acreate(
        owner=mallory,
        request_text="A booking site for 40 yoga studios",
        options=dict(DEFAULT_OPTIONS),
        status=Design.Status.AWAITING_ANSWERS,
        clarifications=WAITING,
    )
    operator = await sync_to_async(lambda: grant(make_user("otto"), "change_design"))()
    await async_client.aforce_login(operator)
    page = (await async_client.get(f"/designs/{waiting.pk}/")).content.decode()
    assert 'name="answer_0"' in page  # change implies view, as in Django's admin
    response = await async_client.post(f"/designs/{waiting.pk}/answers/", {"answer_0": "50k"})
    assert response.status_code == 302
    task = tasks.running_task(waiting.pk)
    assert task is not None
    await task
    design = await Design.objects.aget(pk=waiting.pk)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert design.owner_id == mallory.pk and design.clarifications[0]["answer"] == "50k"
