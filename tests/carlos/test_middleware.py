"""Django's middleware on the event loop (carlos.middleware), through the real ASGI application.

Issue 16's profile: each page hopped to a thread and back 17-26 times (every middleware's
`process_request` and `process_response`, the login check, two queries for the session and
the user, one per ORM call), and under load each hop waited for a turn of a busy event loop.
The hops are counted here by counting `sync_to_async` calls during one request.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.conf import settings
from django.core import checks
from django.test import override_settings

from agents.models import AgentRun, Design
from agents.options import DEFAULT_OPTIONS
from tests.carlos.test_login import ORIGIN, PASSWORD, amake_user, browser, csrf_token, post_login

pytestmark = pytest.mark.django_db(transaction=True)

# What a page may still cost: Django's request_started signal, the session and user (one
# hop), the page's one database round, and closing the response (request_finished).
HOPS_PER_PAGE = 4


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[str]]:
    """Every `sync_to_async` call from here on, by the name of the function it runs."""
    counted: collections.Counter[str] = collections.Counter()
    call = SyncToAsync.__call__

    def counting(self: SyncToAsync, *args: Any, **kwargs: Any) -> Any:
        counted[getattr(self.func, "__qualname__", type(self.func).__name__)] += 1
        return call(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counting)
    yield counted


@pytest.fixture
async def signed_in() -> AsyncIterator[httpx.AsyncClient]:
    await amake_user("alice")
    async with browser() as client:
        answer = await post_login(client, "alice", PASSWORD, await csrf_token(client))
        assert answer.status_code == 302, answer.text
        yield client


async def running_design() -> int:
    """A running design of the signed-in user's, one agent done and one at work."""

    def create() -> int:
        from django.contrib.auth import get_user_model

        owner = get_user_model().objects.get(username="alice")
        design = Design.objects.create(
            owner=owner,
            request_text="An online bookshop for 50,000 daily users",
            options=dict(DEFAULT_OPTIONS),
            status=Design.Status.RUNNING,
        )
        AgentRun.objects.create(
            design=design,
            agent="requirements",
            status=AgentRun.Status.SUCCEEDED,
            output_text="# Requirements\n\n- search\n- payments\n",
        )
        AgentRun.objects.create(design=design, agent="carlos", status=AgentRun.Status.RUNNING)
        return design.pk

    return await sync_to_async(create)()


async def test_each_page_makes_at_most_four_hops_to_a_thread(signed_in, hops) -> None:
    """Before: login page 19, form 22, history 24, design page 25 (and 24 for a login)."""
    design_id = await running_design()
    await signed_in.get(f"/designs/{design_id}/")  # the stage estimates' cache filled
    for path in ("/", "/designs/", f"/designs/{design_id}/"):
        hops.clear()
        page = await signed_in.get(path)
        assert page.status_code == 200, page.text[:300]
        assert sum(hops.values()) <= HOPS_PER_PAGE, (path, dict(hops))


async def test_the_login_page_reads_nothing_for_a_visitor_without_a_session(hops) -> None:
    async with browser() as visitor:
        hops.clear()
        page = await visitor.get("/accounts/login/")
    assert page.status_code == 200
    # request_started and closing the response: no session, no user to read.
    assert sum(hops.values()) <= 2, dict(hops)


async def test_the_session_is_still_saved_and_messages_still_shown(signed_in) -> None:
    """A login saves the session (its save goes to a thread), and the logout's message,
    stored through the messages middleware, reaches the next page."""
    assert (await signed_in.get("/")).status_code == 200  # the saved session holds
    token = await csrf_token(signed_in, "/")
    out = await signed_in.post(
        "/accounts/logout/",
        data={"csrfmiddlewaretoken": token},
        headers={"referer": f"{ORIGIN}/"},
    )
    assert out.status_code == 302, out.text[:300]
    landing = await signed_in.get(out.headers["location"])
    assert "You have been logged out." in landing.text
    assert (await signed_in.get("/")).status_code == 302  # signed out for real


async def test_a_post_without_its_csrf_token_is_refused(signed_in) -> None:
    answer = await signed_in.post(
        "/", data={"request_text": "no token"}, headers={"referer": f"{ORIGIN}/"}
    )
    assert answer.status_code == 403


async def test_csrf_kept_in_the_session_still_works_from_a_thread() -> None:
    """With CSRF_USE_SESSIONS the token lives in the session, which may not be loaded yet:
    those steps go to a thread, and a form posted with its token is accepted."""
    from carlos.middleware import LoopMiddlewareHandler

    await amake_user("bob")
    with override_settings(CSRF_USE_SESSIONS=True):
        handler = LoopMiddlewareHandler()
        transport = httpx.ASGITransport(app=handler, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
            answer = await post_login(client, "bob", PASSWORD, await csrf_token(client))
            assert answer.status_code == 302, answer.text[:300]
            refused = await client.post("/", data={}, headers={"referer": f"{ORIGIN}/"})
            assert refused.status_code == 403


def test_settings_keep_djangos_paths_so_its_deploy_checks_find_the_middleware() -> None:
    """The subclasses are swapped in by the handler only; Django's security checks look for
    its middleware by path and would otherwise warn (W001-W003) and skip the HSTS,
    cookie and frame checks."""
    from carlos.asgi import django_asgi_app
    from carlos.middleware import ON_THE_LOOP

    assert "django.middleware.security.SecurityMiddleware" in settings.MIDDLEWARE
    assert not any(path.startswith("carlos.middleware") for path in settings.MIDDLEWARE)
    found = {
        message.id
        for message in checks.run_checks(include_deployment_checks=True, tags=["security"])
    }
    assert not found & {"security.W001", "security.W002", "security.W003"}, found
    # ... while the chain the server runs is made of the loop's subclasses.
    chain = django_asgi_app._view_middleware
    assert [type(method.__self__).__module__ for method in chain] == ["carlos.middleware"]
    assert set(ON_THE_LOOP) <= set(settings.MIDDLEWARE)


async def test_requests_reuse_their_database_threads(signed_in, monkeypatch) -> None:
    """Django starts a thread for each request and joins it at the end, on the event loop;
    the handler hands its threads (lanes) from request to request instead."""
    import threading

    started: list[str] = []
    start = threading.Thread.start

    def counting(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting)
    for _ in range(10):
        assert (await signed_in.get("/designs/")).status_code == 200
    assert len(started) <= 1, started  # before: 20, a thread and its joiner a request
