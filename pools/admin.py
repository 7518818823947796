"""Read-only admin for pool history, with a chart of the pools over the filtered range.

The chart is aggregated in the database (time buckets from epoch seconds, at most
`MAX_POINTS` per pool) so 100,000 rows cost one grouped query, not a Python loop, and it is
drawn as inline SVG on the server: no script, no CDN, nothing the page's
Content-Security-Policy has to allow. Each point is the cluster's total: every instance's
figure over the bucket, summed over the instances (filtered to one instance, it is that
instance's), so several servers show as one cluster rather than as their mean.

Per pool, three panels: its slots (the interval's peak in use and queue, the deployment's
queue and concurrency limit, the size), its calls per minute (requests, errors, refusals,
429s) and its p95 times (waiting for a slot, the call, the first token). With Redis each
instance runs its share of the deployment's limit, so the limit summed is the cluster's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.contrib import admin
from django.contrib.admin.exceptions import DisallowedModelAdminLookup
from django.contrib.admin.options import IncorrectLookupParameters
from django.db import NotSupportedError, connections
from django.db.models import (
    Avg,
    BigIntegerField,
    Count,
    FloatField,
    Func,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    Value,
)
from django.db.models.functions import Cast, Coalesce, NullIf
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.safestring import SafeString

from pools.admin_filters import (
    SafeFiltersMixin,
    UnusableFilter,
    bad_filter_response,
    evaluating_filters,
)
from pools.models import PoolSnapshot

MAX_POINTS = 200


@dataclass(frozen=True)
class Series:
    """One line of a panel: `key` names it in the SVG, `field` is the `Bucket` it reads."""

    key: str
    field: str
    label: str
    colour: str
    dashed: bool = False
    clamped: bool = False  # drawn along the top edge where it is above the panel's scale


# Colours stay readable for the common colour-vision deficiencies.
SLOT_SERIES = (
    Series("in_use", "in_use_peak", "in use (peak)", "#1c64b0"),
    Series("waiting", "waiting_peak", "waiting for a slot (peak)", "#a61e4d"),
    Series("deployment_waiting", "deployment_waiting_peak", "deployment queue (peak)", "#e8590c"),
    # The deployment's limit is often far above one pool's slots: it is clamped, not scaled.
    Series("limit", "limit", "concurrency limit", "#2b8a3e", dashed=True, clamped=True),
    Series("size", "size", "size", "#868e96", dashed=True),
)
CALL_SERIES = (
    Series("requests", "requests_per_min", "requests", "#1c64b0"),
    Series("errors", "errors_per_min", "errors", "#a61e4d"),
    Series("refused", "refused_per_min", "refused", "#e8590c"),
    Series("rate_limited", "rate_limited_per_min", "429s", "#7048e8"),
)
TIME_SERIES = (
    Series("wait_p95", "wait_p95_ms", "wait", "#a61e4d"),
    Series("latency_p95", "latency_p95_ms", "call", "#1c64b0"),
    Series("ttft_p95", "ttft_p95_ms", "first token", "#2b8a3e"),
)

WIDTH = 760
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 48  # inside each panel; its legend is in BOTTOM
SLOTS_H = 202  # a plot of 142
SMALL_H = 140  # the calls and times panels, side by side under it: plots of 80
POOL_H = SLOTS_H + SMALL_H


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


@dataclass(frozen=True)
class Bucket:
    """One point of a pool's lines: the bucket's start and, summed over the instances, each
    instance's figure in it: averages of the moments (`in_use` ...), the interval peaks at
    their highest (`..._peak`), the concurrency limit at its lowest, calls per minute; the
    p95 times are the worst instance's. None where no row had the figure."""

    at: datetime
    in_use: float
    available: float
    overflow: float
    waiting: float
    size: int
    rows: int
    instances: int = 1  # instances with rows in this bucket
    in_use_peak: float | None = None
    waiting_peak: float | None = None
    deployment_waiting_peak: float | None = None
    limit: float | None = None
    requests_per_min: float | None = None
    errors_per_min: float | None = None
    refused_per_min: float | None = None
    rate_limited_per_min: float | None = None
    wait_p95_ms: float | None = None
    latency_p95_ms: float | None = None
    ttft_p95_ms: float | None = None


@dataclass(frozen=True)
class ChartData:
    start: datetime | None
    end: datetime | None
    bucket_seconds: int
    pools: dict[str, list[Bucket]]
    instances: tuple[str, ...] = ()  # every instance in the range, sorted
    limit_reasons: dict[str, str] | None = None  # per pool, the reason in its latest row


def _per_minute(field: str) -> Any:
    """Per instance and bucket: the rows' `field` per minute of the intervals they cover (rows
    without an interval, an instance's first, are left out)."""
    timed = Q(interval_s__gt=0)
    return (
        Cast(Sum(field, filter=timed), FloatField())
        * Value(60.0)
        / NullIf(Sum("interval_s", filter=timed), Value(0.0))
    )


# Per instance and bucket (inner aggregate), then per bucket over the instances (outer).
_BUCKET_COLUMNS = {
    "in_use": (Avg("in_use"), "SUM"),
    "available": (Avg("available"), "SUM"),
    "overflow": (Avg("overflow_in_use"), "SUM"),
    "waiting": (Avg("waiting"), "SUM"),
    "size": (Max("size"), "SUM"),
    "rows": (Count("id"), "SUM"),
    "instance": (None, "COUNT"),
    # Rows from before the peaks were kept fall back on their moment.
    **{
        f"{gauge}_peak": (Max(Coalesce(f"{gauge}_peak", gauge)), "SUM")
        for gauge in ("in_use", "waiting", "deployment_waiting")
    },
    "limit": (Min("concurrency_limit"), "SUM"),
    **{
        f"{count}_per_min": (_per_minute(count), "SUM")
        for count in ("requests", "errors", "refused", "rate_limited")
    },
    **{p95: (Max(p95), "MAX") for p95 in ("wait_p95_ms", "latency_p95_ms", "ttft_p95_ms")},
}
_INTEGER_COLUMNS = {"size", "rows", "instance"}


def _inner(name: str) -> str:
    """The per-instance alias of a column: never a field's name, which an F() in a later
    aggregate would otherwise take for the earlier aggregate ("instance" is the group's)."""
    return name if name == "instance" else f"bucket_{name}"


def _number(name: str, value: Any) -> Any:
    if name in _INTEGER_COLUMNS:
        return int(value)
    return None if value is None else float(value)


def chart_data(queryset: QuerySet[PoolSnapshot], max_points: int = MAX_POINTS) -> ChartData:
    """Per pool, at most `max_points` time buckets of the queryset: each instance's figures
    over the bucket, then summed over the instances, both in the database (one query)."""
    queryset = queryset.order_by()  # a default ordering would join the GROUP BY
    bounds = queryset.aggregate(start=Min("taken_at"), end=Max("taken_at"))
    if bounds["start"] is None:
        return ChartData(None, None, 0, {})
    instances = tuple(queryset.values_list("instance", flat=True).distinct().order_by("instance"))
    start_epoch = math.floor(bounds["start"].timestamp())
    end_epoch = math.floor(bounds["end"].timestamp())
    width = max(1, math.ceil((end_epoch - start_epoch + 1) / max_points))
    bucket = (EpochSeconds("taken_at") - Value(start_epoch)) / Value(width)
    per_instance = (
        queryset.annotate(bucket=bucket)
        .values("pool", "bucket", "instance")
        .annotate(
            **{
                _inner(name): aggregate
                for name, (aggregate, _) in _BUCKET_COLUMNS.items()
                if aggregate is not None
            }
        )
    )
    # The ORM cannot select from a grouped subquery, so the outer GROUP BY wraps its SQL
    # (with its parameters: nothing from the request is pasted into the text).
    connection = connections[queryset.db]
    inner_sql, params = per_instance.query.get_compiler(connection=connection).as_sql()
    q = connection.ops.quote_name
    names = list(_BUCKET_COLUMNS)
    outer = ", ".join(f"{_BUCKET_COLUMNS[name][1]}({q(_inner(name))})" for name in names)
    sql = (
        f"SELECT {q('pool')}, {q('bucket')}, {outer} FROM ({inner_sql}) per_instance "
        f"GROUP BY {q('pool')}, {q('bucket')} ORDER BY {q('pool')}, {q('bucket')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    pools: dict[str, list[Bucket]] = {}
    for pool, bucket_index, *values in rows:
        figures = {name: _number(name, value) for name, value in zip(names, values, strict=True)}
        figures["instances"] = figures.pop("instance")
        at = datetime.fromtimestamp(start_epoch + int(bucket_index) * width, tz=UTC)
        pools.setdefault(pool, []).append(Bucket(at=at, **figures))
    reasons = {
        pool: queryset.filter(pool=pool)
        .order_by("-taken_at", "-id")
        .values_list("limit_reason", flat=True)
        .first()
        or ""
        for pool in pools
    }
    start = datetime.fromtimestamp(start_epoch, tz=UTC)
    end = datetime.fromtimestamp(end_epoch, tz=UTC)
    return ChartData(start, end, width, pools, instances, reasons)


def scope_label(instances: tuple[str, ...]) -> str:
    """What the chart's numbers cover: one instance, or the sum over several."""
    if len(instances) == 1:
        return f"instance {instances[0]}"
    return f"cluster total of {len(instances)} instances"


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    colour: str
    segments: list[str]  # SVG polylines "x,y x,y ...": a line breaks where a figure is missing
    dots: list[tuple[str, str]]  # a segment of one point is drawn as a dot
    dashed: bool = False

    @property
    def points(self) -> str:
        return " ".join(self.segments)


@dataclass(frozen=True)
class Panel:
    """One plot of one pool, placed at (x, y) in the chart."""

    pool: str
    kind: str  # "slots", "calls", "times"
    title: str
    note: str
    x: int
    y: int
    width: int
    height: int
    y_max: int
    y_max_label: str
    lines: list[Line]
    legend: list[tuple[int, Series]]

    # The panel's own geometry, for the template.
    @property
    def left(self) -> int:
        return LEFT

    @property
    def top(self) -> int:
        return TOP

    @property
    def plot_w(self) -> int:
        return self.width - LEFT - RIGHT

    @property
    def plot_h(self) -> int:
        return self.height - TOP - BOTTOM

    @property
    def right_edge(self) -> int:
        return self.width - RIGHT

    @property
    def mid(self) -> float:
        return TOP + self.plot_h / 2

    @property
    def bottom(self) -> int:
        return TOP + self.plot_h

    @property
    def label_y(self) -> int:
        return self.bottom + 16

    @property
    def legend_y(self) -> int:
        return self.bottom + 33


def _nice_ceiling(value: float) -> int:
    """The y-axis top: at least 1, rounded up to 1, 2 or 5 times a power of ten."""
    if value <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return int(step * magnitude)
    return int(10 * magnitude)  # pragma: no cover - the loop always returns


def _axis_label(value: int) -> str:
    return f"{value // 1000}k" if value >= 10_000 and value % 1000 == 0 else str(value)


def _figure(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.0f}{unit}" if abs(value) >= 10 else f"{value:.1f}".removesuffix(".0") + unit


def _panel(
    pool: str,
    kind: str,
    buckets: list[Bucket],
    series: tuple[Series, ...],
    span: tuple[float, float],
    box: tuple[int, int, int, int],
    title: str,
    note: str = "",
) -> Panel:
    x0, y0, width, height = box
    t0, t1 = span
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    scaled = [
        value
        for b in buckets
        for s in series
        if not s.clamped and (value := getattr(b, s.field)) is not None
    ]
    y_max = _nice_ceiling(max(scaled, default=0.0))

    def x(at: datetime) -> float:
        if t1 == t0:
            return LEFT + plot_w / 2
        return LEFT + (at.timestamp() - t0) / (t1 - t0) * plot_w

    def y(value: float) -> float:
        return TOP + plot_h - min(value, y_max) / y_max * plot_h

    lines = []
    for s in series:
        segments: list[list[tuple[str, str]]] = [[]]
        for b in buckets:
            value = getattr(b, s.field)
            if value is None:
                if segments[-1]:
                    segments.append([])
                continue
            segments[-1].append((f"{x(b.at):.1f}", f"{y(value):.1f}"))
        segments = [segment for segment in segments if segment]
        lines.append(
            Line(
                key=s.key,
                label=f"{s.label} (along the top where above the scale)" if s.clamped else s.label,
                colour=s.colour,
                segments=[" ".join(f"{cx},{cy}" for cx, cy in seg) for seg in segments],
                dots=[seg[0] for seg in segments if len(seg) == 1],
                dashed=s.dashed,
            )
        )
    legend, at = [], LEFT
    for s in series:  # each entry as wide as its label (about 6.2 px a character at 11 px)
        legend.append((at, s))
        at += 16 + round(len(s.label) * 6.2) + 18
    return Panel(
        pool=pool,
        kind=kind,
        title=title,
        note=note,
        x=x0,
        y=y0,
        width=width,
        height=height,
        y_max=y_max,
        y_max_label=_axis_label(y_max),
        lines=lines,
        legend=legend,
    )


def chart_context(data: ChartData) -> dict[str, Any]:
    """SVG geometry for `data`: per pool its slots panel across the chart, its calls and its
    times side by side below; x from the range's start to its end in each."""
    panels: list[Panel] = []
    scope = scope_label(data.instances)
    reasons = data.limit_reasons or {}
    if data.start is not None and data.end is not None:
        span = (data.start.timestamp(), data.end.timestamp())
        half = WIDTH // 2
        for index, (pool, buckets) in enumerate(sorted(data.pools.items())):
            top = index * POOL_H
            last = buckets[-1]
            limit = ""
            if last.limit is not None:
                reason = reasons.get(pool)
                limit = f", limit {_figure(last.limit)}" + (f" ({reason})" if reason else "")
            note = (
                f"{scope}: size {last.size}, last: {_figure(last.in_use_peak)} in use at peak, "
                f"{_figure(last.waiting_peak)} waiting{limit}"
            )
            panels.append(
                _panel(
                    pool, "slots", buckets, SLOT_SERIES, span, (0, top, WIDTH, SLOTS_H), pool, note
                )
            )
            below = top + SLOTS_H
            panels.append(
                _panel(
                    pool,
                    "calls",
                    buckets,
                    CALL_SERIES,
                    span,
                    (0, below, half, SMALL_H),
                    pool,
                    "calls per minute",
                )
            )
            panels.append(
                _panel(
                    pool,
                    "times",
                    buckets,
                    TIME_SERIES,
                    span,
                    (half, below, WIDTH - half, SMALL_H),
                    pool,
                    "p95, ms",
                )
            )
    local = timezone.localtime
    return {
        "scope": scope,
        "panels": panels,
        "start": local(data.start) if data.start else None,
        "end": local(data.end) if data.end else None,
        "bucket_seconds": data.bucket_seconds,
        "width": WIDTH,
        "height": POOL_H * len(data.pools) if data.start is not None else 0,
    }


def render_chart(queryset: QuerySet[PoolSnapshot], *, standalone: bool = False) -> SafeString:
    """The chart of `queryset` as SVG markup (a whole document when `standalone`)."""
    context = chart_context(chart_data(queryset))
    context["standalone"] = standalone
    return render_to_string("admin/pools/poolsnapshot/chart.svg", context)


@admin.register(PoolSnapshot)
class PoolSnapshotAdmin(SafeFiltersMixin, admin.ModelAdmin):
    """History is evidence: nobody edits it here (`prune_pool_snapshots` removes old rows).

    A filter in the address that cannot work answers 400, on the list and the chart alike
    (`pools.admin_filters`).
    """

    list_display = (
        "taken_at",
        "pool",
        "instance",
        "size",
        "in_use",
        "in_use_peak",
        "waiting_peak",
        "concurrency_limit",
        "limit_reason",
        "deployment_waiting_peak",
        "paused_s",
        "requests",
        "errors",
        "refused",
        "rate_limited",
        "wait_p95_ms",
        "latency_p95_ms",
        "ttft_p95_ms",
    )
    list_filter = ("pool", "instance")
    date_hierarchy = "taken_at"
    ordering = ("-taken_at", "pool")
    show_full_result_count = False  # a second COUNT(*) over the whole table adds nothing
    list_per_page = 50

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list:
        chart = path(
            "chart.svg",
            self.admin_site.admin_view(self.chart_view),
            name="pools_poolsnapshot_chart",
        )
        return [chart, *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if isinstance(response, TemplateResponse) and context and context.get("cl"):
            try:
                with evaluating_filters(request, self.model):
                    context["pool_chart"] = render_chart(context["cl"].queryset)
            except UnusableFilter as exc:
                return bad_filter_response(request, exc)
        return response

    def chart_view(self, request: HttpRequest) -> HttpResponse:
        """The list page's chart alone, for the same filters (an image/svg+xml document)."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        try:
            changelist = self.get_changelist_instance(request)
            with evaluating_filters(request, self.model):
                svg = render_chart(changelist.queryset, standalone=True)
        except IncorrectLookupParameters:
            return HttpResponseBadRequest("unknown filter")
        except (DisallowedModelAdminLookup, UnusableFilter) as exc:
            return bad_filter_response(request, exc)
        return HttpResponse(svg, content_type="image/svg+xml; charset=utf-8")
