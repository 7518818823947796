"""What the server does once it listens and when it is asked to stop, beyond the pools.

Both ways of serving call these: `manage.py serve` from Daphne's ready callback and
shutdown trigger, and `PoolLifespan` for servers that send ASGI lifespan events (uvicorn,
hypercorn). The pools stay ignorant of designs; this is where the two meet.
"""

from __future__ import annotations

from agents.tasks import DrainReport, drain, start_supervisor
from pools.runtime import get_pool


async def listening() -> None:
    """The port is bound: from now on this process may take designs over (the sweeper) and
    keeps the leases of those it runs."""
    await start_supervisor()


async def stopping() -> DrainReport:
    """Before the pools close: take no new design (readiness fails meanwhile), let running
    agents finish for up to DRAIN_SECONDS, then hand every unfinished design back to resume
    elsewhere."""
    get_pool().stopping = True
    return await drain()
