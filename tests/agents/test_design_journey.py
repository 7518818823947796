"""A design's whole path through the pages against the offline simulator: the form, the
questions, the run, retries and what a refused key leaves behind (no mocks)."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
import zipfile
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from agents.models import AgentRun, Design
from agents.options import DEFAULT_OPTIONS
from tests.agents.pages import logged_in, valid_form

pytestmark = pytest.mark.django_db

User = get_user_model()


# --- the whole path against the offline simulator (no mocks) ---------------------------------
# `carlos_registry` (tests/agents/conftest.py): the process pools pointed at a simulator that
# answers like each Carlos agent.


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
    await logged_in(async_client)
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
    await logged_in(async_client)
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
    await logged_in(async_client)
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
    user = await logged_in(async_client)
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
    await logged_in(async_client)
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
        await logged_in(async_client)
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


@pytest.mark.django_db(transaction=True)
async def test_a_design_submitted_through_the_served_application_runs_after_its_request(
    carlos_registry: Any,
) -> None:
    """Through the real ASGI application (carlos.asgi), whose requests do their database
    work on a lane that is handed to the next request when this one ends: the design started
    by the submit outlives its request (carlos.middleware.detached_task), so it must not use
    that lane, and runs to the end."""
    from django.db.models.signals import post_save

    from tests.carlos.test_login import (
        ORIGIN,
        PASSWORD,
        amake_user,
        browser,
        csrf_token,
        post_login,
    )

    written_from: set[str] = set()

    def note_thread(sender: Any, **kwargs: Any) -> None:
        written_from.add(threading.current_thread().name)

    post_save.connect(note_thread, sender=AgentRun, weak=False)
    await amake_user("lane-user")
    async with browser() as client:
        assert (
            await post_login(client, "lane-user", PASSWORD, await csrf_token(client))
        ).status_code == 302
        token = await csrf_token(client, "/")
        answer = await client.post(
            "/",
            data={
                **valid_form(request_text="A ticket shop for concerts"),
                "csrfmiddlewaretoken": token,
            },
            headers={"referer": f"{ORIGIN}/"},
        )
        assert answer.status_code == 302, answer.text[:500]
        design_id = int(re.fullmatch(r"/designs/(\d+)/", answer.headers["location"])[1])
        for _ in range(3):  # later requests take the lane back meanwhile
            assert (await client.get(f"/designs/{design_id}/")).status_code == 200
    design = await _finish(design_id)
    post_save.disconnect(note_thread, sender=AgentRun)
    assert design.status == Design.Status.SUCCEEDED, design.error
    # Its runs were written from the designs' database threads, never from a request's lane
    # (with the tests' in-memory database, the shared one: agents.tasks).
    assert written_from, "no run was saved"
    assert not any(name.startswith("request-db") for name in written_from), written_from
