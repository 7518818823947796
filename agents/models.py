"""Designs and the agent runs that produce them, persisted as each agent starts and finishes.

Each run is written twice (started, finished) so a reload, another process or the next
server start can see exactly where a design is, and the timings the pools measured are kept
per call rather than lost in logs.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from agents.specs import agent_choices
from pools.engine.telemetry import trace_id_of

__all__ = ["AgentRun", "Design", "DesignRetry"]


class Design(models.Model):
    """One user request and everything the agents produced for it."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        AWAITING_ANSWERS = "awaiting_answers", "Awaiting answers"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        # Kept for designs of earlier releases: a stopped server no longer interrupts one.
        INTERRUPTED = "interrupted", "Interrupted"
        CANCELLED = "cancelled", "Cancelled"

    TERMINAL_STATUSES = frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.INTERRUPTED, Status.CANCELLED}
    )
    # A process works on these only while it holds the design's lease (agents.leases).
    ACTIVE_STATUSES = frozenset({Status.QUEUED, Status.RUNNING})

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="designs"
    )
    request_text = models.TextField()
    options = models.JSONField(default=dict)
    # [{"question": str, "answer": str | None}]; answer None means the user skipped it.
    clarifications = models.JSONField(default=list)
    status = models.CharField(
        max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    verdict = models.CharField(max_length=20, blank=True)
    recommendation = models.CharField(max_length=10, blank=True)
    revisions = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    failed_agent = models.CharField(max_length=20, blank=True)
    # Incremented each time the pipeline starts or resumes on this design (runs are kept).
    attempts = models.PositiveSmallIntegerField(default=0)
    # The process working on the design and until when that holds unless renewed (see
    # agents.leases); empty and null when no process holds it.
    lease_owner = models.CharField(max_length=120, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    # How many times a process took the design over after the one running it died.
    takeovers = models.PositiveSmallIntegerField(default=0)
    # The W3C traceparent of the design's first root span (OpenTelemetry): every later start
    # (a resume, a take-over, a retry) continues that trace. Empty while telemetry is off.
    trace_parent = models.CharField(max_length=55, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")

    def __str__(self) -> str:
        return f"Design #{self.pk}: {self.title}"

    @property
    def title(self) -> str:
        """The first line of the request, short enough for a list."""
        first_line = self.request_text.strip().splitlines()[0] if self.request_text.strip() else ""
        return first_line if len(first_line) <= 80 else first_line[:77] + "..."

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL_STATUSES

    @property
    def trace_id(self) -> str:
        """The OpenTelemetry trace id of the design (32 hex digits), or "" without one."""
        return trace_id_of(self.trace_parent)

    def _outputs(self) -> models.QuerySet[AgentRun]:
        return self.runs.filter(status=AgentRun.Status.SUCCEEDED)

    def output(self, agent: str) -> AgentRun | None:
        """The latest succeeded run of `agent` (highest round; a resume re-uses, never redoes)."""
        return self._outputs().filter(agent=agent).order_by("-round", "-id").first()

    async def aoutput(self, agent: str) -> AgentRun | None:
        """`output()` for async views."""
        return await self._outputs().filter(agent=agent).order_by("-round", "-id").afirst()


class AgentRun(models.Model):
    """One agent call: which pool served it, how long it waited and took, what it produced."""

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        # Stopped before it finished (a shutdown, a cancel, a crash): output_text holds what
        # had streamed by then; a resumed design calls the agent again.
        STOPPED = "stopped", "Stopped"

    design = models.ForeignKey(Design, on_delete=models.CASCADE, related_name="runs")
    # Choices from the agent specs, read when needed: a new agent needs no migration.
    agent = models.CharField(max_length=20, choices=agent_choices)
    round = models.PositiveSmallIntegerField(default=0)
    attempt = models.PositiveSmallIntegerField(default=1)
    pool = models.CharField(max_length=40)
    model = models.CharField(max_length=100)
    temperature = models.FloatField(default=0.0)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RUNNING)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True)
    wait_ms = models.FloatField(null=True, blank=True)
    overflow = models.BooleanField(default=False)
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    # The endpoint sent no usage: the counts were estimated from the text (about 4 chars a token).
    tokens_estimated = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    output_text = models.TextField(blank=True)
    # Parsed analyst JSON; json_error says why it is null when the repair attempt failed too.
    output_json = models.JSONField(null=True, blank=True)
    json_error = models.TextField(blank=True)

    class Meta:
        ordering = ("id",)
        indexes = [models.Index(fields=("design", "agent", "round"))]

    def __str__(self) -> str:
        return f"{self.agent} round {self.round} of design #{self.design_id} ({self.status})"

    @property
    def partial(self) -> bool:
        """Text that an agent stopped or failed in the middle of: shown, never re-used."""
        return self.status != self.Status.SUCCEEDED and bool(self.output_text)

    @property
    def duration_ms(self) -> float | None:
        """Wall time from start (including the wait for a slot) to finish."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds() * 1000


class DesignRetry(models.Model):
    """One retry of a design, kept so that it counts against the hourly allowance.

    A design's first attempt is counted by its own `created_at`; each retry runs every agent
    again and costs as much, so it is an attempt too, charged to the user who asked for it
    (the owner, or someone with the change permission).
    """

    design = models.ForeignKey(Design, on_delete=models.CASCADE, related_name="retries")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="design_retries"
    )
    requested_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("requested_at", "id")
        indexes = [models.Index(fields=("requested_by", "requested_at"))]

    def __str__(self) -> str:
        return f"retry of design #{self.design_id} at {self.requested_at:%Y-%m-%d %H:%M}"
