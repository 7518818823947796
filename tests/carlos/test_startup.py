"""Refuse to start wrong: outside DEBUG, `manage.py serve` and the import of the ASGI application
stop on a missing or weak key, empty allowed hosts or a failing deploy check, naming the
variable; the production values `.env.example` documents pass `check --deploy` and serve pages
over TLS (behind a proxy)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.core.management.utils import get_random_secret_key
from django.test import override_settings

from carlos.startup import deployment_problems
from tests.servers import (
    ROOT,
    START_LIMIT_S,
    child_env,
    health_status,
    manage,
    serving,
    start,
    stop,
)

ENV_EXAMPLE = ROOT / ".env.example"
PRODUCTION_SECTION = "# --- production"


def documented_production_values() -> dict[str, str]:
    """The `# NAME=value` lines of .env.example's production section, as an environment."""
    values: dict[str, str] = {}
    inside = False
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("# ---"):
            inside = line.startswith(PRODUCTION_SECTION)
            continue
        match = re.match(r"# ([A-Z][A-Z0-9_]*)=(\S*)", line) if inside else None
        if match:
            values[match[1]] = match[2]
    assert values, f"no production section ({PRODUCTION_SECTION} ...) in .env.example"
    return values


def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A `manage.py` child with DEBUG off, a strong key, real hosts and the documented values."""
    return bare_production_env(
        tmp_path,
        DJANGO_ALLOWED_HOSTS="carlos.example.com,127.0.0.1",
        **{**documented_production_values(), **extra},
    )


def bare_production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """DEBUG off with a strong key and hosts, but none of the TLS values (plain HTTP)."""
    values = {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": get_random_secret_key(),
        "DJANGO_ALLOWED_HOSTS": "carlos.example.com",
        **extra,
    }
    return child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}", **values)


# Each wrong start: what is wrong, and the variable the refusal must name.
WRONG_STARTS = {
    "missing key": ({"DJANGO_SECRET_KEY": ""}, "DJANGO_SECRET_KEY"),
    "weak key": ({"DJANGO_SECRET_KEY": "change-me"}, "DJANGO_SECRET_KEY"),
    "empty hosts": ({"DJANGO_ALLOWED_HOSTS": ""}, "DJANGO_ALLOWED_HOSTS"),
    "plain HTTP": ({}, "DJANGO_SECURE_SSL_REDIRECT"),
}


@pytest.mark.parametrize("case", WRONG_STARTS, ids=list(WRONG_STARTS))
def test_serve_refuses_to_start_wrong(case: str, tmp_path: Path) -> None:
    """Reproduces: with DEBUG off and no key, `serve` said "Backend ready" and /health 200
    while every page answered 500."""
    wrong, variable = WRONG_STARTS[case]
    server = start(bare_production_env(tmp_path, **wrong), tmp_path / "serve.log", "--migrate")
    try:
        deadline = time.monotonic() + START_LIMIT_S  # fail-safe, not a timing assertion
        while server.process.poll() is None and time.monotonic() < deadline:
            if health_status(server) == 200:
                pytest.fail(f"serve started ({case}): /health 200; output:\n{server.tail()}")
            time.sleep(0.1)
    finally:
        stop(server.process)
    output = server.log.read_text()
    assert server.process.returncode == 1, output
    assert variable in output
    assert "Backend ready" not in output
    assert "Traceback" not in output  # a message for the operator, not a crash


@pytest.mark.parametrize("case", WRONG_STARTS, ids=list(WRONG_STARTS))
def test_importing_the_application_refuses_to_start_wrong(case: str, tmp_path: Path) -> None:
    """What uvicorn or gunicorn do first: `import carlos.asgi` fails, naming the variable."""
    wrong, variable = WRONG_STARTS[case]
    done = subprocess.run(
        [sys.executable, "-c", "import carlos.asgi"],
        cwd=ROOT,
        env=bare_production_env(tmp_path, **wrong),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, done.stderr
    refusal = done.stderr.partition("django.core.exceptions.ImproperlyConfigured: ")[2]
    assert refusal.startswith("Carlos will not start"), done.stderr
    assert variable in refusal


def test_the_documented_production_values_pass_the_deploy_check(tmp_path: Path) -> None:
    """Reproduces: `check --deploy` with DEBUG off and a strong key reported W004, W008, W012
    and W016, with no setting to fix them."""
    done = manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert "no issues" in done.stdout, done.stdout + done.stderr


def get(url: str, **headers: str) -> tuple[int, dict[str, str], str]:
    """Status, headers (the last of each name, Set-Cookie joined) and body, redirects not
    followed."""

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirects)
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=10)
    except urllib.error.HTTPError as error:
        response = error
    with response:
        named = {name.lower(): value for name, value in response.headers.items()}
        named["set-cookie"] = " | ".join(response.headers.get_all("Set-Cookie") or [])
        return response.status, named, response.read().decode()


def test_serve_in_production_behind_a_tls_proxy(tmp_path: Path) -> None:
    """The documented values: pages render over TLS with HSTS and Secure cookies, plain HTTP
    is redirected to HTTPS, and the probes still answer by address."""
    with serving(production_env(tmp_path), tmp_path / "serve.log", "--migrate") as server:
        assert health_status(server) == 200
        login = f"{server.base}/accounts/login/"
        status, headers, body = get(login, **{"X-Forwarded-Proto": "https"})
        assert status == 200 and 'name="password"' in body
        assert "max-age=" in headers["strict-transport-security"]
        assert re.search(r"csrftoken=[^|]*;\s*Secure", headers["set-cookie"], re.IGNORECASE)
        status, headers, _ = get(login)
        assert status == 301
        assert headers["location"].startswith("https://")


def test_a_generated_key_that_starts_with_a_dollar_is_kept_as_written(tmp_path: Path) -> None:
    """Django's key generator starts one key in 50 with `$`, which django-environ read as the
    name of another variable: the key was then "not set" and the server refused to start
    (a flaky `test_serve_in_production_behind_a_tls_proxy` showed it)."""
    key = "$" + get_random_secret_key()[1:]
    env = bare_production_env(tmp_path, DJANGO_SECRET_KEY=key)
    shown = manage(
        env, "shell", "-c", "from django.conf import settings; print(settings.SECRET_KEY)"
    )
    assert shown.stdout.strip().splitlines()[-1] == key  # after the shell's banner


@override_settings(DEBUG=True, SECRET_KEY="dev", ALLOWED_HOSTS=[])
def test_debug_is_not_a_deployment() -> None:
    assert deployment_problems() == []


@pytest.mark.django_db  # Django's model checks ask the database what it supports
@override_settings(DEBUG=False, SECRET_KEY="x" * 10, ALLOWED_HOSTS=[], SECURE_SSL_REDIRECT=True)
def test_every_problem_is_named_at_once() -> None:
    problems = "\n".join(deployment_problems())
    assert "DJANGO_SECRET_KEY" in problems and "DJANGO_ALLOWED_HOSTS" in problems
    assert "DJANGO_SECURE_SSL_REDIRECT" not in problems


# -- what start-up prints: one line per log event, nothing misleading ----------------------------

LOG_EVENTS = """
import logging
import django
django.setup()
logging.getLogger("django.request").warning("Not Found: /nope")
logging.getLogger("daphne.server").info(
    "HTTP/2 support not enabled (install the http2 and tls Twisted extras)"
)
logging.getLogger("daphne.server").info("Listening on TCP address 127.0.0.1:8000")
logging.getLogger("daphne.server").info("Killed 0 pending application instances")
"""


def test_each_log_event_is_one_line_and_no_misleading_notice(tmp_path: Path) -> None:
    """Reproduces (issue 15): in development (DEBUG) Django's own console handler printed
    every django.request line a second time, unformatted; Daphne's "HTTP/2 support not
    enabled" came at every start of a server that serves plain HTTP behind a TLS proxy."""
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    done = subprocess.run(
        [sys.executable, "-c", LOG_EVENTS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert [line for line in lines if "Not Found: /nope" in line] == [
        next(line for line in lines if " WARNING django.request: Not Found: /nope" in line)
    ]
    assert not [line for line in lines if "HTTP/2" in line or "Killed 0 pending" in line]
    assert any(" INFO daphne.server: Listening on TCP address" in line for line in lines)
