"""What the page sees while a design runs: its events, and each agent's text as it streams."""

from __future__ import annotations

import logging
import time

from channels.layers import get_channel_layer

from agents import leases
from agents.events import (
    AgentFinished,
    AgentStarted,
    DesignStatus,
    Event,
    Tokens,
    live_design,
    live_run,
    publish,
)
from agents.models import AgentRun, Design

logger = logging.getLogger("agents")

# Live token events are coalesced per agent to at most one per this many seconds, so the
# in-memory channel layer's 100-message capacity is never reached.
TOKEN_EVENT_INTERVAL_S = 0.05
# How often a streaming agent's text so far is saved: what a stop or a crash keeps, at one
# small write per agent per interval rather than one per token.
PARTIAL_SAVE_INTERVAL_S = 5.0

# -- live events ---------------------------------------------------------------------------


class EventPublisher:
    """Publishes the design's live events (`agents.events`); a failure never breaks a design."""

    def __init__(self, design_id: int) -> None:
        self.design_id = design_id
        try:
            self._layer = get_channel_layer()
        except Exception:
            logger.warning(
                "no channel layer: design %s runs without live events", design_id, exc_info=True
            )
            self._layer = None

    async def send(self, event: Event) -> None:
        if self._layer is None:
            return
        try:
            await publish(self._layer, self.design_id, event)
        except Exception:
            logger.warning(
                "design %s: could not publish %s", self.design_id, event.kind, exc_info=True
            )

    async def design_status(self, design: Design) -> None:
        queue_place = await leases.queue_place(design)
        await self.send(live_design(design, queue_place, DesignStatus))

    async def run_changed(self, run: AgentRun, kind: type[AgentStarted | AgentFinished]) -> None:
        """A run started or ended: its timeline row, rendered, goes with its fields."""
        await self.send(live_run(run, kind))


class LiveText:
    """One agent's text as it streams: sent to the page at most every TOKEN_EVENT_INTERVAL_S,
    saved to its run at most every PARTIAL_SAVE_INTERVAL_S, and kept whole for a stop."""

    def __init__(self, events: EventPublisher, run: AgentRun) -> None:
        self._events = events
        self._run = run
        self._parts: list[str] = []
        self._pending: list[str] = []
        self._last_sent = 0.0
        self._last_saved = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self._parts)

    async def add(self, chunk: str) -> None:
        self._parts.append(chunk)
        self._pending.append(chunk)
        now = time.monotonic()
        if now - self._last_sent >= TOKEN_EVENT_INTERVAL_S:
            await self.flush()
        if now - self._last_saved >= PARTIAL_SAVE_INTERVAL_S:
            self._last_saved = now
            await AgentRun.objects.filter(pk=self._run.pk, status=AgentRun.Status.RUNNING).aupdate(
                output_text=self.text
            )

    async def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._last_sent = time.monotonic()
        await self._events.send(Tokens(agent=self._run.agent, round=self._run.round, text=text))
