"""`--rolling-restart`: each server stopped as a deploy does and started again while the
designs run, and which agent calls the simulator then saw twice."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx

from carlos.loadtest.checks import fetch_json
from carlos.loadtest.users import Recorder
from carlos.loadtest.world import World, log_since, log_size, start_server
from carlos.processes import STOP_GRACE_S, Children, stop_process

# In each design's request text, hence in every prompt of its agents.
_MARKER = re.compile(r"\(load test #(\d+)\)")
# What `manage.py serve` prints when its drain handed designs on.
_DRAINED = re.compile(r"Drained in [\d.]+s: (\d+) design\(s\) handed on .*?, (\d+) stopped")

# --- rolling restart ------------------------------------------------------------------------


@dataclass
class Restart:
    """One server's restart: SIGTERM, its drain and exit, then a new process on its port."""

    server: str
    began: float  # monotonic: SIGTERM sent
    exited: float
    ready: float  # /health answered 200 again
    exit_code: int | None
    drained: tuple[int, int] | None  # designs handed on at a checkpoint, stopped mid-agent

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "drain_s": round(self.exited - self.began, 1),
            "exit_code": self.exit_code,
            "down_s": round(self.ready - self.exited, 1),
            "designs_at_checkpoint": self.drained[0] if self.drained else None,
            "designs_stopped_mid_agent": self.drained[1] if self.drained else None,
        }


def drain_seconds(env: dict[str, str]) -> float:
    try:
        return max(0.0, float(env.get("DRAIN_SECONDS", "30")))
    except ValueError:
        return 30.0


async def restart_server(world: World, index: int, children: Children) -> Restart:
    """Stop a server as a deploy does (SIGTERM; it drains, then exits; SIGKILL only past
    DRAIN_SECONDS and the stop grace), then start it again on its port with the same
    environment; returns once its `/health` answers 200."""
    server = world.servers[index]
    log_before = log_size(server.log)
    world.draining.add(server.label)
    began = time.monotonic()
    try:
        code = await stop_process(server.process, drain_seconds(world.env) + STOP_GRACE_S)
    finally:
        world.draining.discard(server.label)
    exited = time.monotonic()
    drained = _DRAINED.findall(log_since(server.log, log_before))
    world.servers[index] = await start_server(
        server.label, server.host, server.port, world.env, world.tmp, children
    )
    return Restart(
        server=server.label,
        began=began,
        exited=exited,
        ready=time.monotonic(),
        exit_code=code,
        drained=(int(drained[-1][0]), int(drained[-1][1])) if drained else None,
    )


async def rolling_restart(
    world: World,
    children: Children,
    recorder: Recorder,
    users_done: Callable[[], bool],
    restarts: list[Restart],
    progress: Callable[[str], None],
) -> None:
    """Once a third of the designs are seen running (or every user is done), restart each
    server in turn, appending to `restarts` as each is back."""
    wanted = math.ceil(len(recorder.designs) / 3)
    while not users_done():
        if sum(1 for run in recorder.designs if run.status not in (None, "queued")) >= wanted:
            break
        await asyncio.sleep(0.1)
    for index in range(len(world.servers)):
        label = world.servers[index].label
        progress(f"restarting server {label}: SIGTERM, drain, start again ...")
        restart = await restart_server(world, index, children)
        restarts.append(restart)
        figures = restart.as_dict()
        progress(
            f"server {label} drained and exited {figures['exit_code']} in "
            f"{figures['drain_s']} s; serving again {figures['down_s']} s later"
        )


async def request_log(world: World) -> dict[str, Any]:
    """The simulator's log of the chat requests it received."""
    async with httpx.AsyncClient(timeout=120) as client:
        _, log = await fetch_json(client, f"{world.simulator_url}/_simulator/requests")
    return log


def repeated_calls(
    log: dict[str, Any],
    texts: Iterable[tuple[int, str]],
    saved: Iterable[tuple[int, str, float]],
) -> dict[str, Any]:
    """Agent calls made more than once, from the simulator's request log and the answers
    saved (each agent's succeeded runs).

    A call belongs to a design by the marker of its request text in the prompt, and to an
    agent by the agent line of its system prompt. A call for an agent after its answer was
    saved must never happen: a resumed design re-uses the agents that finished. The other
    repeats are agents a drain stopped mid-answer, which run again where the design resumes.
    """
    from agents.simulated import agent_of

    design_of: dict[int, int] = {}
    for design_id, text in texts:
        if (found := _MARKER.search(text)) is not None:
            design_of[int(found[1])] = design_id
    saved_at: dict[tuple[int, str], list[float]] = {}
    for design_id, agent, at in saved:
        saved_at.setdefault((design_id, agent), []).append(at)
    calls: dict[tuple[int, str], list[float]] = {}
    unattributed = 0
    for entry in log.get("requests") or []:
        messages = entry.get("messages") or []
        found = _MARKER.search(" ".join(str(m.get("content")) for m in messages))
        agent = agent_of(SimpleNamespace(messages=messages))
        if found is None or agent is None or int(found[1]) not in design_of:
            unattributed += 1  # a warm-up call, or a request the simulator could not read
            continue
        calls.setdefault((design_of[int(found[1])], agent), []).append(entry["at"])
    repeated = after_saved = 0
    for key, arrivals in calls.items():
        answers = saved_at.get(key, [])
        repeated += max(0, len(arrivals) - max(len(answers), 1))
        if answers:
            after_saved += sum(1 for at in arrivals if at > max(answers))
    return {
        "calls": sum(len(arrivals) for arrivals in calls.values()),
        "unattributed": unattributed,
        "after_answer_saved": after_saved,
        "again_after_stopped_mid_answer": max(0, repeated - after_saved),
        "log_enabled": bool(log.get("enabled")),
        "log_dropped": log.get("dropped"),
    }
