"""The process's pool registry, built from Django settings (the thin Django side of pools).

`get_pool()` is the design note's entry point. Building the registry opens nothing, so it
is safe in `AppConfig.ready()`, in management commands and in every test. Where the calls
run in a server (its LLM loop, warm-up, shutdown) is server policy: `carlos.serving`.
"""

from __future__ import annotations

import threading

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from pools.engine.config import PoolsConfig, parse_config
from pools.engine.registry import PoolRegistry

_lock = threading.Lock()
_registry: PoolRegistry | None = None


def load_config() -> PoolsConfig:
    """Parse `settings.CARLOS_POOLS`; raises `ConfigErrors` naming each bad setting."""
    return parse_config(getattr(settings, "CARLOS_POOLS", {}))


def get_pool(size: int | None = None) -> PoolRegistry:
    """The process-wide registry; `size` applies the note's global size knob every time."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = PoolRegistry(load_config())
        registry = _registry
    if size is not None and any(
        pool.size != registry.config.with_size(size).pools[name].size
        for name, pool in registry.config.pools.items()
    ):
        registry.resize(size)
    return registry


def install(registry: PoolRegistry | None) -> PoolRegistry | None:
    """Replace the process registry (tests, benchmarks); returns the previous one."""
    global _registry
    with _lock:
        previous, _registry = _registry, registry
    return previous


@receiver(setting_changed)
def _forget_on_settings_change(*, setting: str, **kwargs: object) -> None:
    if setting == "CARLOS_POOLS":
        install(None)
