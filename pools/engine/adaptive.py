"""How many calls a deployment takes at once, learned from the endpoint, and its 429 pause.

A pool's size is how many warm connections it keeps; how many requests the deployment behind
it can serve at once is something only the endpoint knows, and it changes (Azure lowers a
busy region's limits for hours). So every attempt of every call passes a `DeploymentLimiter`
shared by the pools of one deployment:

- **The pause.** A 429 is a rate signal, not a health failure: dispatch to the deployment
  stops until the server's `retry-after-ms` / `Retry-After` (absent: jittered backoff), and
  callers wait first-in first-out within their own deadline instead of failing.
- **The limit** (Netflix concurrency-limits' AIMD and Gradient2, Envoy's adaptive concurrency
  filter): it starts at the ceiling, so on a healthy endpoint nothing waits; it is multiplied
  down on a 429 and on `x-ratelimit-remaining-*` running low, and down by the latency
  gradient when time to first token rises well above its best recent value; it grows by about
  one call per round trip while calls succeed with the limit in use; above the level a
  429 last refused it steps up only now and then (the wait doubling while the steps are
  refused, and at least four times the last pause), never while
  `x-ratelimit-remaining-requests` says the endpoint is full. A 429 also caps it at
  what is in flight as the refusal comes back (times the ratio): the server said that much
  was too much, however high the limit had been. At most one decrease per round
  trip: only an attempt sent after the last decrease can cause another.

Plain asyncio and a `threading.Lock`: one limiter serves every event loop of the process,
and each waiter is woken on its own loop. With Redis (see `pools.engine.cluster`) the pause and the
limit are the cluster's: `SharedLimit` carries them between instances.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pools.engine.exceptions import RateLimited
from pools.engine.slots import wake_on_its_loop


class Outcome(StrEnum):
    """What one attempt says about the deployment's load."""

    SUCCESS = "success"  # answered: the limit may grow, its first token feeds the gradient
    DROP = "drop"  # 429 or overload: the limit comes down
    IGNORE = "ignore"  # cancelled, a client error, a failure that is not about load


@dataclass(frozen=True)
class LimitSettings:
    """The limiter of one deployment; `adaptive=False` keeps a fixed limit at the ceiling."""

    floor: int = 1
    ceiling: int = 100
    adaptive: bool = True
    backoff_ratio: float = 0.7  # multiplicative decrease on a 429
    low_remaining_ratio: float = 0.9  # ... when x-ratelimit-remaining-* runs low
    low_remaining_fraction: float = 0.05  # "low": under this share of the advertised limit
    latency_tolerance: float = 2.0  # first token slower than best x this: the gradient bites
    best_window_s: float = 60.0  # the best first-token time is re-measured over this window
    pause_backoff_base: float = 0.5  # a 429 without Retry-After pauses 0.5 s, doubling ...
    pause_backoff_max: float = 8.0  # ... up to this, with jitter
    probe_interval_s: float = 1.0  # above the level last refused, one step up this often ...
    probe_interval_max_s: float = 4.0  # ... doubling up to this while the steps keep failing


@dataclass(eq=False)
class Permit:
    """The right to send one attempt to the deployment; give it back with `release`."""

    ticket: float
    granted_at: float
    counted: bool  # False for a pool that opted out of the limit (ADAPTIVE=0)
    in_flight_at_grant: int = 0
    released: bool = False


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    counted: bool = True
    granted: bool = False


@dataclass
class LimitChange:
    reason: str = "start"
    at: float = field(default_factory=time.time)  # wall clock, for people
    before: float = 0.0
    after: float = 0.0


class SharedLimit(Protocol):
    """The cluster's pause and limit for a deployment (Redis, see `pools.engine.cluster`).

    `publish` tells the others this process's new limit or pause; `current` returns the
    cluster's last known (limit, seconds of pause left), or None when there is no store.
    """

    def publish(self, deployment: str, limit: float, pause_s: float, reason: str) -> None: ...

    def current(self, deployment: str) -> tuple[float, float, str] | None: ...


class DeploymentLimiter:
    """The attempts in flight to one deployment, their FIFO queue, the limit and the pause."""

    def __init__(
        self,
        name: str,
        settings: LimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        shared: SharedLimit | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.shared = shared
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._limit = float(settings.ceiling)
        self._in_flight = 0
        self._waiters: list[tuple[float, int, _Waiter]] = []  # a heap by arrival ticket
        self._sequence = itertools.count()
        self._paused_until = 0.0
        self._pause_reason = ""
        self._last_decrease_at = -math.inf
        self._drops_in_a_row = 0
        # The number of calls in flight the endpoint last refused (None: not known, or since
        # exceeded without a refusal), and when the limit may next step above it.
        self._refused_level: float | None = None
        self._probe_interval = settings.probe_interval_s
        self._next_probe_at = 0.0
        self._probe_succeeded = False  # a step above the refused level went through
        self._last_pause_s = 0.0
        # The share of its request limit the endpoint said it had left on the last success:
        # None when it does not say (no header, or -1 / 0 without a limit), 0 when full.
        self._room: float | None = None
        self._ttft_ewma: float | None = None
        self._best: deque[tuple[float, float]] = deque()  # (time, ttft) with rising ttft
        self.last_change = LimitChange(after=self._limit, before=self._limit)
        self.counters = {"drops": 0, "pauses": 0, "decreases": 0, "timeouts": 0}

    # -- the limit -------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        """Attempts allowed in flight now (whole calls: the learned value rounded down)."""
        return max(self.settings.floor, math.floor(self._limit))

    @property
    def waiting(self) -> int:
        """Attempts queued for a permit now."""
        with self._lock:
            return len(self._waiters)

    def paused_for(self) -> float:
        """Seconds of the 429 pause still to run (0 when dispatch is open)."""
        with self._lock:
            self._adopt_shared_locked()
            return max(0.0, self._paused_until - self._clock())

    # -- acquire / release -----------------------------------------------------------------
    async def acquire(self, ticket: float, timeout: float, *, counted: bool = True) -> Permit:
        """A permit once the pause is over and the limit has room, first come first served.

        `ticket` orders the queue (the call's arrival, so a retry keeps its place) and
        `timeout` is what is left of the call's deadline. Raises `RateLimited` when the
        pause outlasts it or the limit keeps it queued to the end. `counted=False` (a pool
        with ADAPTIVE=0) obeys the pause but not the limit.
        """
        loop = asyncio.get_running_loop()
        deadline = self._clock() + timeout
        waiter: _Waiter | None = None
        try:
            while True:
                with self._lock:
                    self._adopt_shared_locked()
                    if waiter is not None and waiter.granted:
                        return self._permit_locked(ticket, counted)
                    now = self._clock()
                    paused = self._paused_until - now
                    if paused > 0 and now + paused > deadline:
                        raise self._pause_refusal_locked(paused, deadline - now)
                    wake: list[_Waiter] = []
                    if paused <= 0:
                        if waiter is None and (
                            not counted or (not self._waiters and self._has_room_locked())
                        ):
                            self._in_flight += counted
                            return self._permit_locked(ticket, counted)
                        wake = self._grant_locked()  # the pause may have just ended
                    if waiter is None:
                        waiter = _Waiter(loop, loop.create_future(), counted)
                        heapq.heappush(self._waiters, (ticket, next(self._sequence), waiter))
                    # Pausing callers wake a little apart when it ends; the first grants.
                    until = deadline if paused <= 0 else min(deadline, now + paused)
                    until += 0.02 * self._rng.random() if paused > 0 else 0.0
                self._signal(wake)
                if waiter.granted:
                    continue
                if now >= deadline:
                    raise self._queue_refusal(timeout)
                try:
                    async with asyncio.timeout(max(0.0, until - self._clock())):
                        await waiter.future
                except TimeoutError:
                    pass
                if waiter.future.done() and not waiter.granted:
                    waiter.future = loop.create_future()
        except BaseException:
            if waiter is not None:
                self._abandon(waiter)
            raise

    def release(
        self,
        permit: Permit,
        outcome: Outcome,
        *,
        ttft_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Give a permit back, telling what the attempt said about the deployment's load."""
        if permit.released:
            return
        permit.released = True
        changes: list[tuple[float, float, str]] = []
        with self._lock:
            self._in_flight -= permit.counted
            if self.settings.adaptive:
                if outcome is Outcome.DROP:
                    self.counters["drops"] += 1
                    self._drops_in_a_row += 1
                    self._on_drop_locked(permit, changes)
                elif outcome is Outcome.SUCCESS:
                    self._drops_in_a_row = 0
                    if headers is not None:
                        self._room = _requests_room(headers)
                    self._on_success_locked(permit, ttft_s, changes)
                    if headers is not None:
                        self._on_headers_locked(permit, headers, changes)
            elif outcome is Outcome.DROP:
                self.counters["drops"] += 1
                self._drops_in_a_row += 1
            elif outcome is Outcome.SUCCESS:
                self._drops_in_a_row = 0
            wake = self._grant_locked()
        self._signal(wake)
        self._publish(changes)

    def pause(self, seconds: float | None, reason: str) -> float:
        """Stop dispatch for `seconds` (the server's Retry-After), or a jittered backoff when
        the server named no wait; returns the pause applied. A pause is only ever extended."""
        with self._lock:
            if seconds is None:
                ceiling = min(
                    self.settings.pause_backoff_max,
                    self.settings.pause_backoff_base * 2 ** max(0, self._drops_in_a_row - 1),
                )
                seconds = ceiling * (0.5 + 0.5 * self._rng.random())
            now = self._clock()
            self._last_pause_s = seconds
            if seconds > 0:
                self.counters["pauses"] += 1
                if now + seconds > self._paused_until:
                    self._paused_until = now + seconds
                    self._pause_reason = reason
            left = max(0.0, self._paused_until - now)
            limit = self._limit
        if self.shared is not None and seconds > 0:
            self.shared.publish(self.name, limit, left, reason)
        return seconds

    # -- internals (lock held) ------------------------------------------------------------------
    def _has_room_locked(self) -> bool:
        return self._in_flight < self.limit

    def _permit_locked(self, ticket: float, counted: bool) -> Permit:
        return Permit(
            ticket=ticket,
            granted_at=self._clock(),
            counted=counted,
            in_flight_at_grant=self._in_flight,
        )

    def _grant_locked(self) -> list[_Waiter]:
        woken: list[_Waiter] = []
        if self._paused_until > self._clock():
            return woken
        while self._waiters and (not self._waiters[0][2].counted or self._has_room_locked()):
            _, _, waiter = heapq.heappop(self._waiters)
            waiter.granted = True
            self._in_flight += waiter.counted
            woken.append(waiter)
        return woken

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter leaves (deadline, cancellation): take it out, or give back its grant."""
        with self._lock:
            if waiter.granted:
                self._in_flight -= waiter.counted
                wake = self._grant_locked()
            else:
                self._waiters = [entry for entry in self._waiters if entry[2] is not waiter]
                heapq.heapify(self._waiters)
                wake = []
        self._signal(wake)

    def _decrease_locked(
        self,
        permit: Permit,
        ratio: float,
        reason: str,
        changes: list[tuple[float, float, str]],
        too_many: int | None = None,
    ) -> None:
        """Multiply the limit by `ratio` (from at most `too_many`, when that is known)."""
        # One decrease per round trip: what was sent before the last one adds nothing new.
        if permit.granted_at < self._last_decrease_at:
            return
        before = self._limit
        start = self._limit if too_many is None else min(self._limit, float(too_many))
        self._limit = max(float(self.settings.floor), start * ratio)
        self._last_decrease_at = self._clock()
        self.counters["decreases"] += 1
        self._changed_locked(reason, before, changes)

    def _on_drop_locked(self, permit: Permit, changes: list[tuple[float, float, str]]) -> None:
        """A 429: what is in flight as it comes back (this call included) was too many.

        The first refusal of a round trip multiplies the limit down (from at most that many)
        and remembers that level. The later refusals of the same round lower the level to
        what is still in flight as each comes back: after the last one, what is left in
        flight is what the endpoint accepted, so the level ends one above its capacity,
        measured. A refusal of a step above the level (a probe) makes the next probe wait
        twice as long.
        """
        settings = self.settings
        in_flight = float(self._in_flight + 1)
        if permit.granted_at < self._last_decrease_at:  # the same round trip
            level = min(self._refused_level or in_flight, in_flight)
            self._refused_level = max(float(settings.floor) + 1, level)
            if self._limit > self._refused_level - 1:
                before = self._limit
                self._limit = max(float(settings.floor), self._refused_level - 1)
                self._changed_locked("429", before, changes)
            return
        known = self._refused_level
        self._probe_succeeded = False
        if known is not None and in_flight >= known:
            # A step above the known level was refused again: back to just below it (what
            # is known to work), and wait twice as long before the next step.
            self._probe_interval = min(settings.probe_interval_max_s, self._probe_interval * 2)
            if permit.granted_at >= self._last_decrease_at:
                before = self._limit
                self._limit = max(float(settings.floor), known - 1)
                self._last_decrease_at = self._clock()
                self.counters["decreases"] += 1
                self._changed_locked("429", before, changes)
        else:
            self._refused_level = in_flight
            self._decrease_locked(permit, settings.backoff_ratio, "429", changes, int(in_flight))
        self._next_probe_at = self._clock() + self._probe_wait()

    def _probe_wait(self) -> float:
        # A step above costs a pause of the whole deployment when refused: step seldom
        # compared with what the endpoint asks to wait.
        return max(self._probe_interval, 4 * self._last_pause_s)

    def _on_success_locked(
        self, permit: Permit, ttft_s: float | None, changes: list[tuple[float, float, str]]
    ) -> None:
        settings = self.settings
        if ttft_s is not None:
            now = self._clock()
            best = self._best
            while best and best[-1][1] >= ttft_s:
                best.pop()
            best.append((now, ttft_s))
            while best[0][0] < now - settings.best_window_s:
                best.popleft()
            self._ttft_ewma = (
                ttft_s if self._ttft_ewma is None else 0.8 * self._ttft_ewma + 0.2 * ttft_s
            )
            floor_ttft = max(best[0][1], 0.001)
            allowed = floor_ttft * settings.latency_tolerance
            if ttft_s > allowed and self._ttft_ewma > allowed:
                gradient = max(0.5, allowed / self._ttft_ewma)
                self._decrease_locked(permit, gradient, "latency", changes)
                return
        # Growth, only while the limit is really in use (not app-limited).
        if permit.in_flight_at_grant < self._limit * 0.5 or self._limit >= settings.ceiling:
            return
        before = self._limit
        level = self._refused_level
        if (
            level is not None
            and permit.in_flight_at_grant >= level
            and permit.granted_at >= self._last_decrease_at
        ):
            level = self._refused_level = None  # ran above it unrefused: capacity came back
            self._probe_interval = settings.probe_interval_s
            self._probe_succeeded = True
        if level is None and self._probe_succeeded:
            step = 1.0  # capacity came back: grow fast until the endpoint says where it ends
        elif level is None:
            step = 1.0 / self._limit  # about one more per round trip
        elif self._limit < level - 1:
            step = 1.0  # fast back up to just below what was refused
            self._limit = min(self._limit + step, level - 1)
            step = 0.0
        elif self._room != 0 and self._clock() >= self._next_probe_at:
            # One step above, now and then, in case capacity came back; never while the
            # endpoint says it is full (x-ratelimit-remaining-requests: 0 of a limit).
            step = 1.0
            self._next_probe_at = self._clock() + self._probe_wait()
        else:
            step = 0.0
        self._limit = min(float(settings.ceiling), self._limit + step)
        if math.floor(self._limit) != math.floor(before):
            self._changed_locked("recovering", before, changes)

    def _on_headers_locked(
        self, permit: Permit, headers: Mapping[str, str], changes: list[tuple[float, float, str]]
    ) -> None:
        for kind in ("requests", "tokens"):
            limit = _positive(headers.get(f"x-ratelimit-limit-{kind}"))
            remaining = _positive(headers.get(f"x-ratelimit-remaining-{kind}"))
            # -1 or 0, or a missing limit, means "unknown", not "none left" (some servers).
            if limit and remaining and remaining / limit < self.settings.low_remaining_fraction:
                self._decrease_locked(
                    permit, self.settings.low_remaining_ratio, f"{kind} running low", changes
                )
                return

    def _changed_locked(
        self, reason: str, before: float, changes: list[tuple[float, float, str]]
    ) -> None:
        self.last_change = LimitChange(reason=reason, before=before, after=self._limit)
        changes.append((self._limit, max(0.0, self._paused_until - self._clock()), reason))

    def _adopt_shared_locked(self) -> None:
        """Take the cluster's limit and pause when another instance learned them first."""
        if self.shared is None:
            return
        known = self.shared.current(self.name)
        if known is None:
            return
        limit, pause_s, reason = known
        now = self._clock()
        if pause_s > 0 and now + pause_s > self._paused_until + 0.01:
            self._paused_until = now + pause_s
            self._pause_reason = reason
        if self.settings.adaptive and limit > 0 and abs(limit - self._limit) >= 0.5:
            before = self._limit
            self._limit = min(float(self.settings.ceiling), max(float(self.settings.floor), limit))
            self.last_change = LimitChange(reason=f"cluster: {reason}", before=before, after=limit)

    def _publish(self, changes: list[tuple[float, float, str]]) -> None:
        if self.shared is not None and changes:
            limit, pause_s, reason = changes[-1]
            self.shared.publish(self.name, limit, pause_s, reason)

    def _pause_refusal_locked(self, paused: float, left: float) -> RateLimited:
        return RateLimited(
            f"deployment {self.name!r} is rate limited: the endpoint asked to wait "
            f"{paused:.1f}s ({self._pause_reason or '429'}) and the call's total deadline "
            f"leaves {max(0.0, left):.1f}s",
            retry_after=paused,
        )

    def _queue_refusal(self, waited: float) -> RateLimited:
        with self._lock:
            self.counters["timeouts"] += 1
            return RateLimited(
                f"deployment {self.name!r} is at its concurrency limit of {self.limit} calls "
                f"(learned from the endpoint: {self.last_change.reason}); the call's total "
                f"deadline passed after {waited:.1f}s in the queue",
                retry_after=0.0,
            )

    def _signal(self, waiters: list[_Waiter]) -> None:
        for waiter in waiters:
            if not wake_on_its_loop(waiter.loop, waiter.future):
                with self._lock:  # its loop is closed: nobody will use the permit
                    self._in_flight -= waiter.counted
                    more = self._grant_locked()
                self._signal(more)

    # -- stats ------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._adopt_shared_locked()
            change = self.last_change
            return {
                "deployment": self.name,
                "adaptive": self.settings.adaptive,
                "limit": self.limit,
                "floor": self.settings.floor,
                "ceiling": self.settings.ceiling,
                "in_flight": self._in_flight,
                "waiting": len(self._waiters),
                "paused_s": round(max(0.0, self._paused_until - self._clock()), 3),
                "pause_reason": self._pause_reason,
                "last_change": {
                    "reason": change.reason,
                    "at": change.at,
                    "from": math.floor(change.before),
                    "to": math.floor(change.after),
                },
                "refused_at": math.floor(self._refused_level) if self._refused_level else None,
                "ttft_best_ms": round(self._best[0][1] * 1000, 1) if self._best else None,
                "ttft_recent_ms": round(self._ttft_ewma * 1000, 1)
                if self._ttft_ewma is not None
                else None,
                **self.counters,
            }


def _requests_room(headers: Mapping[str, str]) -> float | None:
    """The share of its request limit the endpoint says is left, or None when it does not
    really say (no header, -1, or 0 without a limit: unknown, not "none left")."""
    limit = _positive(headers.get("x-ratelimit-limit-requests"))
    try:
        remaining = float(headers.get("x-ratelimit-remaining-requests", ""))
    except ValueError:
        return None
    if limit is None or remaining < 0:
        return None
    return min(1.0, remaining / limit)


def _positive(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number > 0 else None
