"""Whether the pools can take a design now, and what the pages say when they cannot.

The pipeline runs in the background, where a refusal can only fail the design after the user
has left the form; so the form, the answers to clarifying questions and a retry ask here
first and answer 503 with Retry-After instead, the reason shown on the page (and to staff,
the operator's words). Two kinds: the pools are full (a breaker open, a queue at its cap, a
rate budget spent: "at capacity"), or they do not serve at all, as /health's readiness says
(warming up, stopping, the endpoint unreachable or unhealthy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass

from django.http import HttpRequest, HttpResponse

from agents import leases
from agents.specs import pools_in_use
from carlos import serving
from carlos.admission import outside_the_gate
from carlos.middleware import detached_task
from pools.engine.exceptions import PoolError
from pools.engine.registry import PoolRegistry
from pools.runtime import get_pool

logger = logging.getLogger("agents")

# Retry-After when the pools give no hint of their own (shutting down, a queue that timed
# out): about one agent call.
BUSY_RETRY_AFTER_S = 30
# Retry-After while this server drains: a restart, or another instance, takes the design.
DRAINING_RETRY_AFTER_S = 5
# A design sent while the pools warm up waits this long for them before it is refused, and
# Retry-After then says to come back in a few seconds.
WARM_UP_WAIT_S = 5.0
WARMING_RETRY_AFTER_S = 2
# What the form says when the pools do not serve at all (staff also see the reason).
STOPPING = "This server is restarting and takes no new design"
WARMING = "Carlos is starting up: its connections to the language model are warming up"
UNREACHABLE = "Carlos cannot reach its language model right now"
UNHEALTHY = "Carlos's language model endpoint is failing or rate limiting it right now"


@dataclass(frozen=True)
class Busy:
    """The pools cannot take a design now: why (for the log and staff), when to come back,
    and what the page tells the user (`notice`; empty: Carlos is at capacity)."""

    reason: str
    retry_after: int  # whole seconds, at least 1: the Retry-After header and the page say it
    notice: str = ""


def _whole_seconds(seconds: float | None) -> int:
    return max(1, math.ceil(BUSY_RETRY_AFTER_S if seconds is None else seconds))


def busy_from(refusal: PoolError) -> Busy:
    """A refusal raised by a call (POOL_REFUSALS), with its own retry hint when it has one."""
    hint = getattr(refusal, "retry_after", None)  # CircuitOpen and RateBudgetExceeded say
    return Busy(f"{type(refusal).__name__}: {refusal}", _whole_seconds(hint))


async def pools_busy(request: HttpRequest) -> Busy | None:
    """Why the pools would refuse a design started now, or None if they can take it: the
    engine's refusal for every pool an agent uses (`PoolRegistry.refusal`: its circuit
    breaker, a capped pool whose queue is full, its rate budget), then whether the pools
    serve at all (`pools_not_ready`), once a warm-up under way had a moment to finish."""
    if leases.draining():
        return Busy(
            "this server is stopping; it takes no new design", DRAINING_RETRY_AFTER_S, STOPPING
        )
    registry = get_pool()
    refusal = registry.refusal(pools_in_use())
    if refusal is not None:
        return Busy(refusal.reason, _whole_seconds(refusal.retry_after_s))
    if not registry.initialized and not registry.closed:
        await _join_warm_up(request, registry)
    return pools_not_ready(registry)


async def _join_warm_up(request: HttpRequest, registry: PoolRegistry) -> None:
    """Wait up to WARM_UP_WAIT_S for the pools' warm-up, out of the page gate's line: the
    server's own (it just started), or one begun here when nothing warms them (a server
    without start-up events that is not Daphne). A design sent in the server's first second
    then waits a moment instead of being refused; the readiness check that follows decides."""
    warm = detached_task(serving.warm_up(registry), name="pool warm-up")  # joins one under way
    warm.add_done_callback(_warm_up_outcome)
    async with outside_the_gate(request.scope):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(warm), WARM_UP_WAIT_S)


def _warm_up_outcome(warm: asyncio.Future[None]) -> None:
    """A warm-up's own failure is the server's to log; readiness then tells the user."""
    if not warm.cancelled() and (error := warm.exception()) is not None:
        logger.error("pool warm-up failed: %r", error)


def pools_not_ready(registry: PoolRegistry) -> Busy | None:
    """/health's readiness (`unavailable_reason`: one answer for the probe and the form),
    in the user's words: warming up, stopping, the endpoint unreachable or unhealthy."""
    reason = registry.unavailable_reason()
    if reason is None:
        return None
    if registry.stopping or registry.closed:
        return Busy(reason, DRAINING_RETRY_AFTER_S, STOPPING)
    if not registry.initialized:  # still warming after the wait
        return Busy(reason, WARMING_RETRY_AFTER_S, WARMING)
    if registry.warmup_error:
        return Busy(reason, BUSY_RETRY_AFTER_S, UNREACHABLE)
    return Busy(reason, BUSY_RETRY_AFTER_S, UNHEALTHY)


def busy_response(response: HttpResponse, busy: Busy | None) -> HttpResponse:
    """The page's response, with Retry-After (and a log line) when the design was refused."""
    if busy is not None:
        logger.warning("design refused with 503, pools busy: %s", busy.reason)
        response["Retry-After"] = str(busy.retry_after)
    return response
