"""What the server commands share (not a command itself): the options of those that read a
running server's /health, and of those that start the offline simulator."""

from __future__ import annotations

from django.core.management.base import CommandParser

DEFAULT_URL = "http://127.0.0.1:8000"


def add_server_arguments(parser: CommandParser, url_role: str = "") -> None:
    """`--url` of the running server (with `url_role`, what else the URL is used as) and
    `--timeout` for its /health."""
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"Base URL of the running Carlos server (default {DEFAULT_URL}){url_role}. "
        "A `serve --workers N` answers each connection from one of its workers, so /health "
        "describes that worker only (pool_status --cluster shows them all).",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="Seconds to wait for /health (default 5)."
    )


def add_simulator_arguments(parser: CommandParser) -> None:
    """`--no-simulator` and `--simulator-args`, for the commands that serve (`serve`,
    `runserver`) and start the simulator when no endpoint is configured."""
    parser.add_argument(
        "--no-simulator",
        action="store_true",
        help="Do not start the offline simulator even when no endpoint is configured "
        "(use when one already runs, e.g. `manage.py llm_simulator` in another shell).",
    )
    parser.add_argument(
        "--simulator-args",
        default="--ttft-ms 120 --tokens-per-second 400",
        help="Extra arguments for the simulator it starts (default: realistic pacing).",
    )
