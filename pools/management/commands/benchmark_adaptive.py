"""`manage.py benchmark_adaptive`: the learned limit against fixed sizes and unbounded overflow."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pools.benchmark_adaptive import Scenario, format_report, run_benchmark, summarise
from pools.simulator.process import start_simulator

# The run's numbers: (flag, type, default, help).
_NUMBERS: tuple[tuple[str, type, float, str], ...] = (
    ("--rounds", int, 1, "Runs per variant (default 1)."),
    ("--phase-seconds", float, 20.0, "Length of each capacity phase (default 20 s)."),
    (
        "--capacity",
        int,
        16,
        "The upstream's capacity at the start and end; it is halved in the middle phase "
        "(default 16).",
    ),
    ("--callers", int, 48, "Callers (default 48)."),
    (
        "--retry-after-ms",
        float,
        1000.0,
        "What the upstream's 429s ask to wait (default 1000 ms, as Retry-After: 1).",
    ),
)


class Command(BaseCommand):
    help = (
        "Run the same stream of calls against a capacity-limited upstream (the offline "
        "simulator in a child process; its capacity halves, then doubles, during each run) "
        "with adaptive pools, with fixed pool sizes from a sweep, and with unbounded overflow "
        "(the design note's pool: a shared SDK client with its own retries; and this engine "
        "with ADAPTIVE=0), interleaved. Prints goodput per variant and, last, the line "
        "`goodput adaptive/best_fixed=X adaptive/unbounded=Y reconverge_s=Z failed_on_429=N` "
        "(targets: X >= 0.95, Y >= 2, Z <= 10, N = 0)."
    )

    def add_arguments(self, parser) -> None:
        for flag, kind, default, text in _NUMBERS:
            parser.add_argument(flag, type=kind, default=default, help=text)
        parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        capacity = options["capacity"]
        if capacity < 2 or options["rounds"] < 1 or options["phase_seconds"] <= 0:
            raise CommandError("--capacity must be >= 2, --rounds >= 1, --phase-seconds > 0")
        scenario = Scenario(
            capacities=(capacity, capacity // 2, capacity),
            phase_s=options["phase_seconds"],
            callers=options["callers"],
            fixed_sizes=tuple(sorted({capacity // 4, capacity // 2, capacity * 3 // 4, capacity})),
            warm_size=capacity,
        )
        simulator = start_simulator(
            [
                "--port", "0",
                "--ttft-ms", "100",
                "--tokens-per-second", "100",
                "--ttft-per-request-ms", "5",
                "--capacity", str(capacity),
                "--retry-after", str(options["retry_after_ms"] / 1000),
                "--keepalive-timeout", "120",
            ],
            manage_py=settings.BASE_DIR / "manage.py",
        )  # fmt: skip
        try:
            results = asyncio.run(run_benchmark(simulator.root_url, scenario, options["rounds"]))
        finally:
            simulator.stop()
        summary = summarise(results, scenario)
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))
        else:
            self.stdout.write(format_report(summary, scenario))
