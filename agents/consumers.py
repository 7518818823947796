"""The live feed of one design: a snapshot on connect, then the pipeline's events as they happen.

The pipeline publishes to the design's group (`agents.events.design_group`; the events are
typed in `agents.events`); this consumer only relays, so a browser that disconnects never
affects the design. The group is joined before the snapshot is read: an event published in
between is then sent twice (harmless, the page applies events idempotently) rather than lost.
After each snapshot with agents writing, the socket asks the process running the design for
their text so far (`agents.pipeline.live`), which answers to this socket's channel alone; the
tokens carry their offsets, so the page puts the two together without a gap or a repeat.

Every way a socket ends releases what it holds, before the close is sent and again when the
consumer stops for any reason: its timers (resync, session check) are cancelled and it leaves
its groups, so a closed socket neither receives events nor queries the database. Close codes
are the application's own (4000-4999; Daphne refuses to send RFC 6455's 1008/1009 from an
application, which turned those closes into a traceback and a 1011), named after the HTTP
status they resemble, and a refused message is also explained in an `error` event first,
because Daphne sends no close reason.

A socket lasts as long as the login it was opened with: a logout closes that session's
sockets, a password change, deactivation or deletion of the user closes all of theirs (the
sockets re-check their session on a message to `sessions-<user id>`, sent from Django's
signals in any process sharing the channel layer), and every SESSION_RECHECK_S each socket
checks its session in the session store, which catches expiry and sessions removed
otherwise. A session that ended closes with 4401: the page then reconnects, and the new
handshake, with the browser's current cookie, is told 4403 when there is no login any more.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Coroutine
from importlib import import_module
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils.crypto import constant_time_compare

from agents.access import may_see
from agents.events import (
    DesignStatus,
    Event,
    Pong,
    Snapshot,
    SocketError,
    as_json,
    design_group,
    snapshot,
)
from agents.models import AgentRun
from agents.pipeline.live import ask_for_text

logger = logging.getLogger(__name__)

# Close codes the page understands (4000-4999 are free for applications).
CLOSE_BAD_MESSAGE = 4400  # not the page's protocol: a JSON object whose kind is ping or snapshot
CLOSE_SESSION_ENDED = 4401  # the login this socket was opened with has ended: reconnect to see
CLOSE_NOT_AUTHENTICATED = 4403
CLOSE_NOT_FOUND = 4404  # no such design for this user, or no such socket path
CLOSE_MESSAGE_TOO_BIG = 4413
# The page only ever sends tiny control messages; anything larger is refused unread.
MAX_CLIENT_MESSAGE_BYTES = 1024
# A socket that has relayed nothing for this long re-joins the group and sends a fresh
# snapshot: a channel layer drops messages to a full queue, and drops a channel from its
# groups when a message waited past its expiry, so under heavy load an event can be lost.
RESYNC_AFTER_S = 15.0
# How often an open socket checks its session in the store (two small queries on the thread
# that serves every page): expiry, sessions removed without a logout and password changes made
# where the signals do not reach (another process without Redis) are noticed within this time;
# logouts, password changes and deactivations in the server at once. At 60 s, 40 quiet
# sockets took SQLite lock calls from 1,172 to 1,540 per 120 s; at 300 s that is about 6 %.
SESSION_RECHECK_S = 300.0
TASK_PREFIX = "design-socket"
# The events that say where the design stands (a finished design needs no resync).
STATE_EVENTS = frozenset({Snapshot.kind, DesignStatus.kind})


def sessions_group_name(user_pk: Any) -> str:
    """The group of every open socket of one user (told when their sessions may have ended)."""
    return f"sessions-{user_pk}"


def session_digest(session_key: str) -> str:
    """Names a session in a message without carrying its key (a credential) through the layer."""
    return hashlib.sha256(session_key.encode()).hexdigest()


def session_still_valid(session_key: str, user_pk: Any) -> bool:
    """Whether the session still logs in `user_pk`, by Django's own rules (`auth.get_user`),
    read from the store afresh and changing nothing: an expired or deleted session, another
    user, a user now inactive or deleted, or a password changed since (the session's hash no
    longer matches) all say no."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user_id, backend_path = store.get(SESSION_KEY), store.get(BACKEND_SESSION_KEY)
    if user_id is None or backend_path not in settings.AUTHENTICATION_BACKENDS:
        return False
    user = load_backend(backend_path).get_user(get_user_model()._meta.pk.to_python(user_id))
    if user is None or user.pk != user_pk:
        return False
    if not hasattr(user, "get_session_auth_hash"):
        return True
    session_hash = store.get(HASH_SESSION_KEY)
    return bool(session_hash) and any(
        constant_time_compare(session_hash, expected)
        for expected in (user.get_session_auth_hash(), *user.get_session_auth_fallback_hash())
    )


class DesignConsumer(AsyncJsonWebsocketConsumer):
    """`/ws/designs/<id>/`: for the design's owner and whoever may view every design."""

    design_id: int
    group: str | None = None
    sessions_group: str | None = None
    _session_key: str | None = None
    _user_pk: Any = None
    _resync: asyncio.Task[None] | None = None
    _session_watch: asyncio.Task[None] | None = None
    _last_sent = 0.0
    _finished = False
    _closing = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The consumer's whole life: whatever ends it (a disconnect, a close, an exception,
        a cancellation by the server), what the socket held is released."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()

    async def connect(self) -> None:
        # Accept first, then close with an application code: a close before the handshake
        # reaches the browser as a bare 1006, and the page could not tell "log in again".
        await self.accept()
        user = self.scope.get("user")
        session_key = getattr(self.scope.get("session"), "session_key", None)
        if user is None or not user.is_authenticated or session_key is None:
            await self._close(CLOSE_NOT_AUTHENTICATED)
            return
        self._session_key, self._user_pk = session_key, user.pk
        self.design_id = int(self.scope["url_route"]["kwargs"]["design_id"])
        if not await may_see(user, self.design_id):
            await self._close(CLOSE_NOT_FOUND)
            return
        # Sessions first: a logout from here on reaches this socket.
        self.sessions_group = sessions_group_name(user.pk)
        await self.channel_layer.group_add(self.sessions_group, self.channel_name)
        self.group = design_group(self.design_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        state = await snapshot(self.design_id)
        if state is None:  # deleted in between
            await self._close(CLOSE_NOT_FOUND)
            return
        await self._send_snapshot(state)
        self._session_watch = self._start(self._recheck_session_periodically(), "session")
        if self._resync is None:
            self._resync = self._start(self._resync_while_quiet(), "resync")

    def _start(self, work: Coroutine[Any, Any, None], purpose: str) -> asyncio.Task[None]:
        """One of the socket's timers, named so that a leftover is easy to spot."""
        name = f"{TASK_PREFIX} {self.channel_name} {purpose}"
        task = asyncio.get_running_loop().create_task(work, name=name)
        task.add_done_callback(self._timer_ended)
        return task

    def _timer_ended(self, task: asyncio.Task[None]) -> None:
        """A timer that failed (the database unreachable, say) is logged, not left unread;
        the socket stays open and the page keeps its events."""
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s failed: %r", task.get_name(), task.exception())

    async def send_event(self, event: Event) -> None:
        """One of the consumer's own events (a snapshot, a pong)."""
        await self.send_json(as_json(event))

    async def _send_snapshot(self, state: Snapshot) -> None:
        """A snapshot, then the text so far of the agents it shows writing (asked of the
        process running the design, which sends it to this socket)."""
        await self.send_event(state)
        writing = [run.run_id for run in state.runs if run.status == AgentRun.Status.RUNNING]
        if writing and not self._closing:
            await ask_for_text(self.design_id, writing, self.channel_name)

    async def send_json(self, content: Any, close: bool = False) -> None:
        """Every event the page receives passes here, its own and those relayed (already
        JSON): what the design's state says decides whether the socket keeps resyncing."""
        if self._closing:
            return  # a message already queued when the socket closed
        self._last_sent = time.monotonic()
        kind = content.get("kind")
        if kind in STATE_EVENTS:
            design = content["design"] if kind == Snapshot.kind else content
            self._finished = bool(design.get("terminal"))
            if not self._finished and self._resync is not None and self._resync.done():
                self._resync = self._start(self._resync_while_quiet(), "resync")
        await super().send_json(content, close)

    async def _resync_while_quiet(self) -> None:
        while not self._finished:
            await asyncio.sleep(self._last_sent + RESYNC_AFTER_S - time.monotonic())
            if self.group is None or time.monotonic() - self._last_sent < RESYNC_AFTER_S:
                continue
            await self.channel_layer.group_add(self.group, self.channel_name)
            state = await snapshot(self.design_id)
            if state is None:
                await self._close(CLOSE_NOT_FOUND)
                return
            await self._send_snapshot(state)

    async def _recheck_session_periodically(self) -> None:
        while not self._closing:
            await asyncio.sleep(SESSION_RECHECK_S)
            try:
                await self._close_unless_session_valid()
                if self.sessions_group is not None:  # re-join: a layer drops slow members
                    await self.channel_layer.group_add(self.sessions_group, self.channel_name)
            except Exception as exc:  # the session store unreachable now: try next time
                logger.warning(
                    "design %s: could not check a socket's session: %r", self.design_id, exc
                )

    async def _close_unless_session_valid(self) -> None:
        if self._closing or self._session_key is None:
            return
        if not await database_sync_to_async(session_still_valid)(self._session_key, self._user_pk):
            await self._close(CLOSE_SESSION_ENDED, "your session has ended; log in again")

    async def session_ended(self, message: dict[str, Any]) -> None:
        """A logout: this socket's session ended if it is the one named."""
        if self._session_key is not None and constant_time_compare(
            message.get("session", ""), session_digest(self._session_key)
        ):
            await self._close(CLOSE_SESSION_ENDED, "you logged out")

    async def session_changed(self, message: dict[str, Any]) -> None:
        """The user's password, status or existence changed: is this session still valid?"""
        await self._close_unless_session_valid()

    async def _close(self, code: int, error: str | None = None) -> None:
        """Release what the socket holds, say why (when `error`), then close with `code`."""
        if self._closing:
            return
        self._closing = True
        await self._release()
        if error is not None:
            await super().send_json(as_json(SocketError(error=error)))
        await self.close(code=code, reason=error[:120] if error else None)

    async def _release(self) -> None:
        """Cancel the socket's timers and leave its groups. Idempotent; safe from a timer
        itself (it is then left to end on its own, which it does right after)."""
        current = asyncio.current_task()
        timers = [task for task in (self._resync, self._session_watch) if task is not None]
        self._resync = self._session_watch = None
        others = [task for task in timers if task is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others)
        for attribute in ("group", "sessions_group"):
            group = getattr(self, attribute)
            if group is not None:
                setattr(self, attribute, None)
                await self.channel_layer.group_discard(group, self.channel_name)

    async def disconnect(self, code: int) -> None:
        self._closing = True
        await self._release()

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        """Size-check before parsing: a client cannot make the server decode megabytes."""
        if self._closing:
            return
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > MAX_CLIENT_MESSAGE_BYTES:
            logger.info("design %s: closing a socket that sent %d bytes", self.design_id, size)
            await self._close(
                CLOSE_MESSAGE_TOO_BIG,
                f"messages may be at most {MAX_CLIENT_MESSAGE_BYTES:,} bytes; "
                f"this one had {size:,}",
            )
            return
        if text_data is None:
            await self._close(CLOSE_BAD_MESSAGE, "send JSON text messages only")
            return
        try:
            content = json.loads(text_data)
        except (ValueError, RecursionError):
            await self._close(CLOSE_BAD_MESSAGE, "messages must be JSON")
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """`ping` keeps proxies from idling the socket out; `snapshot` re-syncs the page."""
        kind = content.get("kind") if isinstance(content, dict) else None
        if kind == "ping":
            await self.send_event(Pong())
        elif kind == Snapshot.kind:
            state = await snapshot(self.design_id)
            if state is not None:
                await self._send_snapshot(state)
        else:
            await self._close(CLOSE_BAD_MESSAGE, "unknown message; send ping or snapshot")

    async def design_event(self, message: dict[str, Any]) -> None:
        """Relay one pipeline event as it was published (`agents.events.publish`): no
        database work and no parsing per event, or a busy database would slow this socket's
        queue until the channel layer drops messages."""
        await self.send_json(message["event"])


class NoSuchSocket(AsyncWebsocketConsumer):
    """Every other WebSocket path: a clean 4404, logged in or not (Channels' router would
    raise, which Daphne answers with a 500 and a traceback)."""

    async def connect(self) -> None:
        await self.accept()
        await self.close(code=CLOSE_NOT_FOUND)


# --- sessions that end close their sockets -------------------------------------------------------
async def tell_sockets_of(user_pk: Any, message: dict[str, Any]) -> None:
    """Send `message` to every open socket of the user, in every process sharing the channel
    layer. Best effort: a logout or a save never fails for it (the periodic check remains)."""
    layer = get_channel_layer()
    if layer is None or user_pk is None:
        return
    try:
        await layer.group_send(sessions_group_name(user_pk), message)
    except Exception as exc:  # the layer (Redis) unreachable: the sockets' own check remains
        logger.warning(
            "could not tell user %s's open sockets to check their session: %r", user_pk, exc
        )


@receiver(user_logged_out, dispatch_uid="agents.consumers.logged_out")
async def close_the_sockets_of_a_logout(
    sender: Any, request: Any, user: Any, **kwargs: Any
) -> None:
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and session_key:
        await tell_sockets_of(
            user.pk, {"type": "session.ended", "session": session_digest(session_key)}
        )


# Saves that may end sessions: a new password, a deactivation (a login's last_login does not).
SESSION_FIELDS = frozenset({"password", "is_active"})


def recheck_after_commit(user_pk: Any) -> None:
    """Once the change is committed (another process's check must see it), ask the user's
    sockets to check their sessions."""
    message = {"type": "session.changed"}
    transaction.on_commit(lambda: async_to_sync(tell_sockets_of)(user_pk, message))


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="agents.consumers.user_saved")
def recheck_sockets_of_a_changed_user(
    sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any
) -> None:
    if not created and (update_fields is None or SESSION_FIELDS & set(update_fields)):
        recheck_after_commit(instance.pk)


@receiver(
    post_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="agents.consumers.user_deleted"
)
def recheck_sockets_of_a_deleted_user(sender: Any, instance: Any, **kwargs: Any) -> None:
    recheck_after_commit(instance.pk)
