"""Errors raised by the pool engine.

Callers catch `PoolError` for anything the pool itself refuses; errors from the model
endpoint come through unchanged as the `openai` SDK's exceptions.
"""


class PoolError(Exception):
    """Base class for every refusal by the pool engine."""


class PoolTimeout(PoolError):
    """A queued caller waited longer than the pool's timeout for a slot."""


class PoolExhausted(PoolError):
    """The pool is full, its overflow is capped and `max_waiting` callers already queue."""


class PoolClosed(PoolError):
    """The pool engine was closed (server shutting down)."""


class UnknownPool(PoolError, KeyError):
    """A pool name that is not configured."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown pool"


class ConfigError(PoolError, ValueError):
    """A configuration value is invalid; `setting` names it the way the user wrote it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class RefusalWithRetryAfter(PoolError):
    """A refusal that says when to try again: in `retry_after` seconds (0: no hint)."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(RefusalWithRetryAfter):
    """The upstream deployment failed repeatedly; calls are refused until it cools down."""


class DeadlineExceeded(TimeoutError):
    """A call ran past one of its deadlines: `first_token`, `idle` (between chunks), `total`."""

    def __init__(self, deadline: str, seconds: float) -> None:
        labels = {
            "first_token": "no first token",
            "idle": "no new chunk",
            "total": "the call did not finish",
        }
        super().__init__(f"{labels.get(deadline, deadline)} within {seconds:g}s")
        self.deadline = deadline
        self.seconds = seconds


class RateBudgetExceeded(RefusalWithRetryAfter):
    """A call would overdraw its deployment's requests or tokens per minute for too long."""


class RateLimited(RefusalWithRetryAfter):
    """The endpoint is rate limiting the deployment for longer than the call can wait.

    A 429 pauses dispatch and callers wait within their deadline; this is raised only when
    the wait the server asked for (or the queue behind the learned concurrency limit) does
    not fit in what is left of the call's deadline. The message says which and how long.
    """


class BadResponse(PoolError):
    """The endpoint answered 200 but the answer is not a whole, readable completion."""


class TruncatedResponse(BadResponse):
    """A stream ended without a finish reason: the answer was cut, not finished."""


class MalformedResponse(BadResponse):
    """A streamed chunk could not be decoded."""


class EmptyResponse(BadResponse):
    """The model finished without a single character of text."""


# The pools refusing to take a call (full, circuit open, over the rate budget, shutting
# down) rather than the model failing it: a caller in a request answers "try again later".
POOL_REFUSALS = (
    PoolExhausted,
    PoolTimeout,
    CircuitOpen,
    RateBudgetExceeded,
    RateLimited,
    PoolClosed,
)
