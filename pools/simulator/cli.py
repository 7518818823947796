"""The simulator's command line: `python -m pools.simulator` and `manage.py llm_simulator`.

Why one parser for both: the Django command only adds the project's settings as defaults,
so the flags, their checks and the serving loop are written once, here, without Django.
"""

import argparse
import asyncio
import importlib
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from pools.simulator.config import FAULT_CHOICES, QUOTA_DEFAULT_MAX_TOKENS, SimulatorConfig
from pools.simulator.responders import Responder
from pools.simulator.server import LLMSimulator

__all__ = [
    "DEFAULT_RESPONDER",
    "Defaults",
    "UsageError",
    "add_arguments",
    "config_from_options",
    "description",
    "load_responder",
    "main",
    "run",
]

DEFAULT_RESPONDER = "pools.simulator.responders.default_responder"


class UsageError(Exception):
    """Flags that parse but make no sense together, or cannot be acted on."""


@dataclass(frozen=True)
class Defaults:
    """Where the listening address and the responder come from when no flag says."""

    host: str = "127.0.0.1"
    port: int = 8765
    responder: str = DEFAULT_RESPONDER
    source: str = ""  # what the help names as their origin, e.g. "settings.LLM_SIMULATOR_"


def description(prog: str) -> str:
    return (
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
        f"slightly flaky model: {prog} --ttft-ms 400 --tokens-per-second 30 "
        "--error-rate 0.05 --reset-rate 0.02. Example, an Azure S0 deployment: "
        f"{prog} --quota-rpm 60 --quota-tpm 10000"
    )


# --- value checks ---------------------------------------------------------------------------


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


# --- the flags ------------------------------------------------------------------------------

# Latency flags: each a number >= 0, 0 by default.
_LATENCY = {
    "--ttft-ms": "Time to first token in milliseconds (default: %(default)s).",
    "--tokens-per-second": "Streaming pace; 0 sends tokens as fast as possible "
    "(default: %(default)s).",
    "--rtt-ms": "Emulated network round trip, added per new connection (twice with TLS) and "
    "per request (default: %(default)s).",
    "--ttft-per-request-ms": "Added to the time to first token for every other chat request "
    "already in flight when one arrives, so latency rises with concurrency "
    "(default: %(default)s).",
}

# Fault rates: each a fraction between 0 and 1, 0 by default.
_RATES = {
    "--error-rate": "Fraction of chat requests answered with HTTP 500.",
    "--reset-rate": "Fraction of streams whose TCP connection is reset after a few chunks.",
    "--stall-rate": "Fraction of responses that stop sending mid-way for --stall-seconds.",
    "--truncate-rate": "Fraction of streams that end cleanly after a few chunks with no "
    "finish_reason, no usage and no [DONE], as a cut stream.",
    "--malformed-rate": "Fraction of streams that send one malformed SSE event, then end.",
    "--empty-rate": "Fraction of answers with no content at all (finish_reason stop).",
    "--length-rate": "Fraction of answers cut at half, with finish_reason length.",
    "--content-filter-rate": "Fraction of answers cut at a third, with finish_reason "
    "content_filter (as Azure's content filter does).",
}

# Options whose name differs from the SimulatorConfig field they set.
_FIELD_OF_OPTION = {
    "retry_after": "retry_after_s",
    "keepalive_timeout": "keepalive_timeout_s",
    "quota_window": "quota_window_s",
}


def add_arguments(parser: argparse.ArgumentParser, defaults: Defaults = Defaults()) -> None:
    """Every flag of the simulator, in the groups `--help` shows."""
    source = defaults.source
    net = parser.add_argument_group("listening")
    net.add_argument(
        "--host",
        default=defaults.host,
        help=f"Address to bind (default: {f'{source}HOST, ' if source else ''}%(default)s).",
    )
    net.add_argument(
        "--port",
        type=_count,
        default=defaults.port,
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
    for flag, text in _LATENCY.items():
        timing.add_argument(flag, type=_non_negative, default=0.0, help=text)

    _add_rate_limits(parser.add_argument_group("rate limits and 429s"))

    faults = parser.add_argument_group("faults (fractions between 0 and 1)")
    for flag, text in _RATES.items():
        faults.add_argument(flag, type=_rate, default=0.0, help=text)
    faults.add_argument(
        "--stall-seconds",
        type=_non_negative,
        default=30.0,
        help="How long a stalled response pauses (default: %(default)s).",
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
        "--next-429 and the stream faults) only to this model/deployment (default: all).",
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
        default=defaults.responder,
        help="Function (ChatRequest) -> str producing completion text (default: "
        f"{f'{source}RESPONDER or ' if source else ''}%(default)s).",
    )


def _add_rate_limits(limits: Any) -> None:
    """The quota, capacity and 429 flags (an argparse argument group)."""
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


# --- from flags to a running simulator ------------------------------------------------------


def config_from_options(options: Mapping[str, Any]) -> SimulatorConfig:
    """The SimulatorConfig the parsed flags describe (other options are ignored)."""
    names = {field.name for field in fields(SimulatorConfig)}
    values = {_FIELD_OF_OPTION.get(key, key): value for key, value in options.items()}
    values = {key: value for key, value in values.items() if key in names}
    deployments = values["deployments"]
    if deployments:
        values["deployments"] = tuple(d.strip() for d in deployments.split(",") if d.strip())
    else:
        values["deployments"] = None
    values["api_key"] = values["api_key"] or None
    values["no_usage"] = int(values["no_usage"])
    return SimulatorConfig(**values)


def load_responder(path: str) -> Responder:
    """The function at dotted `path`; ImportError if there is none."""
    module_path, _, name = path.rpartition(".")
    if not module_path:
        raise ImportError(f"{path} doesn't look like a module path")
    module = importlib.import_module(module_path)
    try:
        return getattr(module, name)
    except AttributeError as exc:
        raise ImportError(f'Module "{module_path}" does not define a "{name}" attribute') from exc


def run(options: Mapping[str, Any], announce: Callable[[str], None]) -> None:
    """Serve as the parsed flags say until SIGINT/SIGTERM; UsageError says why not."""
    if options["ca_file"] and not options["tls"]:
        raise UsageError("--ca-file only makes sense together with --tls.")
    try:
        responder = load_responder(options["responder"])
    except ImportError as exc:
        raise UsageError(f"Cannot import responder {options['responder']!r}: {exc}") from exc
    simulator = LLMSimulator(config_from_options(options), responder)
    try:
        asyncio.run(_serve(simulator, options["ca_file"], announce))
    except OSError as exc:
        raise UsageError(f"Cannot start the LLM simulator: {exc}") from exc


async def _serve(sim: LLMSimulator, ca_file: str | None, announce: Callable[[str], None]) -> None:
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
        announce(f"LLM simulator listening on {sim.base_url}")
        await stop.wait()
    finally:
        await sim.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None, prog: str = "python -m pools.simulator") -> None:
    """`python -m pools.simulator [flags]`: the simulator with no Django at all."""
    parser = argparse.ArgumentParser(prog=prog, description=description(prog))
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        run(options, lambda line: print(line, flush=True))
    except UsageError as exc:
        parser.exit(1, f"{prog}: error: {exc}\n")
