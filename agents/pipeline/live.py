"""What the page sees while a design runs: its events, and each agent's text as it streams.

A page that joins while an agent is writing (a reload, a second tab, a reconnect) must get
the text so far, not only what streams after it joined. The text lives where it is written,
in the process running the design, and is reached through the channel layer, so this works
the same with the in-memory layer (one process) and with Redis (the socket on another
instance than the design):

1. While a design runs here, `EventPublisher` answers on a channel of its own, a member of
   the group `text_group(design_id)` on `text_layer()`: a second instance of the configured
   layer, so that it can receive on the loop running the design (a layer receives on one
   loop only, and the sockets' layer receives on the server's).
2. A socket that sends a snapshot with running agents asks that group (`ask_for_text`),
   naming its own channel; the design's process answers each running agent's text so far,
   a `TextSoFar` event sent straight to that channel on the sockets' layer.
3. Every `Tokens` event carries the offset of its first character in the run's text, so the
   page appends only what lies beyond what it has: nothing is doubled or lost, whichever of
   the text and the tokens streamed meanwhile arrives first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer

from agents import leases
from agents.events import (
    DESIGN_EVENT,
    AgentFinished,
    AgentStarted,
    Event,
    LiveProgress,
    TextSoFar,
    Tokens,
    as_json,
    design_event,
    live_progress,
    publish,
    run_event,
)
from agents.models import AgentRun, Design
from agents.progress import stage_estimates

logger = logging.getLogger("agents")

# Live token events are coalesced per agent to at most one per this many seconds, so the
# in-memory channel layer's 100-message capacity is never reached.
TOKEN_EVENT_INTERVAL_S = 0.05
# How often a streaming agent's text so far is saved: what a stop or a crash keeps, at one
# small write per agent per interval rather than one per token.
PARTIAL_SAVE_INTERVAL_S = 5.0
# The channel-layer message type of a request for the text so far.
TEXT_WANTED = "text.wanted"

# The request layer of each sockets' layer (see the module's docstring, step 1).
_text_layers: dict[int, tuple[Any, Any]] = {}


def text_group(design_id: int) -> str:
    """The group of the process running the design, asked for its agents' text so far."""
    return f"design-text-{design_id}"


def text_layer() -> Any:
    """The layer requests for the text so far travel on: another instance of the configured
    layer (the same Redis and prefix; in one process, one shared in-memory instance)."""
    sockets = get_channel_layer()
    known = _text_layers.get(id(sockets))
    if known is not None and known[0] is sockets:
        return known[1]
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    _text_layers.clear()  # the settings changed (tests): forget the old layers' requests
    _text_layers[id(sockets)] = (sockets, layer)
    return layer


async def ask_for_text(design_id: int, run_ids: list[int], reply_to: str) -> None:
    """Ask the process running the design for these runs' text so far, to be sent to the
    channel `reply_to` (a socket's) as `TextSoFar` events. Best effort: a page that gets no
    answer shows what streams from now on."""
    message = {"type": TEXT_WANTED, "runs": run_ids, "reply_to": reply_to}
    try:
        await text_layer().group_send(text_group(design_id), message)
    except Exception:
        logger.warning("design %s: could not ask for the text so far", design_id, exc_info=True)


# -- live events ---------------------------------------------------------------------------


class EventPublisher:
    """Publishes the design's live events (`agents.events`) and, while `answering()`, gives a
    page that joins mid-answer its running agents' text so far. A failure never breaks a
    design.

    The design's progress goes with every status and run event; it is worked out from the
    design and runs the pipeline holds (read once, at the first status event, then kept up
    to date from the runs it announces), not read again from the database per event.
    """

    def __init__(self, design_id: int) -> None:
        self.design_id = design_id
        self._texts: dict[int, LiveText] = {}  # the running agents' text, by run id
        self._design: Design | None = None
        self._runs: dict[int, AgentRun] = {}  # every run of the design, by id
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
        await self._follow(design)
        queue_place = await leases.queue_place(design)
        await self.send(design_event(design, queue_place, await self._progress()))

    async def run_changed(self, run: AgentRun, kind: type[AgentStarted | AgentFinished]) -> None:
        """A run started or ended: its timeline row and the design's progress, rendered, go
        with its fields; an ended run's text is no longer asked for (the page loads it)."""
        if kind is AgentFinished:
            self._texts.pop(run.pk, None)
        if self._design is None:
            await self._follow(await Design.objects.aget(pk=run.design_id))
        self._runs[run.pk] = run
        await self.send(run_event(run, kind, await self._progress()))

    async def _follow(self, design: Design) -> None:
        """Keep `design` (the pipeline's own instance) and its runs so far."""
        if self._design is None:
            self._runs = {run.pk: run async for run in design.runs.order_by("id")}
        self._design = design

    async def _progress(self) -> LiveProgress:
        assert self._design is not None
        runs = [self._runs[pk] for pk in sorted(self._runs)]
        return live_progress(self._design, runs, await stage_estimates())

    def live_text(self, run: AgentRun) -> LiveText:
        """The run's streaming text, given to pages that join while it is written."""
        live = LiveText(self, run)
        self._texts[run.pk] = live
        return live

    @contextlib.asynccontextmanager
    async def answering(self) -> AsyncIterator[None]:
        """For the block (the design's run here), answer requests for the text so far."""
        if self._layer is None:
            yield
            return
        layer = text_layer()
        group = text_group(self.design_id)
        try:
            channel = await layer.new_channel()
            await layer.group_add(group, channel)
        except Exception:
            logger.warning(
                "design %s: pages joining mid-answer will not get the text so far",
                self.design_id,
                exc_info=True,
            )
            yield
            return
        answering = asyncio.get_running_loop().create_task(
            self._answer(layer, channel), name=f"design-{self.design_id} text so far"
        )
        try:
            yield
        finally:
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
            with contextlib.suppress(Exception):
                await layer.group_discard(group, channel)

    async def _answer(self, layer: Any, channel: str) -> None:
        while True:
            try:
                message = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis slow or away for a moment: try again shortly
                # One line, no traceback: under load channels_redis' BZPOPMIN times out now
                # and then (seen in `loadtest --workers 2`); a page asking meanwhile shows the
                # live tokens and gets the whole text when the agent finishes.
                logger.warning(
                    "design %s: waiting for text requests failed (%s: %s); again in 1 s",
                    self.design_id,
                    type(exc).__name__,
                    exc,
                )
                await asyncio.sleep(1.0)
                continue
            if message.get("type") != TEXT_WANTED:
                continue
            for run_id in message.get("runs", ()):
                live = self._texts.get(run_id)
                if live is None:  # not writing (yet, or any more): nothing to give
                    continue
                event = {"type": DESIGN_EVENT, "event": as_json(live.so_far())}
                try:
                    await self._layer.send(message["reply_to"], event)
                except Exception:
                    logger.info("design %s: a page left before its text", self.design_id)


class LiveText:
    """One agent's text as it streams: sent to the page at most every TOKEN_EVENT_INTERVAL_S,
    saved to its run at most every PARTIAL_SAVE_INTERVAL_S, kept whole for a stop and for a
    page that joins mid-answer."""

    def __init__(self, events: EventPublisher, run: AgentRun) -> None:
        self._events = events
        self._run = run
        self._parts: list[str] = []
        self._pending: list[str] = []
        self._sent = 0  # characters already sent in Tokens events
        self._last_sent = 0.0
        self._last_saved = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def so_far(self) -> TextSoFar:
        run = self._run
        return TextSoFar(agent=run.agent, round=run.round, run_id=run.pk, text=self.text)

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
        offset, self._sent = self._sent, self._sent + len(text)
        self._last_sent = time.monotonic()
        run = self._run
        await self._events.send(
            Tokens(agent=run.agent, round=run.round, run_id=run.pk, offset=offset, text=text)
        )
