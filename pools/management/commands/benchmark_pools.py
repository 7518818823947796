"""`manage.py benchmark_pools`: the pool against the alternatives, measured over TLS."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from pools.benchmark import format_report, run_benchmark
from pools.simulator_process import start_simulator


class Command(BaseCommand):
    help = (
        "Benchmark the LLM pool against a fresh SDK client per call, one reused client and the "
        "original per-slot design, interleaved, over TLS to the offline simulator running in a "
        "child process with an emulated network round trip. Prints median and p90 latency, the "
        "ratios and whether each target is met."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--rounds", type=int, default=200, help="Calls per variant (default 200)."
        )
        parser.add_argument(
            "--rtt-ms",
            type=float,
            default=5.0,
            help="Emulated network round trip per new connection and per request (default 5).",
        )
        parser.add_argument("--size", type=int, default=10, help="Pool size (default 10).")
        parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
        parser.add_argument(
            "--redis",
            nargs="?",
            const=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15",
            default=None,
            metavar="URL",
            help="Also measure acquire + release with cluster coordination through this Redis "
            "(default $REDIS_URL, else redis://127.0.0.1:6379/15).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["rounds"] < 5:
            raise CommandError("--rounds must be at least 5")
        with tempfile.TemporaryDirectory() as tmp:
            ca_file = str(Path(tmp) / "simulator-ca.pem")
            simulator = start_simulator(
                ["--port", "0", "--tls", "--ca-file", ca_file, "--rtt-ms", str(options["rtt_ms"])]
            )
            base_url = simulator.base_url
            try:
                report = asyncio.run(
                    run_benchmark(
                        base_url,
                        ca_file,
                        rounds=options["rounds"],
                        size=options["size"],
                        redis_url=options["redis"],
                    )
                )
            finally:
                simulator.stop()
        summary = report.summary()
        summary["setup"] = {"tls": True, "rtt_ms": options["rtt_ms"], "pool_size": options["size"]}
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))
        else:
            self.stdout.write(
                f"TLS to the offline simulator, emulated RTT {options['rtt_ms']} ms, "
                f"pool size {options['size']}"
            )
            self.stdout.write(format_report(summary))
