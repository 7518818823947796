"""`manage.py loadtest`: N users designing at once while the simulator injects faults.

Why: the product's promises under load (every design ends, nothing leaks, `/health` stays
fast) are only worth the figures that back them. The command starts its own world on
loopback (a throwaway SQLite database, the offline simulator and `manage.py serve` as child
processes), drives it as browsers would, checks for leaks and prints the figures; the work
is in `carlos.loadtest`. With `--rolling-restart` it runs two servers and restarts each in
turn while the designs run, as a deploy would; with `--workers N` its server runs N processes
on one port (`serve --workers N`, through Redis).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from carlos.loadtest.command import REPORT_OPTIONS, Option, add_options, measure, options_from
from carlos.loadtest.options import MAX_DESIGNS, MAX_TIMEOUT_S, MAX_WORKERS, LoadTestOptions
from carlos.loadtest.report import format_report
from carlos.loadtest.run import run_load_test

DEFAULTS = LoadTestOptions()
RUN: tuple[Option, ...] = (
    (
        "--designs",
        int,
        DEFAULTS.designs,
        None,
        f"Designs submitted at once (default {DEFAULTS.designs}, at most {MAX_DESIGNS}).",
    ),
    (
        "--users",
        int,
        None,
        None,
        "Users who submit them, each its share at once (default: one per design).",
    ),
    (
        "--timeout",
        float,
        DEFAULTS.timeout,
        "SECONDS",
        f"Bound on the whole run (default {DEFAULTS.timeout:g}, at most {MAX_TIMEOUT_S:g}); "
        "unfinished designs are then reported as not terminal.",
    ),
    (
        "--host",
        str,
        DEFAULTS.host,
        None,
        "Loopback address to serve on (default 127.0.0.1); anything else is refused.",
    ),
    (
        "--workers",
        int,
        DEFAULTS.workers,
        "N",
        f"Server processes on the server's port (`serve --workers N`, default "
        f"{DEFAULTS.workers}, at most {MAX_WORKERS}); more than one needs REDIS_URL, where "
        "the run writes under a key prefix of its own and deletes its keys afterwards.",
    ),
    (
        "--login-concurrency",
        int,
        DEFAULTS.login_concurrency,
        None,
        f"Users logging in at the same moment before the designs start (default "
        f"{DEFAULTS.login_concurrency}; 0 = all at once: each login is a ~1 s PBKDF2 hash on "
        "the server).",
    ),
)
FAULTS: tuple[Option, ...] = (
    (
        "--fault-rate",
        float,
        None,
        None,
        "Split equally into HTTP 500s, connection resets and stalls (default 0.05; 0 with "
        "--rolling-restart).",
    ),
    *(
        (
            f"--{kind}-rate",
            float,
            None,
            None,
            f"Fraction {what}; with any of these, unnamed kinds are 0.",
        )
        for kind, what in (
            ("error", "answered HTTP 500 (retried by the pools)"),
            ("reset", "reset after a few chunks"),
            ("stall", "stalled mid-stream for --stall-seconds"),
        )
    ),
    (
        "--stall-seconds",
        float,
        DEFAULTS.stall_seconds,
        None,
        f"Length of a stall (default {DEFAULTS.stall_seconds:g}: past the pools' 30 s idle "
        "deadline, so a stall fails its call).",
    ),
    ("--seed", int, DEFAULTS.seed, None, "Seed of the fault draws."),
)
PACING: tuple[Option, ...] = (
    (
        "--ttft-ms",
        float,
        DEFAULTS.ttft_ms,
        None,
        f"Time to first token (default {DEFAULTS.ttft_ms:g}).",
    ),
    (
        "--tokens-per-second",
        float,
        DEFAULTS.tokens_per_second,
        None,
        f"Streaming pace per call (default {DEFAULTS.tokens_per_second:g}).",
    ),
    (
        "--simulator-nice",
        int,
        DEFAULTS.simulator_nice,
        "N",
        "CPU priority (nice, 0-19) of the simulator, which stands in for a remote endpoint: "
        "above 0 it does not preempt the server being measured on one machine "
        f"(default {DEFAULTS.simulator_nice}: the same priority as the server).",
    ),
)
REPORT: tuple[Option, ...] = (
    (
        "--probe-interval",
        float,
        DEFAULTS.probe_interval,
        "SECONDS",
        f"Time between /health probes (default {DEFAULTS.probe_interval:g}).",
    ),
    (
        "--keep",
        None,
        False,
        None,
        "Keep the run's folder (database, server, simulator and probe logs) and print where it is.",
    ),
    (
        "--rolling-restart",
        None,
        False,
        None,
        "Run two servers on the same database (users alternate between them) and, once a "
        "third of the designs run, restart each in turn with SIGTERM: it drains "
        "(DRAIN_SECONDS, default here 10) and its unfinished designs resume on the other "
        "(DESIGN_SWEEP_SECONDS, default here 1). Reports designs resumed, agent calls "
        "repeated (from the simulator's request log) and each restart's drain and downtime. "
        "No faults are injected unless a rate is given.",
    ),
    *REPORT_OPTIONS,
)


class Command(BaseCommand):
    help = (
        "Load-test Carlos on loopback: start a server (`manage.py serve`) and the offline "
        "simulator with injected faults in child processes, on a throwaway SQLite database; "
        "log N users in, have them all submit designs at once and watch each over its "
        "WebSocket until it ends, while /health is timed every 100 ms and the server's "
        "sockets and memory are sampled. Then check that the pools are idle and every "
        "connection closed, and report completed and failed designs by cause, p50/p99 page "
        "and /health latency, peak sockets and RSS, and whether the targets are met."
    )
    # It checks the world it starts, not the settings of the shell it is run from.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        add_options(parser, RUN)
        faults = parser.add_argument_group("injected faults (fractions of chat requests)")
        add_options(faults, FAULTS)
        add_options(parser.add_argument_group("simulated model pacing"), PACING)
        add_options(parser, REPORT)

    def handle(self, *args: Any, **options: Any) -> None:
        settings = options_from(LoadTestOptions, options)
        measure(self, options, settings, run_load_test, format_report)
