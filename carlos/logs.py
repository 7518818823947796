"""What the server's log leaves out: lines that mislead whoever reads it (settings.LOGGING).

Daphne announces "HTTP/2 support not enabled (install the http2 and tls Twisted extras)" at
every start. Carlos serves plain HTTP (HTTP/1.1 and WebSockets) behind a TLS proxy, and
Daphne speaks HTTP/2 only over its own TLS, so the extras would change nothing here: the line
reads as a fault to fix where there is none. On a clean stop it says "Killed 0 pending
application instances", which reads as something killed where nothing was.
"""

from __future__ import annotations

import logging

MISLEADING_DAPHNE_LINES = (
    "HTTP/2 support not enabled",
    "Killed 0 pending application instances",
)


class DropMisleadingDaphneLines(logging.Filter):
    """On the `daphne.server` logger: drop the lines above, keep every other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(MISLEADING_DAPHNE_LINES)
