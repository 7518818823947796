"""ASGI entry point: probes, then HTTP through Django, WebSockets through Channels.

Serve it with `python manage.py serve` (Daphne, with start-up and shutdown hooks), with a plain
`daphne carlos.asgi:application` (the first request warms the pools, Daphne's shutdown closes
them: carlos.lifespan), or with any lifespan-aware server such as `uvicorn
carlos.asgi:application`.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "carlos.settings")
django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application does

from carlos.middleware import LoopMiddlewareHandler  # noqa: E402

# Django's handler, with its middleware run on the event loop (carlos.middleware).
django_asgi_app = LoopMiddlewareHandler()

from carlos.startup import refuse_to_import_wrong  # noqa: E402

refuse_to_import_wrong()  # outside DEBUG, a wrong configuration stops here, naming the variable

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.core.exceptions import SuspiciousFileOperation  # noqa: E402
from django.http import Http404, HttpRequest, HttpResponse  # noqa: E402

from agents.routing import websocket_urlpatterns  # noqa: E402
from carlos import lifecycle, lifespan, telemetry  # noqa: E402
from carlos.admission import RequestGate  # noqa: E402
from carlos.socket_origins import SiteOriginValidator  # noqa: E402
from pools.endpoints import HealthEndpoints  # noqa: E402


class StaticFiles(ASGIStaticFilesHandler):
    """STATIC_URL for Daphne; a path escaping the static folders (`..`) is a 404, not a 500."""

    def serve(self, request: HttpRequest) -> HttpResponse:
        try:
            return super().serve(request)
        except SuspiciousFileOperation as exc:
            raise Http404("no such static file") from exc


application = lifespan.PoolLifespan(
    ProtocolTypeRouter(
        {
            # Health probes are answered first, on the event loop, without Django's middleware,
            # and never wait in the gate's line. Daphne serves no static files itself: the CSS,
            # the page script and the vendored mermaid are served from STATIC_URL here (off
            # the event loop, in a thread).
            "http": HealthEndpoints(
                RequestGate(
                    StaticFiles(django_asgi_app),
                    limit=settings.MAX_CONCURRENT_REQUESTS,
                    max_waiting=settings.MAX_WAITING_REQUESTS,
                ),
                # Operators see where traces and metrics go (the key masked).
                sections={"telemetry": telemetry.describe},
                warming=lifespan.warming,
            ),
            # Sessions authenticate the socket; the Origin check (scheme, host and port: this
            # site's own pages, or DJANGO_WS_ALLOWED_ORIGINS) stops other sites and other
            # ports from opening it with the user's cookies (cross-site WebSocket hijacking).
            "websocket": SiteOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    ),
    on_starting=lifecycle.starting,
    on_started=lifecycle.listening,
    on_stopping=lifecycle.stopping,
    on_stopped=lifecycle.stopped,
)
