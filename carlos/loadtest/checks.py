"""The checks after the last design: pools idle, connections closed, sockets back to where
they were, and what the database says of every design and agent run."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from carlos.loadtest.options import SETTLE_TIMEOUT_S, SETUP_TIMEOUT_S
from carlos.loadtest.readings import open_sockets, sockets_to, total
from carlos.loadtest.world import World
from carlos.processes import ChildFailed, run_manage

# What the database says once the run is over (a `manage.py shell` child prints it as JSON).
_CHECK_CODE = """
import json
from django.db.models import Sum
from agents.models import AgentRun, Design
saved = AgentRun.objects.filter(status="succeeded", finished_at__isnull=False)
print(json.dumps({
    "designs": list(Design.objects.values_list("id", "status", "error")),
    "texts": list(Design.objects.values_list("id", "request_text")),
    "resumed": Design.objects.filter(attempts__gte=2).count(),
    "runs_running": AgentRun.objects.filter(status="running").count(),
    "runs_stopped": AgentRun.objects.filter(status="stopped").count(),
    "saved": [
        (design, agent, at.timestamp())
        for design, agent, at in saved.values_list("design_id", "agent", "finished_at")
    ],
    "tokens_out": AgentRun.objects.aggregate(total=Sum("tokens_out"))["total"] or 0,
}))
"""

# --- checks ---------------------------------------------------------------------------------


async def fetch_json(client: httpx.AsyncClient, url: str) -> tuple[int, dict[str, Any]]:
    response = await client.get(url)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {}


def pool_leaks(health: dict[str, Any], simulator: dict[str, Any]) -> list[str]:
    """What is not at rest after the last design: busy slots, waiters, stray connections."""
    problems = []
    pools = health.get("pools", {})
    for name, pool in pools.items():
        for key in ("in_use", "waiting", "overflow_in_use"):
            if pool.get(key, 0) != 0:
                problems.append(f"pool {name}: {key} = {pool.get(key)}")
    sizes = sum(pool.get("total", 0) for pool in pools.values())
    open_now = health.get("http", {}).get("connections_open")
    if open_now is None:
        problems.append("/health shows no http.connections_open")
    elif open_now > sizes:
        problems.append(
            f"{open_now} upstream connections open, more than the pools' {sizes} slots "
            "(temporary connections not closed)"
        )
    simulator_open = simulator.get("connections_open")
    if open_now is not None and simulator_open != open_now:
        problems.append(
            f"the server counts {open_now} upstream connections open, "
            f"the simulator {simulator_open}"
        )
    return problems


def merged_health(healths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several server processes' `/health` as one, for the leak checks: each pool named after
    its server or worker ("A main"), the upstream connection counts added up (the simulator
    counts them all together)."""
    if len(healths) == 1:
        return next(iter(healths.values()))
    pools = {
        f"{label} {name}": pool
        for label, health in healths.items()
        for name, pool in health.get("pools", {}).items()
    }
    http = {
        key: total(health.get("http", {}).get(key) for health in healths.values())
        for key in ("connections_open", "connections_num", "max_connections")
    }
    return {"pools": pools, "http": http}


async def server_health(
    client: httpx.AsyncClient, world: World
) -> tuple[int, dict[str, dict[str, Any]], list[str]]:
    """Every server process's pools and connections: (the worst /health status, each
    process's figures by name, what is missing).

    A server of several workers answers for one of them at a time, so its figures are those
    the workers last published to the cluster (`/health?scope=cluster`, every third of
    POOL_LEASE_SECONDS), one entry per worker."""
    statuses, healths, missing = [], {}, []
    for server in world.servers:
        if not server.workers:
            status, body = await fetch_json(client, f"{server.base_url}/health")
            statuses.append(status)
            healths[server.label] = body
            continue
        status, body = await fetch_json(client, f"{server.base_url}/health?scope=cluster")
        statuses.append(status)
        instances = body.get("cluster_view", {}).get("instances", {})
        for instance, stats in instances.items():
            healths[f"{server.label} {instance}".strip()] = stats
        if len(instances) < len(server.workers):
            missing.append(
                f"only {len(instances)} of the {len(server.workers)} workers report to the cluster"
            )
    return max(statuses), healths, missing


async def settle(world: World) -> dict[str, Any]:
    """Poll until the pools and connections of every server are at rest (or the settle time
    is up)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            status, healths, missing = await server_health(client, world)
            _, simulator = await fetch_json(client, f"{world.simulator_url}/_simulator/stats")
            health = merged_health(healths)
            problems = missing + pool_leaks(health, simulator)
            if not problems or time.monotonic() > deadline:
                return {
                    "problems": problems,
                    "health_status": status,
                    "health": health,
                    "simulator": simulator,
                }
            await asyncio.sleep(0.25)


async def socket_counts(
    world: World, until_at_most: int | None = None
) -> tuple[int | None, int | None]:
    """The servers' sockets, and those that are neither upstream nor Redis connections
    (listeners, clients, internal pipes), counted without connecting to a server: the
    upstream figure comes from the simulator, the Redis one (workers open theirs as they need
    them) from /proc. With `until_at_most`, wait (a few seconds at most) for the second to
    come down to it, as closing sockets may still be on their way out.
    """
    deadline = time.monotonic() + 5
    redis_url = world.env.get("REDIS_URL")
    redis_port = (urlsplit(redis_url).port or 6379) if redis_url else 0
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            _, stats = await fetch_json(client, f"{world.simulator_url}/_simulator/stats")
            sockets = total(open_sockets(pid) for pid in world.pids)
            upstream = stats.get("connections_open")
            redis = total(sockets_to(pid, redis_port) for pid in world.pids) if redis_port else 0
            if sockets is None or upstream is None or redis is None:
                other = None
            else:
                other = sockets - upstream - redis
            if until_at_most is None or other is None or other <= until_at_most:
                return sockets, other
            if time.monotonic() > deadline:
                return sockets, other
            await asyncio.sleep(0.2)


async def database_state(world: World) -> dict[str, Any]:
    """Designs and runs as the database has them; the error instead if it cannot be read
    (SQLite may still be locked by the server), so the report is never lost to the check."""
    problem = ""
    for _ in range(3):
        try:
            out = await run_manage(["shell", "-c", _CHECK_CODE], world.env, SETUP_TIMEOUT_S)
            return json.loads(out.strip().splitlines()[-1])
        except (ChildFailed, ValueError, IndexError) as exc:
            problem = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            await asyncio.sleep(1)
    return {
        "designs": [],
        "texts": [],
        "resumed": None,
        "runs_running": 0,
        "runs_stopped": None,
        "saved": [],
        "tokens_out": 0,
        "error": problem,
    }
