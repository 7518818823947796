"""Operator views of the pools app."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from pools.runtime import get_pool


@never_cache
@require_GET
async def health(request: HttpRequest) -> JsonResponse:
    """Readiness: the design note's health JSON, live; 503 when the pools cannot serve
    (not initialized, closed, or the main deployment's circuit is open)."""
    registry = get_pool()
    reason = registry.unavailable_reason()
    body = {"status": "degraded" if reason else "healthy", **registry.stats()}
    if reason:
        body["reason"] = reason
    return JsonResponse(body, status=503 if reason else 200, json_dumps_params={"indent": 2})


@never_cache
@require_GET
async def liveness(request: HttpRequest) -> JsonResponse:
    """The process answers: 200 even during an LLM outage, so nothing restarts a healthy app."""
    return JsonResponse({"status": "alive"})
