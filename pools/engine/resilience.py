"""Retries that respect the server, and a circuit breaker per upstream deployment.

There is exactly one retry layer: the pool's (the SDK is built with `max_retries=0`), so
every attempt is seen by the breaker and counted in the stats. A call is retried only on
failures that may pass (connection errors, timeouts, 408/409/5xx, a cut, malformed or empty
answer before any text), never once the user has seen tokens of a stream, and never when
cancelled. A 429 is no failure here: it pauses the deployment (`pools.engine.adaptive`) and the
call waits its turn within its deadline.

The breaker counts only what says the deployment is unhealthy: 5xx, connection failures,
an upstream that went silent (first-token or idle deadline), a broken stream. Never a 429,
a client error, a cancellation or the call's own total deadline.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import openai

from pools.engine.exceptions import (
    BadResponse,
    CircuitOpen,
    DeadlineExceeded,
    EmptyResponse,
)

RETRYABLE_STATUS = {408, 409}
# While a half-open probe runs, the calls beside it look again this often.
PROBE_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Failure:
    """How one failed attempt should be treated."""

    retryable: bool
    breaker_failure: bool  # counts against the upstream's health
    rate_limited: bool = False
    retry_after: float | None = None


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            if name != "retry-after":
                continue
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def classify(exc: BaseException) -> Failure:
    """Decide whether an exception from a call may be retried and whether it hurts health."""
    if isinstance(exc, DeadlineExceeded):
        # The upstream went silent (first token, idle gap); the total deadline is the call's.
        silent = exc.deadline in ("first_token", "idle")
        return Failure(retryable=exc.deadline == "first_token", breaker_failure=silent)
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return Failure(retryable=True, breaker_failure=True)
    if isinstance(exc, BadResponse):
        return Failure(retryable=True, breaker_failure=not isinstance(exc, EmptyResponse))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = parse_retry_after(exc.response.headers if exc.response else None)
        if status == 429:
            return Failure(True, False, rate_limited=True, retry_after=retry_after)
        if status in RETRYABLE_STATUS or status >= 500:
            return Failure(True, status >= 500, retry_after=retry_after)
    return Failure(retryable=False, breaker_failure=False)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between attempts; how many attempts is each pool's `MAX_RETRIES`."""

    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_cap: float = 30.0

    def delay(self, attempt: int, failure: Failure, rng: random.Random | None = None) -> float:
        """Seconds before retry number `attempt` (1-based): the server's hint, capped, or
        exponential backoff with jitter."""
        if failure.retry_after is not None:
            return min(failure.retry_after, self.retry_after_cap)
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        jitter = rng.random() if rng else random.random()
        return ceiling * (0.5 + 0.5 * jitter)  # jitter in [50%, 100%]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per deployment: opens on a run of failures or a failure rate.

    While open, new calls fail immediately; after the cooldown one probe is let through
    (half-open) and its outcome closes or re-opens the circuit. Only an attempt that started
    after the circuit opened can close it: a slow call from before the outage proves nothing
    about now. Thread-safe.
    """

    def __init__(
        self,
        name: str,
        *,
        failures_to_open: int = 10,
        failure_rate: float = 0.5,
        window: int = 20,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failures_to_open = failures_to_open
        self.failure_rate = failure_rate
        self.window = window
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._consecutive_failures = 0
        self._open_until = 0.0
        self._opened_at = -math.inf  # clock time of the last closed -> open transition
        self._probe_in_flight = False
        self.times_opened = 0
        self.last_reason = ""
        # Told of every opening (state, seconds, reason) and closing, outside the lock: how
        # other processes learn of it (see pools.engine.cluster).
        self.on_change: Callable[[BreakerState, float, str], None] | None = None

    def _notify(self, state: BreakerState, seconds: float, reason: str) -> None:
        if self.on_change is not None:
            self.on_change(state, seconds, reason)

    def _refresh_locked(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._refresh_locked()
            return self._state

    def check(self) -> None:
        """Raise `CircuitOpen` while the circuit is open (takes no probe).

        Half-open is no refusal here: the caller will wait for the probe's outcome.
        """
        with self._lock:
            self._refresh_locked()
            if self._state is BreakerState.OPEN:
                raise self._refusal_locked()

    def before_attempt(self) -> float | None:
        """Admit one attempt (None), or say how long to wait before asking again.

        Raises `CircuitOpen` while open. Half-open lets a single probe through; the calls
        beside it wait for its outcome instead of failing: a design's parallel agents on
        one deployment would otherwise fail the design, cancel the probe, and keep the
        circuit half-open for good.
        """
        with self._lock:
            self._refresh_locked()
            if self._state is BreakerState.OPEN:
                raise self._refusal_locked()
            if self._state is BreakerState.HALF_OPEN:
                if self._probe_in_flight:
                    return PROBE_POLL_SECONDS
                self._probe_in_flight = True
            return None

    def refusal(self) -> CircuitOpen:
        """The error for a caller that can wait no longer for the probe."""
        with self._lock:
            return self._refusal_locked()

    def opened_since(self, started_at: float) -> float | None:
        """Seconds until the probe may go, for a call that started before the circuit opened
        (it waits instead of failing, within its deadline); None when it is not such a call."""
        with self._lock:
            self._refresh_locked()
            if self._state is BreakerState.CLOSED or started_at >= self._opened_at:
                return None
            return max(0.0, self._open_until - self._clock())

    def record_success(self, started_at: float | None = None) -> None:
        """An attempt succeeded; `started_at` (this breaker's clock) is when it was sent."""
        with self._lock:
            self._outcomes.append(True)
            self._consecutive_failures = 0
            if (
                self._state is not BreakerState.CLOSED
                and started_at is not None
                and started_at < self._opened_at
            ):
                return  # started before the outage: says nothing about the deployment now
            closed_now = self._state is not BreakerState.CLOSED
            if closed_now:
                self._state = BreakerState.CLOSED
                self._outcomes.clear()
            self._probe_in_flight = False
        if closed_now:
            self._notify(BreakerState.CLOSED, 0.0, "")

    def record_failure(self, failure: Failure, reason: str) -> None:
        if not failure.breaker_failure:
            self.release_probe()
            return
        opened: float | None = None
        with self._lock:
            self._outcomes.append(False)
            self._consecutive_failures += 1
            failed = self._outcomes.count(False)
            rate_exceeded = (
                len(self._outcomes) >= self.window // 2
                and failed / len(self._outcomes) >= self.failure_rate
            )
            if (
                self._state is BreakerState.HALF_OPEN
                or self._consecutive_failures >= self.failures_to_open
                or rate_exceeded
            ):
                opened = self.cooldown
            if opened is not None:
                self._open_locked(opened, reason)
            self._probe_in_flight = False
        if opened is not None:
            self._notify(BreakerState.OPEN, opened, reason)

    def release_probe(self) -> None:
        """An attempt ended without telling anything about health (cancelled, client error)."""
        with self._lock:
            self._probe_in_flight = False

    def _open_locked(self, seconds: float, reason: str) -> None:
        if self._state is not BreakerState.OPEN:
            self.times_opened += 1
            self._opened_at = self._clock()
        self._state = BreakerState.OPEN
        self._open_until = max(self._open_until, self._clock() + seconds)
        self.last_reason = reason

    def _refusal_locked(self) -> CircuitOpen:
        retry_in = max(0.0, self._open_until - self._clock())
        return CircuitOpen(
            f"the circuit for deployment {self.name!r} is open after upstream failures "
            f"({self.last_reason}); retry in {retry_in:.1f}s",
            retry_after=retry_in,
        )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._refresh_locked()
            return {
                "state": self._state.value,
                "retry_in_s": round(max(0.0, self._open_until - self._clock()), 3)
                if self._state is BreakerState.OPEN
                else 0.0,
                "consecutive_failures": self._consecutive_failures,
                "recent_failure_rate": round(self._outcomes.count(False) / len(self._outcomes), 3)
                if self._outcomes
                else 0.0,
                "times_opened": self.times_opened,
                "last_reason": self.last_reason,
            }
