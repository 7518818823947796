"""The design WebSocket through the real ASGI stack: origin check, session auth, routing, and
the socket's end: a clean close with an application code, and nothing left running after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.sessions.models import Session
from django.test import AsyncClient
from django.utils import timezone

from agents import consumers
from agents.consumers import MAX_CLIENT_MESSAGE_BYTES
from agents.events import (
    AgentFinished,
    Tokens,
    as_json,
    from_json,
    publish,
    read_progress,
    run_event,
)
from agents.models import AgentRun, Design
from tests.agents.sockets import (
    closed_with,
    layer_members,
    leftovers,
    open_socket,
    replies_until_closed,
)

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]

User = get_user_model()


async def make_user(username: str, *, staff: bool = False, viewer: bool = False) -> Any:
    """A user; `viewer` holds `agents.view_design` (may watch everyone's designs)."""
    user = await User.objects.acreate_user(
        username, password="a-long-test-password", is_staff=staff
    )
    if viewer:
        await user.user_permissions.aadd(
            await Permission.objects.aget(codename="view_design", content_type__app_label="agents")
        )
    return user


async def make_design(owner: Any, **fields: Any) -> Design:
    return await Design.objects.acreate(owner=owner, request_text="A data lake", **fields)


async def succeeded_run(design: Design, duration_ms: float, **fields: Any) -> AgentRun:
    """A run of the design that succeeded after `duration_ms`."""
    now = timezone.now()
    return await AgentRun.objects.acreate(
        design=design,
        status="succeeded",
        started_at=now - timedelta(milliseconds=duration_ms),
        finished_at=now,
        **fields,
    )


async def test_anonymous_socket_is_closed_4403() -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk)
    connected, _ = await communicator.connect()
    assert connected
    assert await closed_with(communicator) == 4403
    await communicator.disconnect()


async def test_other_users_socket_is_closed_4404_like_a_missing_design() -> None:
    design = await make_design(await make_user("olivia"))
    stranger = await make_user("mallory")
    for design_id in (design.pk, 987654):
        communicator = await open_socket(design_id, stranger)
        connected, _ = await communicator.connect()
        assert connected
        assert await closed_with(communicator) == 4404
        await communicator.disconnect()


async def test_foreign_origin_is_refused_before_the_handshake() -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk, owner, origin="https://evil.example")
    connected, _ = await communicator.connect()
    assert not connected
    await communicator.disconnect()


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://localhost:8000", "localhost:8000"),
        ("http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://[::1]:8000", "[::1]:8000"),
        ("http://localhost", "localhost:80"),  # the default port, written or not
        ("http://localhost:80", "localhost"),
    ],
)
async def test_the_sites_own_origin_is_accepted_on_whatever_port_it_is_served(
    origin: str, host: str
) -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk, owner, origin=origin, host=host)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"
    await communicator.disconnect()


async def handshake_accepted(design: Design, user: Any, origin: str, host: str, **kw: Any) -> bool:
    communicator = await open_socket(design.pk, user, origin=origin, host=host, **kw)
    connected, _ = await communicator.connect()
    await communicator.disconnect()
    return connected


async def test_configured_origins_are_matched_in_scheme_host_and_port(settings) -> None:
    """DJANGO_WS_ALLOWED_ORIGINS: pages served from another address may open the socket."""
    settings.WS_ALLOWED_ORIGINS = ["https://carlos.example.com", "https://*.example.org"]
    owner = await make_user("olivia")
    design = await make_design(owner)
    for origin, accepted in (
        ("https://carlos.example.com", True),
        ("https://carlos.example.com:443", True),
        ("https://team.example.org", True),
        ("http://carlos.example.com", False),
        ("https://carlos.example.com:8443", False),
        ("https://evil.carlos.example.com", False),
        ("https://example.org.evil.net", False),
    ):
        assert await handshake_accepted(design, owner, origin, "localhost:8000") is accepted, origin


async def test_behind_a_tls_proxy_the_sites_origin_is_https(settings) -> None:
    """With SECURE_PROXY_SSL_HEADER, the proxy's X-Forwarded-Proto says what the browser used."""
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.ALLOWED_HOSTS = ["carlos.example.com"]
    owner = await make_user("olivia")
    design = await make_design(owner)
    proxied = {"extra_headers": [(b"x-forwarded-proto", b"https")]}
    host = "carlos.example.com"
    assert await handshake_accepted(design, owner, "https://carlos.example.com", host, **proxied)
    assert not await handshake_accepted(design, owner, "http://carlos.example.com", host, **proxied)
    assert not await handshake_accepted(design, owner, "https://carlos.example.com", host)
    assert await handshake_accepted(design, owner, "http://carlos.example.com", host)


@pytest.mark.parametrize(
    "origins",
    [["carlos.example.com"], ["*"], ["https://carlos.example.com/app"], ["ftp://example.com"]],
)
def test_a_wrong_allowed_origin_stops_the_application_at_import(origins: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import carlos.asgi"],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "carlos.settings",
            "DJANGO_DEBUG": "1",
            "DJANGO_WS_ALLOWED_ORIGINS": ",".join(origins),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    refusal = done.stderr.strip().splitlines()[-1]
    assert refusal.startswith("django.core.exceptions.ImproperlyConfigured: "), done.stderr
    assert "DJANGO_WS_ALLOWED_ORIGINS" in refusal and repr(origins[0]) in refusal


async def test_snapshot_on_connect_has_the_design_and_every_run() -> None:
    owner = await make_user("olivia")
    design = await make_design(
        owner, status=Design.Status.RUNNING, attempts=2, revisions=0, verdict=""
    )
    earlier = await AgentRun.objects.acreate(  # stopped by a restart; the resume redid it
        design=design, agent="requirements", attempt=1, status="stopped", pool="mini", model="m"
    )
    finished = await succeeded_run(
        design, 2000, agent="requirements", attempt=2, pool="mini", model="gpt-4o-mini",
        ttft_ms=80.0, wait_ms=0.5, tokens_in=100, tokens_out=400, output_text="## Requirements",
    )  # fmt: skip
    running = await AgentRun.objects.acreate(
        design=design, agent="carlos", attempt=2, status="running", pool="main", model="gpt-4o"
    )
    communicator = await open_socket(design.pk, owner)
    connected, _ = await communicator.connect()
    assert connected
    snapshot = await communicator.receive_json_from(timeout=5)
    assert snapshot["kind"] == "snapshot"
    state = snapshot["design"]
    assert (state["design_id"], state["status"]) == (design.pk, "running")
    assert state["queue_place"] is None
    assert (state["terminal"], state["retryable"]) == (False, False)
    assert 'data-status="running">Running</span>' in state["status_html"]
    assert [(run["run_id"], run["agent"], run["status"]) for run in snapshot["runs"]] == [
        (earlier.pk, "requirements", "stopped"),
        (finished.pk, "requirements", "succeeded"),
        (running.pk, "carlos", "running"),
    ]
    first = snapshot["runs"][1]
    assert first["duration_ms"] == pytest.approx(2000, abs=1)
    assert (first["ttft_ms"], first["wait_ms"], first["tokens_out"]) == (80.0, 0.5, 400)
    # Each run comes with its timeline row, rendered as the page renders it.
    assert first["row_html"].startswith(f'<tr data-key="{finished.pk}">')
    assert "<td>Requirements</td>" in first["row_html"] and "2000 ms" in first["row_html"]
    assert from_json(snapshot) == from_json(json.loads(json.dumps(snapshot)))
    await communicator.disconnect()


async def test_a_user_with_view_design_may_watch_any_design_staff_alone_may_not() -> None:
    """The same rule as the pages: `agents.view_design`, not the staff flag."""
    design = await make_design(await make_user("olivia"))
    communicator = await open_socket(design.pk, await make_user("vera", viewer=True))
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"
    await communicator.disconnect()
    communicator = await open_socket(design.pk, await make_user("sam", staff=True))
    assert (await communicator.connect())[0]
    assert await closed_with(communicator) == 4404
    await communicator.disconnect()


async def test_group_events_are_forwarded_as_published() -> None:
    owner = await make_user("olivia")
    design = await make_design(owner, status=Design.Status.RUNNING, attempts=1)
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    await communicator.receive_json_from(timeout=5)  # snapshot
    layer = get_channel_layer()
    tokens = Tokens(agent="carlos", round=0, run_id=7, offset=0, text="## 1. Overview\n")
    await publish(layer, design.pk, tokens)
    received = await communicator.receive_json_from(timeout=5)
    assert received == {
        "kind": "tokens",
        "agent": "carlos",
        "round": 0,
        "run_id": 7,
        "offset": 0,
        "text": "## 1. Overview\n",
    }
    assert from_json(received) == tokens

    run = await succeeded_run(
        design, 2500, agent="carlos", attempt=1, pool="main", model="gpt-4o",
        ttft_ms=110.0, wait_ms=0.2, tokens_in=500, tokens_out=1500,
    )  # fmt: skip
    finished = run_event(run, AgentFinished, await read_progress(design))
    await publish(layer, design.pk, finished)
    received = await communicator.receive_json_from(timeout=5)
    assert received == as_json(finished) and from_json(received) == finished
    assert received["kind"] == "agent_finished" and received["run_id"] == run.pk
    assert received["duration_ms"] == pytest.approx(2500) and received["tokens_out"] == 1500

    # Another design's events do not leak into this socket.
    await publish(
        layer, design.pk + 1, Tokens(agent="ronei", round=0, run_id=8, offset=0, text="secret")
    )
    assert await communicator.receive_nothing(timeout=0.2)
    await communicator.disconnect()


async def test_ping_snapshot_and_an_unknown_message() -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    await communicator.receive_json_from(timeout=5)
    await communicator.send_json_to({"kind": "ping"})
    assert await communicator.receive_json_from(timeout=5) == {"kind": "pong"}
    await communicator.send_json_to({"kind": "snapshot"})
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"
    # Anything else is not the page's protocol: said in words, then closed 4400.
    await communicator.send_to(text_data="not json")
    replies, code = await replies_until_closed(communicator)
    assert code == 4400
    assert json.loads(replies[0]) == {"kind": "error", "error": "messages must be JSON"}
    await communicator.disconnect()


@pytest.mark.parametrize("frame", ["text", "bytes"])
async def test_oversized_client_message_closes_the_socket(frame: str) -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    await communicator.receive_json_from(timeout=5)
    payload = "x" * (MAX_CLIENT_MESSAGE_BYTES + 1)
    if frame == "text":
        await communicator.send_to(text_data=payload)
    else:
        await communicator.send_to(bytes_data=payload.encode())
    # 4413, not the protocol's 1009: Daphne refuses to send 1009 from an application.
    replies, code = await replies_until_closed(communicator)
    assert code == 4413
    assert json.loads(replies[0]) == {
        "kind": "error",
        "error": "messages may be at most 1,024 bytes; this one had 1,025",
    }
    await communicator.disconnect()


@pytest.fixture
async def resyncing(monkeypatch) -> tuple[Design, set[tuple[str, str]], WebsocketCommunicator]:
    """A socket on its owner's running design, connected, its first snapshot read, resyncing
    every 0.05 s; with the channel layer's groups from before it."""
    monkeypatch.setattr(consumers, "RESYNC_AFTER_S", 0.05)
    owner = await make_user("olivia")
    design = await make_design(owner, status=Design.Status.RUNNING, attempts=1)
    members = layer_members()
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"
    return design, members, communicator


async def test_a_socket_closed_for_a_bad_message_stops_resyncing_and_leaves_its_group(
    resyncing,
) -> None:
    """The defect: after the refused close the socket stayed in its group and its resync kept
    querying the database every RESYNC_AFTER_S while the design was unfinished."""
    design, members, communicator = resyncing
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"  # resynced
    await communicator.send_to(text_data="x" * (MAX_CLIENT_MESSAGE_BYTES + 1))
    _, code = await replies_until_closed(communicator)
    assert code == 4413
    assert await leftovers(members) == []
    # Neither the pipeline's events nor resyncs reach the closed socket any more.
    await publish(
        get_channel_layer(),
        design.pk,
        Tokens(agent="carlos", round=0, run_id=7, offset=0, text="late"),
    )
    assert await communicator.receive_nothing(timeout=0.5)
    await communicator.disconnect()


@pytest.mark.parametrize("ending", ["disconnect", "crash"])
async def test_however_the_consumer_ends_its_timers_stop_and_it_leaves_its_groups(
    resyncing, ending: str
) -> None:
    """A client that goes away, or a consumer that fails (here: the server hands it an event
    it has no handler for), releases what the socket held."""
    _, members, communicator = resyncing
    if ending == "disconnect":
        await communicator.disconnect()
    else:
        await communicator.send_input({"type": "websocket.nonsense"})
        with pytest.raises(ValueError, match=r"No handler for message type websocket\.nonsense"):
            await communicator.wait(timeout=5)
    assert await leftovers(members) == []


async def test_a_quiet_socket_resyncs_so_a_lost_final_status_still_arrives(monkeypatch) -> None:
    monkeypatch.setattr(consumers, "RESYNC_AFTER_S", 0.2)
    owner = await make_user("lena")
    design = await make_design(owner, status=Design.Status.RUNNING, attempts=1)
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    assert (await communicator.receive_json_from(timeout=5))["design"]["status"] == "running"

    # The design finishes, but its design_status event never reaches this socket.
    await Design.objects.filter(pk=design.pk).aupdate(status=Design.Status.SUCCEEDED)
    resynced = await communicator.receive_json_from(timeout=5)
    assert resynced["kind"] == "snapshot" and resynced["design"]["status"] == "succeeded"
    assert await communicator.receive_nothing(timeout=0.5)  # finished: no more resyncs
    await communicator.disconnect()


# --- a socket closes when its session ends ---------------------------------------------------
SESSION_ENDED, NOT_AUTHENTICATED = 4401, 4403


async def logged_in(user: Any) -> tuple[AsyncClient, str]:
    """A browser of its own, logged in as `user`, and its session cookie."""
    browser = AsyncClient()
    await browser.aforce_login(user)
    return browser, browser.cookies[settings.SESSION_COOKIE_NAME].value


async def watching(design: Design, cookie: str) -> WebsocketCommunicator:
    communicator = await open_socket(design.pk, cookie=cookie)
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"
    return communicator


async def session_ended(communicator: WebsocketCommunicator) -> bool:
    """Whether the server closed the socket 4401, saying why in an `error` event first."""
    replies, code = await replies_until_closed(communicator)
    return code == SESSION_ENDED and json.loads(replies[-1])["kind"] == "error"


async def still_follows(communicator: WebsocketCommunicator, design: Design) -> None:
    event = Tokens(agent="carlos", round=0, run_id=7, offset=0, text="still here")
    await publish(get_channel_layer(), design.pk, event)
    assert await communicator.receive_json_from(timeout=5) == as_json(event)


@dataclass
class TwoSessions:
    """One user logged in on two machines, both watching the same running design."""

    design: Design
    members: set[tuple[str, str]]  # the channel layer's groups before the sockets
    browser: AsyncClient  # the first machine's
    cookie: str
    other_cookie: str
    socket: WebsocketCommunicator
    other: WebsocketCommunicator


async def two_sessions(owner: Any) -> TwoSessions:
    design = await make_design(owner, status=Design.Status.RUNNING, attempts=1)
    members = layer_members()
    browser, cookie = await logged_in(owner)
    _, other_cookie = await logged_in(owner)
    socket, other = await watching(design, cookie), await watching(design, other_cookie)
    return TwoSessions(design, members, browser, cookie, other_cookie, socket, other)


async def told_to_log_in(design: Design, cookie: str) -> bool:
    """Whether a page reconnecting with `cookie` is accepted, then closed 4403 (log in)."""
    again = await open_socket(design.pk, cookie=cookie)
    assert (await again.connect())[0]
    code = await closed_with(again)
    await again.disconnect()
    return code == NOT_AUTHENTICATED


async def test_logout_closes_that_sessions_socket_and_no_other() -> None:
    two = await two_sessions(await make_user("olivia"))

    response = await two.browser.post("/accounts/logout/")
    assert response.status_code == 302
    assert await session_ended(two.socket)
    await still_follows(two.other, two.design)
    await two.socket.disconnect()
    # The page reconnects after a 4401; with the logged-out cookie it is told to log in.
    assert await told_to_log_in(two.design, two.cookie)
    await two.other.disconnect()
    assert await leftovers(two.members) == []


async def test_a_password_change_closes_every_socket_of_the_user() -> None:
    """Through the admin's own form: the session that changed the password gets a new key and
    stays logged in (Django's `update_session_auth_hash`), so its page reconnects and follows
    on; every other session of the user has ended."""
    two = await two_sessions(await make_user("olivia", staff=True))

    response = await two.browser.post(
        "/admin/password_change/",
        {
            "old_password": "a-long-test-password",
            "new_password1": "another-long-password-9",
            "new_password2": "another-long-password-9",
        },
    )
    assert response.status_code == 302, response.content[:500]
    assert await session_ended(two.socket)
    assert await session_ended(two.other)
    await two.socket.disconnect()
    await two.other.disconnect()
    new_cookie = two.browser.cookies[settings.SESSION_COOKIE_NAME].value
    assert new_cookie != two.cookie
    reconnected = await watching(two.design, new_cookie)
    await still_follows(reconnected, two.design)
    await reconnected.disconnect()
    assert await told_to_log_in(two.design, two.other_cookie)
    assert await leftovers(two.members) == []


@pytest.mark.parametrize("change", ["deactivated", "deleted"])
async def test_a_deactivated_or_deleted_user_loses_every_socket(change: str) -> None:
    owner = await make_user("olivia")
    watcher = await make_user("vera", viewer=True)  # may watch everyone's designs
    design = await make_design(owner, status=Design.Status.RUNNING, attempts=1)
    members = layer_members()
    _, cookie = await logged_in(watcher)
    _, owners_cookie = await logged_in(owner)
    socket, owners = await watching(design, cookie), await watching(design, owners_cookie)
    if change == "deactivated":
        watcher.is_active = False
        await watcher.asave(update_fields=["is_active"])
    else:
        await watcher.adelete()
    assert await session_ended(socket)
    await still_follows(owners, design)  # another user's socket is not touched
    await socket.disconnect()
    await owners.disconnect()
    assert await leftovers(members) == []


async def test_a_login_elsewhere_does_not_close_a_socket() -> None:
    """Only what can end a session counts: a login saves the user too (its last_login)."""
    owner = await make_user("olivia")
    design = await make_design(owner, status=Design.Status.RUNNING, attempts=1)
    _, cookie = await logged_in(owner)
    socket = await watching(design, cookie)
    browser = AsyncClient()
    response = await browser.post(
        "/accounts/login/", {"username": "olivia", "password": "a-long-test-password"}
    )
    assert response.status_code == 302
    await still_follows(socket, design)
    await socket.disconnect()


@pytest.mark.parametrize("end", ["expired", "deleted"])
async def test_a_session_that_ends_in_the_store_closes_its_socket(monkeypatch, end: str):
    """Expiry, or a session removed without a logout (`clearsessions`, an operator), is
    noticed by the socket's periodic check of its session (SESSION_RECHECK_S)."""
    monkeypatch.setattr(consumers, "SESSION_RECHECK_S", 0.05)
    two = await two_sessions(await make_user("olivia"))
    assert await two.socket.receive_nothing(timeout=0.3)  # checked a few times: still live
    await still_follows(two.socket, two.design)

    sessions = Session.objects.filter(session_key=two.cookie)
    if end == "expired":
        await sessions.aupdate(expire_date=timezone.now())
    else:
        await sessions.adelete()
    assert await session_ended(two.socket)
    await still_follows(two.other, two.design)
    await two.socket.disconnect()
    await two.other.disconnect()
    assert await leftovers(two.members) == []
