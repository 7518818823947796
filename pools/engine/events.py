"""Per-call events, for whoever measures the pools (Prometheus, snapshots, tests).

The engine emits one event when a slot is granted or refused and one when a call ends.
Observers run synchronously on the caller's path, so they must be cheap; an observer that
raises is logged and never breaks a call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

logger = logging.getLogger("pools")


class EventKind(StrEnum):
    ACQUIRED = "acquired"  # a slot was granted (wait_ms, overflow, queued)
    REFUSED = "refused"  # PoolTimeout or PoolExhausted (error names which)
    COMPLETED = "completed"  # a call finished (latency_ms, ttft_ms for streams, tokens)
    FAILED = "failed"  # a call raised (error is the exception's class name)


@dataclass(frozen=True, slots=True)
class PoolEvent:
    pool: str
    kind: EventKind
    wait_ms: float | None = None
    overflow: bool = False
    queued: bool = False
    latency_ms: float | None = None
    ttft_ms: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    error: str = ""


Observer = Callable[[PoolEvent], None]


class EventBus:
    """A list of observers with a fail-safe `emit`."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def subscribe(self, observer: Observer) -> None:
        if observer not in self._observers:
            self._observers.append(observer)

    def unsubscribe(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def emit(self, event: PoolEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                logger.exception("pool event observer %r failed", observer)
