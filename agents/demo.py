"""A local demo login for development against the offline simulator.

`manage.py serve` on a fresh checkout has no users, so a developer could not try the
product without first running `createsuperuser`. When, and only when, the site runs with
DEBUG on and talks to the offline simulator (no real model, no real data), a `demo`
account is created once with a random password kept in a file only the owner can read.
Production settings (DEBUG off) or a real LLM endpoint never get one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction

from pools.runtime import get_pool

DEMO_USERNAME = "demo"


def credentials_path() -> Path:
    """Where the demo password lives: under BASE_DIR/var, which git ignores."""
    return Path(settings.BASE_DIR) / "var" / "demo-credentials.txt"


def _read_password(path: Path) -> str | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "password" and value.strip():
            return value.strip()
    return None


def _write_password(path: Path, password: str) -> None:
    """Write the file readable by its owner only (0600), even if it existed with wider rights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(
            "# Carlos local demo account (DEBUG with the offline LLM simulator only)\n"
            f"username: {DEMO_USERNAME}\n"
            f"password: {password}\n"
        )
    os.chmod(path, 0o600)


def demo_allowed() -> bool:
    """A demo login only makes sense on a development site that calls no real model."""
    return bool(settings.DEBUG) and get_pool().config.endpoint.kind == "simulator"


def ensure_demo_account() -> tuple[str, str] | None:
    """(username, password) of the demo account, creating it the first time; else None.

    Idempotent: a second call returns the same credentials. If the credentials file was
    lost (or no longer matches), a new random password is set and written.
    """
    if not demo_allowed():
        return None
    path = credentials_path()
    user_model = get_user_model()
    with transaction.atomic():
        user, created = user_model._default_manager.select_for_update().get_or_create(
            **{user_model.USERNAME_FIELD: DEMO_USERNAME}
        )
        password = None if created else _read_password(path)
        if password is None or not user.check_password(password):
            password = secrets.token_urlsafe(18)
            user.set_password(password)
            user.save(update_fields=["password"])
            _write_password(path, password)
    return DEMO_USERNAME, password
