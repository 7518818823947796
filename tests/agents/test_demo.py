"""The demo account: created once in development against the simulator, never elsewhere."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

pytestmark = pytest.mark.django_db

User = get_user_model()


# --- demo account ---------------------------------------------------------------------------


@pytest.fixture
def demo_settings(settings, tmp_path):
    """DEBUG on, BASE_DIR in a temporary folder, the default (simulator) endpoint.

    The check builds the process pool registry from settings; the one that was installed
    before is put back afterwards so no other test sees this one.
    """
    from pools import runtime

    settings.DEBUG = True
    settings.BASE_DIR = tmp_path
    previous = runtime.install(None)
    yield settings
    runtime.install(previous)


def test_demo_account_created_once_with_a_private_credentials_file(demo_settings) -> None:
    from agents.demo import credentials_path, ensure_demo_account

    credentials = ensure_demo_account()
    assert credentials is not None
    username, password = credentials
    assert username == "demo" and len(password) >= 20
    path = credentials_path()
    assert path == demo_settings.BASE_DIR / "var" / "demo-credentials.txt"
    assert path.stat().st_mode & 0o777 == 0o600
    assert f"password: {password}" in path.read_text()
    # Idempotent: the same account and password the second time.
    assert ensure_demo_account() == credentials
    assert User.objects.filter(username="demo").count() == 1
    user = User.objects.get(username="demo")
    assert not user.is_staff and not user.is_superuser
    # And the credentials really log in.
    client = Client()
    response = client.post("/accounts/login/", {"username": username, "password": password})
    assert response.status_code == 302
    assert client.get("/").status_code == 200


def test_demo_password_is_reset_when_the_file_is_lost(demo_settings) -> None:
    from agents.demo import credentials_path, ensure_demo_account

    _, first = ensure_demo_account()
    credentials_path().unlink()
    _, second = ensure_demo_account()
    assert second != first
    assert User.objects.get(username="demo").check_password(second)
    assert credentials_path().stat().st_mode & 0o777 == 0o600


def test_no_demo_account_without_debug(settings, tmp_path) -> None:
    from agents.demo import ensure_demo_account

    settings.DEBUG = False
    settings.BASE_DIR = tmp_path
    assert ensure_demo_account() is None
    assert not User.objects.filter(username="demo").exists()
    assert not (tmp_path / "var").exists()


def test_no_demo_account_against_a_real_endpoint(demo_settings) -> None:
    from agents.demo import ensure_demo_account

    demo_settings.CARLOS_POOLS = {
        "ENDPOINT": {"BASE_URL": "https://llm.internal.example/v1", "API_KEY": "sk-test"}
    }
    assert ensure_demo_account() is None
    assert not User.objects.filter(username="demo").exists()
