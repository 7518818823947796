"""Start-up warm-up and clean shutdown for ASGI servers that speak the lifespan protocol.

Daphne sends no lifespan events (`manage.py serve` hooks its start and stop instead);
uvicorn and hypercorn do, and this wrapper answers them in front of the Channels router,
which would otherwise reject the `lifespan` scope.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from carlos.serving import shut_down, tune_gc_for_serving, warm_up
from pools.engine.metrics import metrics_for
from pools.runtime import get_pool
from pools.sampler import SnapshotSampler, start_sampler

logger = logging.getLogger("pools")


class PoolLifespan:
    """ASGI middleware: warm the pools on `lifespan.startup`, close them on shutdown.

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

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.on_starting is not None:
                    try:
                        self.on_starting()
                    except Exception:  # telemetry is worth a log line, not a refusal
                        logger.exception("the application's start-up step failed")
                registry = get_pool()
                metrics_for(registry)
                try:
                    await warm_up(registry)
                except Exception as exc:  # report, so the server refuses to start
                    logger.exception("pool warm-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self.sampler = start_sampler(registry)  # pool history, after warm-up
                tune_gc_for_serving()
                if self.on_started is not None:
                    await self.on_started()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
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
                await send({"type": "lifespan.shutdown.complete"})
                return
