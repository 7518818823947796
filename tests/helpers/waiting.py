"""Wait for a condition instead of sleeping and hoping it happened.

Both waits poll `predicate` until it returns something true and hand that value back. The
timeout is a fail-safe limit, never a timing assertion: a broken build fails (with `what`
and, if given, the `state` it was in) instead of hanging.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

POLL_INTERVAL_S = 0.01


async def eventually[T](
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    *,
    what: str = "the condition",
    state: Callable[[], Any] | None = None,
    interval: float = POLL_INTERVAL_S,
) -> T:
    """Poll `predicate` (plain or async) on the running loop until it holds; its value."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > give_up:
            raise AssertionError(_never(what, timeout, state))
        await asyncio.sleep(interval)


def eventually_sync[T](
    predicate: Callable[[], T],
    timeout: float = 5.0,
    *,
    what: str = "the condition",
    state: Callable[[], Any] | None = None,
    interval: float = 0.05,
) -> T:
    """`eventually` for code without an event loop (a thread, a child process's output)."""
    give_up = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > give_up:
            raise AssertionError(_never(what, timeout, state))
        time.sleep(interval)
    return value


def _never(what: str, timeout: float, state: Callable[[], Any] | None) -> str:
    message = f"never happened within {timeout:g} s: {what}"
    return message if state is None else f"{message} ({state()})"
