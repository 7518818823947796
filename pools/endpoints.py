"""`/health` and `/health/live`, answered in front of Django.

A request through Django passes a dozen middleware and signal handlers, most of them
synchronous; each hops to the one thread that also runs every ORM query of the running
designs, so under load a health probe waited seconds in that thread's queue. Probes read
only the pools' in-memory stats (and Redis for `?scope=cluster`), so they are served here on
the event loop: no middleware, no database, no thread. The answer does not depend on the Host
header, so not on `ALLOWED_HOSTS` either: orchestrators probe by address.

Who asks decides how much is shown. Anyone gets the design note's public shape (`status`,
and per pool the slot numbers and counters); the operator details (endpoint, model and
deployment names, breakers, limits, the instance, the `reason` of a 503, the cluster view)
need /metrics' access rule (`pools.access.operator_allowed`) or a staff user's session. The
session is read only for a request that carries its cookie and passes nothing cheaper, so the
orchestrators' probes never touch the database.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings
from django.contrib.auth import aget_user
from django.http import HttpRequest
from django.http.cookie import parse_cookie
from redis.exceptions import RedisError

from pools.access import operator_allowed
from pools.engine.registry import PoolRegistry
from pools.runtime import get_pool

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# Extra sections of the operators' view: name -> a cheap, synchronous describer.
Sections = Mapping[str, Callable[[], Any]]
# Whether a server start is warming a registry not initialized yet (carlos.lifespan.warming).
Warming = Callable[[PoolRegistry], bool]

WARMING_UP = "the pools are warming up (connections opening); ready in a moment"
READINESS_PATH = "/health"
LIVENESS_PATH = "/health/live"
_NO_STORE = b"max-age=0, no-cache, no-store, must-revalidate, private"
OPERATORS_ONLY = (
    "scope=cluster is for operators: METRICS_TOKEN, an address in METRICS_ALLOWED_IPS "
    "(loopback when neither is set) or a staff session"
)
# What anyone may see of a pool: the note's slot numbers, and the counters.
PUBLIC_POOL_FIELDS = frozenset({"total", "in_use", "available", "overflow_in_use", "waiting"})
PUBLIC_COUNTER_PREFIXES = ("requests_", "connections_", "usage_")
# Session lookups in flight at once; past it a probe gets the public answer rather than
# queueing more queries behind the designs' ORM thread (probes skip the request gate).
MAX_SESSION_LOOKUPS = 2
_session_lookups = 0

logger = logging.getLogger("pools")


async def readiness(
    query: dict[str, list[str]],
    connection: Scope,
    sections: Sections | None = None,
    warming: Warming | None = None,
) -> tuple[int, dict[str, Any]]:
    """The design note's health JSON, live; 503 when the pools cannot serve (warming up,
    not initialized, closed, or the main deployment's circuit is open). Operators get the
    details too, and the application's `sections`; `scope=cluster` (operators only) adds
    every instance's last report when the pools are coordinated through Redis."""
    registry = get_pool()
    scope = query.get("scope", ["instance"])[-1]
    if scope not in {"instance", "cluster"}:
        return 400, {"error": "scope must be 'instance' or 'cluster'"}
    operator = await is_operator(connection)
    if scope == "cluster" and not operator:
        return 403, {"error": OPERATORS_ONLY}
    if scope == "cluster" and registry.cluster is None:
        return 400, {"error": "scope=cluster needs REDIS_URL (no cluster)"}
    reason = registry.unavailable_reason()
    if reason and not registry.initialized and not registry.closed and warming is not None:
        reason = WARMING_UP if warming(registry) else reason
    body = {"status": "degraded" if reason else "healthy", **registry.stats().as_json()}
    if not operator:
        return (503 if reason else 200), public_view(body)
    if reason:
        body["reason"] = reason
    for name, describe in (sections or {}).items():
        try:
            body[name] = describe()
        except Exception as exc:  # a probe answers whatever a section does
            logger.exception("/health could not describe %s", name)
            body[name] = {"error": type(exc).__name__}
    if scope == "cluster":
        try:
            body["cluster_view"] = await registry.cluster_stats()
        except (RedisError, OSError) as exc:
            body["cluster_view"] = {"error": f"Redis unreachable: {type(exc).__name__}"}
    return (503 if reason else 200), body


async def liveness(
    query: dict[str, list[str]],
    connection: Scope,
    sections: Sections | None = None,
    warming: Warming | None = None,
) -> tuple[int, dict[str, Any]]:
    """The process answers: 200 even during an LLM outage, so nothing restarts a healthy app."""
    return 200, {"status": "alive"}


def public_view(body: dict[str, Any]) -> dict[str, Any]:
    """The note's public shape: the status, and per pool its slot numbers and counters."""
    return {
        "status": body["status"],
        "pools": {
            name: {
                key: value
                for key, value in pool.items()
                if isinstance(value, int | float)
                and (key in PUBLIC_POOL_FIELDS or key.startswith(PUBLIC_COUNTER_PREFIXES))
            }
            for name, pool in body["pools"].items()
        },
    }


async def is_operator(connection: Scope) -> bool:
    """/metrics' access rule (token, address; loopback by default), else a staff session."""
    headers = _headers(connection)
    client = connection.get("client") or ("", 0)
    if operator_allowed(headers.get("authorization", ""), client[0], open_by_default=False):
        return True
    return await _staff_session(headers.get("cookie", ""))


async def _staff_session(cookie_header: str) -> bool:
    """Whether the session cookie is a logged-in, active staff user's: the session and user
    are read as Django's auth middleware reads them (the session hash checked), but only
    for a well-formed key and at most MAX_SESSION_LOOKUPS at once."""
    global _session_lookups
    session_key = parse_cookie(cookie_header).get(settings.SESSION_COOKIE_NAME)
    if not session_key or _session_lookups >= MAX_SESSION_LOOKUPS:
        return False
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    if store.session_key is None:  # malformed: no query for it
        return False
    request = HttpRequest()
    request.session = store
    _session_lookups += 1
    try:
        user = await aget_user(request)
    except Exception:  # a probe answers whatever the session store does
        logger.warning("/health could not read a session; answering without details", exc_info=True)
        return False
    finally:
        _session_lookups -= 1
    return bool(user.is_active and user.is_staff)


def _headers(connection: Scope) -> dict[str, str]:
    """The request's headers by lower-case name; repeated ones joined as HTTP allows."""
    headers: dict[str, str] = {}
    for name, value in connection.get("headers", ()):
        key = name.decode("latin-1").lower()
        separator = "; " if key == "cookie" else ", "
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}{separator}{text}" if key in headers else text
    return headers


_HANDLERS = {READINESS_PATH: readiness, LIVENESS_PATH: liveness}


class HealthEndpoints:
    """ASGI middleware: answer the probes, pass everything else to `app`.

    `sections` (name -> describer) are added to the operators' view of /health; `warming`
    tells a warm-up under way from pools nobody warms (the reason operators read).
    """

    def __init__(
        self, app: ASGIApp, *, sections: Sections | None = None, warming: Warming | None = None
    ) -> None:
        self.app = app
        self.sections = dict(sections or {})
        self.warming = warming

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
        status, body = await handler(query, scope, self.sections, self.warming)
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
