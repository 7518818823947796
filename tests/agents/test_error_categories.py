"""What users are told about a failure (a category) and what the log keeps (the redacted detail).

The exceptions are the real ones the SDK and the pool engine raise, built from real httpx
responses; the end-to-end case (a wrong key through the simulator, the page, the zip and the
log) is in test_views.py.
"""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from agents.pipeline import describe_error, error_detail
from agents.redaction import REDACTED, redact
from pools.engine.exceptions import (
    CircuitOpen,
    DeadlineExceeded,
    PoolTimeout,
    RateLimited,
    TruncatedResponse,
)

URL = "https://llm.example.net/v1/chat/completions"
MASKED = "Incorrect API key provided: sk-********QX7Z."


def status_error(cls: type[openai.APIStatusError], status: int, **body: str) -> Exception:
    """An SDK status error as the client raises it (body: the endpoint's `error` object)."""
    response = httpx.Response(
        status,
        request=httpx.Request("POST", URL),
        json={"error": body},
        headers={"x-request-id": "req_42"},
    )
    return cls(f"Error code: {status} - {body}", response=response, body=body)


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (
            status_error(openai.AuthenticationError, 401, message=MASKED, code="invalid_api_key"),
            "AuthenticationError (HTTP 401): the model endpoint refused the key",
        ),
        (
            status_error(
                openai.PermissionDeniedError, 403, message="key " + "0123456789abcdef" * 2
            ),
            "PermissionDeniedError (HTTP 403): the model endpoint refused access with this key",
        ),
        (
            status_error(openai.NotFoundError, 404, message="The model `x` does not exist"),
            "NotFoundError (HTTP 404): the model endpoint does not know this model or deployment",
        ),
        (
            status_error(openai.RateLimitError, 429, message="Rate limit reached for org-abc"),
            "RateLimitError (HTTP 429): rate limited by the model endpoint",
        ),
        (
            status_error(openai.BadRequestError, 400, message="filtered", code="content_filter"),
            "BadRequestError (HTTP 400): the endpoint's content filter refused the request",
        ),
        (
            status_error(
                openai.BadRequestError, 400, message="too long", code="context_length_exceeded"
            ),
            "BadRequestError (HTTP 400): the request is too long for the model",
        ),
        (
            status_error(openai.InternalServerError, 503, message="upstream sk-live-abcdef down"),
            "InternalServerError (HTTP 503): the model endpoint had a server error",
        ),
        (
            openai.APIConnectionError(request=httpx.Request("POST", URL)),
            "APIConnectionError: the connection to the model endpoint failed",
        ),
        (
            openai.APITimeoutError(request=httpx.Request("POST", URL)),
            "APITimeoutError: the model endpoint did not answer in time",
        ),
        (
            httpx.ConnectError("[Errno 111] connect to https://user:pw@llm.example.net failed"),
            "ConnectError: the connection to the model endpoint failed",
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_endpoint_errors_are_shown_as_a_category(error: Exception, shown: str) -> None:
    assert describe_error(error) == shown
    detail = error_detail(error)
    assert detail.startswith(shown)
    for secret in ("QX7Z", "0123456789abcdef", "sk-live", "pw@", "*****"):
        assert secret not in detail


def test_the_log_keeps_the_endpoints_words_without_the_key() -> None:
    error = status_error(openai.AuthenticationError, 401, message=MASKED, code="invalid_api_key")
    detail = error_detail(error)
    assert f"Incorrect API key provided: {REDACTED}." in detail
    assert "request id req_42" in detail
    try:
        try:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        except httpx.ConnectError as cause:
            raise openai.APIConnectionError(request=httpx.Request("POST", URL)) from cause
    except openai.APIConnectionError as exc:
        assert "caused by ConnectError: [Errno 111] Connection refused" in error_detail(exc)


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (
            RateLimited(
                "deployment 'gpt-4o' is rate limited: the endpoint asked to wait 40.0s (429) "
                "and the call's total deadline leaves 12.0s",
                retry_after=40,
            ),
            "RateLimited: deployment 'gpt-4o' is rate limited: the endpoint asked to wait "
            "40.0s (429) and the call's total deadline leaves 12.0s",
        ),
        (DeadlineExceeded("idle", 1), "DeadlineExceeded: no new chunk within 1s"),
        (
            TruncatedResponse("the endpoint's stream ended without a finish reason"),
            "TruncatedResponse: the endpoint's stream ended without a finish reason",
        ),
        (
            CircuitOpen("the circuit for deployment 'gpt-4o' is open; retry in 3.0s"),
            "CircuitOpen: the circuit for deployment 'gpt-4o' is open; retry in 3.0s",
        ),
        (
            PoolTimeout("no slot in pool 'mini' within 0.3s"),
            "PoolTimeout: no slot in pool 'mini' within 0.3s",
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_the_pool_engines_own_sentences_stay_readable(error: Exception, shown: str) -> None:
    assert describe_error(error) == shown
    assert error_detail(error) == shown


def test_an_unexpected_error_is_named_by_its_type_only() -> None:
    error = KeyError("sk-live-0123456789 in a dict that should not have been there")
    assert describe_error(error) == "KeyError (details in the server log)"
    assert "0123456789" not in error_detail(error)


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("Incorrect API key provided: sk-proj-ab****************************cdEF.", "provided:"),
        ("Incorrect API key provided: abc*********************xyz.", "provided:"),
        ("key 0123456789abcdef0123456789abcdef was refused", "was refused"),  # Azure, 32 hex
        ("key " + "Ab1" * 28 + " was refused", "was refused"),  # Azure, 84 alphanumerics
        ("Authorization: Bearer eyJhbGciOi.eyJzdWIiOi.sig", "Authorization: Bearer"),
        ("headers {'api-key': 'f00dfeed'}", "api-key"),
        ("GET https://user:s3cret@llm.example.net/v1 failed", "llm.example.net/v1"),
    ],
)
def test_key_shapes_are_redacted(text: str, kept: str) -> None:
    clean = redact(text)
    assert REDACTED in clean and kept in clean
    for fragment in ("cdEF", "xyz", "0123456789abcdef", "Ab1Ab1", "eyJ", "f00dfeed", "s3cret"):
        assert fragment not in clean


def test_ordinary_words_and_names_are_kept() -> None:
    text = "deployment 'gpt-4o-mini-2024-07-18-eastus' answered a **bold** task-force in 40.0s"
    assert redact(text) == text


def test_the_configured_key_is_redacted_whatever_its_shape(settings) -> None:
    settings.CARLOS_POOLS = {"ENDPOINT": {"API_KEY": "plain-words-key"}}
    assert redact("the key plain-words-key was refused") == f"the key {REDACTED} was refused"


def test_a_traceback_logged_by_the_agents_logger_carries_no_key(caplog) -> None:
    logger = logging.getLogger("agents")  # the pipeline's and the pages' logger
    with caplog.at_level(logging.ERROR, logger="agents"):
        try:
            raise ValueError("upstream said: Incorrect API key provided: sk-********QX7Z.")
        except ValueError:
            logger.exception("design 1: requirements crashed with sk-inline-QX7Z")
    assert "ValueError" in caplog.text and "Traceback" in caplog.text
    assert "QX7Z" not in caplog.text


@pytest.mark.django_db
def test_errors_stored_before_this_release_lose_their_key_fragments() -> None:
    """The migration that introduced categories scrubs what older releases stored."""
    import importlib

    from django.apps import apps
    from django.contrib.auth import get_user_model

    from agents.models import AgentRun, Design

    leaked = f"AuthenticationError (HTTP 401): Error code: 401 - {MASKED}"
    owner = get_user_model().objects.create_user("olga", password="a-long-test-password")
    design = Design.objects.create(owner=owner, request_text="x", status="failed", error=leaked)
    run = AgentRun.objects.create(
        design=design, agent="requirements", status="failed", error=leaked
    )
    kept = Design.objects.create(
        owner=owner, request_text="y", status="failed", error="CircuitOpen: x"
    )
    migration = importlib.import_module("agents.migrations.0003_designretry")
    migration.redact_stored_errors(apps, None)
    for row in (design, run):
        row.refresh_from_db()
        assert row.error == leaked.replace("sk-********QX7Z", REDACTED)
    kept.refresh_from_db()
    assert kept.error == "CircuitOpen: x"
