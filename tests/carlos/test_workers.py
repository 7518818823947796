"""`manage.py serve --workers N`: N server processes on one port, one cluster through Redis.

Real processes throughout: `serve --workers 2` with its one simulator, a throwaway SQLite
database and a Redis prefix of this run's own. With SO_REUSEPORT the kernel spreads new
connections over the workers, so a test that needs a given worker opens new connections
until one lands there, and asks the kernel (psutil, the workers' sockets) which one it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from django.core.management.base import CommandError
from websockets.asyncio.client import ClientConnection, connect

from carlos.workers import NO_REDIS, worker_count
from tests.helpers import services
from tests.helpers.services import forget_keys, run_prefix
from tests.helpers.waiting import eventually, eventually_sync
from tests.servers import (
    HOST,
    START_LIMIT_S,
    Server,
    child_env,
    free_port,
    log_in,
    manage,
    migrate_with_one_user,
    start,
    stop,
)
from tests.test_multi_instance import submit

REDIS_URL = services.CLUSTER_REDIS_URL
needs_redis = services.needs_redis(REDIS_URL)
USERNAME, PASSWORD = "worker-user", f"pw-{os.urandom(8).hex()}"
ATTEMPTS = 60  # new connections tried to reach a given worker (each lands on one of two)
DESIGN_LIMIT_S = 90.0  # fail-safe limits, not timing assertions: a broken build must not hang
FAST = {"ttft_ms": 0.0}
SLOW = {"ttft_ms": 1500.0}  # every call holds its slot a while before its first token


@dataclass
class Workers:
    """A running `serve --workers 2`: the parent, its workers' pids, where things are."""

    server: Server
    database: Path
    simulator: str  # the simulator's root URL
    pids: dict[int, int]  # worker number: pid

    def set_simulator(self, settings: dict[str, float]) -> None:
        response = httpx.post(f"{self.simulator}/_simulator/faults", json=settings, timeout=5)
        response.raise_for_status()

    def design(self, design_id: int) -> tuple[str, str]:
        """(status, lease owner) of a design, read from the database file."""
        with sqlite3.connect(self.database, timeout=30) as connection:
            row = connection.execute(
                "SELECT status, lease_owner FROM agents_design WHERE id = ?", (design_id,)
            ).fetchone()
        return row[0], row[1]


def workers_env(tmp_path: Path, prefix: str, **extra: str) -> dict[str, str]:
    return child_env(
        f"sqlite:///{tmp_path / 'db.sqlite3'}",
        REDIS_URL=REDIS_URL,
        REDIS_PREFIX=prefix,
        POOL_LEASE_SECONDS="1.5",  # each instance publishes its stats every half second
        POOL_SNAPSHOT_INTERVAL="0",
        DRAIN_SECONDS="1",
        DESIGNS_PER_HOUR="1000",
        **extra,
    )


def worker_processes(parent: int) -> dict[int, int]:
    """The `serve --worker N:...` children of `parent`: {N: pid}."""
    found = {}
    for child in psutil.Process(parent).children():
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "--worker" in command:
            found[int(command[command.index("--worker") + 1].split(":")[0])] = child.pid
    return found


def simulators(parent: int) -> list[int]:
    return [
        child.pid
        for child in psutil.Process(parent).children()
        if any("llm_simulator" in part for part in child.cmdline())
    ]


def wait_ready(server: Server, count: int = 2) -> dict[int, int]:
    """Until the parent says every worker is ready; the workers' pids."""

    def ready() -> bool:
        if server.process.poll() is not None:
            pytest.fail(f"serve exited with {server.process.returncode}:\n{server.tail()}")
        return f"✅ {count} workers ready on" in server.log.read_text()

    eventually_sync(ready, START_LIMIT_S, what="every worker ready", state=server.tail)
    pids = worker_processes(server.process.pid)
    assert sorted(pids) == list(range(1, count + 1)), pids
    return pids


def instance_pid(instance: str) -> int:
    """The pid in a cluster instance name (`host:pid:random`)."""
    return int(instance.rsplit(":", 2)[1])


def health(server: Server, scope: str = "instance") -> dict[str, Any]:
    """One GET /health on a new connection (so the kernel picks a worker each time)."""
    url = f"{server.base}/health?scope={scope}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def serving_pid(workers: Workers, client_port: int) -> int | None:
    """Which worker holds the server's end of the connection from `client_port`."""
    for pid in workers.pids.values():
        for connection in psutil.Process(pid).net_connections(kind="tcp"):
            remote = connection.raddr
            if (
                remote
                and remote.port == client_port
                and connection.laddr.port == workers.server.port
            ):
                return pid
    return None


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """`serve --workers 2` on a database with one user, its simulator fast until a test
    slows it."""
    if problem := services.redis_problem(REDIS_URL):
        pytest.skip(problem)
    folder = tmp_path_factory.mktemp("workers")
    prefix = run_prefix("test-workers")
    env = workers_env(folder, prefix)
    migrate_with_one_user(env, USERNAME, PASSWORD)
    simulator_args = "--ttft-ms 0 --tokens-per-second 4000"
    server = start(env, folder / "serve.log", "--workers", "2", "--simulator-args", simulator_args)
    try:
        pids = wait_ready(server)
        simulator = f"http://127.0.0.1:{env['LLM_SIMULATOR_PORT']}"
        yield Workers(server, folder / "db.sqlite3", simulator, pids)
    finally:
        stop(server.process)
        forget_keys(REDIS_URL, prefix)


async def start_design(workers: Workers, client: httpx.AsyncClient, text: str) -> tuple[int, int]:
    """Submit a design with the simulator slowed down; (its id, the pid of the worker
    running it)."""
    workers.set_simulator(SLOW)
    design_id = await submit(client, text)

    def runner() -> int | None:
        status, owner = workers.design(design_id)
        return instance_pid(owner) if status == "running" and owner else None

    pid = await eventually(runner, DESIGN_LIMIT_S, what="the design runs", interval=0.05)
    assert pid in workers.pids.values(), (pid, workers.pids)
    return design_id, pid


async def finish(workers: Workers, design_id: int) -> None:
    """Let the design end quickly, so the next test starts from idle workers."""
    workers.set_simulator(FAST)
    await eventually(
        lambda: workers.design(design_id)[0] in {"succeeded", "failed"},
        DESIGN_LIMIT_S,
        what=f"design {design_id} ends",
        interval=0.1,
    )


# == one port, two processes ====================================================================
@needs_redis
def test_two_workers_answer_on_one_port_with_one_simulator(workers: Workers):
    seen: dict[str, int] = {}
    for _ in range(ATTEMPTS):
        body = health(workers.server)
        assert body["status"] == "healthy"
        instance = body["cluster"]["instance"]
        seen[instance] = seen.get(instance, 0) + 1
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen  # both workers answered on the one port
    assert {instance_pid(instance) for instance in seen} == set(workers.pids.values())
    assert len(simulators(workers.server.process.pid)) == 1  # one shared by both workers
    assert body["cluster"]["mode"] == "cluster"
    view = health(workers.server, "cluster")["cluster_view"]
    assert set(view["instances"]) == set(seen)


@needs_redis
async def test_a_design_started_on_one_worker_is_watched_live_on_the_other(workers: Workers):
    async with httpx.AsyncClient(base_url=workers.server.base, timeout=30) as client:
        await log_in(client, USERNAME, PASSWORD)
        design_id, runner = await start_design(workers, client, "A shop watched from afar")
        cookies = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    try:
        socket, watcher = await socket_on_other_worker(workers, design_id, cookies, runner)
        kinds: list[str] = []
        async with socket:
            while "tokens" not in kinds:  # live tokens, not only the snapshot
                event = json.loads(await asyncio.wait_for(socket.recv(), DESIGN_LIMIT_S))
                kinds.append(event["kind"])
        assert watcher != runner
        assert kinds[0] == "snapshot", kinds
    finally:
        await finish(workers, design_id)


async def socket_on_other_worker(
    workers: Workers, design_id: int, cookies: str, runner: int
) -> tuple[ClientConnection, int]:
    """The design's WebSocket, opened again until a worker other than `runner` holds it."""
    url = f"ws://{HOST}:{workers.server.port}/ws/designs/{design_id}/"
    for _ in range(ATTEMPTS):
        socket = await connect(
            url, origin=workers.server.base, additional_headers={"Cookie": cookies}
        )
        holder = serving_pid(workers, socket.local_address[1])
        if holder is not None and holder != runner:
            return socket, holder
        await socket.close()
    pytest.fail(f"no WebSocket reached a worker other than {runner} in {ATTEMPTS} tries")


@needs_redis
async def test_capacity_held_in_one_worker_is_seen_by_the_other(workers: Workers):
    async with httpx.AsyncClient(base_url=workers.server.base, timeout=30) as client:
        await log_in(client, USERNAME, PASSWORD)
        design_id, runner = await start_design(workers, client, "A ledger with slow answers")
    try:

        def other_sees_the_lease() -> dict[str, Any] | None:
            body = health(workers.server, "cluster")
            if instance_pid(body["cluster"]["instance"]) == runner:
                return None  # answered by the worker that runs the design: ask again
            view = body["cluster_view"]
            held = sum(view["leases_held"].values())
            running = [
                sum(pool["in_use"] for pool in stats["pools"].values())
                for name, stats in view["instances"].items()
                if instance_pid(name) == runner
            ]
            return body if held >= 1 and running and running[0] >= 1 else None

        body = await eventually(
            lambda: asyncio.to_thread(other_sees_the_lease),
            DESIGN_LIMIT_S,
            what="another worker sees the running design's leases in the cluster",
            interval=0.1,
        )
        # The other worker holds none itself: what it sees is the runner's capacity in use.
        assert sum(pool["in_use"] for pool in body["pools"].values()) == 0
        assert len(body["cluster_view"]["instances"]) == 2
    finally:
        await finish(workers, design_id)


# == refused, failed, stopped ===================================================================
def test_the_default_is_one_worker_per_core_with_redis_and_one_without():
    assert worker_count(None, "redis://127.0.0.1:6379/0") == (os.process_cpu_count() or 1)
    assert worker_count(None, "") == 1
    assert worker_count(3, "redis://127.0.0.1:6379/0") == 3
    with pytest.raises(CommandError, match=r"^--workers must be between 1 and 64, got 0$"):
        worker_count(0, "redis://127.0.0.1:6379/0")


def test_more_than_one_worker_without_redis_is_refused(tmp_path):
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}", REDIS_URL="")
    done = manage(env, "serve", "--workers", "2", "--port", str(free_port()), check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"CommandError: {NO_REDIS.format(count=2)}"
    assert done.stdout == ""  # nothing started: no port, no demo account, no simulator


@needs_redis
def test_sigterm_stops_every_worker_cleanly(tmp_path):
    prefix = run_prefix("test-workers")
    server = start(
        workers_env(tmp_path, prefix), tmp_path / "serve.log", "--migrate", "--workers", "2"
    )
    try:
        pids = wait_ready(server)
        (simulator,) = simulators(server.process.pid)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.tail()
        output = server.log.read_text()
        for number, pid in pids.items():
            assert not psutil.pid_exists(pid)
            lines = [line for line in output.splitlines() if line.startswith(f"[worker {number}] ")]
            # Each line a worker logs says which worker wrote it, in the configured format.
            assert any(
                re.search(r"^\[worker \d\] \d{4}-\d\d-\d\d .* INFO pools: ", line) for line in lines
            )
            assert any("🛑 LLM connection pools closed" in line for line in lines), output
        eventually_sync(lambda: not psutil.pid_exists(simulator), 20, what="the simulator stops")
    finally:
        stop(server.process)
        forget_keys(REDIS_URL, prefix)


@needs_redis
def test_a_worker_that_dies_at_start_fails_serve_and_stops_the_rest(tmp_path):
    prefix = run_prefix("test-workers")
    server = start(
        workers_env(tmp_path, prefix), tmp_path / "serve.log", "--migrate", "--workers", "2"
    )
    try:
        started = eventually_sync(
            lambda: len(worker_processes(server.process.pid)) == 2,
            START_LIMIT_S,
            what="both workers start",
            interval=0.01,
        )
        assert started
        children = psutil.Process(server.process.pid).children()  # workers and simulator
        first = worker_processes(server.process.pid)[1]
        os.kill(first, signal.SIGKILL)  # long before its imports and warm-up are done
        assert server.process.wait(timeout=60) == 1
        output = server.log.read_text()
        assert output.splitlines()[-1] == (
            f"CommandError: worker 1 (pid {first}) was killed by SIGKILL before it was ready "
            "(its output above says why); the other workers were stopped"
        ), output
        assert "workers ready" not in output
        assert len(children) == 3
        for child in children:  # the other worker and the simulator went with it
            assert not child.is_running()
    finally:
        stop(server.process)
        forget_keys(REDIS_URL, prefix)


@needs_redis
def test_a_killed_serve_takes_its_workers_with_it(tmp_path):
    """SIGKILL of the parent (no forwarding possible) ends its workers too, as one process
    would end: none is left holding the port or draining unsupervised."""
    prefix = run_prefix("test-workers")
    env = workers_env(tmp_path, prefix)
    server = start(env, tmp_path / "serve.log", "--migrate", "--workers", "2", "--no-simulator")
    try:
        workers = [psutil.Process(pid) for pid in wait_ready(server).values()]
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        psutil.wait_procs(workers, timeout=20)
        assert not any(worker.is_running() for worker in workers)
        assert port_is_free(server.port)
    finally:
        stop(server.process)
        forget_keys(REDIS_URL, prefix)


def port_is_free(port: int) -> bool:
    """Whether a plain socket can bind the port (no listener of any worker left on it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True
