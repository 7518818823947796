"""The live feed of one design: a snapshot on connect, then the pipeline's events as they happen.

The pipeline publishes to the group `design-<id>` (see `agents.pipeline.EventPublisher`);
this consumer only relays, so a browser that disconnects never affects the design. The
group is joined before the snapshot is read: an event published in between is then sent
twice (harmless, the page applies events idempotently) rather than lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from agents.models import AgentRun, Design

logger = logging.getLogger(__name__)

# Close codes the page understands (4000-4999 are free for applications).
CLOSE_NOT_AUTHENTICATED = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_MESSAGE_TOO_BIG = 1009  # RFC 6455 "message too big"
# The page only ever sends tiny control messages; anything larger is refused unread.
MAX_CLIENT_MESSAGE_BYTES = 1024
# A socket that has relayed nothing for this long re-joins the group and sends a fresh
# snapshot: a channel layer drops messages to a full queue, and drops a channel from its
# groups when a message waited past its expiry, so under heavy load an event can be lost.
RESYNC_AFTER_S = 15.0
TERMINAL_STATUSES = frozenset(
    {Design.Status.SUCCEEDED, Design.Status.FAILED, Design.Status.INTERRUPTED}
)


def group_name(design_id: int) -> str:
    return f"design-{design_id}"


def run_state(run: AgentRun) -> dict[str, Any]:
    """A run as the page's timeline shows it."""
    return {
        "id": run.pk,
        "agent": run.agent,
        "round": run.round,
        "status": run.status,
        "pool": run.pool,
        "model": run.model,
        "overflow": run.overflow,
        "wait_ms": run.wait_ms,
        "ttft_ms": run.ttft_ms,
        "duration_ms": run.duration_ms,
        "tokens_in": run.tokens_in,
        "tokens_out": run.tokens_out,
        "tokens_estimated": run.tokens_estimated,
        "error": run.error,
    }


def design_state(design: Design) -> dict[str, Any]:
    """The design's own fields the page keeps live (status, verdict, cause of failure)."""
    return {
        "id": design.pk,
        "status": design.status,
        "verdict": design.verdict,
        "recommendation": design.recommendation,
        "revisions": design.revisions,
        "error": design.error,
        "failed_agent": design.failed_agent,
    }


async def snapshot(design_id: int) -> dict[str, Any] | None:
    """The design and the runs of its current attempt, as one `snapshot` event."""
    design = await Design.objects.filter(pk=design_id).afirst()
    if design is None:
        return None
    runs = design.runs.filter(attempt=design.attempts).order_by("id")
    return {
        "kind": "snapshot",
        "design": design_state(design),
        "runs": [run_state(run) async for run in runs],
    }


class DesignConsumer(AsyncJsonWebsocketConsumer):
    """`/ws/designs/<id>/`: for the design's owner and staff only."""

    design_id: int
    group: str | None = None
    _resync: asyncio.Task[None] | None = None
    _last_sent = 0.0
    _finished = False

    async def connect(self) -> None:
        # Accept first, then close with an application code: a close before the handshake
        # reaches the browser as a bare 1006, and the page could not tell "log in again".
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_NOT_AUTHENTICATED)
            return
        self.design_id = int(self.scope["url_route"]["kwargs"]["design_id"])
        visible = Design.objects.filter(pk=self.design_id)
        if not user.is_staff:
            visible = visible.filter(owner_id=user.pk)
        if not await visible.aexists():
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.group = group_name(self.design_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        state = await snapshot(self.design_id)
        if state is None:  # deleted in between
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.send_json(state)
        self._resync = asyncio.get_running_loop().create_task(self._resync_while_quiet())

    async def send_json(self, content: Any, close: bool = False) -> None:
        self._last_sent = time.monotonic()
        if content.get("kind") in {"snapshot", "design_status"}:
            status = (content.get("design") or content).get("status")
            self._finished = status in TERMINAL_STATUSES
            if not self._finished and self._resync is not None and self._resync.done():
                self._resync = asyncio.get_running_loop().create_task(self._resync_while_quiet())
        await super().send_json(content, close)

    async def _resync_while_quiet(self) -> None:
        while not self._finished:
            await asyncio.sleep(self._last_sent + RESYNC_AFTER_S - time.monotonic())
            if self.group is None or time.monotonic() - self._last_sent < RESYNC_AFTER_S:
                continue
            await self.channel_layer.group_add(self.group, self.channel_name)
            state = await snapshot(self.design_id)
            if state is None:
                await self.close(code=CLOSE_NOT_FOUND)
                return
            await self.send_json(state)

    async def disconnect(self, code: int) -> None:
        if self._resync is not None:
            self._resync.cancel()
            self._resync = None
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.group = None

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        """Size-check before parsing: a client cannot make the server decode megabytes."""
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > MAX_CLIENT_MESSAGE_BYTES:
            logger.info("design %s: closing a socket that sent %d bytes", self.design_id, size)
            await self.close(code=CLOSE_MESSAGE_TOO_BIG)
            return
        if text_data is None:
            await self.send_json({"kind": "error", "error": "send JSON text messages only"})
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            await self.send_json({"kind": "error", "error": "messages must be JSON"})
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """`ping` keeps proxies from idling the socket out; `snapshot` re-syncs the page."""
        kind = content.get("kind") if isinstance(content, dict) else None
        if kind == "ping":
            await self.send_json({"kind": "pong"})
        elif kind == "snapshot":
            state = await snapshot(self.design_id)
            if state is not None:
                await self.send_json(state)
        else:
            await self.send_json(
                {"kind": "error", "error": "unknown message; send ping or snapshot"}
            )

    async def design_event(self, message: dict[str, Any]) -> None:
        """Relay one pipeline event as it is: no database work per event, or a busy database
        would slow this socket's queue until the channel layer drops messages."""
        await self.send_json(message["event"])
