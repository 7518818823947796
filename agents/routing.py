"""WebSocket routes of the agents app (mounted by `carlos.asgi`)."""

from django.urls import path

from agents.consumers import DesignConsumer

websocket_urlpatterns = [
    path("ws/designs/<int:design_id>/", DesignConsumer.as_asgi(), name="design-socket"),
]
