"""What `manage.py loadtest` and `manage.py loginstorm` do around their run, written once:
options refused before anything starts, progress on stderr, failures and Ctrl-C as a
CommandError (the children are stopped by then), the report as a table or JSON, and
`--check`'s exit status."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from carlos.loadtest.options import LoadTestError
from carlos.processes import ChildFailed

type Progress = Callable[[str], None]
# One command-line option: flag, type (None: a switch, off by default), default, metavar, help.
type Option = tuple[str, type | None, Any, str | None, str]
# The options `measure` reads, last in each command's table.
REPORT_OPTIONS: tuple[Option, ...] = (
    ("--json", None, False, None, "Print the report as JSON."),
    ("--check", None, False, None, "Exit with status 1 when a target is missed (for scripts)."),
)


def add_options(parser: Any, options: Iterable[Option]) -> None:
    """Options from a table, onto a parser or one of its argument groups, in order."""
    for flag, kind, default, metavar, text in options:
        if kind is None:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)


def options_from(kind: type[Any], given: dict[str, Any]) -> Any:
    """`kind` (a dataclass of run options) from the command's parsed options, validated;
    CommandError naming every value that makes no sense."""
    names = [field.name for field in dataclasses.fields(kind)]
    try:
        return kind(**{name: given[name] for name in names}).validated()
    except LoadTestError as exc:
        raise CommandError(str(exc)) from exc


def measure[O](
    command: BaseCommand,
    given: dict[str, Any],
    settings: O,
    run: Callable[[O, Progress], Coroutine[Any, Any, dict[str, Any]]],
    format_report: Callable[[dict[str, Any]], str],
) -> None:
    """Run, then print the report; with --check, exit 1 when a target is missed."""
    name = command.__module__.rpartition(".")[2]

    def progress(line: str) -> None:
        if given["verbosity"] > 0:
            command.stderr.write(f"{name}: {line}")
            command.stderr.flush()

    try:
        report = asyncio.run(run(settings, progress))
    except (LoadTestError, ChildFailed) as exc:
        raise CommandError(str(exc)) from exc
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise CommandError("interrupted; every child process was stopped") from None
    command.stdout.write(json.dumps(report, indent=2) if given["json"] else format_report(report))
    if given["check"] and not report["met"]:
        sys.exit(1)
