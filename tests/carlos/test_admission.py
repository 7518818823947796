"""The request gate: a bounded number of page requests in Django, the rest in line or refused."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.urls import reverse

from carlos import asgi
from carlos.admission import BUSY_RETRY_AFTER_S, RequestGate, outside_the_gate
from pools.endpoints import HealthEndpoints
from tests.helpers.waiting import eventually


class SlowApp:
    """An ASGI app that answers each request when the test releases it, and records order."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.order: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        self.order.append(scope["path"])
        try:
            await self.release.wait()
        finally:
            self.inside -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def in_line(gate: RequestGate, *, logins: bool = False) -> int:
    """How many requests wait in the gate's line (pages' or logins'), as the gate counts."""
    line = gate._gate()
    return line.logins.waiting if logins else line.waiting


async def test_requests_past_the_limit_wait_their_turn_in_order():
    app = SlowApp()
    gate = RequestGate(app, limit=2, max_waiting=10)
    async with client(gate) as http:
        requests = []
        for n in range(5):
            requests.append(asyncio.create_task(http.get(f"/page/{n}")))
            # Each arrives (inside, or in line) before the next is sent.
            await eventually(lambda n=n: app.inside + in_line(gate) == n + 1)
        assert app.inside == 2
        assert app.order == ["/page/0", "/page/1"]
        app.release.set()
        answers = await asyncio.gather(*requests)
    assert [answer.status_code for answer in answers] == [200] * 5
    assert app.most_inside == 2
    assert app.order == [f"/page/{n}" for n in range(5)]


@pytest.mark.parametrize("method, path", [("GET", "/page"), ("POST", "/login/")])
async def test_a_full_line_is_refused_with_503_and_retry_after(method: str, path: str):
    """Pages and logins alike: one place, one in line, and the next is refused at once."""
    app = SlowApp()
    gate = RequestGate(app, limit=1, max_waiting=1, login_paths={"/login/"}, logins=1)
    async with client(gate) as http:
        inside = asyncio.create_task(http.request(method, path))
        await eventually(lambda: app.inside == 1)
        waiting = asyncio.create_task(http.request(method, path))
        await eventually(lambda: in_line(gate, logins=path == "/login/") == 1)
        refused = await http.request(method, path)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == str(BUSY_RETRY_AFTER_S)
        assert "busy" in refused.text
        app.release.set()
        assert [(await inside).status_code, (await waiting).status_code] == [200, 200]
    assert app.order == [path, path]


async def test_health_is_answered_while_every_place_is_taken(installed_registry):
    app = SlowApp()
    async with client(HealthEndpoints(RequestGate(app, limit=1, max_waiting=0))) as http:
        page = asyncio.create_task(http.get("/slow"))
        await eventually(lambda: app.inside == 1)
        assert (await http.get("/health/live")).status_code == 200
        assert (await http.get("/other")).status_code == 503
        app.release.set()
        assert (await page).status_code == 200


async def test_a_request_waiting_on_a_model_steps_out_of_line_and_back():
    answer = asyncio.Event()
    stepped_out, back = asyncio.Event(), asyncio.Event()
    inside: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        inside.append(scope["path"])
        if scope["path"] == "/questions":
            async with outside_the_gate(scope):
                stepped_out.set()
                await answer.wait()  # the model thinks; this process does nothing
            back.set()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with client(RequestGate(app, limit=1, max_waiting=5)) as http:
        asking = asyncio.create_task(http.get("/questions"))
        await stepped_out.wait()
        assert (await http.get("/other")).status_code == 200  # its place was free meanwhile
        answer.set()
        assert (await asking).status_code == 200 and back.is_set()
        assert (await http.get("/after")).status_code == 200  # and it gave the place back
    assert inside == ["/questions", "/other", "/after"]


async def test_outside_a_gated_request_stepping_out_does_nothing():
    """A scope the gate never saw, and a login POST (a line of its own, no page place), step
    out without freeing a page's place: a page past the only place is still refused."""
    scope = {"type": "http", "path": "/"}
    async with outside_the_gate(scope):
        ran = True
    assert ran and scope == {"type": "http", "path": "/"}

    pages = SlowApp()
    stepped_out, answer = asyncio.Event(), asyncio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] != "/login/":
            await pages(scope, receive, send)
            return
        async with outside_the_gate(scope):
            stepped_out.set()
            await answer.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = RequestGate(app, limit=1, max_waiting=0, login_paths={"/login/"}, logins=1)
    async with client(gate) as http:
        first = asyncio.create_task(http.get("/first"))
        await eventually(lambda: pages.inside == 1)
        login = asyncio.create_task(http.post("/login/"))
        await stepped_out.wait()
        second = asyncio.create_task(http.get("/second"))
        await eventually(lambda: second.done() or pages.inside == 2)
        assert second.done() and second.result().status_code == 503  # the place stayed taken
        answer.set()
        pages.release.set()
        assert [(await login).status_code, (await first).status_code] == [200, 200]
        assert (await http.get("/third")).status_code == 200  # and no place was lost either
    assert pages.order == ["/first", "/third"]


async def test_other_scopes_pass_through():
    seen: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    gate = RequestGate(app, limit=1, max_waiting=0)
    await gate({"type": "websocket", "path": "/ws/"}, None, None)
    assert seen == ["websocket"]


def test_the_application_gates_pages_with_the_settings():
    gate = asgi.application.app.application_mapping["http"].app
    assert isinstance(gate, RequestGate)
    assert (gate.limit, gate.max_waiting) == (8, 1000)
    assert gate.logins == settings.MAX_CONCURRENT_LOGINS
    assert gate.login_paths == {reverse("login"), reverse("admin-login")}


async def test_logins_wait_in_a_line_of_their_own_and_pages_pass_them():
    """A burst of login POSTs took every place and the whole line ahead of a page, each
    passing Django's middleware before it could step out to hash: the page waited 1.3 s."""
    app = SlowApp()
    gate = RequestGate(app, limit=1, max_waiting=10, login_paths={"/login/"}, logins=2)
    async with client(gate) as http:
        logins = [asyncio.create_task(http.post("/login/")) for _ in range(5)]
        await eventually(lambda: app.inside == 2)
        page = asyncio.create_task(http.get("/page"))
        await eventually(lambda: app.inside == 3)  # the page is in, three logins still wait
        assert app.order == ["/login/", "/login/", "/page"]
        assert sum(not login.done() for login in logins) == 5
        app.release.set()
        assert (await page).status_code == 200
        assert [answer.status_code for answer in await asyncio.gather(*logins)] == [200] * 5
    assert app.most_inside == 3  # two logins and the page, never more


@pytest.mark.parametrize("limit, max_waiting, logins", [(0, 1, 1), (1, -1, 1), (1, 1, 0)])
def test_nonsense_limits_are_refused(limit, max_waiting, logins):
    with pytest.raises(ValueError):
        RequestGate(SlowApp(), limit=limit, max_waiting=max_waiting, logins=logins)
