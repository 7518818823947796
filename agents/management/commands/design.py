"""`manage.py design "request"`: run the whole design pipeline from the command line.

The same pipeline as the web pages, with a line per agent as it starts and finishes (its
timing and pool), then the result as a readable report or one JSON document. With no LLM
endpoint configured it starts the offline simulator in-process, so it works standalone.
Telemetry is exported as by the server, when the environment says where (carlos.telemetry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, TextIO

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from agents.events import (
    AgentFinished,
    AgentStarted,
    DesignStatus,
    Event,
    agent_label,
    design_group,
    from_json,
)
from agents.forms import DesignRequestForm
from agents.models import AgentRun, Design
from agents.options import DEFAULT_OPTIONS, OPTION_FIELDS
from agents.pipeline import create_design
from agents.simulated import in_process_endpoint
from agents.specs import Stage, only_in_stage, registered, spec_for
from agents.tasks import run_here
from agents.terraform import deployment_steps, split_terraform
from carlos import telemetry
from pools.runtime import get_pool
from pools.simulator import SimulatorConfig

CLI_USERNAME = "cli"
# The pacing `manage.py serve` gives its simulator: output arrives like a real model's.
SIMULATOR_PACING = {"ttft_ms": 120.0, "tokens_per_second": 400.0}


def validated_request(text: str) -> str:
    """The request under the web form's rules: not blank, no NUL, at most DESIGN_MAX_CHARS.

    A script must not store what the page would refuse, nor run nine agents on a megabyte of
    text. Bytes the shell could not decode arrive as lone surrogates and are refused too,
    before anything (even the default owner) is created.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CommandError(
            "The request is not valid UTF-8 text; check the encoding of the terminal or file."
        ) from None
    form = DesignRequestForm({"request_text": text, **DEFAULT_OPTIONS})
    if not form.is_valid():
        errors = form.errors.get("request_text") or form.errors.as_text().splitlines()
        raise CommandError(" ".join(errors))
    return form.cleaned_data["request_text"]


class Command(BaseCommand):
    help = (
        "Design a cloud architecture for REQUEST with the full agent team (requirements, "
        "Carlos and Ronei, three analysts, auditor, recommender, Terraform) and print the "
        "result. Each agent's start and finish is shown with its timing and pool. Without an "
        "LLM endpoint configured, an in-process offline simulator answers."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("request", help="What to design, in plain words.")
        for key, (label, choices) in OPTION_FIELDS.items():
            parser.add_argument(
                f"--{key}",
                choices=choices.values,
                # argparse formats help with %, and labels such as "99.5-99.9%" contain one.
                help=f"{label}: "
                + ", ".join(f"{c.value} ({c.label})" for c in choices).replace("%", "%%"),
            )
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")
        parser.add_argument("--output", metavar="FILE", help="Write the result to FILE.")
        parser.add_argument(
            "--user",
            metavar="NAME",
            help="Owner of the design (an existing user). Default: the first superuser, "
            f"else a '{CLI_USERNAME}' user created on demand.",
        )
        parser.add_argument(
            "--no-simulator",
            action="store_true",
            help="Use the simulator already running at LLM_SIMULATOR_URL (e.g. `manage.py "
            "llm_simulator`) instead of starting one in-process.",
        )
        parser.add_argument(
            "--fast",
            action="store_true",
            help="With the in-process simulator, answer without pacing (for scripts and tests).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if Design._meta.db_table not in connection.introspection.table_names():
            raise CommandError("The database has no design tables: run `manage.py migrate` first.")
        request_text = validated_request(options["request"])
        owner = self._owner(options["user"])
        chosen = {key: options[key] for key in OPTION_FIELDS if options[key]}
        progress = self.stderr if options["json"] else self.stdout
        progress.style_func = None  # progress lines are information, not errors
        telemetry.setup(instance=get_pool().instance)  # when OTEL_* / Application Insights say
        try:
            design = async_to_sync(self._run)(owner, request_text, chosen, options, progress)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            telemetry.shutdown()  # the design's trace sent, within a bound
        runs = list(AgentRun.objects.filter(design=design).order_by("id"))
        if options["json"]:
            result = json.dumps(design_document(design, runs), indent=2, ensure_ascii=False)
        else:
            result = design_report(design, runs)
        if options["output"]:
            Path(options["output"]).write_text(result + "\n", encoding="utf-8")
            progress.write(f"Saved to {options['output']}\n")
        else:
            self.stdout.write(result)
        if design.status != Design.Status.SUCCEEDED:
            raise CommandError(
                f"design #{design.pk} {design.status}"
                + (f" at {agent_label(design.failed_agent)}" if design.failed_agent else "")
                + (f": {design.error}" if design.error else "")
            )

    def _owner(self, username: str | None) -> Any:
        users = get_user_model()
        if username:
            try:
                return users.objects.get(**{users.USERNAME_FIELD: username})
            except users.DoesNotExist as exc:
                raise CommandError(
                    f"No user named {username!r}; create it first or omit --user."
                ) from exc
        superuser = users.objects.filter(is_superuser=True, is_active=True).order_by("pk").first()
        if superuser is not None:
            return superuser
        user, created = users.objects.get_or_create(**{users.USERNAME_FIELD: CLI_USERNAME})
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        return user

    async def _run(
        self,
        owner: Any,
        request_text: str,
        chosen: dict[str, str],
        options: dict[str, Any],
        progress: TextIO,
    ) -> Design:
        """Warm the pools, run one design with live progress, close the pools: one loop."""
        design = await create_design(owner, request_text, chosen)
        async with contextlib.AsyncExitStack() as stack:
            if get_pool().config.endpoint.kind == "simulator" and not options["no_simulator"]:
                pacing = {} if options["fast"] else SIMULATOR_PACING
                simulator = await stack.enter_async_context(
                    in_process_endpoint(SimulatorConfig(**pacing))
                )
                progress.write(
                    f"🤖 No LLM endpoint configured: offline simulator at {simulator.base_url}\n"
                )
            pool = get_pool()
            await pool.initialize()
            try:
                progress.write(f"Design #{design.pk}: {design.title}\n")
                printer = ProgressPrinter(progress)
                await printer.follow(design.pk)
                try:
                    await run_here(design.pk)  # its lease renewed while it runs
                finally:
                    await printer.stop()
            finally:
                await pool.close()
        return await Design.objects.aget(pk=design.pk)


class ProgressPrinter:
    """Prints a line as each agent starts and finishes, from the design's live events."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.layer = get_channel_layer()
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    async def follow(self, design_id: int) -> None:
        if self.layer is None:
            return
        channel = await self.layer.new_channel()
        await self.layer.group_add(design_group(design_id), channel)
        self._task = asyncio.create_task(self._print(channel))

    async def stop(self) -> None:
        """Let the last events print, then stop listening."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout=2)

    async def _print(self, channel: str) -> None:
        while True:
            event = from_json((await self.layer.receive(channel))["event"])
            line = self.describe(event)
            if line:
                self.out.write(line + "\n")
                self.out.flush()
            if isinstance(event, DesignStatus) and event.terminal:
                return

    def describe(self, event: Event) -> str | None:
        clock = f"[{time.monotonic() - self._started:6.1f}s]"
        if isinstance(event, AgentStarted):
            return f"{clock} ▶ {_agent_name(event)} started on pool {event.pool} ({event.model})"
        if isinstance(event, AgentFinished):
            mark = "✔" if event.status == AgentRun.Status.SUCCEEDED else "✘"
            line = (
                f"{clock} {mark} {_agent_name(event)} {event.status} in "
                f"{_seconds(event.duration_ms)} (ttft {_ms(event.ttft_ms)}, wait "
                f"{_ms(event.wait_ms)}, pool {event.pool}"
                + (", overflow" if event.overflow else "")
                + f", tokens {event.tokens_in}→{event.tokens_out})"
            )
            return line + (f": {event.error}" if event.error else "")
        if isinstance(event, DesignStatus) and event.terminal:
            details = [f"verdict {event.verdict}"] if event.verdict else []
            if event.recommendation:
                details.append(f"recommendation {event.recommendation}")
            if event.error:
                details.append(event.error)
            return f"{clock} ■ design {event.status}" + (
                f" ({'; '.join(details)})" if details else ""
            )
        return None


def _agent_name(event: AgentStarted | AgentFinished) -> str:
    name = spec_for(event.agent).label
    return name + (f" (round {event.round})" if event.round else "")


def _seconds(ms: float | None) -> str:
    return "?" if ms is None else f"{ms / 1000:.2f} s"


def _ms(ms: float | None) -> str:
    return "?" if ms is None else f"{ms:.0f} ms"


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def design_document(design: Design, runs: list[AgentRun]) -> dict[str, Any]:
    """Everything about one design as JSON-ready data: fields, every run, the outputs."""
    current = [run for run in runs if run.attempt == design.attempts]
    terraform_agent = only_in_stage(Stage.TERRAFORM).key
    terraform = next(
        (r for r in reversed(current) if r.agent == terraform_agent and r.status == "succeeded"),
        None,
    )
    return {
        "design": {
            "id": design.pk,
            "owner": design.owner.get_username(),
            "request_text": design.request_text,
            "options": design.options,
            "clarifications": design.clarifications,
            "status": design.status,
            "verdict": design.verdict,
            "recommendation": design.recommendation,
            "revisions": design.revisions,
            "attempts": design.attempts,
            "error": design.error,
            "failed_agent": design.failed_agent,
            "created_at": _iso(design.created_at),
            "started_at": _iso(design.started_at),
            "finished_at": _iso(design.finished_at),
        },
        "runs": [
            {
                "agent": run.agent,
                "round": run.round,
                "attempt": run.attempt,
                "pool": run.pool,
                "model": run.model,
                "temperature": run.temperature,
                "status": run.status,
                "started_at": _iso(run.started_at),
                "finished_at": _iso(run.finished_at),
                "duration_ms": run.duration_ms,
                "ttft_ms": run.ttft_ms,
                "wait_ms": run.wait_ms,
                "overflow": run.overflow,
                "tokens_in": run.tokens_in,
                "tokens_out": run.tokens_out,
                "error": run.error,
                "json_error": run.json_error,
                "output_text": run.output_text,
                "output_json": run.output_json,
            }
            for run in runs
        ],
        "terraform_files": split_terraform(terraform.output_text) if terraform else {},
    }


def design_report(design: Design, runs: list[AgentRun]) -> str:
    """A readable markdown report: the status line, then each agent's final output."""
    latest: dict[str, AgentRun] = {}
    for run in runs:
        if run.attempt == design.attempts and run.status == AgentRun.Status.SUCCEEDED:
            latest[run.agent] = run
    lines = [f"# Design #{design.pk}: {design.title}", ""]
    summary = [f"status {design.status}"]
    if design.verdict:
        summary.append(f"verdict {design.verdict}")
    if design.recommendation:
        summary.append(f"recommendation {design.recommendation}")
    summary.append(f"revisions {design.revisions}")
    lines.append(" · ".join(summary))
    if design.error:
        where = agent_label(design.failed_agent) if design.failed_agent else "pipeline"
        lines.append(f"Error ({where}): {design.error}")
    for spec in registered():
        run = latest.get(spec.key)
        if run is None:
            continue
        title = spec.label + (f" (round {run.round})" if run.round else "")
        lines += ["", f"## {title}", ""]
        if run.output_json is not None:
            lines += ["```json", json.dumps(run.output_json, indent=2), "```"]
        else:
            if run.json_error:
                lines.append(f"(invalid JSON: {run.json_error})")
            lines.append(run.output_text.strip())
    terraform = latest.get(only_in_stage(Stage.TERRAFORM).key)
    if terraform is not None:
        files = split_terraform(terraform.output_text)
        steps = deployment_steps(terraform.output_text)
        lines += ["", f"Terraform files: {', '.join(files) or 'none found'}"]
        if steps:
            lines.append(f"Deployment steps: {len(steps.splitlines())} lines")
    return "\n".join(lines)
