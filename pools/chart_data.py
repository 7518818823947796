"""The pool history chart's figures, aggregated in the database.

Time buckets come from epoch seconds (at most `MAX_POINTS` per pool), so 100,000 rows cost
one grouped query, not a Python loop. Each point is the cluster's total: every instance's
figure over the bucket (inner GROUP BY pool, instance, bucket), summed over the instances
(outer GROUP BY pool, bucket), so several servers show as one cluster rather than as their
mean; filtered to one instance, it is that instance's. Per instance (`per_instance=True`)
the outer query keeps the instances apart: one group of buckets per pool and instance.

Counts (requests, errors, 429s, pauses, tokens) are kept as the bucket's total and as a rate
per minute of the intervals the rows cover; peaks at their highest; the concurrency limit at
its lowest; p95 times as the worst instance's. Errors by kind come from each row's
`error_kinds` JSON, expanded in SQL (SQLite's `json_each`, PostgreSQL's `jsonb_each_text`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import NotSupportedError, connections
from django.db.models import (
    Avg,
    BigIntegerField,
    Count,
    Func,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce

from pools.models import PoolSnapshot

MAX_POINTS = 200
# Error kinds drawn one by one (the most frequent in the range); the rest as "other kinds".
MAX_ERROR_KINDS = 6
OTHER_KINDS = "other kinds"


class EpochSeconds(Func):
    """Whole seconds since 1970 (UTC) of a datetime column, as an integer, in SQL."""

    output_field = BigIntegerField()
    arity = 1

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # '%%%%s' survives Func's own %-formatting and then the backend's, leaving '%s'.
        return super().as_sql(
            compiler, connection, template="CAST(strftime('%%%%s', %(expressions)s) AS INTEGER)"
        )

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return super().as_sql(
            compiler,
            connection,
            template="CAST(FLOOR(EXTRACT(EPOCH FROM %(expressions)s)) AS BIGINT)",
        )

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Only SQLite and PostgreSQL are supported (and verified): elsewhere `/` on integers
        # may not divide whole, which would put every row in its own bucket.
        raise NotSupportedError(f"EpochSeconds is not implemented for {connection.vendor}")


# The JSON object of a row's `error_kinds` as (key, value) rows, per database.
_JSON_ENTRIES = {
    "sqlite": ("json_each({column})", "{alias}.value"),
    "postgresql": ("jsonb_each_text({column})", "CAST({alias}.value AS BIGINT)"),
}


# Per (pool, instance or None, bucket), per error kind: (count, per minute).
KindFigures = dict[tuple[str, str | None, int], dict[str, tuple[int, float | None]]]


@dataclass(frozen=True)
class Bucket:
    """One point of a pool's lines: the bucket's start and, summed over the instances, each
    instance's figure in it: averages of the moments (`in_use` ...), the interval peaks at
    their highest (`..._peak`), the concurrency limit at its lowest, counts in all and per
    minute; the p95 times are the worst instance's. None where no row had the figure."""

    at: datetime
    in_use: float
    available: float
    overflow: float
    waiting: float
    size: int
    rows: int
    instances: int = 1  # instances with rows in this bucket
    in_use_peak: float | None = None
    overflow_peak: float | None = None
    waiting_peak: float | None = None
    deployment_waiting_peak: float | None = None
    limit: float | None = None
    deployment_in_flight: float | None = None
    requests_per_min: float | None = None
    overflow_requests_per_min: float | None = None
    queued_requests_per_min: float | None = None
    errors_per_min: float | None = None
    refused_per_min: float | None = None
    rate_limited_per_min: float | None = None
    pauses_per_min: float | None = None
    tokens_in_per_min: float | None = None
    tokens_out_per_min: float | None = None
    requests: int | None = None
    overflow_requests: int | None = None
    queued_requests: int | None = None
    errors: int | None = None
    refused: int | None = None
    rate_limited: int | None = None
    pauses: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    wait_p95_ms: float | None = None
    wait_max_ms: float | None = None
    latency_p95_ms: float | None = None
    ttft_p95_ms: float | None = None
    # Per error kind (the exception's class): (count, per minute). Only with `error_kinds`.
    errors_by_kind: dict[str, tuple[int, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class ChartData:
    start: datetime | None
    end: datetime | None
    bucket_seconds: int
    # Keyed by pool, or by "pool @ instance" per instance (`groups` says which is which).
    pools: dict[str, list[Bucket]]
    instances: tuple[str, ...] = ()  # every instance in the range, sorted
    limit_reasons: dict[str, str] | None = None  # per pool, the reason in its latest row
    groups: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    error_kinds: tuple[str, ...] = ()  # the kinds drawn, most frequent first


_COUNTS = (
    "requests",
    "overflow_requests",
    "queued_requests",
    "errors",
    "refused",
    "rate_limited",
    "pauses",
    "tokens_in",
    "tokens_out",
)
_PEAKS = {  # the bucket's name: (the row's peak, its moment for rows from before peaks)
    "in_use_peak": ("in_use_peak", "in_use"),
    "overflow_peak": ("overflow_in_use_peak", "overflow_in_use"),
    "waiting_peak": ("waiting_peak", "waiting"),
    "deployment_waiting_peak": ("deployment_waiting_peak", "deployment_waiting"),
}
# Counts are of the rows with an interval: an instance's first cron row counts everything
# since its server started, not the range.
_TIMED = Q(interval_s__isnull=False)
# Each column: its aggregate per instance and bucket (the inner GROUP BY; None: computed
# from other columns), then its SQL per bucket over the instances (the outer one), where
# {name} is the inner column `name`. A rate is each instance's count over the seconds its
# rows cover, summed: a division per group, not per row.
_BUCKET_COLUMNS: dict[str, tuple[Any, str]] = {
    "in_use": (Avg("in_use"), "SUM({in_use})"),
    "available": (Avg("available"), "SUM({available})"),
    "overflow": (Avg("overflow_in_use"), "SUM({overflow})"),
    "waiting": (Avg("waiting"), "SUM({waiting})"),
    "size": (Max("size"), "SUM({size})"),
    "rows": (Count("id"), "SUM({rows})"),
    "instance": (None, "COUNT({instance})"),
    **{
        name: (Max(Coalesce(peak, moment)), f"SUM({{{name}}})")
        for name, (peak, moment) in _PEAKS.items()
    },
    "limit": (Min("concurrency_limit"), "SUM({limit})"),
    "deployment_in_flight": (Avg("deployment_in_flight"), "SUM({deployment_in_flight})"),
    "seconds": (Sum("interval_s", filter=_TIMED), "SUM({seconds})"),
    **{count: (Sum(count, filter=_TIMED), f"SUM({{{count}}})") for count in _COUNTS},
    **{
        f"{count}_per_min": (None, f"SUM({{{count}}} * 60.0 / NULLIF({{seconds}}, 0))")
        for count in _COUNTS
    },
    **{
        ms: (Max(ms), f"MAX({{{ms}}})")
        for ms in ("wait_p95_ms", "wait_max_ms", "latency_p95_ms", "ttft_p95_ms")
    },
}
_INTEGER_COLUMNS = {"size", "rows", "instance"}


def _inner(name: str) -> str:
    """The per-instance alias of a column: never a field's name, which an F() in a later
    aggregate would otherwise take for the earlier aggregate ("instance" is the group's)."""
    return name if name == "instance" else f"bucket_{name}"


def _number(name: str, value: Any) -> Any:
    if name in _INTEGER_COLUMNS or name in _COUNTS:
        return None if value is None else int(value)
    return None if value is None else float(value)


def group_label(pool: str, instance: str | None) -> str:
    return pool if instance is None else f"{pool} @ {instance}"


def chart_data(
    queryset: QuerySet[PoolSnapshot],
    max_points: int = MAX_POINTS,
    *,
    per_instance: bool = False,
    error_kinds: bool = False,
) -> ChartData:
    """Per pool (or per pool and instance), at most `max_points` time buckets of the
    queryset, aggregated in the database; with `error_kinds`, the errors by kind too."""
    queryset = queryset.order_by()  # a default ordering would join the GROUP BY
    bounds = queryset.aggregate(start=Min("taken_at"), end=Max("taken_at"))
    if bounds["start"] is None:
        return ChartData(None, None, 0, {})
    instances = tuple(queryset.values_list("instance", flat=True).distinct().order_by("instance"))
    start_epoch = math.floor(bounds["start"].timestamp())
    end_epoch = math.floor(bounds["end"].timestamp())
    width = max(1, math.ceil((end_epoch - start_epoch + 1) / max_points))
    bucketed = queryset.annotate(
        bucket=(EpochSeconds("taken_at") - Value(start_epoch)) / Value(width)
    )
    per_instance_rows = bucketed.values("pool", "bucket", "instance").annotate(
        **{
            _inner(name): aggregate
            for name, (aggregate, _) in _BUCKET_COLUMNS.items()
            if aggregate is not None
        }
    )
    # The ORM cannot select from a grouped subquery, so the outer GROUP BY wraps its SQL
    # (with its parameters: nothing from the request is pasted into the text).
    connection = connections[queryset.db]
    inner_sql, params = per_instance_rows.query.get_compiler(connection=connection).as_sql()
    q = connection.ops.quote_name
    names = list(_BUCKET_COLUMNS)
    keys = [q("pool"), *([q("instance")] if per_instance else []), q("bucket")]
    inner_columns = {name: q(_inner(name)) for name in names}
    outer = ", ".join(_BUCKET_COLUMNS[name][1].format(**inner_columns) for name in names)
    sql = (
        f"SELECT {', '.join(keys)}, {outer} FROM ({inner_sql}) per_instance "
        f"GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    kinds_by_bucket: KindFigures = {}
    kinds: tuple[str, ...] = ()
    if error_kinds:
        kinds_by_bucket, kinds = _errors_by_kind(bucketed, per_instance)
    pools: dict[str, list[Bucket]] = {}
    groups: dict[str, tuple[str, str | None]] = {}
    for row in rows:
        pool, instance = row[0], (row[1] if per_instance else None)
        bucket_index, values = int(row[len(keys) - 1]), row[len(keys) :]
        figures = {name: _number(name, value) for name, value in zip(names, values, strict=True)}
        figures["instances"] = figures.pop("instance")
        del figures["seconds"]
        at = datetime.fromtimestamp(start_epoch + bucket_index * width, tz=UTC)
        by_kind = kinds_by_bucket.get((pool, instance, bucket_index), {})
        if error_kinds and figures["requests_per_min"] is not None:
            by_kind = {kind: by_kind.get(kind, (0, 0.0)) for kind in kinds}
        label = group_label(pool, instance)
        groups[label] = (pool, instance)
        pools.setdefault(label, []).append(Bucket(at=at, errors_by_kind=by_kind, **figures))
    reasons = {
        pool: queryset.filter(pool=pool)
        .order_by("-taken_at", "-id")
        .values_list("limit_reason", flat=True)
        .first()
        or ""
        for pool in {pool for pool, _ in groups.values()}
    }
    start = datetime.fromtimestamp(start_epoch, tz=UTC)
    end = datetime.fromtimestamp(end_epoch, tz=UTC)
    return ChartData(start, end, width, pools, instances, reasons, groups, kinds)


def _errors_by_kind(
    bucketed: QuerySet[PoolSnapshot], per_instance: bool
) -> tuple[KindFigures, tuple[str, ...]]:
    """Per (pool, instance or None, bucket): each error kind's count and rate per minute
    (per instance, then summed), over the rows with an interval like the other counts; the
    kinds beyond the `MAX_ERROR_KINDS` most frequent are summed as `OTHER_KINDS`. Two
    grouped queries: the kinds' counts, and the seconds the rows cover."""
    connection = connections[bucketed.db]
    entries = _JSON_ENTRIES.get(connection.vendor)
    if entries is None:
        raise NotSupportedError(f"errors by kind are not implemented for {connection.vendor}")
    timed = bucketed.filter(_TIMED)
    # Only rows with an error or a refusal have kinds: the JSON of the others is not read.
    failed = timed.filter(Q(errors__gt=0) | Q(refused__gt=0))
    rows_sql, params = (
        failed.values("pool", "instance", "bucket", "error_kinds")
        .query.get_compiler(connection=connection)
        .as_sql()
    )
    q = connection.ops.quote_name
    each, value = entries[0].format(column=f"r.{q('error_kinds')}"), entries[1].format(alias="e")
    group = f"r.{q('pool')}, r.{q('instance')}, r.{q('bucket')}, e.key"
    sql = f"SELECT {group}, SUM({value}) FROM ({rows_sql}) r, {each} e GROUP BY {group}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        counted = [
            (pool, instance, int(bucket), kind, int(n or 0))
            for pool, instance, bucket, kind, n in cursor.fetchall()
        ]
    seconds = {
        (row["pool"], row["instance"], int(row["bucket"])): row["seconds"]
        for row in timed.values("pool", "instance", "bucket").annotate(seconds=Sum("interval_s"))
    }
    totals: dict[str, int] = defaultdict(int)
    for *_, kind, count in counted:
        totals[kind] += count
    ranked = sorted(totals, key=lambda kind: (-totals[kind], kind))
    shown = ranked if len(ranked) <= MAX_ERROR_KINDS else ranked[: MAX_ERROR_KINDS - 1]
    figures: KindFigures = {}
    for pool, instance, bucket, kind, count in counted:
        name = kind if kind in shown else OTHER_KINDS
        covered = seconds.get((pool, instance, bucket))
        rate = count * 60 / covered if covered else None
        by_kind = figures.setdefault((pool, instance if per_instance else None, bucket), {})
        before, before_rate = by_kind.get(name, (0, None))
        if before_rate is not None and rate is not None:
            rate += before_rate
        by_kind[name] = (before + count, rate if rate is not None else before_rate)
    kinds = tuple(shown) + ((OTHER_KINDS,) if len(ranked) > len(shown) else ())
    return figures, kinds
