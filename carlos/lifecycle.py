"""What the server does once it listens and when it is asked to stop, beyond the pools.

Both ways of serving call these: `manage.py serve` before Daphne starts, from Daphne's ready
callback and from its shutdown trigger, and `PoolLifespan` for servers that send ASGI lifespan
events (uvicorn, hypercorn). The pools stay ignorant of designs and of telemetry; this is
where they meet.
"""

from __future__ import annotations

import asyncio

from agents.tasks import DrainReport, drain, start_supervisor
from carlos import telemetry
from pools.runtime import get_pool


def starting() -> None:
    """Before the first request: export traces and metrics if the environment says where
    (carlos.telemetry), named as the pool snapshots name this process."""
    telemetry.setup(instance=get_pool().instance)


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


async def stopped() -> None:
    """After the drain and the pools' close: send the last spans and metrics, for at most
    telemetry.SHUTDOWN_SECONDS (off the event loop)."""
    await asyncio.to_thread(telemetry.shutdown)
