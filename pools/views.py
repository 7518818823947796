"""Operator views of the pools app."""

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from redis.exceptions import RedisError

from pools.metrics import CONTENT_TYPE, metrics_for, scrape_allowed
from pools.runtime import get_pool


@never_cache
@require_GET
async def health(request: HttpRequest) -> JsonResponse:
    """Readiness: the design note's health JSON, live; 503 when the pools cannot serve
    (not initialized, closed, or the main deployment's circuit is open). `?scope=cluster`
    adds every instance's last report when the pools are coordinated through Redis."""
    registry = get_pool()
    scope = request.GET.get("scope", "instance")
    if scope not in {"instance", "cluster"}:
        return JsonResponse({"error": "scope must be 'instance' or 'cluster'"}, status=400)
    if scope == "cluster" and registry.cluster is None:
        return JsonResponse({"error": "scope=cluster needs REDIS_URL (no cluster)"}, status=400)
    reason = registry.unavailable_reason()
    body = {"status": "degraded" if reason else "healthy", **registry.stats()}
    if reason:
        body["reason"] = reason
    if scope == "cluster":
        try:
            body["cluster_view"] = await registry.cluster_stats()
        except (RedisError, OSError) as exc:
            body["cluster_view"] = {"error": f"Redis unreachable: {type(exc).__name__}"}
    return JsonResponse(body, status=503 if reason else 200, json_dumps_params={"indent": 2})


@never_cache
@require_GET
async def liveness(request: HttpRequest) -> JsonResponse:
    """The process answers: 200 even during an LLM outage, so nothing restarts a healthy app."""
    return JsonResponse({"status": "alive"})


@never_cache
@require_GET
async def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format; METRICS_TOKEN / METRICS_ALLOWED_IPS restrict who may scrape."""
    if not scrape_allowed(request):
        return HttpResponseForbidden("metrics: token or client address not allowed\n")
    return HttpResponse(metrics_for(get_pool()).render(), content_type=CONTENT_TYPE)
