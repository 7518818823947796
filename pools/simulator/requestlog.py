"""The bounded log of chat requests served at GET /_simulator/requests.

Why: a test driving the simulator from another process (a server, a crash test) can prove
which calls were made, with which messages and trace context, and how each one ended.
"""

import time
from collections import deque
from typing import Any

__all__ = ["RequestLog"]


class RequestLog:
    """The last `size` chat requests (0 = off), each with its status and outcome."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"request_log must be a whole number >= 0, got {size!r}")
        self._entries: deque[dict[str, Any]] | None = deque(maxlen=size) if size else None
        self._seq = 0  # never reset: seq numbers stay unique over the server's life
        self.dropped = 0  # entries that fell out of the bounded log since the last clear

    @property
    def enabled(self) -> bool:
        return self._entries is not None

    def arrival(self, traceparent: str | None, deployment: str | None) -> dict[str, Any] | None:
        """Log a chat request as it arrives, so one whose client vanishes still shows."""
        log = self._entries
        if log is None:
            return None
        self._seq += 1
        entry: dict[str, Any] = {
            "seq": self._seq,
            "at": time.time(),
            "model": deployment,  # /v1 requests: the body's model, once the body is valid
            "deployment": deployment,
            "stream": None,  # bool once the body is valid
            "messages": None,
            "traceparent": traceparent,
            "status": None,  # set when the response starts
            "outcome": None,  # completed | cut | refused, set when the request ends
        }
        if len(log) == log.maxlen:
            self.dropped += 1
        log.append(entry)
        return entry

    @staticmethod
    def completed(entry: dict[str, Any] | None) -> None:
        """The whole answer was written: for a stream, the final chunk and [DONE]."""
        if entry is not None:
            entry["outcome"] = "completed"

    @staticmethod
    def ended(entry: dict[str, Any] | None) -> None:
        """A request that was not completed: refused if answered with an error, else cut."""
        if entry is not None and entry["outcome"] is None:
            entry["outcome"] = "cut" if entry["status"] in (None, 200) else "refused"

    def since(self, seq: int = 0) -> list[dict[str, Any]]:
        """Copies of the entries with seq > `seq`, oldest first.

        Copies, so a caller's snapshot does not change as in-flight requests end.
        """
        if self._entries is None:
            return []
        return [dict(entry) for entry in self._entries if entry["seq"] > seq]

    def snapshot(self, seq: int = 0) -> dict[str, Any]:
        """The body of GET /_simulator/requests?since=SEQ."""
        return {"enabled": self.enabled, "requests": self.since(seq), "dropped": self.dropped}

    def clear(self) -> None:
        """Empty the log; seq numbers keep counting up, so `since` never sees one twice."""
        if self._entries is not None:
            self._entries.clear()
        self.dropped = 0
