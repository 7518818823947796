"""The world a load test runs in: a throwaway database with its users, the offline simulator
and `manage.py serve` as child processes on loopback, with production settings.

With `--workers N` the server is `serve --workers N`: a parent and N worker processes on one
port, coordinating through the Redis at REDIS_URL under a key prefix of this run's own
(deleted afterwards); the readings then cover every process of the server.

The login storm builds its world from the same parts (`server_env`, `run_manage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from carlos.loadtest.options import (
    REQUEST_LOG_PER_DESIGN,
    ROLLING_ENV_DEFAULTS,
    SETUP_TIMEOUT_S,
    SIMULATOR_READY_TIMEOUT_S,
    USERNAME_PREFIX,
    LoadTestError,
    LoadTestOptions,
    loopback_host,
)
from carlos.processes import (
    ChildFailed,
    Children,
    free_port,
    manage_py,
    run_manage,
    tail,
    wait_healthy,
)
from carlos.startup import PLAIN_HTTP_LOOPBACK_ENV

_SIMULATOR_URL = re.compile(r"listening on (https?://\S+/v1)")
_WORKERS_READY = re.compile(r"✅ \d+ workers ready on \S+ \(pids ([\d, ]+)\)")
WORKERS_READY_TIMEOUT_S = 90.0


def server_env(host: str, database: Path) -> dict[str, str]:
    """The environment of a measuring run's children: production settings on plain HTTP over
    loopback, this run's database, no upstream, no shared Redis.

    Variables are set explicitly (empty when unused) so a developer's `.env` can never point
    the run at a real endpoint or a shared Redis: `.env` does not override the environment.
    """
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "carlos.settings",
        "DATABASE_URL": f"sqlite:///{database}",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": loopback_host(host),
        **PLAIN_HTTP_LOOPBACK_ENV,
        "AZURE_OPENAI_ENDPOINT": "",
        "LLM_BASE_URL": "",
        "REDIS_URL": "",
        "POOL_SNAPSHOT_INTERVAL": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("LLM_SIMULATOR_URL", None)
    return env


def child_env(options: LoadTestOptions, database: Path) -> dict[str, str]:
    """`server_env`, with a per-user limit (10 an hour by default) that never refuses the
    virtual users; for a rolling restart, a quick sweep and drain unless the environment
    sets them."""
    per_user = math.ceil(options.designs / options.user_count)
    env = {**server_env(options.host, database), "DESIGNS_PER_HOUR": str(per_user + 10)}
    if options.workers > 1:  # validated: REDIS_URL is set
        env["REDIS_URL"] = os.environ["REDIS_URL"]
        env["REDIS_PREFIX"] = f"carlos-loadtest-{secrets.token_hex(4)}"
    if options.rolling_restart:
        for name, value in ROLLING_ENV_DEFAULTS.items():
            env.setdefault(name, value)
    return env


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_since(path: Path, offset: int) -> str:
    """What a child wrote to its log after `offset` (a size from `log_size`)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


# The users share one password hash (and salt): hashing it once instead of once per user
# keeps the setup of 200 throwaway accounts at one PBKDF2 instead of two hundred.
_SETUP_CODE = """
import os
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
User = get_user_model()
encoded = make_password(os.environ["LOADTEST_PASSWORD"])
prefix = os.environ["LOADTEST_PREFIX"]
User.objects.bulk_create(
    User(username=f"{prefix}{i:04d}", password=encoded)
    for i in range(int(os.environ["LOADTEST_USERS"]))
)
"""


# --- the world ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One `manage.py serve` child; a restart replaces it with another on the same port."""

    label: str  # "" for the only server, or "A", "B"
    host: str
    port: int
    process: asyncio.subprocess.Process
    log: Path  # every start of this server appends to it
    pid_file: Path  # the current processes' pids, for the probe to follow across restarts
    workers: tuple[int, ...] = ()  # the pids of its workers, with `--workers` above 1

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pids(self) -> tuple[int, ...]:
        """Every process of the server: the one started, and its workers if it has any."""
        return (self.process.pid, *self.workers)


async def start_server(
    label: str,
    host: str,
    port: int,
    env: dict[str, str],
    tmp: Path,
    children: Children,
    workers: int = 1,
) -> Server:
    """`manage.py serve --workers <workers>` on `port`, returned once its `/health` answers
    200 (and, with several workers, once the parent has said that every one is ready)."""
    suffix = f"-{label}" if label else ""
    log, pid_file = tmp / f"serve{suffix}.log", tmp / f"serve{suffix}.pid"
    offset = log_size(log)
    command = ["serve", "--host", host, "--port", str(port), "--no-simulator"]
    with log.open("ab") as out:
        process = await children.start(
            f"server {label}".strip(),
            manage_py(*command, "--workers", str(workers)),
            env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    write_pids(pid_file, (process.pid,))
    await wait_healthy(f"http://{host}:{port}", process, log)
    worker_pids = await workers_ready(process, log, offset) if workers > 1 else ()
    if worker_pids:
        write_pids(pid_file, (process.pid, *worker_pids))
    return Server(label, host, port, process, log, pid_file, worker_pids)


def write_pids(pid_file: Path, pids: tuple[int, ...]) -> None:
    """The server's pids for the probe, written whole, then renamed: it never reads half."""
    pid_file.with_suffix(".tmp").write_text(" ".join(map(str, pids)))
    pid_file.with_suffix(".tmp").replace(pid_file)


async def workers_ready(
    process: asyncio.subprocess.Process, log: Path, offset: int
) -> tuple[int, ...]:
    """The workers' pids, once `serve --workers` says every one is ready (its log after
    `offset`), or ChildFailed with its log when it exits or never says so."""
    deadline = asyncio.get_running_loop().time() + WORKERS_READY_TIMEOUT_S
    while asyncio.get_running_loop().time() < deadline:
        if (found := _WORKERS_READY.search(log_since(log, offset))) is not None:
            return tuple(int(pid) for pid in found[1].split(", "))
        if process.returncode is not None:
            break
        await asyncio.sleep(0.2)
    raise ChildFailed(f"the server's workers were not all ready:\n{tail(log)}")


async def forget_redis_keys(env: dict[str, str]) -> None:
    """Delete the run's keys (REDIS_PREFIX, its own) from the Redis its workers shared."""
    if not env.get("REDIS_URL"):
        return
    import redis.asyncio as redis

    client = redis.Redis.from_url(env["REDIS_URL"])
    try:
        keys = [key async for key in client.scan_iter(f"{env['REDIS_PREFIX']}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@dataclass
class World:
    """The running servers and simulator of one load test."""

    servers: list[Server]  # an entry is replaced when its server restarts
    simulator_url: str  # scheme://host:port, without /v1
    simulator: asyncio.subprocess.Process
    env: dict[str, str]  # the servers' environment
    password: str
    tmp: Path
    draining: set[str] = field(default_factory=set)  # labels of the servers stopping now

    @property
    def base_url(self) -> str:
        return self.servers[0].base_url

    @property
    def pids(self) -> tuple[int, ...]:
        """Every server process (each server's workers included)."""
        return tuple(pid for server in self.servers for pid in server.pids)

    def answered_while_draining(self, response: httpx.Response) -> bool:
        """Whether the server that gave this answer was draining (a restart under way)."""
        port = response.request.url.port
        return any(s.port == port and s.label in self.draining for s in self.servers)


async def start_world(options: LoadTestOptions, tmp: Path, children: Children) -> World:
    """Database and users, simulator, servers; returns once each `/health` answers 200."""
    env = child_env(options, tmp / "db.sqlite3")
    password = secrets.token_urlsafe(16)
    setup_env = {
        **env,
        "LOADTEST_PASSWORD": password,
        "LOADTEST_PREFIX": USERNAME_PREFIX,
        "LOADTEST_USERS": str(options.user_count),
    }
    setup = asyncio.create_task(
        run_manage(["shell", "-c", _SETUP_CODE], setup_env, SETUP_TIMEOUT_S)
    )
    try:
        simulator, simulator_url = await start_simulator(options, env, tmp, children)
        await setup
    finally:
        if not setup.done():
            setup.cancel()
            with contextlib.suppress(BaseException):
                await setup

    host = loopback_host(options.host)
    server_env = {**env, "LLM_SIMULATOR_URL": f"{simulator_url}/v1"}
    # Side by side (each start is seconds of imports and warm-up); every one is awaited
    # before a failure is raised, so none is left starting.
    ports: list[int] = []
    while len(ports) < len(options.server_labels):
        if (port := free_port(host)) not in ports:
            ports.append(port)
    started = await asyncio.gather(
        *(
            start_server(label, host, port, server_env, tmp, children, options.workers)
            for label, port in zip(options.server_labels, ports, strict=True)
        ),
        return_exceptions=True,
    )
    servers = []
    for result in started:
        if isinstance(result, BaseException):
            raise result
        servers.append(result)
    return World(servers, simulator_url, simulator, server_env, password, tmp)


async def start_simulator(
    options: LoadTestOptions, env: dict[str, str], tmp: Path, children: Children
) -> tuple[asyncio.subprocess.Process, str]:
    rates = options.rates
    # A rolling restart is judged on which agent calls were made twice: keep them all.
    request_log = options.designs * REQUEST_LOG_PER_DESIGN if options.rolling_restart else 0
    args = manage_py(
        "llm_simulator",
        "--host",
        loopback_host(options.host),
        "--port",
        "0",
        "--ttft-ms",
        f"{options.ttft_ms:g}",
        "--tokens-per-second",
        f"{options.tokens_per_second:g}",
        "--error-rate",
        f"{rates['error_rate']:.6f}",
        "--reset-rate",
        f"{rates['reset_rate']:.6f}",
        "--stall-rate",
        f"{rates['stall_rate']:.6f}",
        "--stall-seconds",
        f"{options.stall_seconds:g}",
        "--seed",
        str(options.seed),
        "--responder",
        "agents.simulated.carlos_responder",
        # Idle connections stay open on the simulator's side, so every close is the server's
        # own doing and the two connection counts must agree at the end.
        "--keepalive-timeout",
        "0",
        "--request-log",
        str(request_log),
    )
    log_path = tmp / "simulator.log"
    with log_path.open("wb") as log:
        process = await children.start(
            "simulator", args, env, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    if options.simulator_nice:
        # Before it starts any thread: each thread takes its creator's nice level.
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, process.pid, options.simulator_nice)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), SIMULATOR_READY_TIMEOUT_S)
    except TimeoutError:
        line = b""
    match = _SIMULATOR_URL.search(line.decode(errors="replace"))
    if match is None:
        raise LoadTestError(
            f"the simulator did not start (it said {line.decode(errors='replace').strip()!r}):"
            f"\n{tail(log_path)}"
        )
    return process, match[1].removesuffix("/v1")
