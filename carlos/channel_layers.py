"""The single-process channel layer (no `REDIS_URL`), cheap enough for live tokens and safe
to send to from the LLM loop's thread.

Channels' `InMemoryChannelLayer.group_send` scans every channel and every group for expired
messages on each call, then starts one task per member: with a few hundred open design pages
and a token event per agent every 50 ms, that scan alone took a tenth of the event loop. Here
the scan runs at most once a second, and members are sent to directly.

Its queues belong to the loop the sockets receive on (the server's). The designs run on the
LLM loop, in another thread: what they send is handed to the receiving loop in order, with
one wake-up per batch, and delivered there. Delivery, capacity, expiry and group semantics
are those of the parent class.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from copy import deepcopy
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer

CLEAN_EVERY_S = 1.0

Delivery = Callable[[str, dict[str, Any]], None]


class LocalChannelLayer(InMemoryChannelLayer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cleaned_at = 0.0
        self._home: asyncio.AbstractEventLoop | None = None  # where sockets receive
        self._outbox: deque[tuple[Delivery, str, dict[str, Any]]] = deque()
        self._outbox_lock = threading.Lock()
        self._drain_scheduled = False

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._cleaned_at >= CLEAN_EVERY_S:
            self._cleaned_at = now
            super()._clean_expired()

    # -- the receiving side records its loop ---------------------------------------------------
    async def receive(self, channel: str) -> dict[str, Any]:
        self._home = asyncio.get_running_loop()
        return await super().receive(channel)

    async def group_add(self, group: str, channel: str) -> None:
        self._home = asyncio.get_running_loop()
        await super().group_add(group, channel)

    # -- sending, from any loop ------------------------------------------------------------------
    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        if not self._posted(self._put, channel, message):
            self._put(channel, message)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        if not self._posted(self._deliver, group, message):
            self._deliver(group, message)

    def _put(self, channel: str, message: dict[str, Any]) -> None:
        """The parent's `send`, as a plain function, so it can run as a loop callback."""
        queue = self.channels.setdefault(channel, asyncio.Queue(maxsize=self.get_capacity(channel)))
        try:
            queue.put_nowait((time.time() + self.expiry, deepcopy(message)))
        except asyncio.QueueFull:
            raise ChannelFull(channel) from None

    def _deliver(self, group: str, message: dict[str, Any]) -> None:
        self._clean_expired()
        for channel in list(self.groups.get(group, ())):
            # As the parent: a full member misses this message, the others do not.
            with contextlib.suppress(ChannelFull):
                self._put(channel, message)

    def _posted(self, deliver: Delivery, target: str, message: dict[str, Any]) -> bool:
        """From another loop than the receiving one: queue the delivery for that loop, in
        order, and wake it once per batch. False when called on the receiving loop (or before
        anything receives), where the caller delivers at once."""
        home = self._home
        if home is None or home is asyncio.get_running_loop():
            return False
        with self._outbox_lock:
            self._outbox.append((deliver, target, message))
            if self._drain_scheduled:
                return True
            self._drain_scheduled = True
        try:
            home.call_soon_threadsafe(self._drain)
        except RuntimeError:  # that loop is closed: nothing receives there any more
            self._home = None
            self._drain()
        return True

    def _drain(self) -> None:
        with self._outbox_lock:
            batch = list(self._outbox)
            self._outbox.clear()
            self._drain_scheduled = False
        for deliver, target, message in batch:
            with contextlib.suppress(ChannelFull):  # the sender has moved on: drop, as a group does
                deliver(target, message)
