"""Logins: throttled per account and per client address, and hashed where no page waits.

Why (issue 13): 30 wrong passwords at 2.7/s, then the right one, logged in; and 40 wrong
logins at once took another user's `/designs/` from 9 ms to 6.7 s. Django's LoginView is
synchronous: it hashed the password (PBKDF2, about half a second of a core) in its request's
thread while the request held one of the page gate's four places (carlos.admission), so
four logins filled the gate and every page waited behind the rest of the storm.

How:
- django-axes counts failed logins in the database (`AccessAttempt`: shared by every
  instance, kept across restarts, emptied with the test database after each test). Its
  backend (`ThrottledBackend`) refuses a locked-out account or address inside every
  `authenticate()`, the admin's included, and its middleware answers the attempt that
  reaches the limit with `lockout_response` (AXES_LOCKOUT_CALLABLE).
- These views authenticate asynchronously (`aauthenticate`): the database queries are short
  hops to the request's database thread and the hash runs on a worker thread of the event
  loop's own (Django's `acheck_password`), where nothing else waits for it; the digest
  itself is computed at low CPU priority (`PBKDF2PasswordHasher`), so on a busy machine
  the hashing waits for the pages rather than taking a core from them.
- In front of Django, login POSTs have a line of their own instead of the page gate
  (carlos.admission): at most MAX_CONCURRENT_LOGINS in Django at once (by default every
  core but one), the rest waiting for nothing, so a storm neither takes every core nor
  stands between the pages and the gate. A login that comes through the page gate anyway
  steps out of its line while it waits and hashes (`outside_the_gate`).
- Attempts for one account, or from one address, are decided one after another, so a
  burst cannot pass the check while the first guesses are still being hashed.
- A locked-out attempt is refused before anything is hashed or counted: 429 with
  Retry-After, the seconds until enough of the counted failures are older than the cool-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any

from asgiref.sync import sync_to_async
from axes.backends import AxesStandaloneBackend
from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_client_ip_address, get_cool_off, get_credentials, get_failure_limit
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import REDIRECT_FIELD_NAME, aauthenticate, alogin, hashers
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_out
from django.contrib.auth.views import RedirectURLMixin
from django.core.exceptions import ValidationError
from django.core.validators import MaxLengthValidator
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render, resolve_url
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods

from carlos.admission import outside_the_gate

SITE_TEMPLATE = "registration/login.html"
ADMIN_TEMPLATE = "admin/login.html"
# RFC 9110 wants a challenge with every 401; browsers act on none but Basic and friends.
CHALLENGE = 'Form realm="Carlos"'
_redirects = RedirectURLMixin()  # Django's own rule for a safe `next`

ContextBuilder = Callable[[HttpRequest], Awaitable[dict[str, Any]]]


class ThrottledBackend(AxesStandaloneBackend):
    """axes' lockout check, for `aauthenticate` too: axes 8 has only the synchronous one
    (its AxesBackend would inherit ModelBackend's `aauthenticate` and skip the check)."""

    async def aauthenticate(self, request: HttpRequest, **credentials: Any) -> None:
        return await sync_to_async(self.authenticate)(request, **credentials)


class LoginForm(AuthenticationForm):
    """AuthenticationForm whose password check is awaited (`acheck`) rather than run inside
    `clean()`: the fields are checked first, for nothing, and only then the password."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # AuthenticationForm sets the username's max_length after the field is built, so no
        # validator enforces it: a 1 MB "username" went on to be looked up and counted.
        username = self.fields["username"]
        username.validators.append(MaxLengthValidator(username.max_length))

    def clean(self) -> dict[str, Any]:
        return self.cleaned_data

    async def acheck(self) -> None:
        """What AuthenticationForm.clean() does once the fields are valid, asynchronously."""
        self.user_cache = await aauthenticate(
            self.request,
            username=self.cleaned_data["username"],
            password=self.cleaned_data["password"],
        )
        try:
            if self.user_cache is None:
                raise self.get_invalid_login_error()
            self.confirm_login_allowed(self.user_cache)
        except ValidationError as error:
            self.add_error(None, error)


class AdminLoginForm(LoginForm, AdminAuthenticationForm):
    """The admin's form (staff only) with the awaited check."""


# --- password hashing at low CPU priority ---------------------------------------------------

HASHING_NICE = 10


def _yield_to_pages() -> None:
    """Start of a hashing thread: lower its own CPU priority (Linux keeps a nice level per
    thread; elsewhere the call would name a process, so it is not made)."""
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, thread) < HASHING_NICE:
            os.setpriority(os.PRIO_PROCESS, thread, HASHING_NICE)


_hashing = ThreadPoolExecutor(
    max_workers=os.process_cpu_count() or 1,
    thread_name_prefix="password-hash",
    initializer=_yield_to_pages,
)


class PBKDF2PasswordHasher(hashers.PBKDF2PasswordHasher):
    """Django's PBKDF2 (the same algorithm and hashes), computed at nice HASHING_NICE: under
    a login storm on a busy machine the hashing waits for the pages, instead of taking a
    core from them at their own priority. The caller (a worker thread) waits meanwhile."""

    def encode(self, password: str, salt: str, iterations: int | None = None) -> str:
        digest = partial(hashers.PBKDF2PasswordHasher.encode, self, password, salt, iterations)
        return _hashing.submit(digest).result()


def hashing_priority() -> int:
    """The nice level passwords are hashed at, as a hashing thread reports it."""
    return _hashing.submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ).result()


# --- one attempt at a time per account and address ------------------------------------------

# Per event loop (a lock belongs to one): whose turn it is, per account and per address.
_turns: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakValueDictionary[str, asyncio.Lock]
] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _turn(*keys: str) -> AsyncIterator[None]:
    """Wait until no other attempt on any of `keys` is being decided."""
    loop = asyncio.get_running_loop()
    turns = _turns.get(loop)
    if turns is None:
        turns = _turns[loop] = weakref.WeakValueDictionary()
    async with contextlib.AsyncExitStack() as held:
        for key in sorted(set(keys)):  # one order for everybody: no deadlock
            lock = turns.setdefault(key, asyncio.Lock())
            await held.enter_async_context(lock)  # the stack keeps it alive meanwhile
        yield


# --- lockouts -------------------------------------------------------------------------------


def lockout_ends(request: HttpRequest, credentials: dict[str, Any]) -> datetime | None:
    """When this account's and this address's lockout is over; None if it may try now.

    Synchronous (database queries): call it through `sync_to_async`. Each counted failure
    expires a cool-off after its attempt (axes keeps one row per account, address and
    browser, dated by its last failure), so the lockout lasts until the newest rows that
    reach the limit between them have expired.
    """
    if not settings.AXES_ENABLED or AxesProxyHandler.is_allowed(request, credentials):
        return None
    cool_off = get_cool_off(request)
    limit = get_failure_limit(request, credentials)
    handler = AxesProxyHandler.get_implementation()
    ends = []
    for attempts in handler.get_user_attempts(request, credentials):
        counted = 0
        newest_first = attempts.order_by("-attempt_time")
        for when, failures in newest_first.values_list("attempt_time", "failures_since_start"):
            counted += failures
            if counted >= limit:
                ends.append(when + cool_off)
                break
    return max(ends, default=timezone.now() + cool_off)


def lockout_response(
    request: HttpRequest, original_response: Any = None, credentials: Any = None
) -> HttpResponse:
    """AXES_LOCKOUT_CALLABLE: the answer to the attempt that reached the limit (axes'
    middleware calls it, in a thread, with the credentials in the wrong place or none)."""
    if not isinstance(credentials, dict):
        credentials = getattr(request, "axes_credentials", None) or get_credentials(
            request.POST.get("username")
        )
    ends = lockout_ends(request, credentials) or timezone.now() + get_cool_off(request)
    return locked_out_page(request, ends)


def locked_out_page(request: HttpRequest, ends: datetime) -> HttpResponse:
    """429 with Retry-After, on the site's login page, saying how long the lockout lasts."""
    seconds = max(1, math.ceil((ends - timezone.now()).total_seconds()))
    if seconds < 60:
        wait = f"{seconds} second{'s' if seconds != 1 else ''}"
    else:
        minutes = math.ceil(seconds / 60)
        wait = f"{minutes} minute{'s' if minutes != 1 else ''}"
    context = {
        "form": AuthenticationForm(request),
        "next": _redirects.get_redirect_url(request),
        "locked_out": _(
            "Too many failed logins for this account or from your address. Try again in %(wait)s."
        )
        % {"wait": wait},
    }
    response = render(request, SITE_TEMPLATE, context, status=429)
    response["Retry-After"] = str(seconds)
    return response


def forwarded_client_address(request: HttpRequest) -> str | None:
    """AXES_CLIENT_IP_CALLABLE behind a TLS proxy (DJANGO_BEHIND_PROXY): the address the
    proxy saw, i.e. the last X-Forwarded-For entry (the one it appended; entries to its left
    come from the client and prove nothing). Without it every client would share the
    proxy's address, and five wrong passwords anywhere would lock everyone out."""
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    last = forwarded.rsplit(",", 1)[-1].strip()
    return last or request.META.get("REMOTE_ADDR")


def describe_client(
    username: str | None, ip_address: str | None, user_agent: str, path_info: Any, request: Any
) -> str:
    """AXES_CLIENT_STR_CALLABLE: how axes' log lines name a client. The account only by a
    digest, as a password typed into the username box must not reach the log (the names are
    in the AccessAttempt rows, for staff); no run of asterisks, which reads as a masked key."""
    account = hashlib.sha256(username.encode()).hexdigest()[:12] if username else "none"
    path = path_info[0] if isinstance(path_info, list | tuple) else path_info
    return f"{{address {ip_address}, account #{account}, path {path}}}"


# --- the views ------------------------------------------------------------------------------


async def _site_context(request: HttpRequest) -> dict[str, Any]:
    # The page's header shows who is logged in: load the user (and the session) here, with
    # the async API, or the template reads the session on the event loop and fails.
    request.user = await request.auser()
    return {"next": _redirects.get_redirect_url(request)}


async def _admin_context(request: HttpRequest) -> dict[str, Any]:
    """What AdminSite.login gives its template (it reads the session's user: a sync hop)."""

    def build() -> dict[str, Any]:
        return {
            **admin.site.each_context(request),
            "title": _("Log in"),
            "subtitle": None,
            "app_path": request.get_full_path(),
            "username": request.user.get_username(),
            REDIRECT_FIELD_NAME: _redirects.get_redirect_url(request) or reverse("admin:index"),
        }

    return await sync_to_async(build)()


async def _log_in(
    request: HttpRequest,
    form_class: type[LoginForm],
    template: str,
    context: ContextBuilder,
    success_url: str,
) -> HttpResponse:
    if request.method != "POST":
        page = {**await context(request), "form": form_class(request)}
        return render(request, template, page)
    form = form_class(request, data=request.POST)
    if not form.is_valid():  # a field is missing or too long: there is nothing to check
        return render(request, template, {**await context(request), "form": form}, status=400)
    username = form.cleaned_data["username"]
    credentials = get_credentials(username)
    address = get_client_ip_address(request) or "unknown"
    ends: datetime | None = None
    async with (
        outside_the_gate(getattr(request, "scope", {})),
        _turn(f"account:{username}", f"address:{address}"),
    ):
        ends = await sync_to_async(lockout_ends)(request, credentials)
        if ends is None:
            await form.acheck()
    if ends is not None:
        return locked_out_page(request, ends)
    if form.errors:  # at the limit, axes' middleware turns this into the lockout answer
        response = render(request, template, {**await context(request), "form": form}, status=401)
        response["WWW-Authenticate"] = CHALLENGE
        return response
    await alogin(request, form.get_user())
    return HttpResponseRedirect(_redirects.get_redirect_url(request) or success_url)


def _login_view(view: Callable[[HttpRequest], Awaitable[HttpResponse]]) -> Any:
    """What Django's LoginView wraps its dispatch in, plus the methods a login form has."""
    for decorator in (
        require_http_methods(["GET", "HEAD", "POST"]),
        never_cache,
        csrf_protect,
        sensitive_post_parameters(),
        login_not_required,
    ):
        view = decorator(view)
    return view


@_login_view
async def login(request: HttpRequest) -> HttpResponse:
    """The site's login page (`login`)."""
    success = resolve_url(settings.LOGIN_REDIRECT_URL)
    return await _log_in(request, LoginForm, SITE_TEMPLATE, _site_context, success)


@_login_view
async def admin_login(request: HttpRequest) -> HttpResponse:
    """The admin's login page, in front of AdminSite.login: staff only, throttled alike."""
    request.current_app = admin.site.name
    success = reverse("admin:index")
    if request.method != "POST":
        user = await request.auser()
        if user.is_active and user.is_staff:  # already in, as AdminSite.login does
            return HttpResponseRedirect(_redirects.get_redirect_url(request) or success)
    return await _log_in(request, AdminLoginForm, ADMIN_TEMPLATE, _admin_context, success)


# --- logging out -----------------------------------------------------------------------------


@receiver(user_logged_out, dispatch_uid="carlos.login.say_logged_out")
def say_logged_out(sender: Any, request: HttpRequest | None, **kwargs: Any) -> None:
    """Django's LogoutView redirects to the login page without a word: say it there (the
    messages framework; base.html shows them inside <main> as a status). Connected when this
    module is imported, which the URL configuration does before any logout can be asked for."""
    if request is not None:
        messages.info(request, _("You have been logged out."), fail_silently=True)
