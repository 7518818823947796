"""Read-only admin for pool history, with a chart of the pools over the filtered range.

The chart is aggregated in the database (time buckets from epoch seconds, Avg per bucket,
at most `MAX_POINTS` per pool) so 100,000 rows cost one grouped query, not a Python loop,
and it is drawn as inline SVG on the server: no script, no CDN, nothing the page's
Content-Security-Policy has to allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.db import NotSupportedError
from django.db.models import Avg, BigIntegerField, Count, Func, Max, Min, QuerySet, Value
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.safestring import SafeString

from pools.models import PoolSnapshot

MAX_POINTS = 200

# Series drawn per pool: (field, label, colour). Colours stay readable for the common
# colour-vision deficiencies (blue / orange / green / magenta).
SERIES = (
    ("in_use", "in use", "#1c64b0"),
    ("available", "available", "#2b8a3e"),
    ("overflow", "overflow in use", "#e8590c"),
    ("waiting", "waiting", "#a61e4d"),
)
WIDTH, HEIGHT = 760, 190
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 36
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
LEGEND_H = 22


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
    """One point of a pool's line: the bucket's start and the averages over its rows."""

    at: datetime
    in_use: float
    available: float
    overflow: float
    waiting: float
    size: int
    rows: int


@dataclass(frozen=True)
class ChartData:
    start: datetime | None
    end: datetime | None
    bucket_seconds: int
    pools: dict[str, list[Bucket]]


def chart_data(queryset: QuerySet[PoolSnapshot], max_points: int = MAX_POINTS) -> ChartData:
    """Per pool, at most `max_points` time buckets of the queryset, averaged in the database."""
    queryset = queryset.order_by()  # a default ordering would join the GROUP BY
    bounds = queryset.aggregate(start=Min("taken_at"), end=Max("taken_at"))
    if bounds["start"] is None:
        return ChartData(None, None, 0, {})
    start_epoch = math.floor(bounds["start"].timestamp())
    end_epoch = math.floor(bounds["end"].timestamp())
    width = max(1, math.ceil((end_epoch - start_epoch + 1) / max_points))
    bucket = (EpochSeconds("taken_at") - Value(start_epoch)) / Value(width)
    rows = (
        queryset.annotate(bucket=bucket)
        .values("pool", "bucket")
        .annotate(
            in_use=Avg("in_use"),
            available=Avg("available"),
            overflow=Avg("overflow_in_use"),
            waiting=Avg("waiting"),
            size=Max("size"),
            rows=Count("id"),
        )
        .order_by("pool", "bucket")
    )
    pools: dict[str, list[Bucket]] = {}
    for row in rows:
        at = datetime.fromtimestamp(start_epoch + int(row["bucket"]) * width, tz=UTC)
        pools.setdefault(row["pool"], []).append(
            Bucket(
                at=at,
                in_use=float(row["in_use"]),
                available=float(row["available"]),
                overflow=float(row["overflow"]),
                waiting=float(row["waiting"]),
                size=int(row["size"]),
                rows=int(row["rows"]),
            )
        )
    start = datetime.fromtimestamp(start_epoch, tz=UTC)
    end = datetime.fromtimestamp(end_epoch, tz=UTC)
    return ChartData(start, end, width, pools)


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    colour: str
    points: str  # SVG polyline "x,y x,y ..."
    dots: list[tuple[str, str]]  # drawn when a single point would make no line


@dataclass(frozen=True)
class PoolChart:
    pool: str
    y_max: int
    lines: list[Line]
    last: Bucket


def _nice_ceiling(value: float) -> int:
    """The y-axis top: at least 1, rounded up to 1, 2 or 5 times a power of ten."""
    if value <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return int(step * magnitude)
    return int(10 * magnitude)  # pragma: no cover - the loop always returns


def chart_context(data: ChartData) -> dict[str, Any]:
    """SVG geometry for `data`: one panel per pool, x from the range's start to its end."""
    charts: list[PoolChart] = []
    if data.start is not None and data.end is not None:
        t0, t1 = data.start.timestamp(), data.end.timestamp()
        for pool, buckets in sorted(data.pools.items()):
            y_max = _nice_ceiling(
                max(max(b.size, b.in_use, b.available, b.waiting) for b in buckets)
            )

            def x(at: datetime) -> float:
                if t1 == t0:
                    return LEFT + PLOT_W / 2
                return LEFT + (at.timestamp() - t0) / (t1 - t0) * PLOT_W

            def y(value: float, top: int = y_max) -> float:
                return TOP + PLOT_H - value / top * PLOT_H

            lines = []
            for key, label, colour in SERIES:
                coords = [(f"{x(b.at):.1f}", f"{y(getattr(b, key)):.1f}") for b in buckets]
                lines.append(
                    Line(
                        key=key,
                        label=label,
                        colour=colour,
                        points=" ".join(f"{cx},{cy}" for cx, cy in coords),
                        dots=coords if len(coords) == 1 else [],
                    )
                )
            charts.append(PoolChart(pool, y_max, lines, buckets[-1]))
    local = timezone.localtime
    return {
        "charts": [(index * HEIGHT, chart) for index, chart in enumerate(charts)],
        "start": local(data.start) if data.start else None,
        "end": local(data.end) if data.end else None,
        "bucket_seconds": data.bucket_seconds,
        "width": WIDTH,
        "height": HEIGHT * len(charts) + LEGEND_H,
        "legend_y": HEIGHT * len(charts) + 14,
        "left": LEFT,
        "right_edge": WIDTH - RIGHT,
        "plot_w": PLOT_W,
        "plot_h": PLOT_H,
        "top": TOP,
        "mid": TOP + PLOT_H / 2,
        "bottom": TOP + PLOT_H,
        "label_y": HEIGHT - 16,
        "legend": [
            (LEFT + i * 130, key, label, colour) for i, (key, label, colour) in enumerate(SERIES)
        ],
    }


def render_chart(queryset: QuerySet[PoolSnapshot], *, standalone: bool = False) -> SafeString:
    """The chart of `queryset` as SVG markup (a whole document when `standalone`)."""
    context = chart_context(chart_data(queryset))
    context["standalone"] = standalone
    return render_to_string("admin/pools/poolsnapshot/chart.svg", context)


@admin.register(PoolSnapshot)
class PoolSnapshotAdmin(admin.ModelAdmin):
    """History is evidence: nobody edits it here (`prune_pool_snapshots` removes old rows)."""

    list_display = (
        "taken_at",
        "pool",
        "instance",
        "size",
        "in_use",
        "available",
        "overflow_in_use",
        "waiting",
        "requests",
        "errors",
        "refused",
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
            context["pool_chart"] = render_chart(context["cl"].queryset)
        return response

    def chart_view(self, request: HttpRequest) -> HttpResponse:
        """The list page's chart alone, for the same filters (an image/svg+xml document)."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            return HttpResponseBadRequest("unknown filter")
        svg = render_chart(changelist.queryset, standalone=True)
        return HttpResponse(svg, content_type="image/svg+xml; charset=utf-8")
