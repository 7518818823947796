"""Requests-per-minute and tokens-per-minute budgets per upstream deployment.

Two token buckets refill continuously from the configured limits; the `x-ratelimit-
remaining-*` headers of every response tighten them, because the endpoint knows about
traffic this process cannot see (other processes, other apps on the same key). A call that
would overdraw waits for the refill when that is short enough, and is refused otherwise.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from typing import Any

from pools.exceptions import RateBudgetExceeded

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str | None) -> float | None:
    """Seconds from OpenAI's reset format: "1s", "6m0s", "20ms", "1h2m3.5s"."""
    if not value:
        return None
    total = 0.0
    found = False
    for number, unit in _DURATION.findall(value):
        found = True
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if not found:
        try:
            return float(value)
        except ValueError:
            return None
    return total


class _Bucket:
    def __init__(self, per_minute: int, clock: Any) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self._clock = clock
        self._stamp = clock()

    def refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now)."""
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / self.rate


class RateBudget:
    """The budget of one deployment; `rpm` or `tpm` of 0 means no limit of that kind."""

    def __init__(
        self, name: str, rpm: int = 0, tpm: int = 0, max_wait: float = 10.0, clock: Any = None
    ) -> None:
        self.name = name
        self.rpm = rpm
        self.tpm = tpm
        self.max_wait = max_wait
        clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._requests = _Bucket(rpm, clock) if rpm else None
        self._tokens = _Bucket(tpm, clock) if tpm else None
        self.throttled = 0
        self.refused = 0

    @property
    def limited(self) -> bool:
        return bool(self._requests or self._tokens)

    def reserve(self, tokens: int, max_wait: float | None = None) -> float:
        """Take one request and `tokens` now, or say how long to wait (taking nothing).

        Raises `RateBudgetExceeded` when the wait would be longer than `max_wait` (the
        budget's own, or the caller's if shorter: what is left of its deadline).
        """
        limit = self.max_wait if max_wait is None else min(self.max_wait, max_wait)
        with self._lock:
            waits = [0.0]
            for bucket, amount in ((self._requests, 1), (self._tokens, tokens)):
                if bucket is not None:
                    bucket.refill()
                    waits.append(bucket.wait_for(amount))
            wait = max(waits)
            if wait > limit:
                self.refused += 1
                raise RateBudgetExceeded(
                    f"the rate budget of deployment {self.name!r} "
                    f"({self.rpm or 'unlimited'} requests, {self.tpm or 'unlimited'} tokens per "
                    f"minute) would be exceeded for {wait:.1f}s",
                    retry_after=wait,
                )
            if wait > 0:
                self.throttled += 1
                return wait
            if self._requests is not None:
                self._requests.level -= 1
            if self._tokens is not None:
                self._tokens.level -= min(tokens, self._tokens.capacity)
            return 0.0

    def settle(self, estimated: int, actual: int) -> None:
        """Give back (or take) the difference between the estimate and the real usage."""
        if self._tokens is None:
            return
        with self._lock:
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + estimated - actual)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Tighten the buckets to what the endpoint says is left."""
        with self._lock:
            for bucket, kind in ((self._requests, "requests"), (self._tokens, "tokens")):
                remaining = headers.get(f"x-ratelimit-remaining-{kind}")
                if bucket is None or remaining is None:
                    continue
                try:
                    value = float(remaining)
                except ValueError:
                    continue
                bucket.refill()
                bucket.level = min(bucket.level, value)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            for bucket in (self._requests, self._tokens):
                if bucket is not None:
                    bucket.refill()
            return {
                "rpm": self.rpm,
                "tpm": self.tpm,
                "requests_available": round(self._requests.level, 1) if self._requests else None,
                "tokens_available": round(self._tokens.level) if self._tokens else None,
                "throttled": self.throttled,
                "refused": self.refused,
            }


def estimate_tokens(messages: list[Any], kwargs: Mapping[str, Any], default_output: int) -> int:
    """A cheap upper-side guess of a call's tokens: ~4 characters a token plus the output cap."""
    characters = sum(len(str(message.get("content", ""))) for message in messages)
    output = kwargs.get("max_completion_tokens") or kwargs.get("max_tokens") or default_output
    return characters // 4 + 4 * len(messages) + int(output)
