"""At most `MAX_CONCURRENT_REQUESTS` page requests in Django at once; the rest wait their turn.

Why: Daphne starts every request it reads at once. When 200 users submit designs together,
a few hundred requests each hop to the database thread and back several times, and every
hop is a callback on the serving loop: turns of 300 ready callbacks took 200-400 ms, and a
`/health` probe waited behind them (p99 about 1 s). Requests beyond the limit wait here,
first come first served, as parked futures that cost the loop nothing; the database thread
serves them as fast as before. Past `max_waiting` the answer is 503 with Retry-After.
Health probes are answered in front of this (`pools.endpoints`), WebSockets pass through.
A request that waits on a model's answer steps out of line meanwhile (`outside_the_gate`):
waiting costs this process nothing, and it must not keep others out.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pools.endpoints import ASGIApp, Receive, Scope, Send

BUSY_RETRY_AFTER_S = 5
GATE_SCOPE_KEY = "carlos.request_gate"


class _Gate:
    def __init__(self, limit: int) -> None:
        self.places = asyncio.Semaphore(limit)  # fair: waiters are served in order
        self.waiting = 0


class _Ticket:
    """One request's place, in its scope, so the request can step out of line and back."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self.held = False


class RequestGate:
    """ASGI middleware for HTTP: `limit` requests in `app` at once, `max_waiting` in line."""

    def __init__(self, app: ASGIApp, *, limit: int, max_waiting: int) -> None:
        if limit < 1 or max_waiting < 0:
            raise ValueError("limit must be at least 1 and max_waiting at least 0")
        self.app = app
        self.limit = limit
        self.max_waiting = max_waiting
        # A semaphore belongs to the loop that uses it (tests run several loops).
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Gate] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gate = self._gate()
        if gate.places.locked() and gate.waiting >= self.max_waiting:
            await _busy(send)
            return
        ticket = _Ticket(gate)
        gate.waiting += 1
        try:
            await gate.places.acquire()
        finally:
            gate.waiting -= 1
        ticket.held = True
        try:
            await self.app({**scope, GATE_SCOPE_KEY: ticket}, receive, send)
        finally:
            if ticket.held:
                gate.places.release()

    def _gate(self) -> _Gate:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = _Gate(self.limit)
        return gate


@contextlib.asynccontextmanager
async def outside_the_gate(scope: Mapping[str, Any]) -> AsyncIterator[None]:
    """While the block waits on something that costs this process nothing (a model's answer
    on the LLM loop), the request's place goes to the next in line; it queues again after."""
    ticket = scope.get(GATE_SCOPE_KEY)
    if not isinstance(ticket, _Ticket) or not ticket.held:
        yield
        return
    ticket.held = False
    ticket.gate.places.release()
    try:
        yield
    finally:
        await ticket.gate.places.acquire()
        ticket.held = True


async def _busy(send: Send) -> None:
    body = b"The server is busy. Please try again in a few seconds.\n"
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(BUSY_RETRY_AFTER_S).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
