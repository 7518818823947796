"""Django app for the pool engine."""

import contextlib

from django.apps import AppConfig


class PoolsConfig(AppConfig):
    name = "pools"
    verbose_name = "LLM connection pools"

    def ready(self) -> None:
        # Only registers checks and builds plain objects: ready() runs in every process and
        # may run twice, so no client, socket, database or event loop belongs here.
        from pools import checks  # noqa: F401
        from pools.engine.exceptions import ConfigError
        from pools.runtime import get_pool

        with contextlib.suppress(ConfigError):  # reported precisely by check pools.E001
            get_pool()
