"""What can end a design, and what the user is told about it.

Every message shown to a user passes `describe_error`: the endpoint's own words may quote
the key, so they go only to the log (`error_detail`), redacted.
"""

from __future__ import annotations

import logging

import httpx
import openai
from django.conf import settings

from agents import prompts
from agents.events import agent_label
from agents.models import Design
from agents.redaction import RedactSecrets, redact
from pools.engine import POOL_REFUSALS as POOL_REFUSALS  # the pipeline's, from the engine
from pools.engine import PoolError

logger = logging.getLogger("agents")

# Every failure the pipeline or the pages log passes through it: no key reaches the log,
# not even inside an unexpected exception's traceback.
if not any(isinstance(existing, RedactSecrets) for existing in logger.filters):
    logger.addFilter(RedactSecrets())

Status = Design.Status
RUNNABLE_STATUSES = (Status.QUEUED, Status.AWAITING_ANSWERS)
# What a process may start or resume while it holds the lease (or the lease is free).
CLAIMABLE_STATUSES = (*RUNNABLE_STATUSES, Status.RUNNING)
# A sibling that failed, a drain, a cancel or a crash: the design's own status says which.
STOPPED_ERROR = "stopped before it finished"
LOST_ERROR = "cancelled or taken over by another server"
JSON_RESPONSE_FORMAT = {"type": "json_object"}
# Failures of the endpoint, the pool or the answer's format: logged without a traceback.
EXPECTED_AGENT_ERRORS = (
    openai.OpenAIError,
    PoolError,
    httpx.HTTPError,
    TimeoutError,  # the pool engine's DeadlineExceeded (first token, idle, total)
    prompts.OutputFormatError,
)

# Answers the model stopped before they were whole: never accepted as a finished answer.
UNFINISHED_ANSWERS = {
    "length": "the answer was cut off at the model's output length limit before it was "
    "finished (finish reason 'length'); retry, or ask for a smaller system",
    "content_filter": "the endpoint's content filter stopped the answer before it was "
    "finished (finish reason 'content_filter'); rephrase the request and retry",
}


def max_revisions() -> int:
    """How many revision rounds a NEEDS REVISION verdict may trigger (settings, default 1)."""
    return max(0, int(getattr(settings, "DESIGN_MAX_REVISIONS", 1)))


class DesignNotRunnable(ValueError):
    """The design is not in a state the requested operation can start from."""


class DesignLost(Exception):
    """This process no longer holds the design: another took it over, or it was cancelled."""


class Drained(Exception):
    """The process is draining: the design stops between agents and resumes elsewhere."""


class AgentFailed(Exception):
    """One agent failed; the design ends FAILED naming it (by key for machines: `agent`;
    by label where people read it)."""

    def __init__(self, agent: str, message: str) -> None:
        super().__init__(f"{agent_label(agent)}: {message}")
        self.agent = agent
        self.message = message


# can quote the key it refused, so it only goes to the log (see `error_detail`).
STATUS_CATEGORIES = {
    400: "the model endpoint rejected the request",
    401: "the model endpoint refused the key",
    403: "the model endpoint refused access with this key",
    404: "the model endpoint does not know this model or deployment",
    408: "the model endpoint timed out",
    409: "the model endpoint reported a conflict",
    413: "the request is too large for the model endpoint",
    422: "the model endpoint could not process the request",
    429: "rate limited by the model endpoint",
}
# Error codes in a 400's body that say more than "rejected".
ERROR_CODE_CATEGORIES = {
    "content_filter": "the endpoint's content filter refused the request",
    "context_length_exceeded": "the request is too long for the model",
}
# Errors raised with the product's own sentences (the pool engine's refusals, deadlines and
# answer checks, the format checks): no endpoint text, so users read them as they are.
OWN_WORDS = (PoolError, TimeoutError, prompts.OutputFormatError)
INTERNAL_ERROR = "details in the server log"


def _status_category(status: int, code: object = None) -> str:
    if isinstance(code, str) and code in ERROR_CODE_CATEGORIES:
        return ERROR_CODE_CATEGORIES[code]
    if status in STATUS_CATEGORIES:
        return STATUS_CATEGORIES[status]
    if status >= 500:
        return "the model endpoint had a server error"
    return "the model endpoint rejected the request"


def _transport_category(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return "the model endpoint did not answer in time"
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        return "the connection to the model endpoint failed"
    if isinstance(exc, openai.APIResponseValidationError):
        return "the model endpoint sent an answer that could not be read"
    if isinstance(exc, openai.LengthFinishReasonError):
        return "the answer was cut off at the model's output length limit"
    if isinstance(exc, openai.ContentFilterFinishReasonError):
        return "the endpoint's content filter stopped the answer"
    return "the model endpoint failed"


def describe_error(exc: BaseException) -> str:
    """What the user is shown (design.error, AgentRun.error, the zip): one line, no secret.

    The endpoint's errors become a category ("the model endpoint refused the key", "rate
    limited by the model endpoint"...) because their text may quote the key; the product's
    own errors keep their sentence; anything else is an internal error named by its type.
    The whole detail, redacted, is logged by `error_detail`.
    """
    name = type(exc).__name__
    if isinstance(exc, openai.APIStatusError):
        return f"{name} (HTTP {exc.status_code}): {_status_category(exc.status_code, exc.code)}"
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return f"{name} (HTTP {status}): {_status_category(status)}"
    if isinstance(exc, openai.OpenAIError | httpx.HTTPError):
        return f"{name}: {_transport_category(exc)}"
    if isinstance(exc, OWN_WORDS):
        text = redact(str(exc).strip())
        return f"{name}: {text}" if text else name
    return f"{name} ({INTERNAL_ERROR})"


def error_detail(exc: BaseException) -> str:
    """For the log: what the user is shown, then the endpoint's own words and their cause,
    every key-like token redacted."""
    summary = describe_error(exc)
    parts = [summary]
    if isinstance(exc, openai.APIStatusError):
        parts.append(f"endpoint said: {exc.message}")
        if exc.request_id:
            parts.append(f"request id {exc.request_id}")
    elif str(exc).strip() and str(exc).strip() not in summary:
        parts.append(f"{type(exc).__name__}: {str(exc).strip()}")
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not isinstance(exc, OWN_WORDS):
        parts.append(f"caused by {type(cause).__name__}: {cause}")
    return redact("; ".join(parts))
