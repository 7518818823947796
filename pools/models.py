"""Pool history: one row per pool per interval, so staff can see how the pools behaved.

The live numbers (/health, /metrics) vanish with the process; these rows keep the shape of
each interval (how full, how long callers waited, how slow calls were) for the admin chart,
`pool_status --history` and post-mortems. Rows are written by the sampler in each server
process (`pools.sampler`) or by `manage.py snapshot_pools` from cron.
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

LIMIT_REASON_LENGTH = 80
# The periods of the admin's date drill-down, found by index probes (`datetimes`).
PROBED_PERIODS = ("year", "month", "day")


def _optional(field: type[models.Field], help_text: str = "") -> Any:
    """A figure some rows lack (rows from before it was kept, or from cron): null there."""
    return field(null=True, blank=True, help_text=help_text)


def _period_start(moment: datetime, kind: str) -> datetime:
    if kind == "year":
        return moment.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    if kind == "month":
        return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _next_period(start: datetime, kind: str) -> datetime:
    if kind == "year":
        return start.replace(year=start.year + 1)
    if kind == "month":
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start + timedelta(days=1)  # wall-clock arithmetic: the next local midnight


class PoolSnapshotQuerySet(models.QuerySet):
    """`datetimes()` by taken_at's years, months or days (the admin's date drill-down) probes
    each period between the first and the last row through the index, instead of truncating
    every row: on SQLite with time zones that truncation is a Python call per row (1.9 s at
    100,000 rows); this is about one indexed EXISTS per period shown."""

    def datetimes(
        self, field_name: str, kind: str, order: str = "ASC", tzinfo: tzinfo | None = None
    ) -> Any:
        if field_name != "taken_at" or kind not in PROBED_PERIODS or not settings.USE_TZ:
            return super().datetimes(field_name, kind, order, tzinfo)
        if order not in ("ASC", "DESC"):
            raise ValueError("'order' must be either 'ASC' or 'DESC'.")
        zone = tzinfo or timezone.get_current_timezone()
        bounds = self.aggregate(first=models.Min("taken_at"), last=models.Max("taken_at"))
        if bounds["first"] is None:
            return []
        start = _period_start(timezone.localtime(bounds["first"], zone), kind)
        last = timezone.localtime(bounds["last"], zone)
        periods = []
        while start <= last:
            end = _next_period(start, kind)
            if self.filter(taken_at__gte=start, taken_at__lt=end).exists():
                periods.append(start)
            start = end
        return periods[::-1] if order == "DESC" else periods


class PoolSnapshot(models.Model):
    """One pool of one server process at one moment, and what it did since the last row."""

    objects = PoolSnapshotQuerySet.as_manager()

    taken_at = models.DateTimeField(db_index=True)
    # "host:pid" for the in-process sampler, the server's URL for `snapshot_pools` (cron).
    instance = models.CharField(max_length=200, db_index=True)
    pool = models.CharField(max_length=40)

    # The pool at that moment.
    size = models.PositiveIntegerField(help_text="Configured slots.")
    in_use = models.PositiveIntegerField(help_text="Slots in use, temporary connections included.")
    available = models.PositiveIntegerField(help_text="Pooled slots free.")
    overflow_in_use = models.PositiveIntegerField(help_text="Temporary connections in use.")
    waiting = models.PositiveIntegerField(help_text="Callers queued for a slot.")
    # The pool's deployment at that moment (`pools.engine.adaptive`): pools on one model share its
    # limiter, so these repeat under each of them. Empty in rows from before the limiter.
    concurrency_limit = _optional(
        models.PositiveIntegerField,
        "The deployment's learned concurrency limit: attempts it may have in flight.",
    )
    limit_reason = models.CharField(
        max_length=LIMIT_REASON_LENGTH,
        blank=True,
        default="",
        help_text="Why the limit last changed: start, 429, latency, requests running low, "
        "tokens running low, recovering, or cluster: (another instance's reason).",
    )
    deployment_in_flight = _optional(
        models.PositiveIntegerField, "Attempts in flight to the deployment, all its pools."
    )
    deployment_waiting = _optional(
        models.PositiveIntegerField,
        "Calls queued for the deployment (its limit or its 429 pause), each holding its slot.",
    )
    paused_s = _optional(
        models.FloatField, "Seconds left of the deployment's 429 pause (0: dispatch is open)."
    )

    # The interval since this instance's previous row.
    interval_s = _optional(
        models.FloatField, "Seconds covered; empty when there was no earlier row."
    )
    requests = models.PositiveIntegerField(default=0, help_text="Slots granted.")
    overflow_requests = models.PositiveIntegerField(
        default=0, help_text="Slots granted on a temporary connection."
    )
    queued_requests = models.PositiveIntegerField(
        default=0, help_text="Callers that had to queue for a slot."
    )
    errors = models.PositiveIntegerField(default=0, help_text="Calls that raised.")
    rate_limited = _optional(
        models.PositiveIntegerField,
        "429 answers to the pool's calls (each paused the deployment; the calls "
        "waited and retried); the increase of the counter requests_rate_limited.",
    )
    pauses = _optional(
        models.PositiveIntegerField,
        "429 pauses of the pool's deployment (shared by its pools, so repeated under each); "
        "empty in cron rows.",
    )
    # Peaks of the interval, so a busy minute between two rows still shows: the pool keeps
    # the slots' and its queue's exactly, the deployment's queue is looked at about every
    # second. Empty in cron rows.
    in_use_peak = _optional(models.PositiveIntegerField, "Most slots in use at once.")
    overflow_in_use_peak = _optional(
        models.PositiveIntegerField, "Most temporary connections in use at once."
    )
    waiting_peak = _optional(models.PositiveIntegerField, "Most callers queued for a slot at once.")
    deployment_waiting_peak = _optional(
        models.PositiveIntegerField, "Most calls queued for the deployment at once."
    )
    refused = models.PositiveIntegerField(
        default=0, help_text="Callers refused by the pool (PoolTimeout, PoolExhausted)."
    )
    wait_p50_ms = _optional(models.FloatField)
    wait_p95_ms = _optional(models.FloatField)
    wait_max_ms = _optional(models.FloatField)
    latency_p50_ms = _optional(models.FloatField)
    latency_p95_ms = _optional(models.FloatField)
    ttft_p50_ms = _optional(models.FloatField, "Streamed calls only.")
    ttft_p95_ms = _optional(models.FloatField, "Streamed calls only.")
    # Empty for cron rows: /health does not count tokens.
    tokens_in = _optional(models.PositiveBigIntegerField)
    tokens_out = _optional(models.PositiveBigIntegerField)
    error_kinds = models.JSONField(
        default=dict, blank=True, help_text="Errors and refusals by exception class."
    )
    # The pool's cumulative counters from its stats at that moment (what /health shows);
    # cron rows compute their interval from the previous row's.
    counters = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ("-taken_at", "pool")
        get_latest_by = "taken_at"
        indexes = [models.Index(fields=("pool", "taken_at"), name="pools_snap_pool_time")]

    def __str__(self) -> str:
        return f"{self.pool} @ {self.instance}, {self.taken_at:%Y-%m-%d %H:%M:%S}"
