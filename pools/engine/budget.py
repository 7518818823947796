"""Requests-per-minute and tokens-per-minute budgets per upstream deployment.

Two token buckets refill continuously from the configured limits; the `x-ratelimit-
remaining-*` headers of every response tighten them, because the endpoint knows about
traffic this process cannot see (other processes, other apps on the same key). A call that
would overdraw waits for the refill when that is short enough, and is refused otherwise.

With several processes on one deployment, per-process budgets would multiply by the number
of processes; a `SharedBuckets` store (Redis, see `pools.engine.cluster`) then holds the buckets for
all of them. When the store cannot be reached the process falls back to its own buckets.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pools.engine.exceptions import RateBudgetExceeded

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


@dataclass(frozen=True)
class BucketLevels:
    """What a shared store answers: the wait before a reservation fits, and what is left."""

    wait: float
    requests: float
    tokens: float


BucketOperation = Literal["reserve", "settle", "observe"]


class SharedBuckets(Protocol):
    """Buckets kept outside the process so that every process spends from the same budget.

    `update` refills, applies `operation` atomically and returns the levels, or None when the
    store is unreachable (the caller then uses its local buckets). Operations: "reserve"
    (one request and `tokens`, only when both fit at once), "settle" (`tokens` back, or
    taken when negative), "observe" (cap the levels at `requests` and `tokens`; a negative
    value leaves that level alone).
    """

    async def update(
        self,
        deployment: str,
        rpm: int,
        tpm: int,
        operation: BucketOperation,
        requests: float = 0,
        tokens: float = 0,
    ) -> BucketLevels | None: ...


class RateBudget:
    """The budget of one deployment; `rpm` or `tpm` of 0 means no limit of that kind."""

    def __init__(
        self,
        name: str,
        rpm: int = 0,
        tpm: int = 0,
        max_wait: float = 10.0,
        clock: Any = None,
        shared: SharedBuckets | None = None,
    ) -> None:
        self.name = name
        self.rpm = rpm
        self.tpm = tpm
        self.max_wait = max_wait
        self.shared = shared
        clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._requests = _Bucket(rpm, clock) if rpm else None
        self._tokens = _Bucket(tpm, clock) if tpm else None
        self._shared_levels: BucketLevels | None = None
        self.throttled = 0
        self.refused = 0

    @property
    def limited(self) -> bool:
        return bool(self._requests or self._tokens)

    async def reserve(self, tokens: int, max_wait: float | None = None) -> float:
        """Take one request and `tokens` now, or say how long to wait (taking nothing).

        Raises `RateBudgetExceeded` when the wait would be longer than `max_wait` (the
        budget's own, or the caller's if shorter: what is left of its deadline).
        """
        limit = self.max_wait if max_wait is None else min(self.max_wait, max_wait)
        levels = await self._shared_update("reserve", tokens=tokens)
        with self._lock:
            wait = levels.wait if levels is not None else self._local_wait(tokens)
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
            elif levels is None:
                self._take_locally(tokens)
            return wait

    async def settle(self, estimated: int, actual: int) -> None:
        """Give back (or take) the difference between the estimate and the real usage."""
        if self._tokens is None or estimated == actual:
            return
        if await self._shared_update("settle", tokens=estimated - actual) is not None:
            return
        with self._lock:
            self._tokens.refill()
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + estimated - actual)

    async def observe(self, headers: Mapping[str, str]) -> None:
        """Tighten the buckets to what the endpoint says is left."""
        remaining = {
            kind: _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            for kind in ("requests", "tokens")
        }
        if remaining["requests"] is None and remaining["tokens"] is None:
            return
        capped = await self._shared_update(
            "observe",
            requests=-1 if remaining["requests"] is None else remaining["requests"],
            tokens=-1 if remaining["tokens"] is None else remaining["tokens"],
        )
        if capped is not None:
            return
        with self._lock:
            for bucket, kind in ((self._requests, "requests"), (self._tokens, "tokens")):
                value = remaining[kind]
                if bucket is not None and value is not None:
                    bucket.refill()
                    bucket.level = min(bucket.level, value)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            shared = self._shared_levels
            for bucket in (self._requests, self._tokens):
                if bucket is not None:
                    bucket.refill()
            requests = self._requests.level if self._requests else 0.0
            tokens = self._tokens.level if self._tokens else 0.0
            if shared:
                requests, tokens = shared.requests, shared.tokens
            return {
                "rpm": self.rpm,
                "tpm": self.tpm,
                "shared": shared is not None,
                "requests_available": round(requests, 1) if self._requests else None,
                "tokens_available": round(tokens) if self._tokens else None,
                "throttled": self.throttled,
                "refused": self.refused,
            }

    # -- internals ----------------------------------------------------------------------------
    async def _shared_update(
        self, operation: BucketOperation, requests: float = 0, tokens: float = 0
    ) -> BucketLevels | None:
        """The shared store's answer, or None (and local accounting) when there is none."""
        if self.shared is None:
            return None
        levels = await self.shared.update(
            self.name, self.rpm, self.tpm, operation, requests=requests, tokens=tokens
        )
        self._shared_levels = levels
        return levels

    def _local_wait(self, tokens: int) -> float:
        waits = [0.0]
        for bucket, amount in ((self._requests, 1), (self._tokens, tokens)):
            if bucket is not None:
                bucket.refill()
                waits.append(bucket.wait_for(amount))
        return max(waits)

    def _take_locally(self, tokens: int) -> None:
        if self._requests is not None:
            self._requests.level -= 1
        if self._tokens is not None:
            self._tokens.level -= min(tokens, self._tokens.capacity)


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def estimate_tokens(messages: list[Any], kwargs: Mapping[str, Any], default_output: int) -> int:
    """A cheap upper-side guess of a call's tokens: ~4 characters a token plus the output cap."""
    characters = sum(len(str(message.get("content", ""))) for message in messages)
    output = kwargs.get("max_completion_tokens") or kwargs.get("max_tokens") or default_output
    return characters // 4 + 4 * len(messages) + int(output)
