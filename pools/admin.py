"""Read-only admin for pool history, with a chart of the pools over the filtered range.

The chart is aggregated in the database (time buckets from epoch seconds, at most
`MAX_POINTS` per pool) so 100,000 rows cost one grouped query, not a Python loop, and it is
drawn as inline SVG on the server: no script, no CDN, nothing the page's
Content-Security-Policy has to allow. Each point is the cluster's total: every instance's
average over the bucket, summed over the instances (filtered to one instance, it is that
instance's average), so several servers show as one cluster rather than as their mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.db import NotSupportedError, connections
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
    """One point of a pool's line: the bucket's start and the sums over the instances of
    each instance's averages in it (`size`: the sum of the instances' configured sizes)."""

    at: datetime
    in_use: float
    available: float
    overflow: float
    waiting: float
    size: int
    rows: int
    instances: int = 1  # instances with rows in this bucket


@dataclass(frozen=True)
class ChartData:
    start: datetime | None
    end: datetime | None
    bucket_seconds: int
    pools: dict[str, list[Bucket]]
    instances: tuple[str, ...] = ()  # every instance in the range, sorted


# Per instance and bucket, then summed per bucket: (inner alias, outer aggregate).
_BUCKET_COLUMNS = (
    ("in_use", "SUM"),
    ("available", "SUM"),
    ("overflow", "SUM"),
    ("waiting", "SUM"),
    ("size", "SUM"),
    ("rows", "SUM"),
    ("instance", "COUNT"),
)


def chart_data(queryset: QuerySet[PoolSnapshot], max_points: int = MAX_POINTS) -> ChartData:
    """Per pool, at most `max_points` time buckets of the queryset: each instance averaged
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
            in_use=Avg("in_use"),
            available=Avg("available"),
            overflow=Avg("overflow_in_use"),
            waiting=Avg("waiting"),
            size=Max("size"),
            rows=Count("id"),
        )
    )
    # The ORM cannot select from a grouped subquery, so the outer GROUP BY wraps its SQL
    # (with its parameters: nothing from the request is pasted into the text).
    connection = connections[queryset.db]
    inner_sql, params = per_instance.query.get_compiler(connection=connection).as_sql()
    q = connection.ops.quote_name
    sums = ", ".join(f"{aggregate}({q(name)})" for name, aggregate in _BUCKET_COLUMNS)
    sql = (
        f"SELECT {q('pool')}, {q('bucket')}, {sums} FROM ({inner_sql}) per_instance "
        f"GROUP BY {q('pool')}, {q('bucket')} ORDER BY {q('pool')}, {q('bucket')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    pools: dict[str, list[Bucket]] = {}
    for pool, bucket_index, in_use, available, overflow, waiting, size, count, seen in rows:
        at = datetime.fromtimestamp(start_epoch + int(bucket_index) * width, tz=UTC)
        pools.setdefault(pool, []).append(
            Bucket(
                at=at,
                in_use=float(in_use),
                available=float(available),
                overflow=float(overflow),
                waiting=float(waiting),
                size=int(size),
                rows=int(count),
                instances=int(seen),
            )
        )
    start = datetime.fromtimestamp(start_epoch, tz=UTC)
    end = datetime.fromtimestamp(end_epoch, tz=UTC)
    return ChartData(start, end, width, pools, instances)


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
        "scope": scope_label(data.instances),
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
