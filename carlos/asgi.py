"""ASGI entry point: HTTP through Django, WebSockets through Channels, pools warmed at start.

Serve it with `python manage.py serve` (Daphne, with start-up and shutdown hooks), or with
any lifespan-aware server such as `uvicorn carlos.asgi:application`.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "carlos.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from pools.lifespan import PoolLifespan  # noqa: E402

application = PoolLifespan(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
        }
    )
)
