"""Opening the design socket through the real ASGI application (Origin check, session
authentication, routing, consumer), as a browser's handshake reaches it, and what a closed
socket may leave behind. Shared by the socket tests of this package."""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from carlos.asgi import application

# The page's own origin for the Host the tests connect to (Daphne puts the Host header in the
# scope as a browser sent it; scheme `ws`, as the communicator's scope has none).
HOST = "localhost"
ORIGIN = "http://localhost"
# What the consumer's own tasks are named (its resync and session timers).
SOCKET_TASK_PREFIX = "design-socket"


@sync_to_async
def session_cookie(user: Any) -> str:
    """The session cookie of a fresh login of `user` (a session of its own)."""
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def open_socket(
    target: int | str,
    user: Any | None = None,
    *,
    cookie: str | None = None,
    origin: str | bytes | None = ORIGIN,
    host: str | None = HOST,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> WebsocketCommunicator:
    """A communicator for `/ws/designs/<target>/` (or `target` itself when it is a path),
    with the session of `user` (a new login) or `cookie`; `origin=None` or `host=None` leave
    that header out."""
    path = target if isinstance(target, str) and target.startswith("/") else None
    headers: list[tuple[bytes, bytes]] = []
    if origin is not None:
        headers.append((b"origin", origin if isinstance(origin, bytes) else origin.encode()))
    if host is not None:
        headers.append((b"host", host.encode()))
    if user is not None:
        cookie = await session_cookie(user)
    if cookie is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    headers += extra_headers or []
    return WebsocketCommunicator(application, path or f"/ws/designs/{target}/", headers=headers)


async def closed_with(communicator: WebsocketCommunicator) -> int | None:
    """The close code the server sent next, or None if it sent something else."""
    output = await communicator.receive_output(timeout=5)
    return output.get("code") if output["type"] == "websocket.close" else None


async def replies_until_closed(communicator: WebsocketCommunicator) -> tuple[list[Any], int]:
    """Every message the server sends up to its close, and the close code."""
    replies: list[Any] = []
    while True:
        output = await communicator.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            return replies, output.get("code", 1000)
        replies.append(output.get("text") or output.get("bytes"))


def layer_members() -> set[tuple[str, str]]:
    """Every (group, channel) membership of the process's channel layer."""
    layer = get_channel_layer()
    return {(group, channel) for group, members in layer.groups.items() for channel in members}


def socket_tasks() -> set[asyncio.Task[Any]]:
    """The consumer's own timers that still run."""
    return {
        task
        for task in asyncio.all_tasks()
        if task.get_name().startswith(SOCKET_TASK_PREFIX) and not task.done()
    }


async def leftovers(before: set[tuple[str, str]]) -> list[str]:
    """What sockets closed since `before = layer_members()` left behind: a timer still running
    or a channel still in a group (it would keep receiving, and querying the database)."""
    await asyncio.sleep(0)  # a cancelled task finishes at its next step
    left = [f"task {task.get_name()}" for task in socket_tasks()]
    left += [f"{channel} in {group}" for group, channel in layer_members() - before]
    return left
