"""The web pages: request a design, watch it live, download the results (history: agents.history).

Every view is async, and a page reads what it shows in one round on its request's database
thread (`_read_seen`, `allowance`: each hop to a thread waits for a turn of the event loop
that also carries the live feeds, so a page makes as few as it can), so a slow database or a
long list never holds that loop. Templates only receive data that is already loaded (lists,
dicts, model instances without lazy relations) for the same reason.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import weakref
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import aget_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from agents import leases, tasks
from agents.access import login_required, may_act_on, may_delete, may_view
from agents.capacity import Busy, busy_from, busy_response, pools_busy
from agents.events import (
    AGENT_STATE_TEXT,
    LiveProgress,
    as_json,
    design_state,
    live_progress,
    run_state,
)
from agents.forms import ClarificationForm, DesignRequestForm, design_max_chars
from agents.models import AgentRun, Design, DesignRetry
from agents.options import OPTION_FIELDS, option_label
from agents.pipeline import POOL_REFUSALS, DesignNotRunnable, ask_clarifying_questions
from agents.progress import stage_estimates
from agents.rendering import present_run
from agents.specs import Stage, only_in_stage, registered
from agents.terraform import split_terraform
from carlos.admission import outside_the_gate
from carlos.serving import llm_loop

logger = logging.getLogger("agents")

DEFAULT_DESIGNS_PER_HOUR = 10
RATE_WINDOW = timedelta(hours=1)
# Serialises each user's "check the limit, then create or retry" so two quick POSTs cannot
# both pass.
_submission_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

RETRYABLE = frozenset(tasks.RETRYABLE_STATUSES)
CANCELLABLE = frozenset(tasks.CANCELLABLE_STATUSES)
# What the design forms are posted as; anything else Django would read as an empty form.
FORM_CONTENT_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


async def _current_user(request: HttpRequest) -> AbstractBaseUser | AnonymousUser:
    """The user, loaded with the async API; templates then read it without a sync query."""
    user = await request.auser()
    request.user = user
    return user


@dataclass(frozen=True)
class Seen:
    """A design this user may see, read in one database round with what its views ask of it:
    each async ORM call is a hop to a thread and back, and each hop waits for a turn of an
    event loop that, under load, also carries hundreds of live feeds."""

    design: Design
    may_act: bool
    may_delete: bool
    runs: list[AgentRun]  # in start order; empty unless asked for
    queue_place: int | None  # None unless asked for, or not queued


@sync_to_async
def _read_seen(user: AbstractBaseUser | AnonymousUser, design_id: int, *, page: bool) -> Seen:
    design = Design.objects.select_related("owner").filter(pk=design_id).first()
    if design is None or not may_view(user, design):
        raise Http404("No Design matches the given query.")  # existing or not, as Django's
    return Seen(
        design,
        may_act=may_act_on(user, design),
        may_delete=may_delete(user, design),
        runs=_current_runs(design) if page else [],
        queue_place=leases.place_in_queue(design) if page else None,
    )


async def _visible_design(request: HttpRequest, design_id: int, *, page: bool = False) -> Seen:
    """The design if this user may see it (see agents.access); 404 otherwise, existing or not.
    With `page`, also its runs and its place in the queue, for its page."""
    user = await _current_user(request)
    return await _read_seen(user, design_id, page=page)


def _unreadable_form(request: HttpRequest) -> tuple[int, str] | None:
    """Why a POST cannot be read as a form, as (status, message), or None if it can.

    Django reads another content type as an empty form, and bytes that are not valid in the
    form's charset as Latin-1 or U+FFFD, without a word: the user would be told the request
    is empty, or get a design of garbled text. Say what is wrong instead.
    """
    if request.content_type not in FORM_CONTENT_TYPES:
        return 415, "Send the form as application/x-www-form-urlencoded or multipart/form-data."
    if request.content_type == "application/x-www-form-urlencoded":
        encoding = request.encoding or settings.DEFAULT_CHARSET
        try:
            parse_qsl(
                request.body.decode(encoding),
                keep_blank_values=True,
                encoding=encoding,
                errors="strict",
            )
        except (UnicodeDecodeError, LookupError):
            return 400, (
                f"The form data is not valid {encoding} text, so it cannot be read safely. "
                "Please type or paste your text again."
            )
    return None


# --- rate limit -----------------------------------------------------------------------------


def designs_per_hour() -> int:
    return max(1, int(getattr(settings, "DESIGNS_PER_HOUR", DEFAULT_DESIGNS_PER_HOUR)))


@dataclass(frozen=True)
class Allowance:
    """A user's attempts in the last hour against DESIGNS_PER_HOUR.

    Every attempt counts: a new design (its `created_at`) and each retry (a `DesignRetry`),
    since a retry runs every agent again and costs as many model calls.
    """

    used: int
    limit: int
    next_at: datetime | None  # when one more attempt fits, if none does now


def _submission_lock(user_id: int) -> asyncio.Lock:
    return _submission_locks.setdefault(user_id, asyncio.Lock())


@sync_to_async
def allowance(user_id: int) -> Allowance:
    """What this user has used of the hour, in one database round (a hop to a thread). The
    window slides: each attempt inside the last hour frees its place an hour after it was
    made."""
    limit = designs_per_hour()
    since = timezone.now() - RATE_WINDOW
    designs = Design.objects.filter(owner_id=user_id, created_at__gt=since)
    retries = DesignRetry.objects.filter(requested_by_id=user_id, requested_at__gt=since)
    used = designs.count() + retries.count()
    if used < limit:
        return Allowance(used, limit, None)
    # Once the (used - limit + 1) oldest attempts have left the window, one more fits; they
    # are among as many of the oldest new designs and the oldest retries.
    leaving = used - limit + 1
    created = designs.order_by("created_at").values_list("created_at", flat=True)
    retried = retries.order_by("requested_at").values_list("requested_at", flat=True)
    oldest = sorted([*created[:leaving], *retried[:leaving]])
    return Allowance(used, limit, oldest[leaving - 1] + RATE_WINDOW)


def _wait_text(when: datetime) -> str:
    minutes = max(1, round((when - timezone.now()).total_seconds() / 60))
    return f"in about {minutes} minute{'s' if minutes != 1 else ''}"


# --- new design -----------------------------------------------------------------------------


def _allowance_context(quota: Allowance) -> dict[str, Any]:
    """What the form and the rate-limit notice say about the hour's allowance."""
    return {
        "allowance": quota,
        "retry_at": quota.next_at,
        "retry_in": _wait_text(quota.next_at) if quota.next_at else "",
        "designs_per_hour": quota.limit,
    }


def _rate_limited(response: HttpResponse, quota: Allowance) -> HttpResponse:
    """The 429's Retry-After: whole seconds until the next attempt fits."""
    if quota.next_at is not None:
        seconds = max(1, int((quota.next_at - timezone.now()).total_seconds()) + 1)
        response["Retry-After"] = str(seconds)
    return response


@functools.lru_cache(maxsize=4)
def _blank_form_fields(max_chars: int) -> str:
    """The fields of an unbound form with this length limit (the only setting they show)."""
    return render_to_string("agents/_design_form_fields.html", {"form": DesignRequestForm()})


def _form_page(
    request: HttpRequest,
    form: DesignRequestForm,
    *,
    quota: Allowance,
    status: int = 200,
    busy: Busy | None = None,
    problem: str = "",
) -> HttpResponse:
    context = {
        "form": form,
        # An unbound form's fields are the same for everyone: rendered once (the widgets are
        # most of the page's rendering time).
        "blank_fields": "" if form.is_bound else _blank_form_fields(design_max_chars()),
        "nav": "new",
        **_allowance_context(quota),
        "busy": busy,
        "problem": problem,
    }
    response = render(request, "agents/new_design.html", context, status=status)
    if status == 429:
        _rate_limited(response, quota)
    return busy_response(response, busy)


@login_required
@require_http_methods(["GET", "POST"])
async def new_design(request: HttpRequest) -> HttpResponse:
    """The request form; on a valid POST, create the design and start (or question) it."""
    user = await _current_user(request)
    if request.method == "GET":
        return _form_page(request, DesignRequestForm(), quota=await allowance(user.pk))
    if problem := _unreadable_form(request):
        status, message = problem
        form = DesignRequestForm(request.POST or None)
        quota = await allowance(user.pk)
        return _form_page(request, form, quota=quota, status=status, problem=message)
    form = DesignRequestForm(request.POST)
    if not form.is_valid():
        return _form_page(request, form, quota=await allowance(user.pk), status=400)
    async with _submission_lock(user.pk):
        quota = await allowance(user.pk)
        if quota.next_at is not None:
            return _form_page(request, form, quota=quota, status=429)
        if busy := await pools_busy(request):
            return _form_page(request, form, quota=quota, status=503, busy=busy)
        design = await Design.objects.acreate(
            owner_id=user.pk,
            request_text=form.cleaned_data["request_text"],
            options=form.options(),
            **leases.held_by(leases.this_instance()),  # nobody else starts it meanwhile
        )
    if form.cleaned_data["ask_questions"]:
        try:
            # On the LLM loop, like every model call; out of the page gate's line meanwhile.
            async with outside_the_gate(request.scope):
                questions = await llm_loop().run(ask_clarifying_questions(design.pk))
        except POOL_REFUSALS as exc:
            # Nothing ran yet: withdraw the design; the user keeps the form to send again.
            await Design.objects.filter(pk=design.pk).adelete()
            quota = await allowance(user.pk)
            return _form_page(request, form, quota=quota, status=503, busy=busy_from(exc))
        if questions:
            return redirect("design-detail", design_id=design.pk)
    # No questions wanted, or none came (the analyst had none or failed): run as asked.
    tasks.start_design(design.pk)
    return redirect("design-detail", design_id=design.pk)


# --- design page ----------------------------------------------------------------------------


@dataclass
class Tab:
    """One agent's tab: its latest run (any state) and its latest successful output."""

    agent: str
    label: str
    title: str
    run: AgentRun | None
    output: AgentRun | None
    presented: dict[str, Any] | None

    @property
    def state(self) -> str:
        if self.run is None:
            return "pending"
        return self.run.status

    @property
    def state_text(self) -> str:
        """The state in words, beside its coloured dot."""
        return AGENT_STATE_TEXT.get(self.state, self.state)


def _current_runs(design: Design) -> list[AgentRun]:
    """Every run of the design, in start order: a resume re-uses the finished ones, and the
    stopped or failed ones before it stay on the record."""
    return list(design.runs.order_by("id"))


_read_runs = sync_to_async(_current_runs)


def _tabs(runs: list[AgentRun]) -> list[Tab]:
    latest: dict[str, AgentRun] = {}
    succeeded: dict[str, AgentRun] = {}
    for run in runs:  # ordered by id, so the last one seen wins
        latest[run.agent] = run
        if run.status == AgentRun.Status.SUCCEEDED:
            succeeded[run.agent] = run
    tabs = []
    for spec in registered():
        output = succeeded.get(spec.key)
        tabs.append(
            Tab(
                agent=spec.key,
                label=spec.tab,
                title=spec.label,
                run=latest.get(spec.key),
                output=output,
                presented=present_run(output) if output else None,
            )
        )
    return tabs


def _option_rows(design: Design) -> list[tuple[str, str]]:
    rows = []
    for key, (label, _choices) in OPTION_FIELDS.items():
        value = design.options.get(key)
        if value:
            try:
                rows.append((label, option_label(key, value)))
            except ValueError:  # an option retired since this design was made
                rows.append((label, str(value)))
    return rows


def _design_page(
    request: HttpRequest,
    design: Design,
    runs: list[AgentRun],
    *,
    can_act: bool,
    answers_form: ClarificationForm | None = None,
    status: int = 200,
    busy: Busy | None = None,
    problem: str = "",
    quota: Allowance | None = None,
    queue_place: int | None = None,
    progress: LiveProgress | None = None,
) -> HttpResponse:
    """The design's page; the answer form and the retry, cancel and delete buttons only for
    who may act on it. Without `progress`, the bar and the timeline come with the live feed."""
    questions = [item["question"] for item in design.clarifications]
    awaiting = design.status == Design.Status.AWAITING_ANSWERS
    if answers_form is None and awaiting and can_act:
        answers_form = ClarificationForm(questions)
    state = design_state(design, queue_place)
    page_data = {
        "id": design.pk,
        "terminal": state.terminal,
        "socket": f"/ws/designs/{design.pk}/",
        "runs": f"/designs/{design.pk}/runs/",
        "state_text": AGENT_STATE_TEXT,
    }
    context = {
        "design": design,
        "state": state,
        "runs": [run_state(run) for run in runs],
        "tabs": _tabs(runs),
        "progress": progress,
        "options": _option_rows(design),
        "answers_form": answers_form,
        "answered": [item for item in design.clarifications if item.get("answer")],
        "pending_questions": questions if awaiting and not can_act else [],
        "cancellable": design.status in CANCELLABLE,
        "can_act": can_act,
        "page_data": page_data,
        "show_owner": design.owner_id != request.user.pk,
        # The design's OpenTelemetry trace, for staff to look it up in their tracing system.
        "trace_id": design.trace_id if request.user.is_staff else "",
        "busy": busy,
        "problem": problem,
        **(_allowance_context(quota) if quota is not None else {}),
    }
    response = render(request, "agents/design_detail.html", context, status=status)
    if quota is not None and status == 429:
        _rate_limited(response, quota)
    return busy_response(response, busy)


@login_required
@require_GET
async def design_detail(request: HttpRequest, design_id: int) -> HttpResponse:
    """The design with every agent's output so far; the page script streams the rest."""
    seen = await _visible_design(request, design_id, page=True)
    design, runs = seen.design, seen.runs
    return _design_page(
        request,
        design,
        runs,
        can_act=seen.may_act,
        queue_place=seen.queue_place,
        progress=live_progress(design, runs, await stage_estimates()),
    )


@login_required
@require_GET
async def run_output(request: HttpRequest, design_id: int, run_id: int) -> JsonResponse:
    """One finished run rendered on the server (sanitised), for the page to swap in."""
    design = (await _visible_design(request, design_id)).design
    run = await aget_object_or_404(AgentRun, pk=run_id, design_id=design.pk)
    presented = present_run(run) if run.status == AgentRun.Status.SUCCEEDED else None
    html = render_to_string(
        "agents/_run_output.html", {"design": design, "run": run, "presented": presented}
    )
    return JsonResponse(as_json(run_state(run)) | {"html": html})


@login_required
@require_POST
async def answer_questions(request: HttpRequest, design_id: int) -> HttpResponse:
    """Store the answers (or the skip) and start the design; only once, while it waits."""
    seen = await _visible_design(request, design_id)
    design = seen.design
    if not seen.may_act:
        message = "Only the owner of this design can answer its questions."
        return _forbidden(request, design, message)
    if design.status != Design.Status.AWAITING_ANSWERS:
        return _conflict(request, design, "This design is not waiting for answers any more.")
    if problem := _unreadable_form(request):
        status, message = problem
        runs = await _read_runs(design)
        return _design_page(request, design, runs, can_act=True, status=status, problem=message)
    form = ClarificationForm([item["question"] for item in design.clarifications], request.POST)
    skip = "skip" in request.POST
    if not skip and not form.is_valid():
        runs = await _read_runs(design)
        return _design_page(request, design, runs, can_act=True, answers_form=form, status=400)
    if busy := await pools_busy(request):  # the answers stay in the form, the design waits
        runs = await _read_runs(design)
        return _design_page(
            request, design, runs, can_act=True, answers_form=form, status=503, busy=busy
        )
    answers = (
        [{"question": item["question"], "answer": None} for item in design.clarifications]
        if skip
        else form.answers()
    )
    # Conditional update: a double submit cannot start the pipeline twice.
    claimed = await Design.objects.filter(
        pk=design.pk, status=Design.Status.AWAITING_ANSWERS
    ).aupdate(
        clarifications=answers,
        status=Design.Status.QUEUED,
        **leases.held_by(leases.this_instance()),
    )
    if not claimed:
        return _conflict(request, design, "This design has already been started.")
    tasks.start_design(design.pk)
    return redirect("design-detail", design_id=design.pk)


@login_required
@require_POST
async def retry(request: HttpRequest, design_id: int) -> HttpResponse:
    """Resume a failed, interrupted or cancelled design from its first unfinished agent: one
    more attempt, counted against the hourly allowance of the user who asks (429 past it,
    nothing started)."""
    seen = await _visible_design(request, design_id)
    design, user = seen.design, request.user
    if not seen.may_act:
        return _forbidden(request, design, "Only the owner of this design can retry it.")
    if design.status not in RETRYABLE:
        return _conflict(
            request, design, "Only a failed, interrupted or cancelled design can be retried."
        )
    async with _submission_lock(user.pk):
        quota = await allowance(user.pk)
        if quota.next_at is not None:
            runs = await _read_runs(design)
            return _design_page(request, design, runs, can_act=True, status=429, quota=quota)
        if busy := await pools_busy(request):
            runs = await _read_runs(design)
            return _design_page(request, design, runs, can_act=True, status=503, busy=busy)
        try:
            await tasks.retry_design(design.pk)
        except DesignNotRunnable:  # another request retried it first
            return _conflict(request, design, "This design has already been restarted.")
        await DesignRetry.objects.acreate(design_id=design.pk, requested_by_id=user.pk)
    return redirect("design-detail", design_id=design.pk)


@login_required
@require_POST
async def cancel(request: HttpRequest, design_id: int) -> HttpResponse:
    """Stop a queued, waiting or running design for good: it ends cancelled, and what its
    agents produced (the text of one stopped mid-answer included) is kept."""
    seen = await _visible_design(request, design_id)
    design = seen.design
    if not seen.may_act:
        return _forbidden(request, design, "Only the owner of this design can cancel it.")
    if not await tasks.cancel_design(design.pk):
        return _conflict(request, design, "This design has already finished.")
    return redirect("design-detail", design_id=design.pk)


@login_required
@require_POST
async def delete(request: HttpRequest, design_id: int) -> HttpResponse:
    """Delete a finished design with its runs; a design still in progress is cancelled first
    (409 until then), so no process is left writing to a design that no longer exists."""
    seen = await _visible_design(request, design_id)
    design = seen.design
    if not seen.may_delete:
        return _forbidden(request, design, "Only the owner of this design can delete it.")
    deleted, _ = await Design.objects.filter(
        pk=design.pk, status__in=Design.TERMINAL_STATUSES
    ).adelete()
    if not deleted:
        return _conflict(request, design, "Cancel this design before deleting it.")
    logger.info("design %s deleted by user %s", design.pk, request.user.pk)
    return redirect("design-list")


def _conflict(request: HttpRequest, design: Design, message: str) -> HttpResponse:
    return render(
        request,
        "agents/conflict.html",
        {"design": design, "message": message},
        status=409,
    )


def _forbidden(request: HttpRequest, design: Design, message: str) -> HttpResponse:
    """403 for a design the user may see but not act on (see agents.access)."""
    return render(
        request,
        "agents/conflict.html",
        {
            "design": design,
            "message": message + " You may view it; acting on another user's design needs "
            "the permission to change designs.",
        },
        status=403,
    )


# --- downloads ------------------------------------------------------------------------------


def _zip_response(build: io.BytesIO, filename: str) -> HttpResponse:
    response = HttpResponse(build.getvalue(), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _terraform_files(run: AgentRun | None) -> dict[str, str]:
    return split_terraform(run.output_text) if run is not None else {}


@login_required
@require_GET
async def terraform_zip(request: HttpRequest, design_id: int) -> HttpResponse:
    """The Terraform coder's files (main, variables, outputs, versions) as a zip."""
    design = (await _visible_design(request, design_id)).design
    files = _terraform_files(await design.aoutput(only_in_stage(Stage.TERRAFORM).key))
    if not files:
        raise Http404("This design has no Terraform yet.")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(f"terraform/{name}", content)
    return _zip_response(buffer, f"design-{design.pk}-terraform.zip")


def _package_readme(design: Design, runs: list[AgentRun], files: dict[str, str]) -> str:
    lines = [
        f"# Design #{design.pk}: {design.title}",
        "",
        f"- Status: {design.get_status_display()}",
        f"- Created: {design.created_at:%Y-%m-%d %H:%M} UTC",
    ]
    if design.verdict:
        lines.append(f"- Audit verdict: {design.verdict}")
    if design.recommendation:
        lines.append(f"- Recommendation: {design.recommendation.title()}")
    if design.error:
        lines.append(f"- Error: {design.error}")
    lines += ["", "## Request", "", design.request_text, "", "## Options", ""]
    lines += [f"- {label}: {value}" for label, value in _option_rows(design)]
    if design.clarifications:
        lines += ["", "## Clarifications", ""]
        for item in design.clarifications:
            lines += [f"- **{item['question']}**", f"  {item.get('answer') or '(skipped)'}"]
    lines += [
        "",
        "## Agent timeline",
        "",
        "| agent | round | pool | model | wait ms | ttft ms | duration ms | tokens in/out "
        "| overflow | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.agent} | {run.round} | {run.pool} | {run.model} | {_ms(run.wait_ms)} "
            f"| {_ms(run.ttft_ms)} | {_ms(run.duration_ms)} "
            f"| {'≈' if run.tokens_estimated else ''}{run.tokens_in}/{run.tokens_out} "
            f"| {'yes' if run.overflow else 'no'} | {run.status} |"
        )
    if files:
        lines += ["", "## Terraform", ""]
        lines += [f"- terraform/{name}" for name in files]
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


@login_required
@require_GET
async def download_package(request: HttpRequest, design_id: int) -> HttpResponse:
    """Everything the agents produced, as a zip of markdown files plus the Terraform files."""
    seen = await _visible_design(request, design_id, page=True)
    design, runs = seen.design, seen.runs
    outputs: dict[str, AgentRun] = {}
    for run in runs:
        if run.status == AgentRun.Status.SUCCEEDED:
            outputs[run.agent] = run  # later rounds replace earlier ones
    files = _terraform_files(outputs.get(only_in_stage(Stage.TERRAFORM).key))
    folder = f"design-{design.pk}-{slugify(design.title)[:40]}".rstrip("-")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{folder}/README.md", _package_readme(design, runs, files))
        for position, spec in enumerate(registered(), start=1):
            run = outputs.get(spec.key)
            if run is None:
                continue
            stem = f"{folder}/{position:02d}-{spec.key}"
            if run.output_json is not None:
                archive.writestr(f"{stem}.json", json.dumps(run.output_json, indent=2) + "\n")
            else:
                title = f"# {spec.label} (round {run.round})\n\n"
                archive.writestr(f"{stem}.md", title + run.output_text.rstrip() + "\n")
        for name, content in files.items():
            archive.writestr(f"{folder}/terraform/{name}", content)
    return _zip_response(buffer, f"{folder}.zip")
