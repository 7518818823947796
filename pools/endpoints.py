"""`/health` and `/health/live`, answered in front of Django.

A request through Django passes a dozen middleware and signal handlers, most of them
synchronous; each hops to the one thread that also runs every ORM query of the running
designs, so under load a health probe waited seconds in that thread's queue. Probes read
only the pools' in-memory stats (and Redis for `?scope=cluster`), so they are served here on
the event loop: no middleware, no database, no thread. Nothing host-specific is in the
answer, so it does not depend on `ALLOWED_HOSTS`: orchestrators probe by address.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from redis.exceptions import RedisError

from pools.runtime import get_pool

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

READINESS_PATH = "/health"
LIVENESS_PATH = "/health/live"
_NO_STORE = b"max-age=0, no-cache, no-store, must-revalidate, private"


async def readiness(query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
    """The design note's health JSON, live; 503 when the pools cannot serve (not
    initialized, closed, or the main deployment's circuit is open). `scope=cluster` adds
    every instance's last report when the pools are coordinated through Redis."""
    registry = get_pool()
    scope = query.get("scope", ["instance"])[-1]
    if scope not in {"instance", "cluster"}:
        return 400, {"error": "scope must be 'instance' or 'cluster'"}
    if scope == "cluster" and registry.cluster is None:
        return 400, {"error": "scope=cluster needs REDIS_URL (no cluster)"}
    reason = registry.unavailable_reason()
    body = {"status": "degraded" if reason else "healthy", **registry.stats()}
    if reason:
        body["reason"] = reason
    if scope == "cluster":
        try:
            body["cluster_view"] = await registry.cluster_stats()
        except (RedisError, OSError) as exc:
            body["cluster_view"] = {"error": f"Redis unreachable: {type(exc).__name__}"}
    return (503 if reason else 200), body


async def liveness(query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
    """The process answers: 200 even during an LLM outage, so nothing restarts a healthy app."""
    return 200, {"status": "alive"}


_HANDLERS = {READINESS_PATH: readiness, LIVENESS_PATH: liveness}


class HealthEndpoints:
    """ASGI middleware: answer the probes, pass everything else to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = _HANDLERS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method not in {"GET", "HEAD"}:
            await _respond(send, 405, {"error": "only GET"}, [(b"allow", b"GET, HEAD")])
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        status, body = await handler(query)
        await _respond(send, status, body, head=method == "HEAD")


async def _respond(
    send: Send,
    status: int,
    body: dict[str, Any],
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    *,
    head: bool = False,
) -> None:
    content = json.dumps(body, indent=2).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        (b"cache-control", _NO_STORE),
        (b"x-content-type-options", b"nosniff"),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else content})
