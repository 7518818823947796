"""`manage.py loginstorm`: hundreds of wrong-password logins while a logged-in user reads pages.

Why: every login hashes a password, and a storm of wrong ones must not slow another user's
pages. The command builds its own world on loopback (a throwaway SQLite database, `manage.py
serve` and a page user timing pages in child processes), sends the storm and prints the
figures; the work is in `carlos.loadtest.storm`.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from carlos.loadtest.command import REPORT_OPTIONS, Option, add_options, measure, options_from
from carlos.loadtest.storm import MAX_ADDRESSES, StormOptions, format_report, run_storm

DEFAULTS = StormOptions()
OPTIONS: tuple[Option, ...] = (
    ("--logins", int, DEFAULTS.logins, None, "Wrong logins sent at once."),
    (
        "--accounts",
        int,
        DEFAULTS.accounts,
        None,
        "Accounts they target, in turn (1: one account stormed; = --logins: each login a "
        "different account, so no account lockout helps).",
    ),
    (
        "--addresses",
        int,
        DEFAULTS.addresses,
        None,
        f"Loopback addresses they come from, in turn (127.0.0.2 and up, at most "
        f"{MAX_ADDRESSES}; many: no address lockout helps either).",
    ),
    ("--calm", float, DEFAULTS.calm, "SECONDS", "Pages timed before the storm, for comparison."),
    (
        "--page-interval",
        float,
        DEFAULTS.page_interval,
        "SECONDS",
        "Time between the logged-in user's page loads (/designs/ and / in turn).",
    ),
    ("--timeout", float, DEFAULTS.timeout, None, "Bound on one login."),
    ("--host", str, DEFAULTS.host, None, "Loopback address to serve on."),
    (
        "--storm-nice",
        int,
        DEFAULTS.storm_nice,
        "N",
        "CPU priority (nice, 0-19) of the storm's sender, which stands in for attackers on "
        "other machines: above 0 its CPU does not preempt the server measured here (default "
        "0: the same priority).",
    ),
    ("--keep", None, False, None, "Keep the database and logs."),
    *REPORT_OPTIONS,
)


class Command(BaseCommand):
    help = (
        "Measure a login storm on loopback: start a server (`manage.py serve`) on a throwaway "
        "SQLite database, log a user in and time their pages from a separate process, send "
        "N wrong-password logins at once, and report the user's page p50/p99 before and "
        "during the storm with the storm's answers (429 throttled, 401 wrong password)."
    )
    requires_system_checks: list[str] = []  # it checks the world it starts, not this shell

    def add_arguments(self, parser: CommandParser) -> None:
        add_options(parser, OPTIONS)

    def handle(self, *args: Any, **options: Any) -> None:
        settings = options_from(StormOptions, options)
        measure(self, options, settings, run_storm, format_report)
