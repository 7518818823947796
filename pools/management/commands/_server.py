"""What the commands that read a running server's /health share (not a command itself)."""

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
