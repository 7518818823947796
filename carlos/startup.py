"""Refuse to start wrong: outside DEBUG, a configuration that cannot serve pages safely stops
`manage.py serve` and the import of the ASGI application, naming the variable to fix.

Without this, DEBUG off and no DJANGO_SECRET_KEY started anyway: "Backend ready", /health 200,
and every page a 500. The rule is Django's own deployment check (`check --deploy`), warnings
included, in the words of the environment variables that fix each finding; ids listed in
DJANGO_SILENCED_SYSTEM_CHECKS are accepted, as `check` accepts them.
"""

from __future__ import annotations

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

# What a loopback-only measuring run (loadtest, loginstorm) sets to run production settings
# on plain HTTP on purpose: cookies not Secure, and the HTTPS findings accepted.
PLAIN_HTTP_LOOPBACK_ENV = {
    "DJANGO_SESSION_COOKIE_SECURE": "0",
    "DJANGO_CSRF_COOKIE_SECURE": "0",
    "DJANGO_SECURE_SSL_REDIRECT": "0",
    "DJANGO_SILENCED_SYSTEM_CHECKS": "security.W008,security.W012,security.W016",
}

NEW_KEY = (
    "generate one with: python -c 'from django.core.management.utils import "
    "get_random_secret_key as k; print(k())'"
)
MISSING_KEY = f"DJANGO_SECRET_KEY is not set; it is required when DJANGO_DEBUG is off: {NEW_KEY}"
# What to do about the findings a Carlos deployment meets, in the variables' words.
ADVICE = {
    "security.W008": (
        "DJANGO_SECURE_SSL_REDIRECT is off, so pages would be served over plain HTTP. Behind "
        "a TLS proxy that sets X-Forwarded-Proto, set DJANGO_BEHIND_PROXY=1 (the redirect "
        "follows it); when the ASGI server terminates TLS itself, set "
        "DJANGO_SECURE_SSL_REDIRECT=1"
    ),
    "security.W009": (
        "DJANGO_SECRET_KEY is weak (under 50 characters, under 5 different ones, or a "
        f"generated placeholder): {NEW_KEY}"
    ),
    "security.W020": (
        "DJANGO_ALLOWED_HOSTS is empty, so every page would answer 400: set the host names "
        "the site is reached by, comma-separated"
    ),
}
# The variable behind each other finding's setting (carlos/settings.py reads them).
VARIABLES = {
    "security.W004": "DJANGO_SECURE_HSTS_SECONDS",
    "security.W005": "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "security.W012": "DJANGO_SESSION_COOKIE_SECURE",
    "security.W016": "DJANGO_CSRF_COOKIE_SECURE",
    "security.W018": "DJANGO_DEBUG",
    "security.W021": "DJANGO_SECURE_HSTS_PRELOAD",
}


def deployment_problems() -> list[str]:
    """Everything that stops a start outside DEBUG, each naming what to set; none in DEBUG."""
    if settings.DEBUG:
        return []
    try:
        key_missing = not settings.SECRET_KEY
    except ImproperlyConfigured:  # Django refuses to hand out an empty key
        key_missing = True
    problems = [MISSING_KEY] if key_missing else []
    for message in checks.run_checks(include_deployment_checks=True):
        if message.level < checks.WARNING or message.is_silenced():
            continue
        if key_missing and message.id == "security.W009":
            continue  # said above, more plainly
        problems.append(_describe(message))
    return problems


def refuse_to_start_wrong() -> None:
    """Raise ImproperlyConfigured listing every problem, if there is any."""
    problems = deployment_problems()
    if problems:
        raise ImproperlyConfigured(
            "Carlos will not start with DJANGO_DEBUG off until this is fixed:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
            + "\n(a finding you accept: its id in DJANGO_SILENCED_SYSTEM_CHECKS)"
        )


def refuse_to_import_wrong() -> None:
    """`refuse_to_start_wrong` for carlos.asgi, what uvicorn or gunicorn import first.

    A settings module that is no deployment (the test suite's throwaway settings, DEBUG off
    with a short key and plain HTTP) sets `REFUSE_TO_START_WRONG = False`; the tests that start
    real servers in child processes check the refusal itself. It is not read from the
    environment: no deployment can turn it off by a variable.
    """
    if getattr(settings, "REFUSE_TO_START_WRONG", True):
        refuse_to_start_wrong()


def _describe(message: checks.CheckMessage) -> str:
    if message.id in ADVICE:
        return f"{ADVICE[message.id]} [{message.id}]"
    variable = VARIABLES.get(message.id, "a setting")
    hint = f" {message.hint}" if message.hint else ""
    return f"{variable}: {message.msg}{hint} [{message.id}]"
