"""The server's start (warm-up) and stop (drain, close) for ASGI servers, whichever they are.

uvicorn and hypercorn send ASGI lifespan events: this wrapper answers them in front of the
Channels router, which would otherwise reject the `lifespan` scope. Daphne sends none, so
under a plain `daphne carlos.asgi:application` (the way the Channels docs deploy) the first
request starts the server instead, in the background: that request, a health probe as often
as not, is answered at once ("warming up", 503) and the next ones see the pools ready. The
stop then hangs on Twisted's shutdown, which Daphne runs on SIGTERM and Ctrl-C.
`manage.py serve` hooks Daphne's start and stop itself and is left alone here.

Nothing starts at import or in `AppConfig.ready()`: clients, locks and tasks belong to the
event loop that uses them, and only a running server has the loops they belong on.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from carlos.serving import shut_down, tune_gc_for_serving, warm_up, warm_up_begun
from pools.engine.metrics import metrics_for
from pools.engine.registry import PoolRegistry
from pools.runtime import get_pool
from pools.sampler import SnapshotSampler, start_sampler

logger = logging.getLogger("pools")
# Registries a first request set out to warm (the task begins at the loop's next turn).
_started_by_request: weakref.WeakSet[PoolRegistry] = weakref.WeakSet()


def warming(registry: PoolRegistry) -> bool:
    """Whether a server start is warming `registry`: `serve`'s, a lifespan start-up's or a
    first request's (/health then says "warming up" rather than "not initialized")."""
    return warm_up_begun(registry) or registry in _started_by_request


def running_daphne_reactor() -> Any | None:
    """Twisted's reactor if it runs the event loop of the caller (Daphne serves this process:
    its CLI, `runserver` or `serve`), else None (a test's client, uvicorn, hypercorn)."""
    reactor = sys.modules.get("twisted.internet.reactor")  # the reactor itself, once installed
    if reactor is None or not getattr(reactor, "running", False):
        return None
    if getattr(reactor, "_asyncioEventloop", None) is not asyncio.get_running_loop():
        return None
    return reactor


class PoolLifespan:
    """ASGI middleware: warm the pools on `lifespan.startup` (or, under Daphne, on the first
    request), close them on shutdown (or Daphne's).

    `on_starting` (synchronous) runs first, `on_started` once the pools are warm,
    `on_stopping` before they close and `on_stopped` after (the application's own start,
    drain and last words, telemetry's flush: see carlos.lifecycle).
    """

    def __init__(
        self,
        app: Any,
        *,
        on_starting: Callable[[], Any] | None = None,
        on_started: Callable[[], Awaitable[Any]] | None = None,
        on_stopping: Callable[[], Awaitable[Any]] | None = None,
        on_stopped: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.app = app
        self.on_starting = on_starting
        self.on_started = on_started
        self.on_stopping = on_stopping
        self.on_stopped = on_stopped
        self.sampler: SnapshotSampler | None = None
        # The start a request made (Daphne); None until then, and for lifespan servers.
        self.started_by_request: asyncio.Task[None] | None = None
        self._daphne_start_settled = False  # started here, or found `serve` in charge

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if not self._daphne_start_settled:
            self._start_on_first_request()
        await self.app(scope, receive, send)

    # -- Daphne: the first request starts, Twisted's shutdown stops ---------------------------
    def _start_on_first_request(self) -> None:
        """Under Daphne, with nobody warming the pools yet: start the server in the background.

        Synchronous, on the serving loop: concurrent first requests cannot both start it.
        """
        reactor = running_daphne_reactor()
        if reactor is not None:
            self.start_under_daphne(reactor, "the first request warms the pools")

    def start_under_daphne(self, reactor: Any, why: str) -> None:
        """Start the server (warm-up, pool history, designs) in the background on Daphne's
        event loop, and stop it when Twisted shuts down; nothing if a start already began.

        Called by the first request, or by `runserver` once Daphne listens (before its loop
        runs: the task begins with it). Returns at once.
        """
        registry = get_pool()
        if self._daphne_start_settled or warming(registry):
            self._daphne_start_settled = True
            return  # begun already, or `serve` (or a lifespan start-up) is in charge
        self._daphne_start_settled = True
        logger.info("🔥 No start-up event from the server: %s", why)
        _started_by_request.add(registry)
        self.started_by_request = asyncio.get_event_loop().create_task(
            self._start_in_background(), name="carlos-start"
        )
        reactor.addSystemEventTrigger("before", "shutdown", self._stop_with_twisted)

    async def _start_in_background(self) -> None:
        """The whole start; a failure is logged (and /health says so), never raised."""
        self._call_on_starting()
        registry = get_pool()
        metrics_for(registry)
        try:
            await warm_up(registry)
        except Exception:
            logger.exception("pool warm-up failed")
            return
        try:
            await self._serving(registry)
        except Exception:  # the database unreachable: the pages still say so; log it here
            logger.exception("the server's start after warm-up failed")

    def _stop_with_twisted(self) -> Any:
        """Twisted's "before shutdown" trigger: Daphne waits for the Deferred returned."""
        from twisted.internet import defer

        return defer.Deferred.fromFuture(asyncio.ensure_future(self._stop_after_request_start()))

    async def _stop_after_request_start(self) -> None:
        started = self.started_by_request
        if started is not None and not started.done():
            started.cancel()  # still warming: stop it, then close what it opened
            await asyncio.gather(started, return_exceptions=True)
        await self._stop()

    # -- lifespan servers ------------------------------------------------------------------------
    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._call_on_starting()
                registry = get_pool()
                metrics_for(registry)
                try:
                    await warm_up(registry)
                except Exception as exc:  # report, so the server refuses to start
                    logger.exception("pool warm-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await self._serving(registry)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- shared by both ---------------------------------------------------------------------------
    def _call_on_starting(self) -> None:
        if self.on_starting is not None:
            try:
                self.on_starting()
            except Exception:  # telemetry is worth a log line, not a refusal
                logger.exception("the application's start-up step failed")

    async def _serving(self, registry: PoolRegistry) -> None:
        """After warm-up: pool history, the collector tuned, then the application's start."""
        self.sampler = start_sampler(registry)
        tune_gc_for_serving()
        if self.on_started is not None:
            await self.on_started()

    async def _stop(self) -> None:
        """Drain (on_stopping), stop the sampler, close the pools, then on_stopped."""
        if self.on_stopping is not None:
            try:
                await self.on_stopping()
            except Exception:
                logger.exception("the application's shutdown step failed")
        if self.sampler is not None:  # before the pools close: it reads their stats
            try:
                await self.sampler.stop()
            except Exception:
                logger.exception("stopping the pool snapshot sampler failed")
            self.sampler = None
        await shut_down(get_pool())
        if self.on_stopped is not None:
            try:
                await self.on_stopped()
            except Exception:
                logger.exception("the application's last shutdown step failed")
