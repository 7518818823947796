"""`{% pool_history_last_hour %}`: the last hour of every pool, for the admin index.

Drawn only for a user the pool history's admin lets view it (staff with the view or change
permission on PoolSnapshot); for anyone else it renders nothing, not even a heading.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import template
from django.contrib import admin
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString

from pools.charts import COMPACT_H, METRICS, history, render_svg
from pools.models import PoolSnapshot

register = template.Library()

LAST_HOUR = timedelta(hours=1)


@register.simple_tag(takes_context=True)
def pool_history_last_hour(context: dict[str, Any]) -> SafeString | str:
    request = context.get("request")
    if request is None or not admin.site.get_model_admin(PoolSnapshot).has_view_permission(request):
        return ""
    rows = PoolSnapshot.objects.filter(taken_at__gte=timezone.now() - LAST_HOUR)
    chart = history(rows, METRICS["peaks"], panel_height=COMPACT_H)
    changelist = reverse("admin:pools_poolsnapshot_changelist")
    return render_to_string(
        "admin/pools/poolsnapshot/history.html",
        {
            "chart_id": "pool-history-last-hour",
            "heading": "Pools, last hour",
            "svg": render_svg(chart),
            "tables": chart["tables"],
            "totals": chart["totals"],
            "more_url": f"{changelist}?within=1h",
            "more_label": "The last hour in pool history (requests, errors, 429s, times ...)",
        },
    )
