"""The load test behind `manage.py loadtest`: many users designing at once against faults.

Why a separate world: the figures must describe the product as it is deployed (Daphne
through `manage.py serve`, the real pools, the pipeline, the channel layer, SQLite), not a
test harness. So the run starts its own server and offline simulator as child processes on
loopback, with a throwaway database, and drives them only from outside: HTTP pages with
CSRF and session cookies, the design WebSocket with the right Origin, `/health`, and the
simulator's control endpoints. A separate probe process times `/health` so the load
generator's own CPU does not flatter or spoil that figure.

The run has phases, reported separately: setup; logins (a few users at a time: each login
is a PBKDF2 hash, about a second of the server's CPU); designs (every user submits at once,
then watches on the socket until a terminal status); checks (pools idle, connections closed,
no design left unfinished). It is bounded by `--timeout`: what has not finished by then is
reported as "not terminal".

With `--rolling-restart` the run is a deploy under load: two servers share the database and
the simulator (users alternate between them), and once the designs are under way each is
stopped with SIGTERM, waited for (it drains: no new design, running agents get up to
DRAIN_SECONDS, the rest are handed back to resume elsewhere) and started again on its port,
one after the other. The users ride it out as the page does (a refused connection goes to
the other server, a closed socket reconnects there and asks for snapshots, since without
Redis events do not cross processes), and the simulator's request log shows which agent
calls were made twice.

Nothing here imports Django at module level, so `python -m agents.loadtest probe ...` (the
probe process) starts fast and stays independent of the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import json
import math
import os
import re
import resource
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from carlos.startup import PLAIN_HTTP_LOOPBACK_ENV

BASE_DIR = Path(__file__).resolve().parent.parent
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "interrupted", "cancelled"})
UNFINISHED_STATUSES = ("queued", "running", "awaiting_answers")
MAX_DESIGNS = 2000
MAX_TIMEOUT_S = 3600.0
MAX_NICE = 19
MAX_RESUBMITS = 3  # a user refused with 503 sends the form again this many times at most
DEFAULT_RETRY_AFTER_S = 5.0
MAX_RETRY_AFTER_S = 60.0
HEALTH_P99_TARGET_MS = 100.0
PAGES = ("login_page", "login", "form", "submit", "design_page", "socket_snapshot")
USERNAME_PREFIX = "loadtest-"
SERVER_READY_TIMEOUT_S = 90.0
SIMULATOR_READY_TIMEOUT_S = 30.0
SETUP_TIMEOUT_S = 180.0
CHILD_STOP_GRACE_S = 20.0
# After the last design, how long the pools and connections may take to come to rest.
SETTLE_TIMEOUT_S = 15.0
# The page script's reconnection schedule (static/carlos/carlos.js).
SOCKET_RETRY_FIRST_S = 0.5
SOCKET_RETRY_MAX_S = 10.0
PROGRESS_EVERY_S = 10.0
# --rolling-restart: the servers' durability settings, unless the environment sets them. A
# short sweep, so a drained server's designs resume at once on the other one.
ROLLING_ENV_DEFAULTS = {"DESIGN_SWEEP_SECONDS": "1", "DRAIN_SECONDS": "10"}
ROLLING_LABELS = ("A", "B")
# Without Redis, events reach only the sockets of the process running the design: a socket
# on the other server learns of progress by asking for a snapshot when it has been quiet
# this long (a socket on the running server hears every token and never asks).
SNAPSHOT_POLL_S = 2.0
REQUEST_LOG_PER_DESIGN = 30  # the simulator's request log keeps this many calls per design
REQUESTS = (
    "An online bookshop for 50,000 daily users in Europe with payments and search",
    "Ingest telemetry from 5,000 IoT devices and build operations dashboards",
    "Order processing microservices with payments, inventory and notifications",
    "A patient portal for a clinic network with appointment booking",
    "A multiplayer game backend with leaderboards and matchmaking",
    "A data warehouse for retail sales with nightly reporting and forecasts",
)
_CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
_DESIGN_URL = re.compile(r"/designs/(\d+)/$")
# In each design's request text, hence in every prompt of its agents.
_MARKER = re.compile(r"\(load test #(\d+)\)")
# What `manage.py serve` prints when its drain handed designs on.
_DRAINED = re.compile(r"Drained in [\d.]+s: (\d+) design\(s\) handed on .*?, (\d+) stopped")
_SIMULATOR_URL = re.compile(r"listening on (https?://\S+/v1)")

# Cause of a failed design, from its error text (agents.pipeline.describe_error), first match.
CAUSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("circuit open", re.compile(r"CircuitOpen")),
    ("pool refused", re.compile(r"PoolTimeout|PoolExhausted|PoolClosed")),
    ("deadline", re.compile(r"DeadlineExceeded|APITimeoutError|timed out", re.IGNORECASE)),
    ("upstream 5xx after retries", re.compile(r"\(HTTP 5\d\d\)|InternalServerError")),
    ("rate limited", re.compile(r"\(HTTP 429\)|RateLimitError|RateBudgetExceeded")),
    (
        "connection reset",
        re.compile(
            r"APIConnectionError|RemoteProtocolError|ReadError|Connection reset|"
            r"peer closed|incomplete chunked",
            re.IGNORECASE,
        ),
    ),
    ("bad model output", re.compile(r"OutputFormatError|ValidationError|JSON")),
    ("interrupted", re.compile(r"^interrupted", re.IGNORECASE)),
)


class LoadTestError(Exception):
    """The run could not be set up or went wrong outside the server; the text says what."""


# --- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTestOptions:
    """What to run; `validated()` turns the command-line values into a consistent set."""

    designs: int = 200
    users: int | None = None  # None: one user per design
    timeout: float = 600.0
    host: str = "127.0.0.1"
    fault_rate: float | None = None  # None: 0.05, or the sum of the explicit rates
    error_rate: float | None = None
    reset_rate: float | None = None
    stall_rate: float | None = None
    stall_seconds: float = 35.0  # past the pools' 30 s idle deadline: a stall becomes one
    ttft_ms: float = 300.0
    tokens_per_second: float = 150.0
    seed: int = 0
    probe_interval: float = 0.1
    # Users logging in at the same moment; 0 = all at once. Each login costs the server a
    # PBKDF2 hash (~1 s of CPU), so an unbounded storm measures the hasher, not the designs.
    login_concurrency: int = 10
    keep: bool = False  # keep the run's folder (database, server and simulator logs)
    # The simulator stands in for a remote LLM endpoint: at a nice level above 0 its CPU
    # does not preempt the server being measured on one machine (0: same priority).
    simulator_nice: int = 0
    # Two servers, each restarted with SIGTERM while the designs run; no injected faults
    # unless asked for, so that every failure is the restarts' doing.
    rolling_restart: bool = False

    @property
    def user_count(self) -> int:
        return self.users if self.users is not None else self.designs

    @property
    def server_labels(self) -> tuple[str, ...]:
        """The servers' names in the report: one unnamed server, or A and B."""
        return ROLLING_LABELS if self.rolling_restart else ("",)

    @property
    def rates(self) -> dict[str, float]:
        """Error, reset and stall rates; they add up to the fault rate."""
        explicit = {
            "error_rate": self.error_rate,
            "reset_rate": self.reset_rate,
            "stall_rate": self.stall_rate,
        }
        if all(value is None for value in explicit.values()):
            default = 0.0 if self.rolling_restart else 0.05
            total = default if self.fault_rate is None else self.fault_rate
            return dict.fromkeys(explicit, total / 3)
        return {key: value or 0.0 for key, value in explicit.items()}

    def validated(self) -> LoadTestOptions:
        """Self, if every value makes sense; LoadTestError naming each one that does not."""
        problems = []
        if not 1 <= self.designs <= MAX_DESIGNS:
            problems.append(f"--designs must be between 1 and {MAX_DESIGNS}, got {self.designs}")
        if self.users is not None and not 1 <= self.users <= max(1, self.designs):
            problems.append(
                f"--users must be between 1 and --designs ({self.designs}), got {self.users}"
            )
        if not (math.isfinite(self.timeout) and 1 <= self.timeout <= MAX_TIMEOUT_S):
            problems.append(
                f"--timeout must be between 1 and {MAX_TIMEOUT_S:g} seconds, got {self.timeout}"
            )
        try:
            loopback_host(self.host)
        except LoadTestError as exc:
            problems.append(str(exc))
        for name in ("fault_rate", "error_rate", "reset_rate", "stall_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                flag = "--" + name.replace("_", "-")
                problems.append(f"{flag} is a fraction between 0 and 1, got {value}")
        if not problems and self.fault_rate is not None:
            total = sum(self.rates.values())
            if not math.isclose(total, self.fault_rate, abs_tol=1e-9):
                problems.append(
                    f"--fault-rate {self.fault_rate:g} differs from --error-rate + "
                    f"--reset-rate + --stall-rate = {total:g}; give one or the other"
                )
        for name in ("stall_seconds", "ttft_ms", "tokens_per_second"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                flag = "--" + name.replace("_", "-")
                problems.append(f"{flag} must be a number >= 0, got {value}")
        if self.login_concurrency < 0:
            problems.append(
                f"--login-concurrency must be 0 (all at once) or more, got {self.login_concurrency}"
            )
        if not (math.isfinite(self.probe_interval) and 0.01 <= self.probe_interval <= 10):
            problems.append(
                f"--probe-interval must be between 0.01 and 10 seconds, got {self.probe_interval}"
            )
        if not 0 <= self.simulator_nice <= MAX_NICE:
            problems.append(
                f"--simulator-nice must be between 0 and {MAX_NICE}, got {self.simulator_nice}"
            )
        if problems:
            raise LoadTestError("; ".join(problems))
        return self


def loopback_host(host: str) -> str:
    """The IPv4 loopback address to use for `host`; LoadTestError for anything else.

    The load test opens hundreds of connections and injects faults: aimed anywhere but this
    machine it would be an attack, so only 127.0.0.0/8 and localhost are accepted. (IPv6
    ::1 is loopback too, but `manage.py serve` cannot bind it: its Twisted endpoint string
    would need the colons escaped.)
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise LoadTestError(
            f"--host must be a loopback address (127.0.0.1 or localhost), got {host!r}"
        ) from None
    if not address.is_loopback:
        raise LoadTestError(
            f"--host {host} is not a loopback address: the load test only runs on this "
            "machine (127.0.0.0/8 or localhost)"
        )
    if address.version != 4:
        raise LoadTestError(f"--host {host}: use an IPv4 loopback address such as 127.0.0.1")
    return str(address)


# --- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], share: float) -> float | None:
    """Nearest-rank percentile (p99 of 200 samples is the 198th), None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99 and max of latencies in milliseconds, rounded for reading."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "count": len(values),
        "p50_ms": rounded(percentile(values, 0.50)),
        "p99_ms": rounded(percentile(values, 0.99)),
        "max_ms": rounded(max(values) if values else None),
    }


def failure_cause(error: str) -> str:
    """A design's error text grouped into one of a few causes an operator can act on."""
    for cause, pattern in CAUSES:
        if pattern.search(error):
            return cause
    first_line = error.strip().splitlines()[0] if error.strip() else "no error text"
    return f"other: {first_line[:60]}"


# --- child processes ------------------------------------------------------------------------


class Children:
    """Every child process of a run, stopped in reverse start order whatever happens.

    Each child gets its own session, so a Ctrl-C in the terminal reaches only the load test,
    which then stops the server before the simulator it depends on.
    """

    def __init__(self) -> None:
        self.started: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(
        self, name: str, args: Sequence[str], env: dict[str, str], **kw: Any
    ) -> asyncio.subprocess.Process:
        """Start a child; one named as an earlier one (a restart) takes its place in the
        stopping order."""
        process = await asyncio.create_subprocess_exec(
            *args, cwd=BASE_DIR, env=env, start_new_session=True, **kw
        )
        names = [known for known, _ in self.started]
        if name in names:
            self.started[names.index(name)] = (name, process)
        else:
            self.started.append((name, process))
        return process

    async def stop_all(self) -> dict[str, int | None]:
        """SIGTERM, then SIGKILL after a grace period; returns each child's exit status."""
        codes: dict[str, int | None] = {}
        for name, process in reversed(self.started):
            codes[name] = await stop_process(process)
        return codes


async def stop_process(
    process: asyncio.subprocess.Process, grace: float = CHILD_STOP_GRACE_S
) -> int | None:
    """SIGTERM (the server then closes its pools cleanly), SIGKILL if it does not exit
    within `grace` seconds."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
    return process.returncode


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


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def manage_py(*args: str) -> list[str]:
    return [sys.executable, str(BASE_DIR / "manage.py"), *args]


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


async def run_manage(args: Sequence[str], env: dict[str, str], timeout: float) -> str:
    """A short `manage.py` child to completion; its stdout, or LoadTestError with its output."""
    process = await asyncio.create_subprocess_exec(
        *manage_py(*args),
        cwd=BASE_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        await stop_process(process)
        raise
    if process.returncode != 0:
        raise LoadTestError(
            f"manage.py {args[0]} failed (exit {process.returncode}):\n"
            + (err or out).decode(errors="replace")[-3000:]
        )
    return out.decode(errors="replace")


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


async def wait_healthy(base_url: str, server: asyncio.subprocess.Process, log: Path) -> None:
    """Readiness: `/health` 200 after the pools are warm, or the server's log on failure."""
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if server.returncode is not None:
                raise LoadTestError(
                    f"manage.py serve exited with {server.returncode}:\n{tail(log)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{base_url}/health")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise LoadTestError(
        f"/health never answered 200 within {SERVER_READY_TIMEOUT_S:g} s:\n{tail(log)}"
    )


# --- /proc readings -------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def open_sockets(pid: int) -> int | None:
    """Sockets among the process's file descriptors (TCP, Unix, listening), None if gone."""
    count = 0
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(entry.path).startswith("socket:"):
                    count += 1
    except OSError:
        return None
    return count


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) from /proc/<pid>/status, in kB."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU time so far of a process, or of one of its threads."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    try:
        with open(path) as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine: other users' load shows up here."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return float(sum(values) - idle), float(sum(values))


def total[N: (int, float)](values: Iterable[N | None]) -> N | None:
    """The sum of readings taken per server; None if one is missing."""
    known = list(values)
    if not known or any(value is None for value in known):
        return None
    return sum(value for value in known if value is not None)


@dataclass
class Mark:
    """Clock and CPU readings at a phase boundary."""

    at: float
    server_cpu: float | None  # all the servers together
    loop_cpu: float | None  # the servers' main threads, which run their event loops
    simulator_cpu: float | None
    own_cpu: float
    machine: tuple[float, float] | None
    server_pids: tuple[int, ...] = ()


def mark(world: World | None) -> Mark:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pids = world.pids if world else ()
    return Mark(
        at=time.monotonic(),
        server_cpu=total(cpu_seconds(pid) for pid in pids),
        loop_cpu=total(cpu_seconds(pid, pid) for pid in pids),
        simulator_cpu=cpu_seconds(world.simulator.pid) if world else None,
        own_cpu=usage.ru_utime + usage.ru_stime,
        machine=machine_cpu(),
        server_pids=pids,
    )


def cpu_between(start: Mark, end: Mark) -> dict[str, float | None]:
    """Average cores used in a phase by the servers, the simulator, this process, the machine.

    None for the servers across a restart: a new process's CPU time starts from zero.
    """
    span = max(end.at - start.at, 1e-9)
    same_servers = start.server_pids == end.server_pids

    def per_second(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) / span, 2)

    machine = None
    if start.machine and end.machine and end.machine[1] > start.machine[1]:
        busy = (end.machine[0] - start.machine[0]) / (end.machine[1] - start.machine[1])
        machine = round(busy * (os.cpu_count() or 1), 2)
    return {
        "server": per_second(start.server_cpu, end.server_cpu) if same_servers else None,
        "server_event_loop": per_second(start.loop_cpu, end.loop_cpu) if same_servers else None,
        "simulator": per_second(start.simulator_cpu, end.simulator_cpu),
        "load_generator": per_second(start.own_cpu, end.own_cpu),
        "machine": machine,
    }


# --- the probe process ----------------------------------------------------------------------


PROBE_TIMEOUT_S = 30.0


def probe_main(argv: Sequence[str]) -> None:
    """`python -m agents.loadtest probe`: time /health and sample the server's sockets and RSS.

    A process of its own, so its latencies are the server's, not the load generator's
    event loop's. Probes leave on a fixed schedule whether or not the previous one has
    answered (a slow server must not get fewer samples: no coordinated omission); one that
    times out counts as PROBE_TIMEOUT_S with status 0. One line per reading goes to --out
    (`H <sent> <ms> <status>`, `S <at> <sockets> <rss kB> <probes in flight>`) until SIGTERM.
    The server's pid is read from --pid-file at each sample, so a restarted server is
    followed.
    """
    parser = argparse.ArgumentParser(prog="python -m agents.loadtest probe")
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args(argv)
    asyncio.run(_probe(args.url, Path(args.pid_file), Path(args.out), args.interval))


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


async def _probe(url: str, pid_file: Path, out_path: Path, interval: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Enough connections that every scheduled probe leaves even if each takes the timeout.
    most = math.ceil(PROBE_TIMEOUT_S / interval) + 1
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=1)
    outstanding: set[asyncio.Task[None]] = set()
    with out_path.open("w", buffering=1) as out:

        async def probe(client: httpx.AsyncClient) -> None:
            sent = time.monotonic()
            try:
                status = (await client.get(url)).status_code
            except httpx.HTTPError:
                status = 0
            out.write(f"H {sent:.6f} {(time.monotonic() - sent) * 1000:.3f} {status}\n")

        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, limits=limits) as client:
            next_probe = next_sample = time.monotonic()
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_probe:
                    task = asyncio.create_task(probe(client))
                    outstanding.add(task)
                    task.add_done_callback(outstanding.discard)
                    next_probe += interval
                if now >= next_sample:
                    pid = read_pid(pid_file)
                    sockets = None if pid is None else open_sockets(pid)
                    rss = None if pid is None else memory_kb(pid).get("VmRSS")
                    if sockets is not None and rss is not None:
                        # Our own probes in flight hold server sockets too: report them.
                        out.write(f"S {now:.6f} {sockets} {rss} {len(outstanding)}\n")
                    next_sample = now + max(interval, 0.2)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(next_probe, next_sample) - now)
            for task in list(outstanding):
                task.cancel()
            if outstanding:
                await asyncio.wait(outstanding)


@dataclass
class ProbeReadings:
    """What the probe wrote, read back after it stopped."""

    health: list[tuple[float, float, int]] = field(default_factory=list)  # start, ms, status
    # at, server sockets (less the probe's own in-flight connections), RSS in kB
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    # Probes sent while their server was restarting (draining, then down): what a deploy
    # costs a client that does not fail over, kept out of the figures the target is about.
    restarting: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, out_of_service: Sequence[tuple[float, float]] = ()) -> ProbeReadings:
        """One probe's file; `out_of_service`: its server's restarts (monotonic from, to)."""
        readings = cls()
        with contextlib.suppress(OSError), path.open() as lines:
            for line in lines:
                parts = line.split()
                with contextlib.suppress(ValueError, IndexError):
                    if parts[0] == "H":
                        probe = (float(parts[1]), float(parts[2]), int(parts[3]))
                        restarting = any(a <= probe[0] < b for a, b in out_of_service)
                        (readings.restarting if restarting else readings.health).append(probe)
                    elif parts[0] == "S":
                        own = int(parts[4]) if len(parts) > 4 else 0
                        readings.samples.append(
                            (float(parts[1]), int(parts[2]) - max(own - 1, 0), int(parts[3]))
                        )
        return readings

    @classmethod
    def combined(cls, parts: Iterable[ProbeReadings]) -> ProbeReadings:
        """Several servers' readings as one (a peak is then the peak of any one server)."""
        readings = cls()
        for part in parts:
            readings.health += part.health
            readings.samples += part.samples
            readings.restarting += part.restarting
        return readings

    def health_between(self, start: float, end: float) -> dict[str, Any]:
        return health_summary([(ms, status) for at, ms, status in self.health if start <= at < end])

    def during_restarts(self) -> dict[str, Any]:
        return health_summary([(ms, status) for _, ms, status in self.restarting])


def health_summary(probes: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """`summarize` of /health latencies (ms, status), with the answers other than 200."""
    return {
        **summarize([ms for ms, _ in probes]),
        "non_200": sum(1 for _, status in probes if status != 200),
    }


# --- virtual users --------------------------------------------------------------------------


@dataclass
class DesignRun:
    """One design as its user saw it: how far it got and how it ended."""

    number: int
    user: int
    stage: str = "waiting for login"
    design_id: int | None = None
    status: str | None = None
    error: str = ""
    client_failure: str | None = None  # what a browser user would have seen go wrong
    submitted_at: float | None = None
    finished_at: float | None = None
    events: int = 0
    reconnects: int = 0
    socket_error: str = ""  # the last failed handshake, if any
    refusals: int = 0  # submits answered 503 (busy), each sent again after Retry-After


@dataclass
class Recorder:
    """Everything the users measure, shared by all of them (one event loop, no locks)."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PAGES})
    designs: list[DesignRun] = field(default_factory=list)
    logins_ok: int = 0
    logins_failed: int = 0
    socket_events: int = 0
    failovers: int = 0  # requests sent to another server as the user's own refused them
    refused_while_draining: int = 0  # submits answered 503 by a server being restarted


class PageError(Exception):
    """A page answered something a browser user would see as an error."""


async def timed(
    recorder: Recorder, page: str, request: Callable[[], Awaitable[httpx.Response]]
) -> httpx.Response:
    started = time.perf_counter()
    response = await request()
    recorder.latencies[page].append((time.perf_counter() - started) * 1000)
    return response


def retry_after(answer: httpx.Response) -> float:
    """The seconds a 503 asks to wait (Retry-After), within sensible bounds."""
    try:
        seconds = float(answer.headers.get("retry-after", ""))
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER_S
    if not math.isfinite(seconds):
        seconds = DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 1.0), MAX_RETRY_AFTER_S)


def csrf_token(response: httpx.Response, page: str) -> str:
    match = _CSRF.search(response.text)
    if match is None:
        raise PageError(f"{page}: no CSRF token in the page (HTTP {response.status_code})")
    return match[1]


def form_fields() -> dict[str, str]:
    """The design form's option fields at their defaults, as the browser would post them."""
    from agents.options import DEFAULT_OPTIONS

    return dict(DEFAULT_OPTIONS)


class VirtualUsers:
    """N users: log in (a few at a time), then all submit at once and watch each design to
    its end, each with its own cookie jar and connections, as separate browsers would.

    With several servers, user i uses server i % n, and the next one while its own refuses
    connections (a restart): the servers share the database, so the session holds on both.
    """

    def __init__(
        self,
        world: World,
        options: LoadTestOptions,
        recorder: Recorder,
        on_logged_in: Callable[[], None],
    ) -> None:
        self.world = world
        self.options = options
        self.recorder = recorder
        self.on_logged_in = on_logged_in  # called once, when the last login has finished
        self.fields = form_fields()
        self.logged_in = asyncio.Event()
        self.pending_logins = options.user_count
        self.login_slots = asyncio.Semaphore(options.login_concurrency or options.user_count)
        for number in range(options.designs):
            recorder.designs.append(DesignRun(number=number, user=number % options.user_count))

    def designs_of(self, user: int) -> list[DesignRun]:
        return [run for run in self.recorder.designs if run.user == user]

    async def send(
        self, client: httpx.AsyncClient, user: int, page: str, method: str, path: str, **kw: Any
    ) -> httpx.Response:
        """`path` on the user's server, or on the next while that one is down. A GET is also
        sent again after a connection cut mid-request; a POST only after a refused
        connection, which cannot have reached the server (no design submitted twice)."""
        servers = self.world.servers
        order = [servers[(user + step) % len(servers)] for step in range(len(servers))]
        retry_on = httpx.TransportError if method == "GET" else httpx.ConnectError
        for server in order[:-1]:
            request = functools.partial(client.request, method, server.base_url + path, **kw)
            try:
                return await timed(self.recorder, page, request)
            except retry_on:
                self.recorder.failovers += 1
        request = functools.partial(client.request, method, order[-1].base_url + path, **kw)
        return await timed(self.recorder, page, request)

    async def user(self, index: int) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(self.options.timeout)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            try:
                async with self.login_slots:
                    await self.log_in(client, index)
                self.recorder.logins_ok += 1
            except (PageError, httpx.HTTPError) as exc:
                self.recorder.logins_failed += 1
                for run in self.designs_of(index):
                    run.client_failure = describe(exc)
                return
            finally:
                self.pending_logins -= 1
                if self.pending_logins == 0:
                    self.on_logged_in()
                    self.logged_in.set()
            await self.logged_in.wait()  # every user submits at the same moment
            await asyncio.gather(*(self.design(client, run) for run in self.designs_of(index)))

    async def log_in(self, client: httpx.AsyncClient, index: int) -> None:
        for run in self.designs_of(index):
            run.stage = "logging in"
        page = await self.send(client, index, "login_page", "GET", "/accounts/login/")
        if page.status_code != 200:
            raise PageError(f"login page answered HTTP {page.status_code}")
        data = {
            "csrfmiddlewaretoken": csrf_token(page, "login page"),
            "username": f"{USERNAME_PREFIX}{index:04d}",
            "password": self.world.password,
            "next": "/",
        }
        answer = await self.send(client, index, "login", "POST", "/accounts/login/", data=data)
        if answer.status_code != 302:
            raise PageError(f"login answered HTTP {answer.status_code}, not a redirect")

    async def design(self, client: httpx.AsyncClient, run: DesignRun) -> None:
        try:
            run.stage = "opening the form"
            form = await self.send(client, run.user, "form", "GET", "/")
            if form.status_code != 200:
                raise PageError(f"form page answered HTTP {form.status_code}")
            data = {
                "csrfmiddlewaretoken": csrf_token(form, "form page"),
                "request_text": f"{REQUESTS[run.number % len(REQUESTS)]} (load test #{run.number})",
                **self.fields,
            }
            run.stage = "submitting"
            run.submitted_at = time.monotonic()
            answer = await self.send(client, run.user, "submit", "POST", "/", data=data)
            # As a user told "busy, try again in N seconds" (an open circuit, full pools, a
            # server stopping): wait as told, then send the form again.
            while answer.status_code == 503 and run.refusals < MAX_RESUBMITS:
                run.refusals += 1
                if self.world.answered_while_draining(answer):
                    self.recorder.refused_while_draining += 1
                run.stage = "waiting to submit again"
                await asyncio.sleep(retry_after(answer))
                run.stage = "submitting"
                answer = await self.send(client, run.user, "submit", "POST", "/", data=data)
            match = _DESIGN_URL.search(answer.headers.get("location", ""))
            if answer.status_code != 302 or match is None:
                raise PageError(f"submit answered HTTP {answer.status_code}")
            run.design_id = int(match[1])
            run.stage = "loading the design page"
            page = await self.send(client, run.user, "design_page", "GET", match[0])
            if page.status_code != 200:
                raise PageError(f"design page answered HTTP {page.status_code}")
            run.stage = "watching"
            await self.watch(client, run)
        except (PageError, httpx.HTTPError, OSError) as exc:
            run.client_failure = describe(exc)
        except Exception as exc:  # a bug on our side must not pass for a stuck design
            run.client_failure = f"load generator error: {describe(exc)}"

    async def watch(self, client: httpx.AsyncClient, run: DesignRun) -> None:
        """Follow the socket to a terminal status, reconnecting as the page script does:
        forever, 0.5 s doubling to 10 s between tries, back to 0.5 s once a socket opens;
        only the run's deadline ends it (the design is then reported not terminal). With
        several servers each try goes to the next one (the last may be restarting), and the
        socket asks for snapshots (another server may be running the design)."""
        from websockets.exceptions import InvalidHandshake

        cookie = "; ".join(f"{c.name}={c.value}" for c in client.cookies.jar)
        servers = self.world.servers
        poll_every = SNAPSHOT_POLL_S if len(servers) > 1 else None
        target = run.user % len(servers)
        delay = SOCKET_RETRY_FIRST_S
        while True:
            server = servers[target]
            url = f"{server.base_url.replace('http', 'ws', 1)}/ws/designs/{run.design_id}/"
            try:
                code, opened = await watch_socket(
                    url, server.base_url, cookie, run, self.recorder, poll_every
                )
            except (InvalidHandshake, OSError) as exc:
                code, opened = None, False
                run.socket_error = describe(exc)
            if run.status in TERMINAL_STATUSES:
                run.finished_at = time.monotonic()
                return
            if code in (4403, 4404):
                raise PageError(f"the socket was refused with close code {code}")
            if opened:
                delay = SOCKET_RETRY_FIRST_S
            run.reconnects += 1
            target = (target + 1) % len(servers)
            await asyncio.sleep(delay)
            delay = min(delay * 2, SOCKET_RETRY_MAX_S)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def watch_socket(
    url: str,
    origin: str,
    cookie: str,
    run: DesignRun,
    recorder: Recorder,
    poll_every: float | None = None,
) -> tuple[int | None, bool]:
    """One socket connection: snapshot, then events until terminal.

    Returns the close code and whether the socket had opened.

    The handshake carries the session cookie and this site's Origin, as the page's does
    (the consumer sits behind AllowedHostsOriginValidator). Opening is bounded by the run's
    deadline, not by a timeout of its own: a slow handshake under load is a figure. With
    `poll_every`, the socket asks for a snapshot whenever it has heard nothing (nor asked)
    for that long.
    """
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed

    heard = time.monotonic()  # the last message; read by the poller

    async def ask_for_snapshots(socket: ClientConnection, every: float) -> None:
        asked = 0.0
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(max(0.0, max(heard, asked) + every - time.monotonic()))
                if time.monotonic() - max(heard, asked) >= every:
                    asked = time.monotonic()
                    await socket.send(json.dumps({"kind": "snapshot"}))

    started = time.perf_counter()
    opened = False
    snapshots = 0
    try:
        async with connect(
            url,
            origin=origin,
            additional_headers={"Cookie": cookie},
            open_timeout=None,
            ping_interval=None,  # browsers do not ping; Daphne pings them
        ) as socket:
            opened = True
            poller = None
            if poll_every is not None:
                poller = asyncio.create_task(ask_for_snapshots(socket, poll_every))
            try:
                async for message in socket:
                    heard = time.monotonic()
                    event = json.loads(message)
                    run.events += 1
                    recorder.socket_events += 1
                    if event.get("kind") == "snapshot":
                        if not snapshots:  # later ones: resyncs, and answers to our asking
                            recorder.latencies["socket_snapshot"].append(
                                (time.perf_counter() - started) * 1000
                            )
                        snapshots += 1
                        state = event.get("design") or {}
                        run.status, run.error = state.get("status"), state.get("error") or ""
                    elif event.get("kind") == "design_status":
                        run.status, run.error = event.get("status"), event.get("error") or ""
                    if run.status in TERMINAL_STATUSES:
                        return 1000, opened  # leaving the block closes the socket with 1000
            finally:
                if poller is not None:
                    poller.cancel()
                    await asyncio.wait([poller])
            return socket.close_code, opened
    except ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd is not None else None), opened


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
    """Several servers' `/health` as one, for the leak checks: each pool named after its
    server ("A main"), the upstream connection counts added up (the simulator counts them
    all together)."""
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


async def settle(world: World) -> dict[str, Any]:
    """Poll until the pools and connections of every server are at rest (or the settle time
    is up)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            answers = {
                server.label: await fetch_json(client, f"{server.base_url}/health")
                for server in world.servers
            }
            _, simulator = await fetch_json(client, f"{world.simulator_url}/_simulator/stats")
            health = merged_health({label: answer for label, (_, answer) in answers.items()})
            problems = pool_leaks(health, simulator)
            if not problems or time.monotonic() > deadline:
                return {
                    "problems": problems,
                    "health_status": max(status for status, _ in answers.values()),
                    "health": health,
                    "simulator": simulator,
                }
            await asyncio.sleep(0.25)


async def wait_for_probe(path: Path, probe: asyncio.subprocess.Process) -> None:
    """Until the probe has answered once, so its connection is in the baseline."""
    deadline = time.monotonic() + SIMULATOR_READY_TIMEOUT_S
    while time.monotonic() < deadline and probe.returncode is None:
        with contextlib.suppress(OSError):
            text = await asyncio.to_thread(path.read_text)
            if text.startswith("H ") or "\nH " in text:
                return
        await asyncio.sleep(0.05)
    raise LoadTestError("the /health probe process did not start")


async def socket_counts(
    world: World, until_at_most: int | None = None
) -> tuple[int | None, int | None]:
    """The servers' sockets, and those that are not upstream connections (listeners,
    clients, internal pipes), counted without connecting to a server: the upstream figure
    comes from the simulator. With `until_at_most`, wait (a few seconds at most) for the
    second to come down to it, as closing sockets may still be on their way out.
    """
    deadline = time.monotonic() + 5
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            _, stats = await fetch_json(client, f"{world.simulator_url}/_simulator/stats")
            sockets = total(open_sockets(pid) for pid in world.pids)
            upstream = stats.get("connections_open")
            other = None if sockets is None or upstream is None else sockets - upstream
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
        except (LoadTestError, ValueError, IndexError) as exc:
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
        code = await stop_process(server.process, drain_seconds(world.env) + CHILD_STOP_GRACE_S)
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
            try:
                report = await _run(options, tmp, children, started, deadline, progress)
            finally:
                exits = await children.stop_all()
                progress(f"stopped: {', '.join(f'{k} exit {v}' for k, v in exits.items())}")
                if options.keep:
                    progress(f"kept the database and logs in {tmp}")
            report["setup"]["children_exit"] = exits
            return report
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


async def start_probe(
    server: Server, options: LoadTestOptions, env: dict[str, str], tmp: Path, children: Children
) -> tuple[asyncio.subprocess.Process, Path]:
    """The /health probe of one server (it follows the server across restarts); returns
    once it has answered once, so its connection is in the baseline."""
    suffix = f"-{server.label}" if server.label else ""
    out = tmp / f"probe{suffix}.log"
    probe = await children.start(
        f"probe {server.label}".strip(),
        [
            sys.executable,
            "-m",
            "agents.loadtest",
            "probe",
            "--url",
            f"{server.base_url}/health",
            "--pid-file",
            str(server.pid_file),
            "--out",
            str(out),
            "--interval",
            str(options.probe_interval),
        ],
        env,
    )
    await wait_for_probe(out, probe)
    return probe, out


def peak_memory(world: World) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of the largest server."""
    readings = [memory_kb(pid) for pid in world.pids]
    return {key: max(r.get(key, 0) for r in readings) for key in ("VmRSS", "VmHWM")}


async def _run(
    options: LoadTestOptions,
    tmp: Path,
    children: Children,
    started: Mark,
    deadline: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    servers = "two servers" if options.rolling_restart else "the server"
    progress(f"starting the simulator, {servers} and {options.user_count} users' database ...")
    world = await start_world(options, tmp, children)
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
    )


# --- the report -----------------------------------------------------------------------------


def build_report(
    *,
    options: LoadTestOptions,
    recorder: Recorder,
    readings: ProbeReadings,
    marks: dict[str, Mark],
    health_at_start: dict[str, Any],
    at_rest: dict[str, Any],
    database: dict[str, Any],
    sockets: dict[str, tuple[int | None, int | None]],
    memory: dict[str, int],
    timed_out: bool,
    rolling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The figures as one JSON-ready document (the table is drawn from it). `rolling`: the
    rolling restart's figures, which add its targets."""
    runs = recorder.designs
    causes: Counter[str] = Counter()
    not_terminal: Counter[str] = Counter()  # where the unfinished ones were stuck
    client_errors: list[str] = []
    succeeded = terminal = 0
    for run in runs:
        if run.status in TERMINAL_STATUSES:
            terminal += 1
            if run.status == "succeeded":
                succeeded += 1
            else:
                causes[failure_cause(run.error)] += 1
        elif run.client_failure is not None:
            causes[f"client error while {run.stage}"] += 1
            client_errors.append(f"design {run.number}, {run.stage}: {run.client_failure}")
        else:
            causes["not terminal"] += 1
            not_terminal[run.stage] += 1
            if run.socket_error:
                client_errors.append(f"design {run.number}, last socket error: {run.socket_error}")
    submitted = sum(1 for run in runs if run.design_id is not None)
    by_status = Counter(status for _, status, _ in database["designs"])
    unfinished = {s: by_status[s] for s in UNFINISHED_STATUSES if by_status.get(s)}

    health = at_rest["health"]
    simulator = at_rest["simulator"]
    leak_details = list(at_rest["problems"])
    if unfinished:
        leak_details.append(f"designs left unfinished in the database: {unfinished}")
    if database.get("error"):
        leak_details.append(f"could not read the database to check it: {database['error']}")
    if database["runs_running"]:
        leak_details.append(f"{database['runs_running']} agent runs still marked running")
    upstream_open = health.get("http", {}).get("connections_open") or 0
    clients_before, clients_after = sockets["before"][1], sockets["after"][1]
    if clients_before is not None and clients_after is not None and clients_after > clients_before:
        leak_details.append(
            f"{clients_after - clients_before} more non-upstream sockets open in the server "
            "than before the run (unclosed client or WebSocket connections)"
        )

    phases = {
        "setup_s": marks["ready"].at - marks["start"].at,
        "logins_s": marks["logins"].at - marks["ready"].at,
        "designs_s": marks["designs"].at - marks["logins"].at,
        "checks_s": marks["checks"].at - marks["designs"].at,
    }
    health_designs = readings.health_between(marks["logins"].at, marks["designs"].at)
    durations = [
        (run.finished_at - run.submitted_at) * 1000
        for run in runs
        if run.finished_at is not None and run.submitted_at is not None
    ]
    peak_sockets = max((s for _, s, _ in readings.samples), default=None)
    peak_rss_kb = max([rss for _, _, rss in readings.samples] + [memory.get("VmHWM", 0)], default=0)
    counters = {
        name: {key: value for key, value in pool.items() if key.startswith("requests_")}
        for name, pool in health.get("pools", {}).items()
    }
    designs_s = max(marks["designs"].at - marks["logins"].at, 1e-9)
    health_p99 = health_designs["p99_ms"]
    all_terminal = submitted == options.designs and terminal == options.designs
    targets = {
        "every_design_terminal": {
            "measured": f"{terminal}/{options.designs}",
            "met": all_terminal and not timed_out,
        },
        **rolling_targets(options, rolling, succeeded),
        "zero_leaks": {
            "measured": "none" if not leak_details else f"{len(leak_details)} found",
            "met": not leak_details,
        },
        "health_p99_under_100ms": {
            "measured": health_p99,
            "met": health_p99 is not None
            and health_p99 < HEALTH_P99_TARGET_MS
            and health_designs["non_200"] == 0,
        },
    }
    return {
        "setup": {
            "host": options.host,
            "designs": options.designs,
            "users": options.user_count,
            "timeout_s": options.timeout,
            "fault_rate": round(sum(options.rates.values()), 6),
            **{key: round(value, 6) for key, value in options.rates.items()},
            "stall_seconds": options.stall_seconds,
            "ttft_ms": options.ttft_ms,
            "tokens_per_second": options.tokens_per_second,
            "simulator_nice": options.simulator_nice,
            "servers": len(options.server_labels),
            "seed": options.seed,
            "login_concurrency": options.login_concurrency,
            "cpus": os.cpu_count(),
            "pools": {
                name: pool.get("total") for name, pool in health_at_start.get("pools", {}).items()
            },
            "http_max_connections": health_at_start.get("http", {}).get("max_connections"),
        },
        "designs": {
            "submitted": submitted,
            "terminal": terminal,
            "succeeded": succeeded,
            "failed": options.designs - succeeded,
            "not_terminal": options.designs - terminal,
            "failures_by_cause": dict(causes.most_common()),
            "not_terminal_stages": dict(not_terminal),
            "client_errors": client_errors[:20],
            "timed_out": timed_out,
            "socket_events": recorder.socket_events,
            "socket_reconnects": sum(run.reconnects for run in runs),
            "submits_refused_busy": sum(run.refusals for run in runs),
            "duration": summarize(durations),
            "logins_failed": recorder.logins_failed,
            "database_statuses": dict(by_status),
        },
        "latency": {page: summarize(values) for page, values in recorder.latencies.items()},
        "health": {
            "interval_s": options.probe_interval,
            "whole_run": readings.health_between(marks["ready"].at, marks["checks"].at),
            "during_logins": readings.health_between(marks["ready"].at, marks["logins"].at),
            "during_designs": health_designs,
        },
        "server": {
            "peak_sockets": peak_sockets,
            "sockets_before": sockets["before"][0],
            "sockets_after": sockets["after"][0],
            "peak_rss_mb": round(peak_rss_kb / 1024, 1),
            "rss_after_mb": round(memory.get("VmRSS", 0) / 1024, 1),
            "cpu_cores_during_logins": cpu_between(marks["ready"], marks["logins"]),
            "cpu_cores_during_designs": cpu_between(marks["logins"], marks["designs"]),
        },
        "upstream": {
            "pool_counters": counters,
            "tokens_out": database["tokens_out"],
            "tokens_per_second_during_designs": round(database["tokens_out"] / designs_s),
            "connections_open_after": upstream_open,
            "connections_opened": health.get("http", {}).get("connections_num"),
            "simulator": {
                key: simulator.get(key)
                for key in (
                    "chat_requests",
                    "status_counts",
                    "resets",
                    "stalls",
                    "peak_in_flight",
                    "connections_accepted",
                    "connections_open",
                )
            },
        },
        **({"rolling_restart": rolling} if rolling is not None else {}),
        "leaks": {"found": bool(leak_details), "details": leak_details},
        "wall_time_s": round(marks["checks"].at - marks["start"].at, 1),
        "phases": {key: round(value, 1) for key, value in phases.items()},
        "targets": targets,
        "met": all(target["met"] for target in targets.values()),
    }


def rolling_targets(
    options: LoadTestOptions, rolling: dict[str, Any] | None, succeeded: int
) -> dict[str, dict[str, Any]]:
    """A rolling restart's targets: every design succeeded (unless faults were injected,
    which fail some by design), no finished agent called again, every server back after a
    clean drain (exit 0)."""
    if rolling is None:
        return {}
    targets: dict[str, dict[str, Any]] = {}
    if sum(options.rates.values()) == 0:
        targets["every_design_succeeded"] = {
            "measured": f"{succeeded}/{options.designs}",
            "met": succeeded == options.designs,
        }
    calls = rolling["agent_calls"]
    complete = calls["log_enabled"] and calls["log_dropped"] == 0 and calls["calls"] > 0
    targets["no_completed_agent_repeated"] = {
        "measured": calls["after_answer_saved"] if complete else "log incomplete",
        "met": complete and calls["after_answer_saved"] == 0,
    }
    restarts = rolling["restarts"]
    targets["every_restart_clean"] = {
        "measured": ", ".join(f"{r['server']} {r['exit_code']}" for r in restarts) or "none",
        "met": len(restarts) == len(rolling["servers"])
        and all(r["exit_code"] == 0 for r in restarts),
    }
    return targets


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def format_rolling(rolling: dict[str, Any], designs: dict[str, Any]) -> list[str]:
    """The rolling restart's lines of the table."""
    settings = ", ".join(f"{k} {v}" for k, v in rolling["settings"].items())
    failed = designs["terminal"] - designs["succeeded"]
    lines = [
        f"restarts   servers {' and '.join(rolling['servers'])} on one database ({settings}): "
        f"{designs['succeeded']} succeeded, {failed} failed, {designs['not_terminal']} not "
        f"terminal; {rolling['designs_resumed']} resumed (started more than once)",
    ]
    for restart in rolling["restarts"]:
        handed = ""
        if restart["designs_at_checkpoint"] is not None:
            handed = (
                f"; {restart['designs_at_checkpoint']} designs handed on at a checkpoint, "
                f"{restart['designs_stopped_mid_agent']} stopped mid-agent"
            )
        lines.append(
            f"  server {restart['server']}: SIGTERM to exit {restart['drain_s']} s (exit "
            f"{restart['exit_code']}{handed}), down {restart['down_s']} s until /health 200"
        )
    calls = rolling["agent_calls"]
    lines.append(
        f"  agent calls {calls['calls']}: {calls['after_answer_saved']} for an agent after its "
        f"answer was saved, {calls['again_after_stopped_mid_answer']} made again for agents "
        f"stopped mid-answer ({rolling['agent_runs_stopped']} agent runs stopped by the drains; "
        "those still waiting for a pool slot had made no call)"
        + (f"; request log dropped {calls['log_dropped']}" if calls["log_dropped"] else "")
    )
    during = rolling["health_while_restarting"]
    lines.append(
        f"  {rolling['submits_refused_while_draining']} submits refused (503) by a draining "
        f"server, {rolling['requests_failed_over']} requests sent to the other server; "
        f"/health of a restarting server: {during['count']} probes, {during['non_200']} "
        "not 200 (left out of the /health figures below)"
    )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as the table an operator reads."""
    setup, designs, server = report["setup"], report["designs"], report["server"]
    rolling = report.get("rolling_restart")
    lines = [
        f"Carlos load test on {setup['host']}: {setup['designs']} designs by {setup['users']} "
        f"users, {setup['cpus']} CPUs"
        + (", two servers restarted in turn (--rolling-restart)" if rolling else ""),
        f"faults {setup['fault_rate']:.1%} (HTTP 500 {setup['error_rate']:.2%}, reset "
        f"{setup['reset_rate']:.2%}, stall {setup['stall_rate']:.2%} for "
        f"{setup['stall_seconds']:g} s); simulator TTFT {setup['ttft_ms']:g} ms, "
        f"{setup['tokens_per_second']:g} tokens/s, nice {setup.get('simulator_nice', 0)}; pools "
        + ", ".join(f"{k} {v}" for k, v in setup["pools"].items()),
        "",
        f"designs    submitted {designs['submitted']}, terminal {designs['terminal']}, "
        f"succeeded {designs['succeeded']}, failed {designs['failed']}"
        + (" (timed out)" if designs["timed_out"] else ""),
    ]
    for cause, count in designs["failures_by_cause"].items():
        lines.append(f"  {cause:<32} {count:>5}")
    duration = designs["duration"]
    lines.append(
        f"  submit to terminal: p50 {_ms(duration['p50_ms'])} ms, "
        f"p99 {_ms(duration['p99_ms'])} ms; {designs['socket_events']:,} socket events, "
        f"{designs['socket_reconnects']} reconnects, "
        f"{designs.get('submits_refused_busy', 0)} submits refused busy (503) and sent again"
    )
    if rolling:
        lines += ["", *format_rolling(rolling, designs)]
    lines += ["", f"{'latency':<28} {'count':>6} {'p50 ms':>10} {'p99 ms':>10} {'max ms':>10}"]
    rows = [(page.replace("_", " "), stats) for page, stats in report["latency"].items()]
    health = report["health"]
    rows += [
        ("/health during logins", health["during_logins"]),
        ("/health during designs", health["during_designs"]),
        ("/health whole run", health["whole_run"]),
    ]
    for label, stats in rows:
        lines.append(
            f"  {label:<26} {stats['count']:>6} {_ms(stats['p50_ms']):>10} "
            f"{_ms(stats['p99_ms']):>10} {_ms(stats['max_ms']):>10}"
        )
    lines.append(f"  /health non-200 answers: {health['whole_run']['non_200']}")
    cores = server["cpu_cores_during_designs"]
    if setup.get("servers", 1) > 1:
        sockets = (
            f"servers    peak sockets {server['peak_sockets']} in one (both: before "
            f"{server['sockets_before']}, after {server['sockets_after']}), peak RSS "
            f"{server['peak_rss_mb']} MB in one; cpu of restarted servers is not compared"
        )
    else:
        sockets = (
            f"server     peak sockets {server['peak_sockets']} (before "
            f"{server['sockets_before']}, after {server['sockets_after']}), peak RSS "
            f"{server['peak_rss_mb']} MB"
        )
    lines += [
        "",
        sockets,
        "cpu cores during designs: "
        + ", ".join(
            f"{k.replace('_', ' ')} {v if v is not None else '-'}" for k, v in cores.items()
        ),
    ]
    upstream = report["upstream"]
    simulator = upstream["simulator"]
    lines.append(
        f"upstream   {simulator['chat_requests']} chat requests, statuses "
        f"{simulator['status_counts']}, {simulator['resets']} resets, {simulator['stalls']} "
        f"stalls, peak in flight {simulator['peak_in_flight']}, "
        f"{upstream['connections_opened']} connections opened; {upstream['tokens_out']:,} "
        f"tokens streamed, {upstream['tokens_per_second_during_designs']:,}/s during designs"
    )
    leaks = report["leaks"]
    lines += ["", "leaks      " + ("none" if not leaks["found"] else "; ".join(leaks["details"]))]
    phases = report["phases"]
    lines.append(
        f"wall time  {report['wall_time_s']} s (setup {phases['setup_s']}, logins "
        f"{phases['logins_s']}, designs {phases['designs_s']}, checks {phases['checks_s']})"
    )
    lines += ["", "targets"]
    labels = {
        "every_design_terminal": "every design terminal",
        "every_design_succeeded": "every design succeeded",
        "no_completed_agent_repeated": "completed agents called again",
        "every_restart_clean": "restart exit codes all 0",
        "zero_leaks": "zero leaks",
        "health_p99_under_100ms": "/health p99 < 100 ms (designs)",
    }
    for key, target in report["targets"].items():
        measured = target["measured"]
        shown = f"{measured} ms" if isinstance(measured, float) else str(measured)
        lines.append(f"  {labels[key]:<32} {shown:>14}   {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: Iterable[str]) -> None:
    arguments = list(argv)
    if arguments[:1] != ["probe"]:
        sys.exit("usage: python -m agents.loadtest probe --url URL --pid-file FILE --out FILE")
    probe_main(arguments[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
