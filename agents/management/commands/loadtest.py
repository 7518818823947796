"""`manage.py loadtest`: N users designing at once while the simulator injects faults.

Why: the product's promises under load (every design ends, nothing leaks, `/health` stays
fast) are only worth the figures that back them. The command starts its own world on
loopback (a throwaway SQLite database, the offline simulator and `manage.py serve` as child
processes), drives it as browsers would, checks for leaks and prints the figures; the work
is in `agents.loadtest`. With `--rolling-restart` it runs two servers and restarts each in
turn while the designs run, as a deploy would.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agents.loadtest import (
    MAX_DESIGNS,
    MAX_TIMEOUT_S,
    LoadTestError,
    LoadTestOptions,
    format_report,
    run_load_test,
)

DEFAULTS = LoadTestOptions()


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
        parser.add_argument(
            "--designs",
            type=int,
            default=DEFAULTS.designs,
            help=f"Designs submitted at once (default {DEFAULTS.designs}, at most {MAX_DESIGNS}).",
        )
        parser.add_argument(
            "--users",
            type=int,
            default=None,
            help="Users who submit them, each its share at once (default: one per design).",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=DEFAULTS.timeout,
            metavar="SECONDS",
            help=f"Bound on the whole run (default {DEFAULTS.timeout:g}, at most "
            f"{MAX_TIMEOUT_S:g}); unfinished designs are then reported as not terminal.",
        )
        parser.add_argument(
            "--host",
            default=DEFAULTS.host,
            help="Loopback address to serve on (default 127.0.0.1); anything else is refused.",
        )
        parser.add_argument(
            "--login-concurrency",
            type=int,
            default=DEFAULTS.login_concurrency,
            help=f"Users logging in at the same moment before the designs start (default "
            f"{DEFAULTS.login_concurrency}; 0 = all at once: each login is a ~1 s PBKDF2 "
            "hash on the server).",
        )
        faults = parser.add_argument_group("injected faults (fractions of chat requests)")
        faults.add_argument(
            "--fault-rate",
            type=float,
            default=None,
            help="Split equally into HTTP 500s, connection resets and stalls (default 0.05; "
            "0 with --rolling-restart).",
        )
        for kind, what in (
            ("error", "answered HTTP 500 (retried by the pools)"),
            ("reset", "reset after a few chunks"),
            ("stall", "stalled mid-stream for --stall-seconds"),
        ):
            faults.add_argument(
                f"--{kind}-rate",
                type=float,
                default=None,
                help=f"Fraction {what}; with any of these, unnamed kinds are 0.",
            )
        faults.add_argument(
            "--stall-seconds",
            type=float,
            default=DEFAULTS.stall_seconds,
            help=f"Length of a stall (default {DEFAULTS.stall_seconds:g}: past the pools' "
            "30 s idle deadline, so a stall fails its call).",
        )
        faults.add_argument(
            "--seed", type=int, default=DEFAULTS.seed, help="Seed of the fault draws."
        )
        pacing = parser.add_argument_group("simulated model pacing")
        pacing.add_argument(
            "--ttft-ms",
            type=float,
            default=DEFAULTS.ttft_ms,
            help=f"Time to first token (default {DEFAULTS.ttft_ms:g}).",
        )
        pacing.add_argument(
            "--tokens-per-second",
            type=float,
            default=DEFAULTS.tokens_per_second,
            help=f"Streaming pace per call (default {DEFAULTS.tokens_per_second:g}).",
        )
        pacing.add_argument(
            "--simulator-nice",
            type=int,
            default=DEFAULTS.simulator_nice,
            metavar="N",
            help="CPU priority (nice, 0-19) of the simulator, which stands in for a remote "
            "endpoint: above 0 it does not preempt the server being measured on one machine "
            f"(default {DEFAULTS.simulator_nice}: the same priority as the server).",
        )
        parser.add_argument(
            "--probe-interval",
            type=float,
            default=DEFAULTS.probe_interval,
            metavar="SECONDS",
            help=f"Time between /health probes (default {DEFAULTS.probe_interval:g}).",
        )
        parser.add_argument(
            "--keep",
            action="store_true",
            help="Keep the run's folder (database, server, simulator and probe logs) and print "
            "where it is.",
        )
        parser.add_argument(
            "--rolling-restart",
            action="store_true",
            help="Run two servers on the same database (users alternate between them) and, "
            "once a third of the designs run, restart each in turn with SIGTERM: it drains "
            "(DRAIN_SECONDS, default here 10) and its unfinished designs resume on the other "
            "(DESIGN_SWEEP_SECONDS, default here 1). Reports designs resumed, agent calls "
            "repeated (from the simulator's request log) and each restart's drain and "
            "downtime. No faults are injected unless a rate is given.",
        )
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
        parser.add_argument(
            "--check",
            action="store_true",
            help="Exit with status 1 when a target is missed (for scripts).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            settings = LoadTestOptions(
                designs=options["designs"],
                users=options["users"],
                timeout=options["timeout"],
                host=options["host"],
                fault_rate=options["fault_rate"],
                error_rate=options["error_rate"],
                reset_rate=options["reset_rate"],
                stall_rate=options["stall_rate"],
                stall_seconds=options["stall_seconds"],
                ttft_ms=options["ttft_ms"],
                tokens_per_second=options["tokens_per_second"],
                seed=options["seed"],
                probe_interval=options["probe_interval"],
                keep=options["keep"],
                login_concurrency=options["login_concurrency"],
                simulator_nice=options["simulator_nice"],
                rolling_restart=options["rolling_restart"],
            ).validated()
        except LoadTestError as exc:
            raise CommandError(str(exc)) from exc

        def progress(line: str) -> None:
            if options["verbosity"] > 0:
                self.stderr.write(f"loadtest: {line}")
                self.stderr.flush()

        try:
            report = asyncio.run(run_load_test(settings, progress))
        except LoadTestError as exc:
            raise CommandError(str(exc)) from exc
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise CommandError("interrupted; every child process was stopped") from None
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self.stdout.write(format_report(report))
        if options["check"] and not report["met"]:
            sys.exit(1)
