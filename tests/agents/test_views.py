"""The web pages through Django's test client: forms, limits, access, history and downloads."""

from __future__ import annotations

import asyncio
import io
import logging
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

pytestmark = pytest.mark.django_db

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


@pytest.fixture
def alice(client: Client) -> Any:
    user = make_user("alice")
    client.force_login(user)
    return user


def valid_form(**overrides: str) -> dict[str, str]:
    return {"request_text": "An internal wiki for 200 staff", **DEFAULT_OPTIONS, **overrides}


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
    assert "<h1>Carlos design</h1>" in html
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
    assert "<h1>Carlos design</h1>" in body["html"]
    assert "<script" not in body["html"]
    other = make_design(alice)
    assert client.get(f"/designs/{other.pk}/runs/{carlos.pk}/").status_code == 404
    stranger = Client()
    stranger.force_login(make_user("eve"))
    assert stranger.get(f"/designs/{design.pk}/runs/{carlos.pk}/").status_code == 404


def test_failed_design_shows_the_cause_and_a_retry_button(client: Client, alice: Any) -> None:
    design = make_design(
        alice,
        status=Design.Status.FAILED,
        attempts=1,
        error="APIConnectionError: Connection error.",
        failed_agent="security",
    )
    add_run(design, "security", status=AgentRun.Status.FAILED, error="APIConnectionError")
    html = client.get(f"/designs/{design.pk}/").content.decode()
    assert "This design failed" in html and "at the security agent" in html
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


# --- demo account ---------------------------------------------------------------------------


@pytest.fixture
def demo_settings(settings, tmp_path):
    """DEBUG on, BASE_DIR in a temporary folder, the default (simulator) endpoint.

    The check builds the process pool registry from settings; the one that was installed
    before is put back afterwards so no other test sees this one.
    """
    from pools import runtime

    settings.DEBUG = True
    settings.BASE_DIR = tmp_path
    previous = runtime.install(None)
    yield settings
    runtime.install(previous)


def test_demo_account_created_once_with_a_private_credentials_file(demo_settings) -> None:
    from agents.demo import credentials_path, ensure_demo_account

    credentials = ensure_demo_account()
    assert credentials is not None
    username, password = credentials
    assert username == "demo" and len(password) >= 20
    path = credentials_path()
    assert path == demo_settings.BASE_DIR / "var" / "demo-credentials.txt"
    assert path.stat().st_mode & 0o777 == 0o600
    assert f"password: {password}" in path.read_text()
    # Idempotent: the same account and password the second time.
    assert ensure_demo_account() == credentials
    assert User.objects.filter(username="demo").count() == 1
    user = User.objects.get(username="demo")
    assert not user.is_staff and not user.is_superuser
    # And the credentials really log in.
    client = Client()
    response = client.post("/accounts/login/", {"username": username, "password": password})
    assert response.status_code == 302
    assert client.get("/").status_code == 200


def test_demo_password_is_reset_when_the_file_is_lost(demo_settings) -> None:
    from agents.demo import credentials_path, ensure_demo_account

    _, first = ensure_demo_account()
    credentials_path().unlink()
    _, second = ensure_demo_account()
    assert second != first
    assert User.objects.get(username="demo").check_password(second)
    assert credentials_path().stat().st_mode & 0o777 == 0o600


def test_no_demo_account_without_debug(settings, tmp_path) -> None:
    from agents.demo import ensure_demo_account

    settings.DEBUG = False
    settings.BASE_DIR = tmp_path
    assert ensure_demo_account() is None
    assert not User.objects.filter(username="demo").exists()
    assert not (tmp_path / "var").exists()


def test_no_demo_account_against_a_real_endpoint(demo_settings) -> None:
    from agents.demo import ensure_demo_account

    demo_settings.CARLOS_POOLS = {
        "ENDPOINT": {"BASE_URL": "https://llm.internal.example/v1", "API_KEY": "sk-test"}
    }
    assert ensure_demo_account() is None
    assert not User.objects.filter(username="demo").exists()


# --- the whole path against the offline simulator (no mocks) ---------------------------------
# `carlos_registry` (tests/agents/conftest.py): the process pools pointed at a simulator that
# answers like each Carlos agent.


async def _logged_in(async_client: Any, username: str = "alice") -> Any:
    user = await User.objects.acreate_user(username, password="a-long-test-password")
    await async_client.aforce_login(user)
    return user


async def _finish(design_id: int) -> Design:
    from agents import tasks

    task = tasks.running_task(design_id)
    assert task is not None, "the view did not start the pipeline"
    await task
    return await Design.objects.aget(pk=design_id)


def _design_id(response: Any) -> int:
    assert response.status_code == 302
    match = re.fullmatch(r"/designs/(\d+)/", response["Location"])
    assert match, response["Location"]
    return int(match[1])


@pytest.mark.django_db(transaction=True)
async def test_submitting_the_form_runs_the_design_to_the_end(
    async_client: Any, carlos_registry: Any
) -> None:
    await _logged_in(async_client)
    form = valid_form(request_text="A data pipeline for IoT sensor telemetry", cloud="gcp")
    design_id = _design_id(await async_client.post("/", form))
    design = await _finish(design_id)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert design.options["cloud"] == "gcp"
    assert design.verdict in {"APPROVED", "NEEDS REVISION"}
    assert design.recommendation in {"CARLOS", "RONEI"}
    agents = {agent async for agent in design.runs.values_list("agent", flat=True)}
    assert len(agents) == 9
    page = await async_client.get(f"/designs/{design_id}/")
    html = page.content.decode()
    assert page.status_code == 200
    assert '<pre class="mermaid-source">' in html
    assert "google_" in html  # Terraform for the cloud the user chose
    archive = zipfile.ZipFile(
        io.BytesIO((await async_client.get(f"/designs/{design_id}/terraform.zip")).content)
    )
    assert "terraform/main.tf" in archive.namelist()


@pytest.mark.django_db(transaction=True)
async def test_clarifying_questions_then_answers_start_the_design(
    async_client: Any, carlos_registry: Any
) -> None:
    await _logged_in(async_client)
    form = valid_form(ask_questions="on")
    design_id = _design_id(await async_client.post("/", form))
    design = await Design.objects.aget(pk=design_id)
    assert design.status == Design.Status.AWAITING_ANSWERS
    questions = [item["question"] for item in design.clarifications]
    assert 3 <= len(questions) <= 5
    page = (await async_client.get(f"/designs/{design_id}/")).content.decode()
    assert 'name="answer_0"' in page
    response = await async_client.post(
        f"/designs/{design_id}/answers/", {"answer_0": "About 50,000 users at peak", "answer": "1"}
    )
    assert response.status_code == 302
    design = await _finish(design_id)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert design.clarifications[0] == {
        "question": questions[0],
        "answer": "About 50,000 users at peak",
    }
    assert all(item["answer"] is None for item in design.clarifications[1:])
    # Answering twice is refused: the design is no longer waiting.
    again = await async_client.post(f"/designs/{design_id}/answers/", {"skip": "1"})
    assert again.status_code == 409


@pytest.mark.django_db(transaction=True)
async def test_skipping_the_questions_starts_the_design(
    async_client: Any, carlos_registry: Any
) -> None:
    await _logged_in(async_client)
    design_id = _design_id(await async_client.post("/", valid_form(ask_questions="on")))
    response = await async_client.post(
        f"/designs/{design_id}/answers/", {"answer_0": "ignored", "skip": "1"}
    )
    assert response.status_code == 302
    design = await _finish(design_id)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert design.clarifications and all(item["answer"] is None for item in design.clarifications)


@pytest.mark.django_db(transaction=True)
async def test_retry_runs_a_failed_design_again(async_client: Any, carlos_registry: Any) -> None:
    user = await _logged_in(async_client)
    design = await Design.objects.acreate(
        owner=user,
        request_text="A public web app for a bakery",
        options=dict(DEFAULT_OPTIONS),
        status=Design.Status.FAILED,
        attempts=1,
        error="APIConnectionError: Connection error.",
        failed_agent="carlos",
    )
    await AgentRun.objects.acreate(
        design=design, agent="carlos", attempt=1, status="failed", pool="main", model="gpt-4o"
    )
    response = await async_client.post(f"/designs/{design.pk}/retry/")
    assert response.status_code == 302
    design = await _finish(design.pk)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert design.attempts == 2 and design.error == "" and design.failed_agent == ""
    html = (await async_client.get(f"/designs/{design.pk}/")).content.decode()
    assert 'id="design-failure" class="notice bad" role="alert" hidden' in html
    # The failed run stays on the record beside the resume's runs; no tab shows it failed.
    assert html.count("<tr data-key=") == 10
    assert html.count("badge failed") == 1
    assert 'class="dot failed"' not in html


@pytest.mark.django_db(transaction=True)
async def test_every_retry_counts_against_the_hourly_allowance(
    async_client: Any, simulator_factory: Any, make_registry: Any, install_registry: Any, settings
) -> None:
    """Reproduces: one user retried a failing design 11 times, 84 model calls, never limited."""
    from agents import tasks

    settings.DESIGNS_PER_HOUR = 3
    # The endpoint knows none of the pools' deployments: every attempt fails at its first agent.
    simulator = await simulator_factory(deployments=("retired-model",))
    install_registry(make_registry(simulator))
    await _logged_in(async_client)
    design_id = _design_id(await async_client.post("/", valid_form()))

    async def failed_attempt(number: int) -> None:
        """Wait until attempt `number` has ended: it fails at its first call, so fast that its
        task may be gone before the test looks for it."""
        for _ in range(1000):  # fail-safe, not a timing check
            design = await Design.objects.aget(pk=design_id)
            if design.attempts == number and design.status == Design.Status.FAILED:
                if (task := tasks.running_task(design_id)) is not None:
                    await task
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"attempt {number} never ended ({design.status})")

    await failed_attempt(1)
    for attempt in (2, 3):  # the design and two retries: three designs this hour
        assert _design_id(await async_client.post(f"/designs/{design_id}/retry/")) == design_id
        await failed_attempt(attempt)
    calls = simulator.stats.chat_requests

    refused = await async_client.post(f"/designs/{design_id}/retry/")
    assert refused.status_code == 429
    assert "limit of 3 designs per hour" in refused.content.decode()
    design = await Design.objects.aget(pk=design_id)
    assert (design.status, design.attempts) == (Design.Status.FAILED, 3)
    assert tasks.running_task(design_id) is None
    assert (await async_client.post("/", valid_form())).status_code == 429  # nor a new one
    assert simulator.stats.chat_requests == calls  # no model call after the limit
    assert "3 of 3 used this hour" in (await async_client.get("/")).content.decode()


WRONG_KEY = "sk-wrong-test-key-QX7Z"


@pytest.mark.django_db(transaction=True)
async def test_a_refused_key_is_shown_as_a_category_and_no_fragment_of_it_anywhere(
    async_client: Any, simulator_factory: Any, install_registry: Any, caplog: Any
) -> None:
    """Reproduces: "Incorrect API key provided: sk-********1234." on the design page, in the
    zip and in the log."""
    from pools.engine.config import parse_config
    from pools.engine.registry import PoolRegistry

    simulator = await simulator_factory(api_key="sk-the-right-key-0000")
    endpoint = {"BASE_URL": simulator.base_url, "API_KEY": WRONG_KEY}
    registry = install_registry(PoolRegistry(parse_config({"ENDPOINT": endpoint})))
    try:
        await _logged_in(async_client)
        with caplog.at_level(logging.INFO):
            design_id = _design_id(await async_client.post("/", valid_form()))
            design = await _finish(design_id)
    finally:
        await registry.close()
    category = "AuthenticationError (HTTP 401): the model endpoint refused the key"
    assert (design.status, design.failed_agent, design.error) == (
        "failed",
        "requirements",
        category,
    )
    run = await AgentRun.objects.aget(design_id=design_id)
    assert run.error == category
    page = (await async_client.get(f"/designs/{design_id}/")).content.decode()
    fragment = (await async_client.get(f"/designs/{design_id}/runs/{run.pk}/")).content.decode()
    archive = zipfile.ZipFile(
        io.BytesIO((await async_client.get(f"/designs/{design_id}/download/")).content)
    )
    readme = archive.read(next(n for n in archive.namelist() if n.endswith("README.md"))).decode()
    assert "the model endpoint refused the key" in page and category in readme
    assert "the model endpoint refused the key" in fragment
    log = "\n".join(record.getMessage() for record in caplog.records)
    assert "Incorrect API key provided: [redacted]" in log  # the detail is for the operator
    for where, text in (("page", page), ("fragment", fragment), ("zip", readme), ("log", log)):
        assert "QX7Z" not in text and "sk-wrong" not in text and "********" not in text, where
    for where, text in (("page", page), ("fragment", fragment), ("zip", readme)):
        assert "Incorrect API key" not in text, where


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

    await _logged_in(async_client)
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
