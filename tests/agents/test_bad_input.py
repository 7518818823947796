"""A catalogue of bad input at every door: the form, the JSON endpoints, the socket, the CLI.

Each case must get a clear 4xx (a clean close for the WebSocket, a CommandError for the
command) and change nothing it should not: no design or run is created, started or
altered, and nothing the user sent is ever echoed back unescaped.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from typing import Any
from urllib.parse import urlencode

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from agents import tasks
from agents.consumers import MAX_CLIENT_MESSAGE_BYTES
from agents.models import AgentRun, Design
from agents.options import DEFAULT_OPTIONS
from tests.agents.sockets import (
    closed_with,
    layer_members,
    leftovers,
    open_socket,
    replies_until_closed,
    session_cookie,
)
from tests.conftest import probe

pytestmark = pytest.mark.django_db(transaction=True)

User = get_user_model()
MEGABYTE = 1024 * 1024
SCRIPT = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
# A request whose every field is valid, so each case below breaks exactly one thing.
VALID = {"request_text": "A helpdesk for 300 staff", **DEFAULT_OPTIONS}


def urlencoded(fields: dict[str, str]) -> bytes:
    return urlencode(fields).encode()


def counts() -> tuple[int, int]:
    return Design.objects.count(), AgentRun.objects.count()


def make_user(username: str, **fields: Any) -> Any:
    return User.objects.create_user(username, password="a-long-test-password", **fields)


def make_design(owner: Any, **fields: Any) -> Design:
    fields.setdefault("options", dict(DEFAULT_OPTIONS))
    return Design.objects.create(owner=owner, request_text="A data lake", **fields)


def add_run(design: Design, agent: str = "requirements", **fields: Any) -> AgentRun:
    fields.setdefault("status", AgentRun.Status.SUCCEEDED)
    return AgentRun.objects.create(
        design=design, agent=agent, attempt=1, pool="mini", model="gpt-4o-mini", **fields
    )


@pytest.fixture
def alice(client: Client) -> Any:
    user = make_user("alice")
    client.force_login(user)
    return user


# --- the request form --------------------------------------------------------------------
FORM = "application/x-www-form-urlencoded"


def refused(
    name: str, body: bytes, message: str, *, content_type: str = FORM, status: int = 400
) -> Any:
    """A bad POST of the request form, the answer it must get, and the message it shows."""
    return pytest.param(body, content_type, status, message, id=name)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        refused("empty", urlencoded(VALID | {"request_text": ""}), "the request cannot be empty"),
        refused(
            "whitespace",
            urlencoded(VALID | {"request_text": " \n\t\r\n "}),
            "the request cannot be empty",
        ),
        refused(
            "one-megabyte",
            urlencoded(VALID | {"request_text": "x" * MEGABYTE}),
            "Your request is 1,048,576 characters long; the limit is 4,000.",
        ),
        refused(
            "invalid-utf8-raw-bytes",
            b"request_text=caf\xc3\x28+\xff\xfe&" + urlencoded(DEFAULT_OPTIONS),
            "The form data is not valid utf-8 text",
        ),
        refused(
            "invalid-utf8-percent-escaped",
            b"request_text=caf%C3%28+%FF&" + urlencoded(DEFAULT_OPTIONS),
            "The form data is not valid utf-8 text",
        ),
        refused(
            "nul-character",
            urlencoded(VALID | {"request_text": "two\x00parts"}),
            "Null characters are not allowed.",
        ),
        refused(
            "unknown-option-value",
            urlencoded(VALID | {"cloud": "oracle"}),
            "Select a valid choice. oracle is not one of the available choices.",
        ),
        refused(
            "missing-options", urlencoded({"request_text": "A helpdesk"}), "This field is required."
        ),
        refused(
            "json-instead-of-a-form",
            b'{"request_text": "A helpdesk for 300 staff", "cloud": "aws"}',
            "Send the form as application/x-www-form-urlencoded or multipart/form-data.",
            content_type="application/json",
            status=415,
        ),
        refused(
            "text-plain",
            b"request_text=A helpdesk",
            "Send the form as application/x-www-form-urlencoded",
            content_type="text/plain",
            status=415,
        ),
    ],
)
def test_bad_form_posts_get_a_clear_4xx_and_create_nothing(
    client: Client, alice: Any, body: bytes, content_type: str, status: int, message: str
) -> None:
    before = counts()
    response = client.post("/", body, content_type=content_type)
    assert response.status_code == status
    assert message in response.content.decode()
    assert counts() == before
    assert "Retry-After" not in response


def test_the_rejected_form_echoes_html_escaped(client: Client, alice: Any) -> None:
    response = client.post("/", VALID | {"request_text": SCRIPT, "cloud": "oracle"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in html
    assert not Design.objects.exists()


def test_unknown_form_fields_are_ignored_not_stored(client: Client, alice: Any, settings) -> None:
    """Extra fields (browser extensions, old pages) are not options: they never reach a design.

    The hourly limit is reached first, so a valid form stops at 429 with nothing started.
    """
    settings.DESIGNS_PER_HOUR = 1
    existing = make_design(alice)
    response = client.post("/", VALID | {"region": "mars", "owner_id": "999", "status": "x"})
    assert response.status_code == 429
    assert list(Design.objects.values_list("pk", flat=True)) == [existing.pk]


def test_posts_without_a_csrf_token_are_forbidden_and_change_nothing(alice: Any) -> None:
    waiting = make_design(
        alice,
        status=Design.Status.AWAITING_ANSWERS,
        clarifications=[{"question": "Budget?", "answer": None}],
    )
    broken = make_design(alice, status=Design.Status.FAILED, attempts=1, error="boom")
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    before = counts()
    for url, data in (
        ("/", VALID),
        (f"/designs/{waiting.pk}/answers/", {"answer_0": "about 1k euros"}),
        (f"/designs/{broken.pk}/retry/", {}),
    ):
        assert browser.post(url, data).status_code == 403, url
    assert counts() == before
    waiting.refresh_from_db()
    broken.refresh_from_db()
    assert (waiting.status, waiting.clarifications[0]["answer"]) == ("awaiting_answers", None)
    assert (broken.status, broken.attempts) == ("failed", 1)


def test_bad_answers_posts_get_a_clear_4xx_and_leave_the_design_waiting(
    client: Client, alice: Any
) -> None:
    design = make_design(
        alice,
        status=Design.Status.AWAITING_ANSWERS,
        clarifications=[{"question": "Budget?", "answer": None}],
    )
    url = f"/designs/{design.pk}/answers/"
    json_post = client.post(url, b'{"skip": "1"}', content_type="application/json")
    assert json_post.status_code == 415
    raw = client.post(url, b"answer_0=\xff\xfe", content_type="application/x-www-form-urlencoded")
    assert raw.status_code == 400
    assert "The form data is not valid utf-8 text" in raw.content.decode()
    too_long = client.post(url, {"answer_0": "x" * MEGABYTE})
    assert too_long.status_code == 400
    design.refresh_from_db()
    assert design.status == Design.Status.AWAITING_ANSWERS
    assert design.clarifications == [{"question": "Budget?", "answer": None}]
    assert tasks.running_task(design.pk) is None


def test_another_users_design_is_404_everywhere_and_stays_untouched(
    client: Client, alice: Any
) -> None:
    mallory = make_user("mallory")
    theirs = make_design(
        mallory,
        status=Design.Status.AWAITING_ANSWERS,
        clarifications=[{"question": "Budget?", "answer": None}],
    )
    run = add_run(theirs, output_text="## Their requirements")
    failed = make_design(mallory, status=Design.Status.FAILED, attempts=1, error="boom")
    before = counts()
    for method, url in (
        ("get", f"/designs/{theirs.pk}/"),
        ("get", f"/designs/{theirs.pk}/runs/{run.pk}/"),
        ("get", f"/designs/{theirs.pk}/download/"),
        ("get", f"/designs/{theirs.pk}/terraform.zip"),
        ("post", f"/designs/{theirs.pk}/answers/"),
        ("post", f"/designs/{failed.pk}/retry/"),
    ):
        response = getattr(client, method)(url, {"skip": "1"} if method == "post" else None)
        assert response.status_code == 404, url
        assert b"Their requirements" not in response.content
    assert counts() == before
    theirs.refresh_from_db()
    failed.refresh_from_db()
    assert (theirs.status, failed.status) == ("awaiting_answers", "failed")


# --- the JSON endpoints --------------------------------------------------------------------


def test_the_run_output_endpoint_refuses_every_bad_id(client: Client, alice: Any) -> None:
    design = make_design(alice)
    run = add_run(design, output_text="## Requirements")
    other = make_design(alice)
    huge = "9" * 30  # routes as an int, far past any database integer
    for url in (
        f"/designs/{other.pk}/runs/{run.pk}/",  # a run of another design
        f"/designs/{design.pk}/runs/{run.pk + 1000}/",
        f"/designs/{design.pk}/runs/{huge}/",
        f"/designs/{huge}/runs/{run.pk}/",
    ):
        assert client.get(url).status_code == 404, url
    for url in (f"/designs/{design.pk}/runs/abc/", f"/designs/{design.pk}/runs/-1/"):
        assert client.get(url).status_code == 404, url  # does not route at all
    assert client.post(f"/designs/{design.pk}/runs/{run.pk}/").status_code == 405
    assert Client().get(f"/designs/{design.pk}/runs/{run.pk}/").status_code == 302  # login
    good = client.get(f"/designs/{design.pk}/runs/{run.pk}/")
    assert good.status_code == 200 and good.json()["agent"] == "requirements"


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("scope=bogus", "scope must be 'instance' or 'cluster'"),
        ("scope=", "scope must be 'instance' or 'cluster'"),
        ("scope=INSTANCE", "scope must be 'instance' or 'cluster'"),
        ("scope=instance&scope=%FF", "scope must be 'instance' or 'cluster'"),
        ("scope=cluster", "scope=cluster needs REDIS_URL"),
    ],
)
async def test_health_refuses_a_bad_scope_with_a_json_400(query: str, error: str):
    response = await probe(f"/health?{query}")
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert error in response.json()["error"]


async def test_health_only_answers_get() -> None:
    assert (await probe("/health", "POST")).status_code == 405
    assert (await probe("/health/live", "PUT")).status_code == 405


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token", "Basic c2VjcmV0LXRva2Vu", "bearer  nope "],
)
def test_metrics_refuses_a_missing_or_wrong_token(
    client: Client, settings, authorization: str | None
) -> None:
    settings.METRICS_TOKEN = "secret-token"
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 403
    assert b"secret-token" not in response.content
    assert b"carlos_pool" not in response.content


def test_metrics_answers_the_right_token(client: Client, settings) -> None:
    settings.METRICS_TOKEN = "secret-token"
    response = client.get("/metrics", headers={"Authorization": "Bearer secret-token"})
    assert response.status_code == 200
    assert b"carlos_pool_size" in response.content


# --- script in the request text, through the whole product ---------------------------------


async def test_html_and_script_in_the_request_are_shown_escaped_never_executed(
    async_client: Any, carlos_registry: Any
) -> None:
    user = await User.objects.acreate_user("alice", password="a-long-test-password")
    await async_client.aforce_login(user)
    text = f"A shop {SCRIPT} for 5k users"
    response = await async_client.post("/", VALID | {"request_text": text})
    assert response.status_code == 302
    design = await Design.objects.aget()
    assert design.request_text == text  # stored as typed: escaping is the output's job
    task = tasks.running_task(design.pk)
    assert task is not None
    await task
    design = await Design.objects.aget()
    assert design.status == Design.Status.SUCCEEDED, design.error

    page = (await async_client.get(f"/designs/{design.pk}/")).content.decode()
    history = (await async_client.get("/designs/")).content.decode()
    fragments = [
        (await async_client.get(f"/designs/{design.pk}/runs/{run.pk}/")).json()["html"]
        async for run in AgentRun.objects.filter(design=design)
    ]
    escaped = "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;"
    for html in (page, history, *fragments):
        assert "<script>alert" not in html
        assert "<img src=x" not in html
    assert escaped in page and escaped in history


# --- the WebSocket -------------------------------------------------------------------------
# Every bad frame, path, Origin and session below ends in a close code a client can rely on
# (4000-4999 are the application's; Daphne refuses to send anything but 1000 and 3000-4999),
# or in a refused handshake (403), and leaves nothing behind: no timer, no group membership.
BAD_MESSAGE, SESSION_ENDED, NOT_AUTHENTICATED, NOT_FOUND, TOO_BIG = 4400, 4401, 4403, 4404, 4413
SITE_HOST, SITE_ORIGIN = "localhost:8000", "http://localhost:8000"


def exactly(size: int, text: str = "x") -> str:
    """A JSON ping padded with `text` to exactly `size` bytes of UTF-8."""
    head, tail = '{"kind": "ping", "pad": "', '"}'
    room = size - len(head) - len(tail)
    pad = text * (room // len(text.encode()))
    return head + pad + "x" * (room - len(pad.encode())) + tail


async def fields(design: Design) -> tuple[Any, ...]:
    fresh = await Design.objects.aget(pk=design.pk)
    return fresh.status, fresh.attempts, fresh.error, fresh.clarifications


async def waiting_design(owner: Any) -> Design:
    """Unfinished (its socket resyncs while open), with a question awaiting an answer."""
    return await Design.objects.acreate(
        owner=owner,
        request_text="A data lake",
        status=Design.Status.AWAITING_ANSWERS,
        clarifications=[{"question": "Budget?", "answer": None}],
    )


BAD_FRAMES = [
    # Too big: refused unread, whatever the content.
    pytest.param({"text_data": exactly(MAX_CLIENT_MESSAGE_BYTES + 1)}, TOO_BIG, id="1025-bytes"),
    pytest.param({"text_data": exactly(1037)}, TOO_BIG, id="1037-bytes"),
    pytest.param({"text_data": exactly(1800, "é")}, TOO_BIG, id="1800-bytes-of-2-byte-chars"),
    pytest.param({"text_data": "€" * 342}, TOO_BIG, id="342-chars-1026-bytes"),
    pytest.param({"bytes_data": b"\x00" * 1800}, TOO_BIG, id="1800-bytes-binary"),
    pytest.param({"text_data": exactly(MEGABYTE, "é")}, TOO_BIG, id="1-MiB-text"),
    pytest.param({"bytes_data": exactly(MEGABYTE).encode()}, TOO_BIG, id="1-MiB-binary"),
    # Malformed: not the page's protocol (a JSON object whose kind is ping or snapshot).
    pytest.param({"bytes_data": b"\xff\xfe\xc3\x28 not utf-8"}, BAD_MESSAGE, id="binary-junk"),
    pytest.param({"bytes_data": b'{"kind": "ping"}'}, BAD_MESSAGE, id="json-in-a-binary-frame"),
    pytest.param({"text_data": "{not json"}, BAD_MESSAGE, id="not-json"),
    pytest.param({"text_data": '{"kind": "ping"'}, BAD_MESSAGE, id="cut-json"),
    pytest.param({"text_data": " "}, BAD_MESSAGE, id="blank"),
    pytest.param({"text_data": "\x00"}, BAD_MESSAGE, id="nul"),
    pytest.param({"text_data": "[1, 2, 3]"}, BAD_MESSAGE, id="array"),
    pytest.param({"text_data": '"ping"'}, BAD_MESSAGE, id="string"),
    pytest.param({"text_data": "null"}, BAD_MESSAGE, id="null"),
    pytest.param({"text_data": '{"kind": NaN}'}, BAD_MESSAGE, id="nan-kind"),
    pytest.param({"text_data": '{"kind": ["ping"]}'}, BAD_MESSAGE, id="list-kind"),
    pytest.param({"text_data": '{"type": "ping"}'}, BAD_MESSAGE, id="no-kind"),
    pytest.param({"text_data": '{"kind": "start", "design": 1}'}, BAD_MESSAGE, id="unknown-kind"),
    pytest.param({"text_data": "[" * 400 + "]" * 400}, BAD_MESSAGE, id="nested-400"),
    pytest.param({"text_data": "[" * MAX_CLIENT_MESSAGE_BYTES}, BAD_MESSAGE, id="nested-1024"),
    pytest.param({"text_data": SCRIPT}, BAD_MESSAGE, id="script"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_a_bad_socket_frame_closes_the_socket_cleanly_and_changes_nothing(
    frame: dict[str, Any], code: int
) -> None:
    owner = await User.objects.acreate_user("olivia", password="a-long-test-password")
    design = await waiting_design(owner)
    before, members = await fields(design), layer_members()
    socket = await open_socket(design.pk, owner)
    connected, _ = await socket.connect()
    assert connected
    assert (await socket.receive_json_from(timeout=5))["kind"] == "snapshot"
    await socket.send_to(**frame)
    replies, closed = await replies_until_closed(socket)
    assert closed == code
    # Said in words first (Daphne sends no close reason), and nothing sent is echoed back.
    assert [json.loads(reply)["kind"] for reply in replies] == ["error"]
    error = json.loads(replies[0])["error"]
    assert error and len(error) < 200 and "<script" not in error and "pad" not in error
    if code == TOO_BIG:
        assert "at most 1,024 bytes" in error
    # Released at the close, before the server even reports the disconnect.
    assert await leftovers(members) == []
    await socket.disconnect()
    assert await fields(design) == before
    assert await AgentRun.objects.acount() == 0


async def test_the_largest_allowed_message_is_still_answered() -> None:
    owner = await User.objects.acreate_user("olivia", password="a-long-test-password")
    design = await waiting_design(owner)
    socket = await open_socket(design.pk, owner)
    await socket.connect()
    await socket.receive_json_from(timeout=5)
    await socket.send_to(text_data=exactly(MAX_CLIENT_MESSAGE_BYTES, "é"))
    assert await socket.receive_json_from(timeout=5) == {"kind": "pong"}
    await socket.disconnect()


BAD_PATHS = [
    "/ws/designs/abc/",
    "/ws/designs/-1/",
    "/ws/designs/1.5/",
    "/ws/designs/١٢/",  # digits, but not ASCII ones
    "/ws/designs/1",
    "/ws/designs/1/extra/",
    "/ws/designs//",
    "/ws/designs/",
    "/ws/nothing/",
    "/ws/",
    "/",
    "/designs/1/",
    "/ws/designs/\x00/",
    "/ws/designs/%2e%2e/",
]


@pytest.mark.parametrize("logged_in", [False, True], ids=["anonymous", "logged-in"])
@pytest.mark.parametrize("path", BAD_PATHS)
async def test_an_unknown_socket_path_is_closed_4404_never_a_500(path: str, logged_in: bool):
    owner = await User.objects.acreate_user("olivia", password="a-long-test-password")
    await waiting_design(owner)
    members = layer_members()
    socket = await open_socket(path, owner if logged_in else None)
    connected, _ = await socket.connect()
    assert connected
    assert await closed_with(socket) == NOT_FOUND
    assert await leftovers(members) == []
    await socket.disconnect()


BAD_ORIGINS = [
    # (Origin, Host): the socket is opened on http://localhost:8000 unless the Host says else.
    pytest.param("http://localhost:9999", SITE_HOST, id="another-port"),
    pytest.param("https://localhost:8000", SITE_HOST, id="another-scheme"),
    pytest.param("https://127.0.0.1", SITE_HOST, id="another-scheme-host-and-port"),
    pytest.param("http://localhost", SITE_HOST, id="default-port-80"),
    pytest.param("http://127.0.0.1:8000", SITE_HOST, id="another-allowed-host"),
    pytest.param("ws://localhost:8000", SITE_HOST, id="ws-scheme"),
    pytest.param("https://evil.example", SITE_HOST, id="another-site"),
    pytest.param("http://localhost:8000.evil.example", SITE_HOST, id="lookalike-host"),
    pytest.param("http://localhost:8000@evil.example", SITE_HOST, id="userinfo-then-evil"),
    pytest.param("http://evil.example@localhost:8000", SITE_HOST, id="userinfo"),
    pytest.param("http://localhost:8000/designs/", SITE_HOST, id="with-a-path"),
    pytest.param("http://localhost:notaport", SITE_HOST, id="bad-port"),
    pytest.param("http://localhost:99999", SITE_HOST, id="port-out-of-range"),
    pytest.param("http://[::1", SITE_HOST, id="broken-ipv6"),
    pytest.param("null", SITE_HOST, id="null"),
    pytest.param("", SITE_HOST, id="empty"),
    pytest.param("file://", SITE_HOST, id="file"),
    pytest.param(b"http://localhost:8000\xff", SITE_HOST, id="not-ascii"),
    pytest.param(None, SITE_HOST, id="missing"),
    pytest.param("http://evil.example", "evil.example", id="host-not-allowed"),
    pytest.param("http://localhost:8000", None, id="no-host"),
    pytest.param("http://localhost:8000", "localhost:8000, evil.example", id="bad-host"),
]


@pytest.mark.parametrize(("origin", "host"), BAD_ORIGINS)
async def test_a_foreign_or_malformed_origin_is_refused_before_the_handshake(
    origin: str | bytes | None, host: str | None
) -> None:
    owner = await User.objects.acreate_user("olivia", password="a-long-test-password")
    design = await waiting_design(owner)
    before, members = await fields(design), layer_members()
    socket = await open_socket(design.pk, owner, origin=origin, host=host)
    connected, _ = await socket.connect()
    assert not connected  # Daphne answers the handshake 403; nothing of the design is sent
    assert await leftovers(members) == []
    await socket.disconnect()
    assert await fields(design) == before


async def test_two_origin_headers_are_refused() -> None:
    owner = await User.objects.acreate_user("olivia", password="a-long-test-password")
    design = await waiting_design(owner)
    socket = await open_socket(
        design.pk,
        owner,
        origin=SITE_ORIGIN,
        host=SITE_HOST,
        extra_headers=[(b"origin", b"https://evil.example")],
    )
    connected, _ = await socket.connect()
    assert not connected
    await socket.disconnect()


@sync_to_async
def expired_session_of(user: Any) -> str:
    cookie = Client()
    cookie.force_login(user)
    key = cookie.cookies[settings.SESSION_COOKIE_NAME].value
    Session.objects.filter(session_key=key).update(expire_date=timezone.now())
    return key


@sync_to_async
def logged_out_session_of(user: Any) -> str:
    browser = Client()
    browser.force_login(user)
    key = browser.cookies[settings.SESSION_COOKIE_NAME].value
    browser.post("/accounts/logout/")
    return key


async def stale_session_of(user: Any) -> str:
    """A session from before the password changed."""
    key = await session_cookie(user)
    user.set_password("another-long-password")
    await user.asave()
    return key


async def inactive_users_session(user: Any) -> str:
    key = await session_cookie(user)
    user.is_active = False
    await user.asave()
    return key


BAD_SESSIONS = {
    "none": None,
    "garbage": lambda user: "not-a-session-key",
    "another-secret-shape": lambda user: "a" * 40,
    "expired": expired_session_of,
    "logged-out": logged_out_session_of,
    "password-changed-since": stale_session_of,
    "user-deactivated": inactive_users_session,
}


@pytest.mark.parametrize("session", list(BAD_SESSIONS))
async def test_a_socket_without_a_live_session_is_closed_4403(session: str) -> None:
    owner = await User.objects.acreate_user("olivia", password="a-long-test-password")
    design = await waiting_design(owner)
    make = BAD_SESSIONS[session]
    cookie = None if make is None else make(owner)
    if asyncio.iscoroutine(cookie):
        cookie = await cookie
    before, members = await fields(design), layer_members()
    socket = await open_socket(design.pk, cookie=cookie, origin=SITE_ORIGIN, host=SITE_HOST)
    connected, _ = await socket.connect()
    assert connected
    assert await closed_with(socket) == NOT_AUTHENTICATED
    assert await leftovers(members) == []
    await socket.disconnect()
    assert await fields(design) == before


async def test_a_socket_for_another_users_or_a_nonexistent_design_is_closed_4404() -> None:
    owner = await User.objects.acreate_user("olivia", password="a-long-test-password")
    stranger = await User.objects.acreate_user("mallory", password="a-long-test-password")
    design = await Design.objects.acreate(owner=owner, request_text="A data lake")
    for design_id in (design.pk, 987654, "9" * 30):
        socket = await open_socket(design_id, stranger)
        connected, _ = await socket.connect()
        assert connected
        closed = await socket.receive_output(timeout=5)
        assert (closed["type"], closed.get("code")) == ("websocket.close", 4404), design_id
        await socket.disconnect()


# --- the design command --------------------------------------------------------------------


def run_design_command(request: str, *args: str) -> None:
    call_command("design", request, *args, "--fast", stdout=io.StringIO(), stderr=io.StringIO())


@pytest.mark.parametrize(
    ("request_text", "args", "message"),
    [
        pytest.param("", (), "the request cannot be empty", id="empty"),
        pytest.param(" \n\t ", (), "the request cannot be empty", id="whitespace"),
        pytest.param(
            "x" * MEGABYTE, (), "1,048,576 characters long; the limit is 4,000", id="one-megabyte"
        ),
        # What Python makes of argv bytes that are not UTF-8 (PEP 383 surrogate escapes).
        pytest.param(
            os.fsdecode(b"caf\xc3\x28 \xff"), (), "not valid UTF-8 text", id="invalid-utf8"
        ),
        pytest.param("two\x00parts", (), "Null characters are not allowed", id="nul"),
        pytest.param("A shop", ("--cloud", "mars"), "invalid choice: 'mars'", id="bad-option"),
        pytest.param("A shop", ("--colour", "red"), "unrecognized arguments", id="unknown-option"),
        pytest.param("A shop", ("--user", "nobody"), "No user named 'nobody'", id="unknown-user"),
    ],
)
def test_the_design_command_refuses_bad_input_before_creating_anything(
    request_text: str, args: tuple[str, ...], message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        run_design_command(request_text, *args)
    assert counts() == (0, 0)
    assert not User.objects.exists()  # not even the default 'cli' owner
