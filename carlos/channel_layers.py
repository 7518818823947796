"""The single-process channel layer (no `REDIS_URL`), made cheap enough for live tokens.

Channels' `InMemoryChannelLayer.group_send` scans every channel and every group for expired
messages on each call, then starts one task per member: with a few hundred open design pages
and a token event per agent every 50 ms, that scan alone took a tenth of the event loop. Here
the scan runs at most once a second, and members are sent to directly. Delivery, capacity,
expiry and group semantics are those of the parent class.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer

CLEAN_EVERY_S = 1.0


class LocalChannelLayer(InMemoryChannelLayer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cleaned_at = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._cleaned_at >= CLEAN_EVERY_S:
            self._cleaned_at = now
            super()._clean_expired()

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        for channel in list(self.groups.get(group, ())):
            # As the parent: a full member misses this message, the others do not.
            with contextlib.suppress(ChannelFull):
                await self.send(channel, message)
