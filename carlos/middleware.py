"""Django's middleware, run on the event loop instead of hopping to a thread at every step.

Django's `MiddlewareMixin` runs each `process_request`, `process_view` and `process_response`
of an async request through `sync_to_async`: with this project's middleware that was 16 hops
to a thread and back per request (19-26 per page in all), each waiting for a turn of an
event loop that 200 users were also using (issue 16's profile). What these steps do is read headers
and set attributes, so the subclasses here run them inline. The steps that can touch the
database still go to a thread: saving a changed session, storing messages that were read or
added (they may overflow into the session), checking a posted form's CSRF token (a refusal
renders a page that reads the user), and CSRF kept in the session.

`settings.MIDDLEWARE` keeps Django's own paths, because Django's deploy checks find its
middleware by path (no HSTS, cookie or frame checks otherwise). `LoopMiddlewareHandler` swaps
these subclasses in while it builds its async chain; any other middleware is left as it is.

The handler also gives each request a database thread kept from earlier requests (a lane)
instead of Django's new thread per request: starting that thread and joining it at the end
blocked the event loop, a quarter of its time in the load test's profile. A task that
outlives its request starts with `detached_task`, so it never keeps the request's lane.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware as DjangoAuthentication
from django.contrib.auth.middleware import get_user as lazy_user
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.contrib.messages.middleware import MessageMiddleware as DjangoMessages
from django.contrib.sessions.middleware import SessionMiddleware as DjangoSessions
from django.core.handlers.asgi import ASGIHandler
from django.db import connections
from django.http import HttpRequest, HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware as DjangoXFrameOptions
from django.middleware.common import CommonMiddleware as DjangoCommon
from django.middleware.csp import ContentSecurityPolicyMiddleware as DjangoCsp
from django.middleware.csrf import CsrfViewMiddleware as DjangoCsrf
from django.middleware.security import SecurityMiddleware as DjangoSecurity

Response = HttpResponseBase


class OnTheLoop:
    """`MiddlewareMixin.__acall__` without the hops: each step inline unless it says it
    needs a thread for this request (`request_needs_thread`, `response_needs_thread`)."""

    get_response: Callable[[HttpRequest], Awaitable[Response]]

    def request_needs_thread(self, request: HttpRequest) -> bool:
        return False

    def response_needs_thread(self, request: HttpRequest, response: Response) -> bool:
        return False

    async def __acall__(self, request: HttpRequest) -> Response:
        response: Response | None = None
        process_request = getattr(self, "process_request", None)
        if process_request is not None:
            if self.request_needs_thread(request):
                response = await sync_to_async(process_request)(request)
            else:
                response = process_request(request)
        response = response or await self.get_response(request)
        process_response = getattr(self, "process_response", None)
        if process_response is not None:
            if self.response_needs_thread(request, response):
                response = await sync_to_async(process_response)(request, response)
            else:
                response = process_response(request, response)
        return response


class SecurityMiddleware(OnTheLoop, DjangoSecurity):
    """Redirects and security headers: settings and headers only."""


class SessionMiddleware(OnTheLoop, DjangoSessions):
    """The session store is created lazily; only a save reaches the database."""

    def response_needs_thread(self, request: HttpRequest, response: Response) -> bool:
        session = getattr(request, "session", None)
        if session is None:
            return False
        return bool(session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class CommonMiddleware(OnTheLoop, DjangoCommon):
    """User agents, `APPEND_SLASH` (resolving a URL) and Content-Length: no I/O."""


class CsrfViewMiddleware(OnTheLoop, DjangoCsrf):
    """The token lives in a cookie: reading and setting it is headers only. A form's check
    goes to a thread: a refusal renders the failure page (its template reads the user), and
    with `CSRF_USE_SESSIONS` the token is in the session, so then every step does."""

    SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # never checked (Django)

    def request_needs_thread(self, request: HttpRequest) -> bool:
        return bool(settings.CSRF_USE_SESSIONS)

    def response_needs_thread(self, request: HttpRequest, response: Response) -> bool:
        return bool(settings.CSRF_USE_SESSIONS)

    async def process_view(  # type: ignore[override]
        self,
        request: HttpRequest,
        callback: Callable[..., Any],
        callback_args: tuple[Any, ...],
        callback_kwargs: dict[str, Any],
    ) -> Response | None:
        """A coroutine, so Django's handler calls it on the loop instead of in a thread."""
        check = super().process_view
        if request.method not in self.SAFE_METHODS or settings.CSRF_USE_SESSIONS:
            return await sync_to_async(check)(request, callback, callback_args, callback_kwargs)
        return check(request, callback, callback_args, callback_kwargs)


class AuthenticationMiddleware(OnTheLoop, DjangoAuthentication):
    """Sets the lazy `request.user` and `request.auser`; the views await `auser()`, which
    here reads the session and then the user in one hop to a thread instead of two."""

    def process_request(self, request: HttpRequest) -> None:
        super().process_request(request)
        request.auser = partial(_user_in_one_hop, request)  # type: ignore[attr-defined]


async def _user_in_one_hop(request: HttpRequest) -> AbstractBaseUser | AnonymousUser:
    """Without a session cookie there is nothing to read: anonymous, on the loop."""
    if not hasattr(request, "_acached_user"):
        if request.session.session_key is None:
            user = lazy_user(request)
        else:
            user = await sync_to_async(lazy_user)(request)
        request._acached_user = user  # type: ignore[attr-defined]
    return request._acached_user  # type: ignore[attr-defined]


class MessageMiddleware(OnTheLoop, DjangoMessages):
    """Messages read or added may be stored in the session (after the cookie's 2 KB), which
    may not be loaded yet: that response goes to a thread; the usual one, none, does not."""

    def response_needs_thread(self, request: HttpRequest, response: Response) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and bool(storage.used or storage.added_new)


class XFrameOptionsMiddleware(OnTheLoop, DjangoXFrameOptions):
    """One header."""


class ContentSecurityPolicyMiddleware(OnTheLoop, DjangoCsp):
    """A nonce and one header."""


# Django's path -> the subclass that runs it on the loop.
ON_THE_LOOP = {
    f"{cls.__bases__[-1].__module__}.{cls.__bases__[-1].__name__}": f"{__name__}.{cls.__name__}"
    for cls in (
        SecurityMiddleware,
        SessionMiddleware,
        CommonMiddleware,
        CsrfViewMiddleware,
        AuthenticationMiddleware,
        MessageMiddleware,
        XFrameOptionsMiddleware,
        ContentSecurityPolicyMiddleware,
    )
}


# Idle database threads kept for the next requests (the page gate lets 4 in at once; logins
# and a few others wait outside it).
IDLE_LANES_KEPT = 32


class DatabaseLanes:
    """One-thread executors for requests' synchronous work, reused from request to request.

    A lane serves one request at a time (asgiref's thread-sensitive mode: all of a
    request's database work on one thread). Only the serving loop takes and gives back."""

    def __init__(self, keep: int = IDLE_LANES_KEPT) -> None:
        self.keep = keep
        self._idle: list[ThreadPoolExecutor] = []

    def take(self) -> ThreadPoolExecutor:
        if self._idle:
            return self._idle.pop()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-db")

    def give_back(self, lane: ThreadPoolExecutor) -> None:
        if len(self._idle) < self.keep:
            self._idle.append(lane)
        else:
            lane.shutdown(wait=False)

    def close(self) -> None:
        """End the idle lanes' threads (their database connections with them: each thread
        closes its own); later requests start new ones."""
        idle, self._idle = self._idle, []
        for lane in idle:
            lane.submit(connections.close_all).result()
            lane.shutdown(wait=True)


def detached_task[T](coroutine: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """A task on this loop that outlives the request starting it, in a context of its own:
    it must not keep the request's database lane (calls after the request raise), nor its
    other context (a design's trace is its own)."""
    return asyncio.get_running_loop().create_task(
        coroutine, name=name, context=contextvars.Context()
    )


class LoopMiddlewareHandler(ASGIHandler):
    """Django's ASGI handler whose async chain uses the subclasses above for Django's
    middleware that `settings.MIDDLEWARE` lists (the settings themselves stay as they are),
    each request's database work on a lane."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes = DatabaseLanes()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)  # refuses, as Django's does
        lane = self.lanes.take()
        try:
            async with ThreadSensitiveContext(executor=lane):
                await self.handle(scope, receive, send)
        finally:
            self.lanes.give_back(lane)

    def load_middleware(self, is_async: bool = False) -> None:
        listed = settings.MIDDLEWARE
        if is_async:
            settings.MIDDLEWARE = [ON_THE_LOOP.get(path, path) for path in listed]
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = listed
