"""Pool history charts drawn on the server: inline SVG with a text alternative, no script.

The figures come from `pools.chart_data` (aggregated in the database). Nothing here needs a
script or a CDN, so the page's Content-Security-Policy has nothing to allow. Each panel has
a `<desc>` that says what its lines reach, and the admin pages show the same figures as a
table (`figure_tables`), for screen readers and for copying.

What a chart shows is its metric (`?metric=` on the admin list and chart.svg, `METRICS`):
the overview draws three panels per pool (its slots: the interval's peaks in use, on
temporary connections and queued, the deployment's queue and concurrency limit, the size;
its calls per minute; its p95 times); every other metric draws one panel per pool, or per
pool and instance. With Redis each instance runs its share of the deployment's limit, so
the limit summed is the cluster's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.db.models import QuerySet
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from pools.chart_data import Bucket, ChartData, chart_data
from pools.models import PoolSnapshot

BLUE, RED, ORANGE, GREEN, PURPLE, TEAL, GREY = (
    "#1c64b0",
    "#a61e4d",
    "#e8590c",
    "#2b8a3e",
    "#7048e8",
    "#0b7285",
    "#868e96",
)
KIND_COLOURS = (RED, ORANGE, PURPLE, TEAL, BLUE, GREY)


@dataclass(frozen=True)
class Series:
    """One line of a panel: `key` names it in the SVG, `field` is the `Bucket` figure it
    draws; `count` the bucket's total behind a per-minute figure; `kind` an error kind."""

    key: str
    field: str
    label: str
    colour: str
    dashed: bool = False
    clamped: bool = False  # drawn along the top edge where it is above the panel's scale
    count: str = ""
    kind: str = ""
    lowest: bool = False  # its summary gives the lowest figure (a limit), not the highest

    def value(self, bucket: Bucket) -> float | None:
        if self.kind:
            entry = bucket.errors_by_kind.get(self.kind)
            return entry[1] if entry is not None else None
        value: float | None = getattr(bucket, self.field)
        return value

    def total(self, bucket: Bucket) -> int | None:
        if self.kind:
            entry = bucket.errors_by_kind.get(self.kind)
            return entry[0] if entry is not None else None
        total: int | None = getattr(bucket, self.count) if self.count else None
        return total


# Colours stay readable for the common colour-vision deficiencies; dashes tell the rest.
IN_USE = Series("in_use", "in_use_peak", "in use (peak)", BLUE)
OVERFLOW = Series("overflow", "overflow_peak", "overflow (peak)", TEAL, dashed=True)
WAITING = Series("waiting", "waiting_peak", "waiting (peak)", RED)
DEPLOYMENT_WAITING = Series(
    "deployment_waiting", "deployment_waiting_peak", "deployment queue (peak)", ORANGE
)
SIZE = Series("size", "size", "size", GREY, dashed=True)
LIMIT = Series("limit", "limit", "limit", GREEN, dashed=True, lowest=True)
REQUESTS = Series("requests", "requests_per_min", "requests", BLUE, count="requests")
ERRORS = Series("errors", "errors_per_min", "errors", RED, count="errors")
REFUSED = Series("refused", "refused_per_min", "refused", ORANGE, count="refused")
RATE_LIMITED = Series("rate_limited", "rate_limited_per_min", "429s", PURPLE, count="rate_limited")
PAUSES = Series("pauses", "pauses_per_min", "pauses", ORANGE, dashed=True, count="pauses")
WAIT_P95 = Series("wait_p95", "wait_p95_ms", "wait", RED)
LATENCY_P95 = Series("latency_p95", "latency_p95_ms", "call", BLUE)
TTFT_P95 = Series("ttft_p95", "ttft_p95_ms", "first token", GREEN)

SLOT_SERIES = (IN_USE, OVERFLOW, WAITING, DEPLOYMENT_WAITING, replace(LIMIT, clamped=True), SIZE)
CALL_SERIES = (REQUESTS, ERRORS, REFUSED, RATE_LIMITED)
TIME_SERIES = (WAIT_P95, LATENCY_P95, TTFT_P95)


@dataclass(frozen=True)
class Metric:
    """What a chart shows: its name in the address, its label in the chooser, the note on
    each panel (the unit) and its lines (the errors' lines are the kinds in the range)."""

    key: str
    label: str
    note: str
    series: tuple[Series, ...] = ()
    unit: str = ""


OVERVIEW = "overview"
ERRORS_BY_KIND = "errors"
METRICS = {
    metric.key: metric
    for metric in (
        Metric(OVERVIEW, "Overview", "slots, calls per minute and p95 times"),
        Metric("peaks", "Peaks", "the interval's peaks", (IN_USE, OVERFLOW, WAITING, SIZE)),
        Metric(
            "requests",
            "Requests",
            "requests per minute",
            (
                REQUESTS,
                Series(
                    "overflow_requests",
                    "overflow_requests_per_min",
                    "on a temporary connection",
                    TEAL,
                    dashed=True,
                    count="overflow_requests",
                ),
                Series(
                    "queued_requests",
                    "queued_requests_per_min",
                    "queued first",
                    RED,
                    dashed=True,
                    count="queued_requests",
                ),
            ),
        ),
        Metric(ERRORS_BY_KIND, "Errors by kind", "errors and refusals by kind, per minute"),
        Metric("rate_limits", "429s and pauses", "per minute", (RATE_LIMITED, PAUSES)),
        Metric(
            "wait",
            "Wait p95",
            "waiting for a slot, ms",
            (WAIT_P95, Series("wait_max", "wait_max_ms", "longest", RED, dashed=True)),
            " ms",
        ),
        Metric("latency", "Latency p95", "p95 of the whole call, ms", (LATENCY_P95,), " ms"),
        Metric("ttft", "TTFT p95", "p95 time to first token, ms", (TTFT_P95,), " ms"),
        Metric(
            "tokens",
            "Tokens",
            "tokens per minute",
            (
                Series("tokens_in", "tokens_in_per_min", "in", BLUE, count="tokens_in"),
                Series("tokens_out", "tokens_out_per_min", "out", GREEN, count="tokens_out"),
            ),
        ),
        Metric(
            "limit",
            "Limit",
            "the deployment's concurrency limit",
            (
                LIMIT,
                Series("deployment_in_flight", "deployment_in_flight", "in flight", BLUE),
                DEPLOYMENT_WAITING,
            ),
        ),
    )
}


class UnknownMetric(ValueError):
    """A `?metric=` or `?per=` the chart does not offer."""


def metric_named(key: str | None) -> Metric:
    """The metric for the address's `metric` (the overview when absent)."""
    if not key:
        return METRICS[OVERVIEW]
    metric = METRICS.get(key)
    if metric is None:
        raise UnknownMetric(
            f"unknown chart metric {key[:40]!r}; choose one of {', '.join(METRICS)}"
        )
    return metric


WIDTH = 760
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 48  # inside each panel; its legend is in BOTTOM
SLOTS_H = 202  # a plot of 142
SMALL_H = 140  # the calls and times panels, side by side under it: plots of 80
POOL_H = SLOTS_H + SMALL_H
COMPACT_H = 150  # one metric's panel on the admin index


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
    """One plot of one pool (and instance), placed at (x, y) in the chart."""

    pool: str
    kind: str  # "slots", "calls", "times" in the overview, else the metric's key
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
    summary: str = ""  # the panel's text alternative
    instance: str | None = None

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


def _summary(buckets: list[Bucket], series: tuple[Series, ...], unit: str) -> str:
    """What each line reaches over the range, in words."""
    parts = []
    for s in series:
        values = [v for b in buckets if (v := s.value(b)) is not None]
        totals = [t for b in buckets if (t := s.total(b)) is not None]
        if s.count or s.kind:
            if not totals:
                parts.append(f"{s.label}: no figures")
                continue
            most = f", up to {_figure(max(values))} a minute" if values else ""
            parts.append(f"{sum(totals)} {s.label}{most}")
        elif not values:
            parts.append(f"{s.label}: no figures")
        elif s.lowest:
            parts.append(f"{s.label}: lowest {_figure(min(values), unit)}")
        else:
            parts.append(f"{s.label}: highest {_figure(max(values), unit)}")
    return "; ".join(parts)


def _panel(
    pool: str,
    kind: str,
    buckets: list[Bucket],
    series: tuple[Series, ...],
    span: tuple[float, float],
    box: tuple[int, int, int, int],
    title: str,
    note: str = "",
    unit: str = "",
    instance: str | None = None,
) -> Panel:
    x0, y0, width, height = box
    t0, t1 = span
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    scaled = [
        value
        for b in buckets
        for s in series
        if not s.clamped and (value := s.value(b)) is not None
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
            value = s.value(b)
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
        summary=f"{title}, {note}: {_summary(buckets, series, unit)}",
        instance=instance,
    )


def scope_label(instances: tuple[str, ...]) -> str:
    """What the chart's numbers cover: one instance, or the sum over several."""
    if len(instances) == 1:
        return f"instance {instances[0]}"
    return f"cluster total of {len(instances)} instances"


def metric_series(metric: Metric, data: ChartData) -> tuple[Series, ...]:
    """The metric's lines; for errors by kind, one per kind in the range."""
    if metric.key != ERRORS_BY_KIND:
        return metric.series
    return tuple(
        Series(f"kind-{index}", "", kind, KIND_COLOURS[index % len(KIND_COLOURS)], kind=kind)
        for index, kind in enumerate(data.error_kinds)
    )


def _overview_panels(
    group: tuple[str, str | None],
    title: str,
    buckets: list[Bucket],
    span: tuple[float, float],
    top: int,
    note: str,
) -> list[Panel]:
    pool, instance = group
    half, below = WIDTH // 2, top + SLOTS_H
    slots = (0, top, WIDTH, SLOTS_H)
    calls, times = (0, below, half, SMALL_H), (half, below, WIDTH - half, SMALL_H)
    return [
        _panel(pool, "slots", buckets, SLOT_SERIES, span, slots, title, note, "", instance),
        _panel(pool, "calls", buckets, CALL_SERIES, span, calls, title, "calls per minute"),
        _panel(pool, "times", buckets, TIME_SERIES, span, times, title, "p95, ms", " ms"),
    ]


def _slots_note(scope: str, last: Bucket, reason: str | None) -> str:
    limit = ""
    if last.limit is not None:
        limit = f", limit {_figure(last.limit)}" + (f" ({reason})" if reason else "")
    return (
        f"{scope}: size {last.size}, last: {_figure(last.in_use_peak)} in use at peak, "
        f"{_figure(last.waiting_peak)} waiting{limit}"
    )


def chart_context(
    data: ChartData, metric: Metric | None = None, *, panel_height: int = SLOTS_H
) -> dict[str, Any]:
    """SVG geometry for `data`: the overview's three panels per pool, or one panel of the
    metric per pool (and instance); x from the range's start to its end in each."""
    metric = metric or METRICS[OVERVIEW]
    panels: list[Panel] = []
    scope = scope_label(data.instances)
    reasons = data.limit_reasons or {}
    height = 0
    if data.start is not None and data.end is not None:
        span = (data.start.timestamp(), data.end.timestamp())
        series = metric_series(metric, data)
        for label, buckets in sorted(data.pools.items()):
            pool, instance = data.groups.get(label, (label, None))
            if metric.key == OVERVIEW:
                covers = scope if instance is None else f"instance {instance}"
                note = _slots_note(covers, buckets[-1], reasons.get(pool))
                panels += _overview_panels((pool, instance), label, buckets, span, height, note)
                height += POOL_H
                continue
            box = (0, height, WIDTH, panel_height)
            note = metric.note if series else f"{metric.note}: none in this range"
            panels.append(
                _panel(
                    pool, metric.key, buckets, series, span, box, label, note, metric.unit, instance
                )
            )
            height += panel_height
    local = timezone.localtime
    return {
        "scope": scope,
        "metric": metric,
        "panels": panels,
        "start": local(data.start) if data.start else None,
        "end": local(data.end) if data.end else None,
        "bucket_seconds": data.bucket_seconds,
        "width": WIDTH,
        "height": height,
    }


@dataclass(frozen=True)
class FigureTable:
    """A group's figures as a table: the chart's text alternative."""

    pool: str
    instance: str | None
    caption: str
    columns: list[tuple[str, str]]  # (series key, header)
    rows: list[tuple[datetime, list[tuple[str, str]]]]  # (bucket start, (key, cell) ...)

    def html(self) -> SafeString:
        """The table's markup, built here: a template loop over its thousands of cells
        would cost more than the whole chart's query."""
        instance = f' data-instance="{escape(self.instance)}"' if self.instance else ""
        head = "".join(f'<th scope="col">{escape(header)}</th>' for _, header in self.columns)
        body = "\n".join(
            f'<tr><th scope="row">{at:%Y-%m-%d %H:%M:%S}</th>'
            + "".join(f'<td data-series="{escape(key)}">{escape(cell)}</td>' for key, cell in cells)
            + "</tr>"
            for at, cells in self.rows
        )
        # Every value in it is escaped above.
        return mark_safe(
            f'<table class="pool-figures" data-pool="{escape(self.pool)}"{instance}>'
            f"<caption>{escape(self.caption)}</caption>"
            f'<thead><tr><th scope="col">Time</th>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table>"
        )


def _cell(series: Series, bucket: Bucket, unit: str) -> str:
    value = series.value(bucket)
    if not (series.count or series.kind):
        return _figure(value, unit)
    total = series.total(bucket)
    if total is None:
        return "-"
    return f"{total} ({_figure(value)} a minute)" if value is not None else str(total)


def figure_tables(data: ChartData, metric: Metric) -> list[FigureTable]:
    """Per pool (or pool and instance), one row per time bucket with each line's figure;
    counts in all with their rate per minute."""
    if metric.key == OVERVIEW:
        units = [(s, "") for s in SLOT_SERIES + CALL_SERIES] + [(s, " ms") for s in TIME_SERIES]
        units = [(replace(s, label=f"{s.label} p95"), u) if u else (s, u) for s, u in units]
    else:
        units = [(s, metric.unit) for s in metric_series(metric, data)]
    tables = []
    for label, buckets in sorted(data.pools.items()):
        pool, instance = data.groups.get(label, (label, None))
        tables.append(
            FigureTable(
                pool=pool,
                instance=instance,
                caption=f"{label}: {metric.note} (per {data.bucket_seconds} s)",
                columns=[(s.key, s.label) for s, _ in units],
                rows=[
                    (
                        timezone.localtime(b.at),
                        [(s.key, _cell(s, b, unit)) for s, unit in units],
                    )
                    for b in buckets
                ],
            )
        )
    return tables


def range_totals(data: ChartData) -> list[str]:
    """Per pool (or pool and instance), what the whole range held, in one sentence."""
    lines = []
    for label, buckets in sorted(data.pools.items()):

        def total(name: str, buckets: list[Bucket] = buckets) -> int:
            return sum(getattr(b, name) or 0 for b in buckets)

        def highest(name: str, buckets: list[Bucket] = buckets) -> float | None:
            return max((v for b in buckets if (v := getattr(b, name)) is not None), default=None)

        latency = highest("latency_p95_ms")
        times = f"call p95 up to {_figure(latency, ' ms')}" if latency is not None else "no calls"
        lines.append(
            f"{label}: {total('requests')} requests, {total('errors')} errors, "
            f"{total('refused')} refused, {total('rate_limited')} 429s, {total('pauses')} "
            f"pauses, {total('tokens_in') + total('tokens_out')} tokens; at most "
            f"{_figure(highest('in_use_peak'))} in use, {_figure(highest('overflow_peak'))} "
            f"on temporary connections, {_figure(highest('waiting_peak'))} waiting; {times}"
        )
    return lines


def history(
    queryset: QuerySet[PoolSnapshot],
    metric: Metric | None = None,
    *,
    per_instance: bool = False,
    panel_height: int = SLOTS_H,
) -> dict[str, Any]:
    """The chart's context and its tables, from one aggregation of `queryset`."""
    metric = metric or METRICS[OVERVIEW]
    data = chart_data(queryset, per_instance=per_instance, error_kinds=metric.key == ERRORS_BY_KIND)
    context = chart_context(data, metric, panel_height=panel_height)
    context["tables"] = figure_tables(data, metric)
    context["totals"] = range_totals(data)
    context["per_instance"] = per_instance
    return context


def render_svg(context: dict[str, Any], *, standalone: bool = False) -> SafeString:
    """The chart of a `history()` context as SVG markup (a whole document when
    `standalone`)."""
    return render_to_string(
        "admin/pools/poolsnapshot/chart.svg", {**context, "standalone": standalone}
    )


def render_chart(
    queryset: QuerySet[PoolSnapshot],
    metric: Metric | None = None,
    *,
    per_instance: bool = False,
    standalone: bool = False,
) -> SafeString:
    """The chart of `queryset` as SVG markup."""
    return render_svg(history(queryset, metric, per_instance=per_instance), standalone=standalone)
