"""The design WebSocket through a real `manage.py serve` (Daphne, autobahn): what a client on
the wire gets for oversized frames, unknown paths, foreign Origins and a logout.

The in-process tests (`test_consumers.py`, `test_bad_input.py`) cannot see these defects: the
test communicator accepts any close code, while Daphne refuses to send one outside 1000 and
3000-4999 (the consumer's 1009 became a traceback and a 1011, and its clean-up never ran).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from agents.consumers import MAX_CLIENT_MESSAGE_BYTES
from tests.servers import Server, child_env, log_in, manage, serving

USERNAME = "socket-user"
PASSWORD = f"pw-{uuid.uuid4().hex}"
MEBIBYTE = 1024 * 1024
# The close codes the page script and other clients rely on (agents/consumers.py).
CLOSE_BAD_MESSAGE, CLOSE_SESSION_ENDED, CLOSE_NOT_AUTHENTICATED = 4400, 4401, 4403
CLOSE_NOT_FOUND, CLOSE_MESSAGE_TOO_BIG = 4404, 4413
# Fail-safe limits, not timing assertions: a broken build must not hang the suite.
REPLY_LIMIT_S = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    """`manage.py serve` on a free port with a throwaway SQLite database, one user and one
    unfinished design of theirs (awaiting answers: its socket resyncs while it stays open)."""
    database = tmp_path_factory.mktemp("db") / "socket.sqlite3"
    env = child_env(f"sqlite:///{database}")
    log = tmp_path_factory.mktemp("server") / "serve.log"
    manage(env, "migrate", "--verbosity", "0")
    created = manage(
        env,
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; from agents.models import Design; "
        f"user = get_user_model().objects.create_user({USERNAME!r}, password={PASSWORD!r}); "
        "design = Design.objects.create(owner=user, request_text='A data lake', "
        "status=Design.Status.AWAITING_ANSWERS, "
        "clarifications=[{'question': 'Budget?', 'answer': None}]); print(design.pk)",
    )
    design_id = int(created.stdout.strip().splitlines()[-1])
    with serving(env, log) as served:
        yield served, design_id


@pytest.fixture
async def browser(server: tuple[Server, int]) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client logged in through the real login form."""
    served, _ = server
    async with httpx.AsyncClient(base_url=served.base, timeout=REPLY_LIMIT_S) as client:
        await log_in(client, USERNAME, PASSWORD)
        yield client


@pytest.fixture
def cookie(browser: httpx.AsyncClient) -> str:
    """The logged-in browser's cookies, as its WebSocket handshake sends them."""
    return "; ".join(f"{name}={value}" for name, value in browser.cookies.items())


def socket_url(served: Server, path: str) -> str:
    return f"ws://127.0.0.1:{served.port}{path}"


async def close_after(
    served: Server, path: str, cookie: str, message: str | bytes | None = None
) -> tuple[int | None, list[Any]]:
    """Open `path` as the page does (this site's Origin, the session cookie), send `message`
    after the first event, and return the close code the server sent with what came before."""
    received: list[Any] = []
    try:
        async with connect(
            socket_url(served, path),
            origin=served.base,
            additional_headers={"Cookie": cookie},
            open_timeout=REPLY_LIMIT_S,
            max_size=None,
            ping_interval=None,
        ) as socket:
            received.append(await socket.recv(decode=True))
            if message is not None:
                await socket.send(message)
            while True:
                received.append(await socket.recv(decode=True))
    except ConnectionClosed as closed:
        return (closed.rcvd.code if closed.rcvd is not None else None), received


@pytest.fixture
def clean_log(server: tuple[Server, int]) -> Iterator[None]:
    """The server writes no traceback while the test runs (the log is the module's server's,
    so only what the test added is read)."""
    served, _ = server
    start = served.log.stat().st_size
    yield
    with served.log.open("rb") as log:
        log.seek(start)
        added = log.read().decode(errors="replace")
    assert "Traceback" not in added and "invalid close code" not in added, added[-4000:]


@pytest.mark.parametrize(
    "message",
    [
        pytest.param("x" * (MAX_CLIENT_MESSAGE_BYTES + 13), id="1037-bytes-text"),
        pytest.param('{"kind": "ping", "pad": "' + "é" * 886 + 'x"}', id="1800-bytes-text"),
        pytest.param(b"\x00" * 1800, id="1800-bytes-binary"),
        pytest.param("x" * MEBIBYTE, id="1-MiB-text"),
    ],
)
@pytest.mark.usefixtures("clean_log")
async def test_an_oversized_frame_closes_with_an_application_code_on_daphne(
    server: tuple[Server, int], cookie: str, message: str | bytes
) -> None:
    served, design_id = server
    code, received = await close_after(served, f"/ws/designs/{design_id}/", cookie, message)
    assert code == CLOSE_MESSAGE_TOO_BIG, (code, served.tail())
    assert '"kind": "snapshot"' in received[0]
    assert "at most 1,024 bytes" in received[-1]  # said in words too: Daphne drops reasons


@pytest.mark.usefixtures("clean_log")
async def test_past_daphnes_own_limit_the_connection_is_dropped_and_nothing_breaks(
    server: tuple[Server, int], cookie: str
) -> None:
    """Over 1 MiB (Daphne's `websocket_max_message_size`) the frame never reaches the consumer:
    autobahn drops the connection (no close frame), Daphne tells the consumer it disconnected,
    and the next socket works."""
    served, design_id = server
    path = f"/ws/designs/{design_id}/"
    code, _ = await close_after(served, path, cookie, "x" * (MEBIBYTE + 1))
    assert code is None
    code, received = await close_after(served, path, cookie, '{"kind": "nonsense"}')
    assert '"kind": "snapshot"' in received[0] and code == CLOSE_BAD_MESSAGE


@pytest.mark.parametrize(
    "path", ["/ws/designs/abc/", "/ws/designs/-1/", "/ws/nothing/", "/ws/designs/1", "/"]
)
@pytest.mark.usefixtures("clean_log")
async def test_an_unknown_path_closes_4404_not_a_500(
    server: tuple[Server, int], cookie: str, path: str
) -> None:
    served, _ = server
    for session in (cookie, ""):  # logged in or not: nothing there either way
        code, received = await close_after(served, path, session)
        assert code == CLOSE_NOT_FOUND and received == [], (path, code)


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost:9999",
        "https://127.0.0.1",
        "http://127.0.0.1",  # the right scheme and host on another port
        "https://evil.example",
        "null",
    ],
)
@pytest.mark.usefixtures("clean_log")
async def test_a_foreign_origin_is_refused_before_the_handshake(
    server: tuple[Server, int], cookie: str, origin: str
) -> None:
    served, design_id = server
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            socket_url(served, f"/ws/designs/{design_id}/"),
            origin=origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": cookie},
            open_timeout=REPLY_LIMIT_S,
        ):
            pass
    assert refused.value.response.status_code == 403


@pytest.mark.usefixtures("clean_log")
async def test_logging_out_closes_the_sessions_open_socket(
    server: tuple[Server, int], browser: httpx.AsyncClient, cookie: str
) -> None:
    served, design_id = server
    async with connect(
        socket_url(served, f"/ws/designs/{design_id}/"),
        origin=served.base,  # type: ignore[arg-type]
        additional_headers={"Cookie": cookie},
        open_timeout=REPLY_LIMIT_S,
        ping_interval=None,
    ) as socket:
        assert '"kind": "snapshot"' in await socket.recv(decode=True)
        response = await browser.post(
            "/accounts/logout/", headers={"X-CSRFToken": browser.cookies["csrftoken"]}
        )
        assert response.status_code == 302
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await socket.recv(decode=True)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_SESSION_ENDED
    # The page reconnects after 4401; with the ended session it is told to log in again.
    code, received = await close_after(served, f"/ws/designs/{design_id}/", cookie)
    assert (code, received) == (CLOSE_NOT_AUTHENTICATED, [])
