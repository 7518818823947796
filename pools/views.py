"""Operator views of the pools app (the health probes are `pools.endpoints`)."""

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from pools.access import scrape_allowed
from pools.engine.metrics import CONTENT_TYPE, metrics_for
from pools.runtime import get_pool


@never_cache
@require_GET
async def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format; METRICS_TOKEN / METRICS_ALLOWED_IPS restrict who may scrape."""
    if not scrape_allowed(request):
        return HttpResponseForbidden("metrics: token or client address not allowed\n")
    return HttpResponse(metrics_for(get_pool()).render(), content_type=CONTENT_TYPE)
