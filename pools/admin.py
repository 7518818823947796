"""Read-only admin for pool history, with a chart of the pools over the filtered range.

The chart (`pools.charts`) is aggregated in the database and drawn on the server as SVG,
with its figures as a table for screen readers. `?metric=` picks what it shows (`METRICS`:
the overview, the interval's peaks, requests, errors by kind, 429s and pauses, wait,
latency and first-token p95, tokens, the concurrency limit) and `?per=instance` draws one
panel per pool and instance instead of the cluster's total; both stay in every link of the
list (filters, pages, ordering) without being taken for filters. An unknown choice is a
plain 400 naming the valid ones.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.exceptions import DisallowedModelAdminLookup
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.template.response import TemplateResponse
from django.urls import path

from pools.admin_filters import (
    RecentFilter,
    SafeFiltersMixin,
    UnusableFilter,
    bad_filter_response,
    evaluating_filters,
)
from pools.chart_data import MAX_POINTS, chart_data
from pools.charts import METRICS, Metric, UnknownMetric, history, metric_named, render_svg
from pools.models import PoolSnapshot

__all__ = ["MAX_POINTS", "PoolSnapshotAdmin", "chart_data"]

METRIC_VAR = "metric"
PER_VAR = "per"
GROUPINGS = {"pool": "pool (cluster total)", "instance": "pool and instance"}
CHART_PARAMS = frozenset({METRIC_VAR, PER_VAR})


def chart_choices(request: HttpRequest) -> tuple[Metric, bool]:
    """The metric and grouping the address asks for; `UnknownMetric` for any other."""
    metric = metric_named(request.GET.get(METRIC_VAR))
    per = request.GET.get(PER_VAR) or "pool"
    if per not in GROUPINGS:
        raise UnknownMetric(f"unknown chart grouping per={per[:40]!r}; choose pool or instance")
    return metric, per == "instance"


def unknown_choice_response(request: HttpRequest, problem: Exception) -> HttpResponse:
    return HttpResponseBadRequest(
        f"This pool chart cannot be drawn: {problem}.\nRemove it from the address: "
        f"{request.path}\n",
        content_type="text/plain; charset=utf-8",
    )


class PoolSnapshotChangeList(ChangeList):
    """Keeps the chart's choices in every link of the list, and out of its filters."""

    def get_filters_params(self, params: Any = None) -> Any:
        lookups = super().get_filters_params(params)
        for name in CHART_PARAMS:
            lookups.pop(name, None)
        return lookups


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
        "overflow_in_use_peak",
        "waiting_peak",
        "concurrency_limit",
        "limit_reason",
        "deployment_waiting_peak",
        "paused_s",
        "requests",
        "errors",
        "refused",
        "rate_limited",
        "pauses",
        "wait_p95_ms",
        "latency_p95_ms",
        "ttft_p95_ms",
    )
    list_filter = (RecentFilter, "pool", "instance")
    date_hierarchy = "taken_at"
    ordering = ("-taken_at", "pool")
    show_full_result_count = False  # a second COUNT(*) over the whole table adds nothing
    list_per_page = 50
    list_params = CHART_PARAMS

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return PoolSnapshotChangeList

    def get_urls(self) -> list:
        chart = path(
            "chart.svg",
            self.admin_site.admin_view(self.chart_view),
            name="pools_poolsnapshot_chart",
        )
        return [chart, *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        try:
            metric, per_instance = chart_choices(request)
        except UnknownMetric as exc:
            return unknown_choice_response(request, exc)
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if isinstance(response, TemplateResponse) and context and context.get("cl"):
            changelist = context["cl"]
            try:
                with evaluating_filters(request, self.model, CHART_PARAMS):
                    chart = history(changelist.queryset, metric, per_instance=per_instance)
            except UnusableFilter as exc:
                return bad_filter_response(request, exc)
            context["pool_chart"] = render_svg(chart)
            context["pool_history"] = {
                **chart,
                "choices": [
                    {
                        "label": choice.label,
                        "url": changelist.get_query_string({METRIC_VAR: key}),
                        "current": choice is metric,
                    }
                    for key, choice in METRICS.items()
                ],
                "groupings": [
                    {
                        "label": label,
                        "url": changelist.get_query_string({PER_VAR: key}),
                        "current": (key == "instance") == per_instance,
                    }
                    for key, label in GROUPINGS.items()
                ],
            }
        return response

    def chart_view(self, request: HttpRequest) -> HttpResponse:
        """The list page's chart alone, for the same filters (an image/svg+xml document)."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        try:
            metric, per_instance = chart_choices(request)
            changelist = self.get_changelist_instance(request)
            with evaluating_filters(request, self.model, CHART_PARAMS):
                chart = history(changelist.queryset, metric, per_instance=per_instance)
        except UnknownMetric as exc:
            return unknown_choice_response(request, exc)
        except IncorrectLookupParameters:
            return HttpResponseBadRequest("unknown filter")
        except (DisallowedModelAdminLookup, UnusableFilter) as exc:
            return bad_filter_response(request, exc)
        svg = render_svg(chart, standalone=True)
        return HttpResponse(svg, content_type="image/svg+xml; charset=utf-8")
