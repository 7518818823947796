"""`manage.py llm_simulator`: run the offline OpenAI-compatible LLM simulator.

Why: development, demos and cross-process tests need an LLM endpoint that costs nothing,
needs no network and can be made slow or faulty on purpose.
"""

import argparse
import asyncio
import signal
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.module_loading import import_string

from pools.simulator import LLMSimulator, SimulatorConfig
from pools.simulator.server import FAULT_CHOICES, QUOTA_DEFAULT_MAX_TOKENS

DEFAULT_RESPONDER = "pools.simulator.responders.default_responder"


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from exc
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return number


def _rate(value: str) -> float:
    number = _non_negative(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"{value!r} is a fraction and must be between 0 and 1")
    return number


def _positive(value: str) -> float:
    number = _non_negative(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
    return number


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from exc
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return number


class Command(BaseCommand):
    help = (
        "Run the offline LLM simulator: an OpenAI- and Azure-compatible chat-completions "
        "server for development and tests, with adjustable latency and injected faults. "
        "Point clients at the printed base URL (LLM_SIMULATOR_URL); Azure clients use the same "
        "URL without /v1 as their endpoint. It can push back as a real endpoint does: a "
        "concurrency --capacity, or a per-key Azure-style quota (--quota-rpm/--quota-tpm over "
        "--quota-window, kept per API key and model/deployment, answered 429 with the exact "
        "wait), scripted 429s (--next-429), every Retry-After and x-ratelimit-* variant "
        "(--retry-after-mode, --ratelimit-headers), and broken answers (--error-rate, "
        "--reset-rate, --stall-rate, --truncate-rate, --malformed-rate, --empty-rate, "
        "--length-rate, --content-filter-rate, --no-usage), optionally for one model only "
        "(--fault-model). Every one of these settings, --keepalive-timeout included, can "
        "also be changed while it runs with POST /_simulator/faults (JSON, field names as in "
        "GET /_simulator/faults); counters are at GET /_simulator/stats, the last "
        "--request-log chat requests at GET /_simulator/requests, and both are cleared by "
        "POST /_simulator/reset. Stop it with Ctrl-C or SIGTERM. Example, a slow and "
        "slightly flaky model: manage.py llm_simulator --ttft-ms 400 --tokens-per-second 30 "
        "--error-rate 0.05 --reset-rate 0.02. Example, an Azure S0 deployment: "
        "manage.py llm_simulator --quota-rpm 60 --quota-tpm 10000"
    )
    # The simulator needs no database or app checks; starting fast matters for tests.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        net = parser.add_argument_group("listening")
        net.add_argument(
            "--host",
            default=getattr(settings, "LLM_SIMULATOR_HOST", "127.0.0.1"),
            help="Address to bind (default: settings.LLM_SIMULATOR_HOST, %(default)s).",
        )
        net.add_argument(
            "--port",
            type=_count,
            default=getattr(settings, "LLM_SIMULATOR_PORT", 8765),
            help="TCP port; 0 picks a free one and prints it (default: %(default)s).",
        )
        net.add_argument(
            "--tls",
            action="store_true",
            help="Serve HTTPS with a freshly generated self-signed CA (see --ca-file).",
        )
        net.add_argument(
            "--ca-file",
            metavar="PATH",
            help="With --tls, write the CA certificate (PEM) here so clients can trust it, "
            "e.g. LLM_CA_BUNDLE=PATH.",
        )
        net.add_argument(
            "--api-key",
            help="Require this key (Authorization: Bearer KEY or api-key: KEY); others get 401.",
        )
        net.add_argument(
            "--deployments",
            metavar="NAMES",
            help="Comma-separated model/deployment names to accept; others get 404 "
            "(default: accept any model).",
        )
        net.add_argument(
            "--keepalive-timeout",
            type=_non_negative,
            default=120.0,
            metavar="SECONDS",
            help="Close idle keep-alive connections (with a FIN, as uvicorn does after 5 s) "
            "after this long; 0 = never (default: %(default)s).",
        )

        timing = parser.add_argument_group("latency")
        timing.add_argument(
            "--ttft-ms",
            type=_non_negative,
            default=0.0,
            help="Time to first token in milliseconds (default: %(default)s).",
        )
        timing.add_argument(
            "--tokens-per-second",
            type=_non_negative,
            default=0.0,
            help="Streaming pace; 0 sends tokens as fast as possible (default: %(default)s).",
        )
        timing.add_argument(
            "--rtt-ms",
            type=_non_negative,
            default=0.0,
            help="Emulated network round trip, added per new connection (twice with TLS) "
            "and per request (default: %(default)s).",
        )
        timing.add_argument(
            "--ttft-per-request-ms",
            type=_non_negative,
            default=0.0,
            help="Added to the time to first token for every other chat request already in "
            "flight when one arrives, so latency rises with concurrency (default: %(default)s).",
        )

        limits = parser.add_argument_group("rate limits and 429s")
        limits.add_argument(
            "--quota-rpm",
            type=_count,
            default=0,
            help="Requests per window allowed per (API key, model/deployment), as an Azure "
            "deployment's RPM; every API request counts, a models list against each model "
            "(default: 0 = off).",
        )
        limits.add_argument(
            "--quota-tpm",
            type=_count,
            default=0,
            help="Tokens per window per (API key, model/deployment), charged when a chat "
            f"request arrives: prompt + max_tokens ({QUOTA_DEFAULT_MAX_TOKENS} when unset) "
            "(default: 0 = off).",
        )
        limits.add_argument(
            "--quota-window",
            type=_positive,
            default=60.0,
            metavar="SECONDS",
            help="The sliding window the quotas are counted over (default: %(default)s).",
        )
        limits.add_argument(
            "--retry-after-mode",
            choices=FAULT_CHOICES["retry_after_mode"],
            default="both",
            help="How every 429 says when to retry: both retry-after (seconds) and "
            "retry-after-ms, only one of them, retry-after as an HTTP date, or none "
            "(default: %(default)s).",
        )
        limits.add_argument(
            "--ratelimit-headers",
            choices=FAULT_CHOICES["ratelimit_headers"],
            default="real",
            help="x-ratelimit-* headers: real values, none at all, or -1 in every limit and "
            "remaining header (default: %(default)s).",
        )
        limits.add_argument(
            "--next-429",
            type=_count,
            default=0,
            metavar="N",
            help="Answer the next N chat requests 429 (with --retry-after), then serve "
            "normally (default: %(default)s).",
        )

        limits.add_argument(
            "--capacity",
            type=_count,
            default=0,
            help="Max concurrent chat requests; more get 429 with retry headers "
            "(default: 0 = unlimited).",
        )
        limits.add_argument(
            "--retry-after",
            type=_non_negative,
            default=1.0,
            metavar="SECONDS",
            help="Retry-After advertised on --capacity and --next-429 responses; quota 429s "
            "advertise the exact wait (default: %(default)s).",
        )

        faults = parser.add_argument_group("faults (fractions between 0 and 1)")
        faults.add_argument(
            "--error-rate",
            type=_rate,
            default=0.0,
            help="Fraction of chat requests answered with HTTP 500.",
        )
        faults.add_argument(
            "--reset-rate",
            type=_rate,
            default=0.0,
            help="Fraction of streams whose TCP connection is reset after a few chunks.",
        )
        faults.add_argument(
            "--stall-rate",
            type=_rate,
            default=0.0,
            help="Fraction of responses that stop sending mid-way for --stall-seconds.",
        )
        faults.add_argument(
            "--stall-seconds",
            type=_non_negative,
            default=30.0,
            help="How long a stalled response pauses (default: %(default)s).",
        )
        faults.add_argument(
            "--truncate-rate",
            type=_rate,
            default=0.0,
            help="Fraction of streams that end cleanly after a few chunks with no "
            "finish_reason, no usage and no [DONE], as a cut stream.",
        )
        faults.add_argument(
            "--malformed-rate",
            type=_rate,
            default=0.0,
            help="Fraction of streams that send one malformed SSE event, then end.",
        )
        faults.add_argument(
            "--empty-rate",
            type=_rate,
            default=0.0,
            help="Fraction of answers with no content at all (finish_reason stop).",
        )
        faults.add_argument(
            "--length-rate",
            type=_rate,
            default=0.0,
            help="Fraction of answers cut at half, with finish_reason length.",
        )
        faults.add_argument(
            "--content-filter-rate",
            type=_rate,
            default=0.0,
            help="Fraction of answers cut at a third, with finish_reason content_filter "
            "(as Azure's content filter does).",
        )
        faults.add_argument(
            "--no-usage",
            action="store_true",
            help="Never send token usage: streams ignore stream_options.include_usage and "
            "non-streamed answers carry usage: null.",
        )
        faults.add_argument(
            "--fault-model",
            default="",
            metavar="NAME",
            help="Apply every injected fault (--error-rate, --reset-rate, --stall-rate, "
            "--next-429 and the stream faults) only to this model/deployment "
            "(default: all).",
        )
        faults.add_argument(
            "--seed",
            type=int,
            default=0,
            help="Seed for fault draws, so a run can be reproduced (default: %(default)s).",
        )

        parser.add_argument(
            "--request-log",
            type=_count,
            default=0,
            metavar="N",
            help="Keep the last N chat requests (model, messages, traceparent, status, "
            "outcome) for GET /_simulator/requests, so tests can prove which calls were made "
            "(default: 0 = off).",
        )
        parser.add_argument(
            "--responder",
            metavar="DOTTED.PATH",
            default=getattr(settings, "LLM_SIMULATOR_RESPONDER", DEFAULT_RESPONDER),
            help="Function (ChatRequest) -> str producing completion text "
            "(default: settings.LLM_SIMULATOR_RESPONDER or %(default)s).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["ca_file"] and not options["tls"]:
            raise CommandError("--ca-file only makes sense together with --tls.")
        try:
            responder = import_string(options["responder"])
        except ImportError as exc:
            raise CommandError(f"Cannot import responder {options['responder']!r}: {exc}") from exc
        deployments = None
        if options["deployments"]:
            deployments = tuple(d.strip() for d in options["deployments"].split(",") if d.strip())
        config = SimulatorConfig(
            host=options["host"],
            port=options["port"],
            tls=options["tls"],
            ttft_ms=options["ttft_ms"],
            tokens_per_second=options["tokens_per_second"],
            rtt_ms=options["rtt_ms"],
            capacity=options["capacity"],
            retry_after_s=options["retry_after"],
            error_rate=options["error_rate"],
            reset_rate=options["reset_rate"],
            stall_rate=options["stall_rate"],
            stall_seconds=options["stall_seconds"],
            api_key=options["api_key"] or None,
            deployments=deployments,
            seed=options["seed"],
            keepalive_timeout_s=options["keepalive_timeout"],
            quota_rpm=options["quota_rpm"],
            quota_tpm=options["quota_tpm"],
            quota_window_s=options["quota_window"],
            ttft_per_request_ms=options["ttft_per_request_ms"],
            retry_after_mode=options["retry_after_mode"],
            ratelimit_headers=options["ratelimit_headers"],
            next_429=options["next_429"],
            fault_model=options["fault_model"],
            truncate_rate=options["truncate_rate"],
            malformed_rate=options["malformed_rate"],
            empty_rate=options["empty_rate"],
            length_rate=options["length_rate"],
            content_filter_rate=options["content_filter_rate"],
            no_usage=int(options["no_usage"]),
            request_log=options["request_log"],
        )
        try:
            asyncio.run(self._serve(LLMSimulator(config, responder), options["ca_file"]))
        except OSError as exc:
            raise CommandError(f"Cannot start the LLM simulator: {exc}") from exc

    async def _serve(self, sim: LLMSimulator, ca_file: str | None) -> None:
        """Serve until SIGINT/SIGTERM, then stop cleanly so the exit status is 0."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await sim.start()
        try:
            if ca_file:
                await asyncio.to_thread(sim.write_ca_pem, ca_file)
                sys.stderr.write(f"CA certificate written to {ca_file}\n")
            self.stdout.write(f"LLM simulator listening on {sim.base_url}")
            self.stdout.flush()
            await stop.wait()
        finally:
            await sim.stop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
