"""Pool history rows for tests: a `PoolSnapshot` with the pool's slots worked out."""

from __future__ import annotations

from datetime import datetime

from pools.models import PoolSnapshot


def snap(pool: str, at: datetime, in_use: int, size: int = 10, **fields) -> PoolSnapshot:
    """`pool` at `at` with `in_use` of `size` slots taken (beyond `size`: temporary ones);
    `fields` set the rest or override these."""
    values = {
        "taken_at": at,
        "instance": "web-1:100",
        "pool": pool,
        "size": size,
        "in_use": in_use,
        "available": max(0, size - in_use),
        "overflow_in_use": max(0, in_use - size),
        "waiting": 0,
    }
    values.update(fields)
    return PoolSnapshot(**values)
