"""`manage.py benchmark_pools`: the pool against the alternatives, measured over TLS.

Beside the emulated round trip, the same call with no emulated delay (over TLS and plain
HTTP) and the client's CPU per streamed chunk. With `--telemetry otlp`, what exporting
traces and metrics costs a pooled call instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pools.benchmark import (
    SINK_READY,
    format_report,
    format_stream_cpu,
    format_telemetry_overhead,
    format_zero_delay,
    run_benchmark,
    run_stream_cpu,
    run_telemetry_overhead,
    run_zero_delay,
)
from pools.simulator.process import die_with_parent, start_simulator

# Variables that would send the benchmark's telemetry anywhere but the endpoint it names.
OTHER_DESTINATIONS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
)


class Command(BaseCommand):
    help = (
        "Benchmark the LLM pool against a fresh SDK client per call, one reused client and the "
        "original per-slot design, interleaved, over TLS to the offline simulator running in a "
        "child process with an emulated network round trip. Prints median and p90 latency, the "
        "ratios and whether each target is met. Then, with no emulated delay, a pooled call "
        "against the bare SDK with one reused client over TLS and plain HTTP (target <= 1.05), "
        "and the client's CPU per chunk of a long stream: pooled, the SDK's streaming and bare "
        "httpx lines. With --telemetry otlp, measure instead what exporting traces and metrics "
        "over OTLP costs a pooled call (target <= 5 %)."
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
        parser.add_argument(
            "--stream-rounds",
            type=int,
            default=20,
            help="Streams per variant for the CPU per chunk (default 20).",
        )
        parser.add_argument(
            "--stream-tokens",
            type=int,
            default=2000,
            help="Chunks of text per stream for the CPU per chunk (default 2000).",
        )
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
        parser.add_argument(
            "--telemetry",
            choices=["off", "otlp"],
            default="off",
            help="otlp: measure the cost of telemetry export instead. Pooled calls against "
            "one reused SDK client (which no instrumentation sees), interleaved, first with "
            "telemetry off, then with the SDK set up (carlos.telemetry) exporting over OTLP "
            "to --telemetry-endpoint, or to a local sink the benchmark starts in a child "
            "process. Use --rtt-ms 0 for the zero-delay figure. Default: off.",
        )
        parser.add_argument(
            "--telemetry-endpoint",
            metavar="URL",
            help="With --telemetry otlp: the OTLP/HTTP collector's base URL (like "
            "OTEL_EXPORTER_OTLP_ENDPOINT, e.g. http://127.0.0.1:4318) instead of a local sink.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["rounds"] < 5:
            raise CommandError("--rounds must be at least 5")
        if options["stream_rounds"] < 1 or options["stream_tokens"] < 10:
            raise CommandError("--stream-rounds must be at least 1 and --stream-tokens 10")
        if options["telemetry_endpoint"] and options["telemetry"] != "otlp":
            raise CommandError("--telemetry-endpoint needs --telemetry otlp")
        rounds = options["rounds"]
        with tempfile.TemporaryDirectory() as tmp:
            with _simulator(tmp, "emulated", tls=True, rtt_ms=options["rtt_ms"]) as (url, ca):
                if options["telemetry"] == "otlp":
                    self._telemetry(url, ca, options)
                    return
                report = asyncio.run(
                    run_benchmark(
                        url,
                        ca,
                        rounds=rounds,
                        size=options["size"],
                        redis_url=options["redis"],
                        first_call_trials=min(15, rounds),
                        acquire_iterations=min(20_000, 100 * rounds),
                    )
                )
            summary = report.summary()
            with (
                _simulator(tmp, "tls", tls=True) as tls,
                _simulator(tmp, "http", tls=False) as http,
            ):
                summary["zero_delay"] = asyncio.run(
                    run_zero_delay({"TLS": tls, "HTTP": http}, rounds=rounds, size=options["size"])
                )
                summary["streaming"] = asyncio.run(
                    run_stream_cpu(
                        *tls,
                        rounds=options["stream_rounds"],
                        tokens=options["stream_tokens"],
                        size=options["size"],
                    )
                )
        self._write(summary, _format_all, options)

    def _telemetry(self, base_url: str, ca_file: str, options: dict[str, Any]) -> None:
        from carlos import telemetry

        sink = None
        endpoint = options["telemetry_endpoint"]
        if not endpoint:
            sink = subprocess.Popen(
                [sys.executable, "-c", "from pools.benchmark import serve_otlp_sink as s; s()"],
                cwd=settings.BASE_DIR,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=die_with_parent,
            )
            assert sink.stdout is not None
            line = sink.stdout.readline()
            if not line.startswith(SINK_READY):
                sink.kill()
                raise CommandError(f"the OTLP sink did not start: {line.strip()!r}")
            endpoint = line.removeprefix(SINK_READY).strip()

        def enable() -> None:
            for name in OTHER_DESTINATIONS:
                os.environ.pop(name, None)
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
            if not telemetry.setup(instance="benchmark").installed:
                raise CommandError(f"telemetry could not be set up: {telemetry.describe()}")

        try:
            summary = asyncio.run(
                run_telemetry_overhead(
                    base_url, ca_file, enable, rounds=options["rounds"], size=options["size"]
                )
            )
            telemetry.shutdown(timeout=30)
            described = telemetry.describe()
            spans = described.get("spans", {}).get("otlp", {})
            summary["export"] = {
                "endpoint": endpoint,
                "spans_exported": spans.get("exported"),
                "spans_dropped": spans.get("dropped"),
                "spans_failed": spans.get("failed"),
            }
            if sink is not None:
                with urllib.request.urlopen(f"{endpoint}/stats", timeout=10) as reply:
                    summary["export"]["sink"] = json.loads(reply.read())
        finally:
            if sink is not None:
                sink.terminate()
                sink.wait(timeout=10)
        self._write(summary, format_telemetry_overhead, options)

    def _write(
        self,
        summary: dict[str, Any],
        formatter: Callable[[dict[str, Any]], str],
        options: dict[str, Any],
    ) -> None:
        """The summary with its set-up, as JSON or as the text report `formatter` makes."""
        summary["setup"] = {"tls": True, "rtt_ms": options["rtt_ms"], "pool_size": options["size"]}
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))
            return
        self.stdout.write(
            f"TLS to the offline simulator, emulated RTT {options['rtt_ms']} ms, "
            f"pool size {options['size']}"
        )
        self.stdout.write(formatter(summary))


@contextmanager
def _simulator(
    tmp: str, name: str, *, tls: bool, rtt_ms: float | None = None
) -> Iterator[tuple[str, str]]:
    """A simulator in a child process for the block: its base URL and CA file ("" without
    TLS). With no `rtt_ms` (zero delay) it answers with `pools.benchmark.long_answer`, so a
    stream is as long as asked."""
    ca_file = str(Path(tmp) / f"{name}-ca.pem") if tls else ""
    arguments = ["--port", "0", "--rtt-ms", str(rtt_ms or 0.0)]
    if rtt_ms is None:
        arguments += ["--responder", "pools.benchmark.long_answer"]
    if tls:
        arguments += ["--tls", "--ca-file", ca_file]
    simulator = start_simulator(arguments, manage_py=settings.BASE_DIR / "manage.py")
    try:
        yield simulator.base_url, ca_file
    finally:
        simulator.stop()


def _format_all(summary: dict[str, Any]) -> str:
    """The emulated-delay report, then the zero-delay table and the CPU per chunk."""
    return "\n\n".join(
        [
            format_report(summary),
            format_zero_delay(summary["zero_delay"]),
            format_stream_cpu(summary["streaming"]),
        ]
    )
