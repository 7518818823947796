"""The web pages through Django's test client: forms, limits, access, history and downloads."""

from __future__ import annotations

import io
import re
import zipfile
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from agents.models import AgentRun, Design, DesignRetry
from agents.options import DEFAULT_OPTIONS
from tests.agents.pages import (
    add_run,
    failed_design,
    finished_design,
    logged_in,
    make_design,
    make_user,
    valid_form,
)

pytestmark = pytest.mark.django_db

User = get_user_model()


# --- login ----------------------------------------------------------------------------------


def test_pages_require_login(client: Client) -> None:
    for url in ("/", "/designs/", "/designs/1/", "/designs/1/download/"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=")


def test_login_page_logs_in_and_logout_is_post_only(client: Client) -> None:
    make_user("bob")
    page = client.get("/accounts/login/")
    assert page.status_code == 200
    assert b'name="password"' in page.content
    bad = client.post("/accounts/login/", {"username": "bob", "password": "wrong"})
    assert bad.status_code == 401  # carlos/login.py: a refused login says so in its status
    assert b"Please enter a correct username and password" in bad.content
    good = client.post("/accounts/login/", {"username": "bob", "password": "a-long-test-password"})
    assert good.status_code == 302
    assert client.get("/").status_code == 200
    assert client.get("/accounts/logout/").status_code == 405
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/").status_code == 302


# --- the request form -----------------------------------------------------------------------


def test_form_states_the_limit_and_offers_every_option(
    client: Client, alice: Any, settings
) -> None:
    settings.DESIGN_MAX_CHARS = 1234
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "up to 1,234 characters" in html
    assert 'maxlength="1234"' in html
    for key in DEFAULT_OPTIONS:
        assert f'<select name="{key}"' in html
    assert "Data pipeline" in html and "Extreme (multi-region)" in html
    assert "Ask me clarifying questions first" in html
    assert 'name="csrfmiddlewaretoken"' in html


def test_a_blank_forms_fields_are_rendered_once_and_a_bound_forms_each_time(
    client: Client, alice: Any, settings
) -> None:
    """The widgets were most of the form page's rendering (issue 16): an unbound form's are
    the same for everyone, so they are kept; a posted form shows its own values and errors."""
    from django.test.signals import template_rendered

    from agents.views import _blank_form_fields

    _blank_form_fields.cache_clear()
    rendered: list[str] = []

    def count(sender: Any, template: Any, **kwargs: Any) -> None:
        rendered.append(template.name)

    template_rendered.connect(count)
    try:
        first, second = client.get("/").content.decode(), client.get("/").content.decode()
        assert rendered.count("agents/_design_form_fields.html") == 1
        fields = re.compile(r'<div class="options-grid">.*<div class="actions">', re.DOTALL)
        assert fields.search(first)[0] == fields.search(second)[0]  # type: ignore[index]
        settings.DESIGN_MAX_CHARS = 77  # a new limit shows at once
        assert 'maxlength="77"' in client.get("/").content.decode()
        posted = client.post("/", valid_form(request_text="", cloud="gcp"))
        assert posted.status_code == 400
        assert rendered.count("agents/_design_form_fields.html") == 3
        assert '<option value="gcp" selected>' in posted.content.decode()
    finally:
        template_rendered.disconnect(count)


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_request_is_rejected_with_a_message(client: Client, alice: Any, text: str) -> None:
    response = client.post("/", valid_form(request_text=text))
    assert response.status_code == 400
    assert b"the request cannot be empty" in response.content
    assert not Design.objects.exists()


def test_request_over_the_limit_is_rejected(client: Client, alice: Any, settings) -> None:
    settings.DESIGN_MAX_CHARS = 50
    response = client.post("/", valid_form(request_text="x" * 51))
    assert response.status_code == 400
    assert "Your request is 51 characters long; the limit is 50." in response.content.decode()
    assert not Design.objects.exists()


def test_crlf_line_ends_count_as_one_character(client: Client, alice: Any, settings) -> None:
    settings.DESIGN_MAX_CHARS = 10
    settings.DESIGNS_PER_HOUR = 1
    make_design(alice)  # at the hourly limit, so a valid form stops at the 429 without a run
    response = client.post("/", valid_form(request_text="ab\r\ncd\r\nef\r\ngh"))  # 11 with LF
    assert response.status_code == 400
    response = client.post("/", valid_form(request_text="ab\r\ncd\r\nefg"))  # 10 with LF
    assert response.status_code == 429


@pytest.mark.parametrize(
    ("field", "value"), [("cloud", "oracle"), ("reliability", "five-nines"), ("scenario", "")]
)
def test_unknown_option_values_are_rejected(
    client: Client, alice: Any, field: str, value: str
) -> None:
    response = client.post("/", valid_form(**{field: value}))
    assert response.status_code == 400
    html = response.content.decode()
    assert "Select a valid choice" in html or "This field is required" in html
    assert not Design.objects.exists()


def test_post_without_csrf_token_is_forbidden(alice: Any) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    response = browser.post("/", valid_form(request_text=""))
    assert response.status_code == 403
    # With the token from the form the same post reaches the view (400: empty request).
    browser.get("/")
    token = browser.cookies["csrftoken"].value
    response = browser.post("/", valid_form(request_text="") | {"csrfmiddlewaretoken": token})
    assert response.status_code == 400


def test_wrong_methods_are_refused(client: Client, alice: Any) -> None:
    design = make_design(alice)
    assert client.put("/").status_code == 405
    assert client.post(f"/designs/{design.pk}/").status_code == 405
    assert client.delete(f"/designs/{design.pk}/").status_code == 405
    assert client.get(f"/designs/{design.pk}/retry/").status_code == 405
    assert client.get(f"/designs/{design.pk}/answers/").status_code == 405
    assert client.post(f"/designs/{design.pk}/download/").status_code == 405


# --- rate limit -----------------------------------------------------------------------------


def _created(design: Design, ago: timedelta) -> None:
    Design.objects.filter(pk=design.pk).update(created_at=timezone.now() - ago)


def test_rate_limit_answers_429_with_the_time_of_the_next_slot(
    client: Client, alice: Any, settings
) -> None:
    settings.DESIGNS_PER_HOUR = 2
    _created(make_design(alice), timedelta(hours=2))  # outside the window: does not count
    oldest = make_design(alice)
    _created(oldest, timedelta(minutes=50))
    _created(make_design(alice), timedelta(minutes=5))
    response = client.post("/", valid_form())
    assert response.status_code == 429
    oldest.refresh_from_db()
    free_at = oldest.created_at + timedelta(hours=1)
    html = response.content.decode()
    assert "limit of 2 designs per hour" in html
    assert f"{free_at:%H:%M} UTC" in html
    assert "in about 10 minutes" in html
    assert 540 <= int(response["Retry-After"]) <= 601
    assert Design.objects.count() == 3
    # The form page itself says so before the user types anything.
    page = client.get("/")
    assert page.status_code == 200
    assert f"{free_at:%H:%M} UTC" in page.content.decode()


def test_rate_limit_is_per_user(client: Client, alice: Any, settings) -> None:
    settings.DESIGNS_PER_HOUR = 1
    make_design(make_user("carol"))
    page = client.get("/")
    assert "You can submit again" not in page.content.decode()


def test_the_form_says_how_much_of_the_hourly_allowance_is_used(
    client: Client, alice: Any, settings
) -> None:
    settings.DESIGNS_PER_HOUR = 4
    assert "0 of 4 used this hour" in client.get("/").content.decode()
    _created(make_design(alice), timedelta(hours=2))  # outside the window: does not count
    make_design(alice)
    failed = make_design(alice, status=Design.Status.FAILED, attempts=1)
    DesignRetry.objects.create(design=failed, requested_by=alice)  # a retry is an attempt too
    make_design(make_user("carol"))  # someone else's
    assert "3 of 4 used this hour" in client.get("/").content.decode()


def test_a_retry_over_the_hourly_limit_is_refused_with_the_time_of_the_next_slot(
    client: Client, alice: Any, settings
) -> None:
    settings.DESIGNS_PER_HOUR = 1
    failed = make_design(alice, status=Design.Status.FAILED, attempts=1, error="boom")
    response = client.post(f"/designs/{failed.pk}/retry/")
    assert response.status_code == 429
    assert 3500 <= int(response["Retry-After"]) <= 3601
    html = response.content.decode()
    assert "limit of 1 design per hour" in html and "a retry counts as a design" in html
    assert 'id="rate-limit"' in html
    failed.refresh_from_db()
    assert (failed.status, failed.attempts, failed.error) == (Design.Status.FAILED, 1, "boom")
    assert not DesignRetry.objects.exists()


# --- the design page ------------------------------------------------------------------------


def test_owner_sees_every_tab_rendered_and_sanitised(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    response = client.get(f"/designs/{design.pk}/")
    assert response.status_code == 200
    html = response.content.decode()
    for label in (
        "Requirements", "Carlos", "Ronei", "Security", "Cost", "Reliability", "Audit",
        "Recommendation", "Terraform", "Timeline",
    ):  # fmt: skip
        assert f">{label}\n" in html or f"</span>{label}" in html or f">{label}<" in html
    assert "<h3>Carlos design</h3>" in html  # under the tab's h2: the page has one h1
    assert '<pre class="mermaid-source">' in html
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    assert "Audit: APPROVED" in html and "Recommended: Carlos" in html
    # Analyst JSON as a readable summary plus the raw JSON.
    assert "Public SQL endpoint" in html and ">82</span>/100" in html
    assert "Raw JSON" in html and "&quot;encryption_at_rest&quot;: true" in html
    assert "<strong>stronger</strong>" in html
    # Terraform files, each copyable, and the zip link.
    assert "main.tf" in html and "azurerm_resource_group" in html
    assert f"/designs/{design.pk}/terraform.zip" in html
    # The timeline lists every run with its measurements.
    assert html.count("<tr data-key=") == 7
    assert "120 ms" in html


def grant_view(user: Any) -> Any:
    """The user with `agents.view_design` (what lets staff see everyone's designs)."""
    user.user_permissions.add(Permission.objects.get(codename="view_design"))
    return User.objects.get(pk=user.pk)  # permissions are cached per instance


def test_other_users_design_is_404_and_the_view_permission_sees_it(
    client: Client, alice: Any
) -> None:
    mallory_design = make_design(make_user("mallory"))
    assert client.get(f"/designs/{mallory_design.pk}/").status_code == 404
    assert client.get(f"/designs/{mallory_design.pk}/download/").status_code == 404
    assert client.post(f"/designs/{mallory_design.pk}/retry/").status_code == 404
    assert client.get("/designs/999999/").status_code == 404
    assert client.get("/designs/abc/").status_code == 404  # non-integer ids do not route
    staff = Client()
    staff.force_login(grant_view(make_user("sam", staff=True)))
    page = staff.get(f"/designs/{mallory_design.pk}/")
    assert page.status_code == 200
    assert "Owner: mallory" in page.content.decode()


def test_run_fragment_is_sanitised_and_scoped_to_the_design(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    carlos = design.runs.get(agent="carlos")
    response = client.get(f"/designs/{design.pk}/runs/{carlos.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert body["agent"] == "carlos" and body["status"] == "succeeded"
    assert "<h3>Carlos design</h3>" in body["html"]
    assert "<script" not in body["html"]
    other = make_design(alice)
    assert client.get(f"/designs/{other.pk}/runs/{carlos.pk}/").status_code == 404
    stranger = Client()
    stranger.force_login(make_user("eve"))
    assert stranger.get(f"/designs/{design.pk}/runs/{carlos.pk}/").status_code == 404


def test_failed_design_shows_the_cause_and_a_retry_button(client: Client, alice: Any) -> None:
    design = failed_design(alice, "APIConnectionError: Connection error.", failed_agent="security")
    add_run(design, "security", status=AgentRun.Status.FAILED, error="APIConnectionError")
    html = client.get(f"/designs/{design.pk}/").content.decode()
    assert "This design failed" in html and "at Security analyst" in html
    assert "APIConnectionError: Connection error." in html
    assert f'action="/designs/{design.pk}/retry/"' in html
    assert 'id="design-failure" class="notice bad" role="alert">' in html  # not hidden


def test_retry_of_a_design_that_did_not_fail_is_a_conflict(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    response = client.post(f"/designs/{design.pk}/retry/")
    assert response.status_code == 409
    assert b"Only a failed, interrupted or cancelled design can be retried" in response.content
    design.refresh_from_db()
    assert design.status == Design.Status.SUCCEEDED


def test_answers_to_a_design_not_waiting_are_a_conflict(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    response = client.post(f"/designs/{design.pk}/answers/", {"skip": "1"})
    assert response.status_code == 409


def test_design_waiting_for_answers_shows_the_questions(client: Client, alice: Any) -> None:
    design = make_design(
        alice,
        status=Design.Status.AWAITING_ANSWERS,
        clarifications=[
            {"question": "How many users at peak?", "answer": None},
            {"question": "Which regions?", "answer": None},
        ],
    )
    html = client.get(f"/designs/{design.pk}/").content.decode()
    assert "How many users at peak?" in html and "Which regions?" in html
    assert 'name="answer_0"' in html and 'name="answer_1"' in html
    assert 'name="skip"' in html


def test_too_long_answer_is_rejected_on_the_page(client: Client, alice: Any) -> None:
    design = make_design(
        alice,
        status=Design.Status.AWAITING_ANSWERS,
        clarifications=[{"question": "Budget?", "answer": None}],
    )
    response = client.post(f"/designs/{design.pk}/answers/", {"answer_0": "x" * 1001})
    assert response.status_code == 400
    assert b"Ensure this value has at most 1000 characters" in response.content
    design.refresh_from_db()
    assert design.status == Design.Status.AWAITING_ANSWERS


# --- history --------------------------------------------------------------------------------


def test_history_lists_own_designs_newest_first(client: Client, alice: Any) -> None:
    first = make_design(alice, "first request")
    second = make_design(
        alice, "second request", status=Design.Status.SUCCEEDED, verdict="APPROVED"
    )
    _created(first, timedelta(minutes=30))
    make_design(make_user("dave"), "dave's private request")
    html = client.get("/designs/").content.decode()
    assert "dave&#x27;s private request" not in html and "dave's private request" not in html
    assert html.index("second request") < html.index("first request")
    assert f'data-design-id="{second.pk}"' in html
    assert "APPROVED" in html
    assert "<th>Owner</th>" not in html


def test_history_with_the_view_permission_shows_everyone_with_owner_column(alice: Any) -> None:
    make_design(alice, "alice's request")
    make_design(make_user("dave"), "dave's request")
    staff = Client()
    staff.force_login(grant_view(make_user("sam", staff=True)))
    html = staff.get("/designs/").content.decode()
    assert "<th>Owner</th>" in html
    assert "alice&#x27;s request" in html and "dave&#x27;s request" in html


def test_history_is_paginated(client: Client, alice: Any) -> None:
    designs = [make_design(alice, f"request number {index}") for index in range(25)]
    page_one = client.get("/designs/").content.decode()
    assert page_one.count("<tr data-design-id=") == 20
    assert "Page 1 of 2" in page_one and "?page=2" in page_one
    page_two = client.get("/designs/?page=2").content.decode()
    assert page_two.count("<tr data-design-id=") == 5
    assert f'data-design-id="{designs[0].pk}"' in page_two  # the oldest is last
    assert client.get("/designs/?page=abc").status_code == 200  # falls back to page 1


# --- downloads ------------------------------------------------------------------------------


def _zip(response: Any) -> zipfile.ZipFile:
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert "attachment;" in response["Content-Disposition"]
    return zipfile.ZipFile(io.BytesIO(response.content))


def test_terraform_zip_holds_the_four_files(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    archive = _zip(client.get(f"/designs/{design.pk}/terraform.zip"))
    assert sorted(archive.namelist()) == [
        "terraform/main.tf",
        "terraform/outputs.tf",
        "terraform/variables.tf",
        "terraform/versions.tf",
    ]
    assert 'resource "azurerm_resource_group" "app"' in archive.read("terraform/main.tf").decode()


def test_terraform_zip_without_terraform_is_404(client: Client, alice: Any) -> None:
    assert client.get(f"/designs/{make_design(alice).pk}/terraform.zip").status_code == 404


def test_download_package_has_every_output(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    archive = _zip(client.get(f"/designs/{design.pk}/download/"))
    names = archive.namelist()
    folder = names[0].split("/")[0]
    assert folder.startswith(f"design-{design.pk}-a-web-shop")
    expected = {
        "README.md",
        "01-requirements.md",
        "02-carlos.md",
        "03-ronei.md",
        "04-security.json",
        "07-auditor.md",
        "08-recommender.md",
        "09-terraform.md",
        "terraform/main.tf",
        "terraform/variables.tf",
        "terraform/outputs.tf",
        "terraform/versions.tf",
    }
    assert {name.removeprefix(f"{folder}/") for name in names} == expected
    readme = archive.read(f"{folder}/README.md").decode()
    assert "A web shop for 10k users" in readme
    assert "Audit verdict: APPROVED" in readme and "Recommendation: Carlos" in readme
    assert re.search(r"\| carlos \| 0 \| main \| gpt-4o \|", readme)
    assert "flowchart TD" in archive.read(f"{folder}/02-carlos.md").decode()
    assert archive.read(f"{folder}/04-security.json").decode().count('"score"') == 2


# --- hardening ------------------------------------------------------------------------------


def test_pages_carry_a_content_security_policy(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    policy = client.get(f"/designs/{design.pk}/")["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["script-src"] == "'self'"  # no inline script, no CDN
    assert directives["object-src"] == "'none'"
    assert directives["connect-src"] == "'self'"


async def _asgi_get(path: str) -> tuple[int, bytes]:
    """GET through the project's ASGI application (body parts may omit `body`, per ASGI)."""
    from asgiref.testing import ApplicationCommunicator

    from carlos.asgi import application

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "path": path,
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(timeout=10)
    body = b""
    while True:
        part = await communicator.receive_output(timeout=10)
        body += part.get("body", b"")
        if not part.get("more_body", False):
            break
    await communicator.wait(timeout=10)
    return start["status"], body


async def test_static_files_are_served_by_the_asgi_application() -> None:
    """Daphne serves no static files: the ASGI app itself must serve CSS, JS and mermaid."""
    for path, marker in (
        ("/static/carlos/carlos.css", b"--accent"),
        ("/static/carlos/carlos.js", b"design-data"),
        ("/static/vendor/mermaid/mermaid.min.js", b"securityLevel"),
    ):
        status, body = await _asgi_get(path)
        assert status == 200, path
        assert marker in body, path
    status, _ = await _asgi_get("/static/../carlos/settings.py")
    assert status == 404


# --- the user controls their designs (cancel, delete, place in line, drain) -------------------


def test_cancel_and_delete_need_the_owner_csrf_and_the_right_state(alice: Any) -> None:
    design = make_design(alice, status=Design.Status.QUEUED)
    checked = Client(enforce_csrf_checks=True)
    checked.force_login(alice)
    assert checked.post(f"/designs/{design.pk}/cancel/").status_code == 403  # no CSRF token
    stranger = Client()
    stranger.force_login(make_user("eve"))
    assert stranger.post(f"/designs/{design.pk}/cancel/").status_code == 404
    vera = make_user("vera")
    vera.user_permissions.add(Permission.objects.get(codename="view_design"))
    viewer = Client()
    viewer.force_login(vera)
    assert viewer.post(f"/designs/{design.pk}/cancel/").status_code == 403
    assert viewer.post(f"/designs/{design.pk}/delete/").status_code == 403
    design.refresh_from_db()
    assert design.status == Design.Status.QUEUED

    owner = Client()
    owner.force_login(alice)
    assert owner.get(f"/designs/{design.pk}/cancel/").status_code == 405
    assert owner.post(f"/designs/{design.pk}/delete/").status_code == 409  # cancel it first
    assert owner.post(f"/designs/{design.pk}/cancel/").status_code == 302
    design.refresh_from_db()
    assert design.status == Design.Status.CANCELLED and design.finished_at is not None
    again = owner.post(f"/designs/{design.pk}/cancel/")
    assert again.status_code == 409 and b"already finished" in again.content
    html = owner.get(f"/designs/{design.pk}/").content.decode()
    assert "This design was cancelled" in html and f'action="/designs/{design.pk}/retry/"' in html

    response = owner.post(f"/designs/{design.pk}/delete/")
    assert response.status_code == 302 and response["Location"] == "/designs/"
    assert not Design.objects.filter(pk=design.pk).exists()


def test_deleting_a_finished_design_removes_its_runs(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    html = client.get(f"/designs/{design.pk}/").content.decode()
    assert f'action="/designs/{design.pk}/delete/"' in html
    assert client.post(f"/designs/{design.pk}/delete/").status_code == 302
    assert not AgentRun.objects.filter(design_id=design.pk).exists()
    assert client.get(f"/designs/{design.pk}/").status_code == 404


def test_a_queued_design_shows_its_place_in_line(client: Client, alice: Any) -> None:
    make_design(alice, status=Design.Status.QUEUED)
    second = make_design(alice, status=Design.Status.QUEUED)
    html = client.get(f"/designs/{second.pk}/").content.decode()
    assert '<span id="queue-place" class="muted small">2 in line</span>' in html


def test_a_stopped_agent_shows_the_text_it_had_written(client: Client, alice: Any) -> None:
    design = make_design(alice, status=Design.Status.QUEUED, attempts=1)
    add_run(
        design,
        "carlos",
        "# Carlos design\n\nThe front door takes",
        status=AgentRun.Status.STOPPED,
        error="stopped before it finished",
    )
    html = client.get(f"/designs/{design.pk}/").content.decode()
    assert "This agent was stopped before it finished" in html
    assert "The front door takes" in html and "partial" in html
    assert 'class="dot stopped"' in html


@pytest.mark.django_db(transaction=True)
async def test_a_draining_server_refuses_new_designs_with_503_and_retry_after(
    async_client: Any, carlos_registry: Any
) -> None:
    from agents import leases

    await logged_in(async_client)
    leases.begin_draining()
    try:
        response = await async_client.post("/", valid_form())
    finally:
        leases.end_draining()
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert not await Design.objects.aexists()
    assert (await async_client.post("/", valid_form())).status_code == 302


def test_staff_with_the_delete_permission_delete_ended_designs_in_the_admin() -> None:
    owner = make_user("olivia")
    ended = finished_design(owner)
    running = make_design(owner, status=Design.Status.RUNNING)
    staff = make_user("sam", staff=True)
    admin = Client()
    admin.force_login(staff)
    assert admin.get(f"/admin/agents/design/{ended.pk}/delete/").status_code == 403
    for codename in ("view_design", "delete_design"):
        staff.user_permissions.add(Permission.objects.get(codename=codename))
    assert admin.get(f"/admin/agents/design/{running.pk}/delete/").status_code == 403
    page = admin.get(f"/admin/agents/design/{ended.pk}/delete/")
    assert page.status_code == 200 and b"Agent run" in page.content
    response = admin.post(f"/admin/agents/design/{ended.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Design.objects.filter(pk=ended.pk).exists()
    assert not AgentRun.objects.filter(design_id=ended.pk).exists()
    # A bulk delete that includes a design in progress deletes nothing.
    again = finished_design(owner)
    bulk = {"action": "delete_selected", "_selected_action": [again.pk, running.pk], "post": "yes"}
    assert admin.post("/admin/agents/design/", bulk).status_code == 403
    assert Design.objects.count() == 2
    bulk["_selected_action"] = [again.pk]
    assert admin.post("/admin/agents/design/", bulk).status_code == 302
    assert list(Design.objects.values_list("pk", flat=True)) == [running.pk]
