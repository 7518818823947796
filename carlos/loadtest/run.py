"""One load test from start to end: the world, the probes, the users (and the restarts),
the checks, then everything stopped and the report built."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from carlos.loadtest.checks import database_state, fetch_json, settle, socket_counts
from carlos.loadtest.options import (
    PROGRESS_EVERY_S,
    ROLLING_ENV_DEFAULTS,
    TERMINAL_STATUSES,
    LoadTestError,
    LoadTestOptions,
)
from carlos.loadtest.probe import start_probe
from carlos.loadtest.readings import Mark, mark, memory_kb
from carlos.loadtest.report import ProbeReadings, build_report
from carlos.loadtest.rolling import Restart, repeated_calls, request_log, rolling_restart
from carlos.loadtest.users import Recorder, VirtualUsers
from carlos.loadtest.world import World, forget_redis_keys, start_world
from carlos.processes import Children, stop_process

# --- the run --------------------------------------------------------------------------------


async def run_load_test(
    options: LoadTestOptions, progress: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Start the world, run the users, check for leaks, stop everything; the report."""
    options = options.validated()
    try:
        import websockets  # noqa: F401
    except ImportError:
        raise LoadTestError(
            "the load test's WebSocket client needs the `websockets` package "
            "(pip install websockets)"
        ) from None
    started = mark(None)
    deadline = started.at + options.timeout
    children = Children()
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    handled = []
    if main is not None:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, main.cancel)
                handled.append(signum)
    try:
        with tempfile.TemporaryDirectory(
            prefix="carlos-loadtest-", delete=not options.keep
        ) as name:
            tmp = Path(name)
            worlds: list[World] = []  # the one started, for what is cleaned up after it
            try:
                report = await _run(options, tmp, children, started, deadline, progress, worlds)
            finally:
                exits = await children.stop_all()
                progress(f"stopped: {', '.join(f'{k} exit {v}' for k, v in exits.items())}")
                for world in worlds:
                    await forget_redis_keys(world.env)
                if options.keep:
                    progress(f"kept the database and logs in {tmp}")
            report["setup"]["children_exit"] = exits
            return report
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


def peak_memory(world: World) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of the largest server, each the sum over its processes (the
    peaks of several workers added up: at most what they held together)."""
    readings = [[memory_kb(pid) for pid in server.pids] for server in world.servers]
    return {
        key: max(sum(r.get(key, 0) for r in server) for server in readings)
        for key in ("VmRSS", "VmHWM")
    }


async def _run(
    options: LoadTestOptions,
    tmp: Path,
    children: Children,
    started: Mark,
    deadline: float,
    progress: Callable[[str], None],
    worlds: list[World],
) -> dict[str, Any]:
    servers = "two servers" if options.rolling_restart else "the server"
    if options.workers > 1:
        servers += f" ({options.workers} workers)"
    progress(f"starting the simulator, {servers} and {options.user_count} users' database ...")
    world = await start_world(options, tmp, children)
    worlds.append(world)
    async with httpx.AsyncClient(timeout=10) as client:
        _, health_at_start = await fetch_json(client, f"{world.base_url}/health")
    probes = [await start_probe(s, options, world.env, tmp, children) for s in world.servers]
    sockets_before = await socket_counts(world)
    ready = mark(world)
    if len(world.servers) == 1:
        where = f"server ready at {world.base_url}"
    else:
        where = f"servers {' and '.join(f'{s.label} at {s.base_url}' for s in world.servers)} ready"
    progress(f"{where} in {ready.at - started.at:.1f} s; logging in")

    recorder = Recorder()
    marks: dict[str, Mark] = {"start": started, "ready": ready}

    def logged_in() -> None:
        marks["logins"] = mark(world)
        progress(
            f"{recorder.logins_ok} logged in ({recorder.logins_failed} failed) in "
            f"{marks['logins'].at - ready.at:.1f} s; submitting {options.designs} designs"
        )

    users = VirtualUsers(world, options, recorder, logged_in)
    user_tasks = {asyncio.create_task(users.user(i)) for i in range(options.user_count)}
    pending: set[asyncio.Task[None]] = set(user_tasks)
    restarts: list[Restart] = []
    restarter = None
    if options.rolling_restart:
        restarter = asyncio.create_task(
            rolling_restart(
                world,
                children,
                recorder,
                lambda: all(task.done() for task in user_tasks),
                restarts,
                progress,
            )
        )
        pending.add(restarter)
    timed_out = False
    last_progress = time.monotonic()
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            done, pending = await asyncio.wait(pending, timeout=min(remaining, 1.0))
            if restarter in done and (error := restarter.exception()) is not None:
                raise error  # a server that did not come back: the run cannot go on
            if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                if "logins" not in marks:
                    progress(f"{recorder.logins_ok}/{options.user_count} users logged in")
                else:
                    done_count = sum(1 for r in recorder.designs if r.status in TERMINAL_STATUSES)
                    progress(f"{done_count}/{options.designs} designs terminal")
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    marks["designs"] = mark(world)
    marks.setdefault("logins", marks["designs"])
    progress("checking for leaks ...")
    database_task = asyncio.create_task(database_state(world))  # a slow child: start it now
    try:
        at_rest = await settle(world)
        sockets_after = await socket_counts(world, until_at_most=sockets_before[1])
        memory = peak_memory(world)
        log = await request_log(world) if options.rolling_restart else {}
        database = await database_task
    finally:
        if not database_task.done():
            database_task.cancel()
            with contextlib.suppress(BaseException):
                await database_task
    marks["checks"] = mark(world)
    for probe, _ in probes:
        await stop_process(probe)
    windows: dict[str, list[tuple[float, float]]] = {}
    for restart in restarts:
        windows.setdefault(restart.server, []).append((restart.began, restart.ready))
    readings = ProbeReadings.combined(
        ProbeReadings.read(out, windows.get(server.label, ()))
        for server, (_, out) in zip(world.servers, probes, strict=True)
    )
    rolling = None
    if options.rolling_restart:
        rolling = {
            "servers": [server.label for server in world.servers],
            "settings": {name: world.env.get(name) for name in ROLLING_ENV_DEFAULTS},
            "restarts": [restart.as_dict() for restart in restarts],
            "designs_resumed": database["resumed"],
            "agent_runs_stopped": database["runs_stopped"],
            "agent_calls": repeated_calls(log, database["texts"], database["saved"]),
            "submits_refused_while_draining": recorder.refused_while_draining,
            "requests_failed_over": recorder.failovers,
            "health_while_restarting": readings.during_restarts(),
        }
    return build_report(
        options=options,
        recorder=recorder,
        readings=readings,
        marks=marks,
        health_at_start=health_at_start,
        at_rest=at_rest,
        database=database,
        sockets={"before": sockets_before, "after": sockets_after},
        memory=memory,
        timed_out=timed_out,
        rolling=rolling,
        redis_prefix=world.env.get("REDIS_PREFIX") if options.workers > 1 else None,
    )
