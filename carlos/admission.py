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

Login POSTs have a line of their own instead (`login_paths`, at most `logins` in Django at
once, MAX_CONCURRENT_LOGINS): a storm of 200 wrong logins arrived at once, ahead of another
user's page in this line, and each passed Django's middleware holding a place before its
view could step out to hash the password: that page waited 1.3 s. Waiting logins cost
nothing, and the pages keep every place (carlos/login.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from pools.endpoints import ASGIApp, Receive, Scope, Send

BUSY_RETRY_AFTER_S = 5
GATE_SCOPE_KEY = "carlos.request_gate"
# The login forms' addresses (carlos/urls.py: `login`, `admin-login`).
LOGIN_PATHS = frozenset({"/accounts/login/", "/admin/login/"})


class _Line:
    def __init__(self, limit: int) -> None:
        self.places = asyncio.Semaphore(limit)  # fair: waiters are served in order
        self.waiting = 0


class _Gate(_Line):
    def __init__(self, limit: int, logins: int) -> None:
        super().__init__(limit)
        self.logins = _Line(logins)


class _Ticket:
    """One request's place, in its scope, so the request can step out of line and back."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self.held = False


class RequestGate:
    """ASGI middleware for HTTP: `limit` requests in `app` at once, `max_waiting` in line;
    login POSTs (`login_paths`) `logins` at once, in a line of their own."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        max_waiting: int,
        login_paths: Collection[str] = LOGIN_PATHS,
        logins: int | None = None,
    ) -> None:
        if logins is None:
            from django.conf import settings

            logins = settings.MAX_CONCURRENT_LOGINS
        if limit < 1 or max_waiting < 0 or logins < 1:
            raise ValueError("limit and logins must be at least 1 and max_waiting at least 0")
        self.app = app
        self.limit = limit
        self.max_waiting = max_waiting
        self.login_paths = frozenset(login_paths)
        self.logins = logins
        # A semaphore belongs to the loop that uses it (tests run several loops).
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Gate] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gate = self._gate()
        if scope["method"] == "POST" and scope["path"] in self.login_paths:
            await self._log_in(gate.logins, scope, receive, send)
            return
        if not await self._queue(gate, send):
            return
        ticket = _Ticket(gate)
        ticket.held = True
        try:
            await self.app({**scope, GATE_SCOPE_KEY: ticket}, receive, send)
        finally:
            if ticket.held:
                gate.places.release()

    async def _log_in(self, line: _Line, scope: Scope, receive: Receive, send: Send) -> None:
        """A login POST: its own line, and no page place (so nothing to step out of)."""
        if not await self._queue(line, send):
            return
        try:
            await self.app(scope, receive, send)
        finally:
            line.places.release()

    async def _queue(self, line: _Line, send: Send) -> bool:
        """Wait for a place in `line`; False (and a 503 sent) when the line is full."""
        if line.places.locked() and line.waiting >= self.max_waiting:
            await _busy(send)
            return False
        line.waiting += 1
        try:
            await line.places.acquire()
        finally:
            line.waiting -= 1
        return True

    def _gate(self) -> _Gate:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = _Gate(self.limit, self.logins)
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
