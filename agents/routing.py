"""WebSocket routes of the agents app (mounted by `carlos.asgi`).

The last route takes every other path, so that an unknown one is closed 4404 like a design
that is not there, instead of Channels' "No route found" error (an HTTP 500 and a traceback).
"""

from django.urls import path, re_path

from agents.consumers import DesignConsumer, NoSuchSocket

websocket_urlpatterns = [
    path("ws/designs/<int:design_id>/", DesignConsumer.as_asgi(), name="design-socket"),
    re_path(r"", NoSuchSocket.as_asgi(), name="no-such-socket"),
]
