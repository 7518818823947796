"""Operator views of the pools app."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from pools.runtime import get_pool


@never_cache
@require_GET
async def health(request: HttpRequest) -> JsonResponse:
    """The design note's health JSON, live: 200 when the pools are usable, 503 when not."""
    registry = get_pool()
    stats = registry.stats()
    healthy = registry.usable
    body = {"status": "healthy" if healthy else "degraded", **stats}
    if not healthy:
        body["reason"] = "pools closed" if registry.closed else "pools not initialized"
    return JsonResponse(body, status=200 if healthy else 503, json_dumps_params={"indent": 2})
