"""The deadlines of one call (`pools.engine.handle._Call`): the whole call's, and for a
stream the first-token and idle ones, which pass only when the upstream is really silent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pools.engine.exceptions import DeadlineExceeded


async def within[T](awaitable: Awaitable[T], deadline: float, which: str, seconds: float) -> T:
    """Await with an absolute loop-time deadline, raising `DeadlineExceeded(which)`."""
    try:
        async with asyncio.timeout_at(deadline):
            return await awaitable
    except TimeoutError as exc:
        if isinstance(exc, DeadlineExceeded):
            raise
        raise DeadlineExceeded(which, seconds) from None


class SilenceWatch:
    """The first-token and idle deadlines of one streamed attempt, for reads only.

    A deadline is meant for an upstream that went silent, not for an event loop too busy to
    read what already arrived: when it passes while bytes wait unread on the connection, it
    is extended (counted in `extensions`) instead of failing the call and counting a failure
    against the deployment's breaker. The whole-call deadline is never extended. One timer
    per deadline period, re-armed lazily, rather than one per read: reads are per token.
    """

    def __init__(self, call_deadline: float, call_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._call_deadline = call_deadline
        self._call_timeout = call_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task | None = None
        self._expires_at = 0.0
        self.which, self.seconds = "total", call_timeout
        self.expired = False
        self.extensions = 0
        # Set once the response's connection is known; until then a deadline is not extended.
        self.data_waiting: Callable[[], bool] = lambda: False

    def expect(self, which: str, seconds: float) -> None:
        """The upstream must send something within `seconds` from now."""
        expires_at = self._loop.time() + seconds
        if expires_at >= self._call_deadline:  # name the deadline that really binds
            expires_at, which, seconds = self._call_deadline, "total", self._call_timeout
        self._expires_at, self.which, self.seconds = expires_at, which, seconds

    async def read[T](self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, raising `DeadlineExceeded` if the upstream stays silent."""
        task = asyncio.current_task()
        self._reader = task
        if self._timer is None or self._timer.when() > self._expires_at:
            if self._timer is not None:  # the deadline moved earlier (first token -> idle)
                self._timer.cancel()
            self._timer = self._loop.call_at(self._expires_at, self._check)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.expired and task is not None and task.uncancel() == 0:
                raise DeadlineExceeded(self.which, self.seconds) from None
            raise
        finally:
            self._reader = None

    def _check(self) -> None:
        self._timer = None
        if self._reader is None:
            return  # between reads: the next read re-arms
        now = self._loop.time()
        if now < self._expires_at:
            self._timer = self._loop.call_at(self._expires_at, self._check)
            return
        if now < self._call_deadline and self.data_waiting():
            self.extensions += 1  # the loop was late, not the upstream
            self._timer = self._loop.call_at(now + 0.05, self._check)
            return
        self.expired = True
        self._reader.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def data_waiting(network_stream: Any) -> bool:
    """True when the connection has bytes nobody has read yet (or the peer closed it)."""
    try:
        return bool(network_stream.get_extra_info("is_readable"))
    except Exception:  # a stream that cannot tell is treated as silent
        return False
