"""The world a load test runs in: a throwaway database with its users, the offline simulator
and `manage.py serve` as child processes on loopback, with production settings.

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
from carlos.processes import Children, free_port, manage_py, run_manage, tail, wait_healthy
from carlos.startup import PLAIN_HTTP_LOOPBACK_ENV

_SIMULATOR_URL = re.compile(r"listening on (https?://\S+/v1)")


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
    pid_file: Path  # the current process's pid, for the probe to follow it across restarts

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


async def start_server(
    label: str, host: str, port: int, env: dict[str, str], tmp: Path, children: Children
) -> Server:
    """`manage.py serve` on `port`, returned once its `/health` answers 200."""
    suffix = f"-{label}" if label else ""
    log, pid_file = tmp / f"serve{suffix}.log", tmp / f"serve{suffix}.pid"
    with log.open("ab") as out:
        process = await children.start(
            f"server {label}".strip(),
            manage_py("serve", "--host", host, "--port", str(port), "--no-simulator"),
            env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    # Written whole, then renamed: the probe never reads half a pid.
    pid_file.with_suffix(".tmp").write_text(str(process.pid))
    pid_file.with_suffix(".tmp").replace(pid_file)
    server = Server(label, host, port, process, log, pid_file)
    await wait_healthy(server.base_url, process, log)
    return server


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
        return tuple(server.process.pid for server in self.servers)

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
            start_server(label, host, port, server_env, tmp, children)
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
