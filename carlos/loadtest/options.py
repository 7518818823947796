"""What a load test runs: its options, checked as a whole, and the limits they must keep."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "interrupted", "cancelled"})
UNFINISHED_STATUSES = ("queued", "running", "awaiting_answers")
MAX_DESIGNS = 2000
MAX_TIMEOUT_S = 3600.0
MAX_NICE = 19
MAX_WORKERS = 16
MAX_RESUBMITS = 3  # a user refused with 503 sends the form again this many times at most
DEFAULT_RETRY_AFTER_S = 5.0
MAX_RETRY_AFTER_S = 60.0
HEALTH_P99_TARGET_MS = 100.0
USERNAME_PREFIX = "loadtest-"
SIMULATOR_READY_TIMEOUT_S = 30.0
SETUP_TIMEOUT_S = 180.0
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


class LoadTestError(Exception):
    """The run could not be set up or went wrong outside the server; the text says what."""


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
    # Server processes on the server's port (`serve --workers`); more than one coordinate
    # through the Redis at REDIS_URL, under a key prefix of the run's own.
    workers: int = 1

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
        if not 1 <= self.workers <= MAX_WORKERS:
            problems.append(f"--workers must be between 1 and {MAX_WORKERS}, got {self.workers}")
        elif self.workers > 1 and not os.environ.get("REDIS_URL"):
            problems.append(
                f"--workers {self.workers} needs REDIS_URL (e.g. redis://127.0.0.1:6379/0): "
                "the workers share pool capacity and live design streams through Redis (the run "
                "writes under a key prefix of its own and deletes its keys afterwards)"
            )
        elif self.workers > 1 and self.rolling_restart:
            problems.append(
                "--workers and --rolling-restart do not go together: the rolling restart "
                "measures two single-process servers without Redis"
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
