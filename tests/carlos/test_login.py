"""Logins: throttled per account and per client address, and never hashed where pages wait.

Every request goes through the real ASGI application (the page gate, Django's middleware,
django-axes) or Django's test client; the only stand-in is a password hasher that counts
its checks, or holds one until the test lets it go, to see where and how often a password
is hashed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import MD5PasswordHasher
from django.test import Client

pytestmark = pytest.mark.django_db(transaction=True)

User = get_user_model()
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "a-long-test-password"
WRONG = "hunter2-not-it"
LOGIN = "/accounts/login/"
ADMIN_LOGIN = "/admin/login/"
ORIGIN = "https://127.0.0.1"
_CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
FAILSAFE_S = 30.0  # a bound on waiting for something that must happen, not a measurement


class CountingHasher(MD5PasswordHasher):
    """MD5 (fast, as in the test settings) that counts how many passwords it checked."""

    algorithm = "counting_md5"
    checks = 0
    _lock = threading.Lock()

    def verify(self, password: str, encoded: str) -> bool:
        with CountingHasher._lock:
            CountingHasher.checks += 1
        return super().verify(password, encoded)


class HeldHasher(CountingHasher):
    """A hash that takes as long as the test wants: it waits in `verify` until released."""

    algorithm = "held_md5"
    entered = threading.Event()
    released = threading.Event()

    def verify(self, password: str, encoded: str) -> bool:
        HeldHasher.entered.set()
        HeldHasher.released.wait(FAILSAFE_S)
        return super().verify(password, encoded)


@pytest.fixture
def counting_hasher(settings) -> Iterator[type[CountingHasher]]:
    settings.PASSWORD_HASHERS = ["tests.carlos.test_login.CountingHasher"]
    CountingHasher.checks = 0
    yield CountingHasher


@pytest.fixture
def held_hasher(settings) -> Iterator[type[HeldHasher]]:
    settings.PASSWORD_HASHERS = ["tests.carlos.test_login.HeldHasher"]
    HeldHasher.entered.clear()
    HeldHasher.released.clear()
    try:
        yield HeldHasher
    finally:
        HeldHasher.released.set()  # whatever the test did, nothing stays held


def access_attempts() -> Any:
    """axes' record of failed logins (imported late: the module must load without axes)."""
    from axes.models import AccessAttempt

    return AccessAttempt.objects


def make_user(username: str, **fields: Any) -> Any:
    return User.objects.create_user(username, password=PASSWORD, **fields)


async def amake_user(username: str, **fields: Any) -> Any:
    return await User.objects.acreate_user(username, password=PASSWORD, **fields)


@asynccontextmanager
async def browser(address: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping client of the project's ASGI application (page gate included), seen
    by the server as coming from `address`. Over https, as in production: the cookies are
    Secure there (and the cookie jar keeps none for a dotless host such as localhost)."""
    from carlos.asgi import application

    transport = httpx.ASGITransport(app=application, client=(address, 50000))
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
        yield client


async def csrf_token(client: httpx.AsyncClient, path: str = LOGIN) -> str:
    page = await client.get(path)
    assert page.status_code == 200, page.text
    match = _CSRF.search(page.text)
    assert match, "no CSRF token on the login page"
    return match[1]


async def post_login(
    client: httpx.AsyncClient, username: str, password: str, token: str, path: str = LOGIN
) -> httpx.Response:
    return await client.post(
        path,
        data={"username": username, "password": password, "csrfmiddlewaretoken": token},
        headers={"referer": f"{ORIGIN}{path}"},  # Django's CSRF check over https wants it
    )


def lockout_limit() -> int:
    return settings.AXES_FAILURE_LIMIT


def cooloff_seconds() -> int:
    return int(settings.AXES_COOLOFF_TIME.total_seconds())


def assert_locked_out(response: Any) -> None:
    """429, a Retry-After within the cool-off, and a message saying what happened and when."""
    body = response.content.decode() if hasattr(response, "content") else response.text
    assert response.status_code == 429, body[:500]
    retry_after = int(response.headers["Retry-After"])
    assert 0 < retry_after <= cooloff_seconds()
    assert "Too many failed logins" in body
    assert "Try again in" in body


# --- throttling -----------------------------------------------------------------------------


def test_wrong_passwords_lock_the_account_out_even_for_the_right_one(client: Client) -> None:
    make_user("bob")
    for _ in range(lockout_limit() - 1):
        wrong = client.post(LOGIN, {"username": "bob", "password": WRONG})
        assert wrong.status_code == 401
        assert b"Please enter a correct username and password" in wrong.content
    assert_locked_out(client.post(LOGIN, {"username": "bob", "password": WRONG}))
    # The right password does not get in while the lockout lasts, from this address...
    assert_locked_out(client.post(LOGIN, {"username": "bob", "password": PASSWORD}))
    # ...nor from another one: the account itself is locked.
    elsewhere = client.post(
        LOGIN, {"username": "bob", "password": PASSWORD}, REMOTE_ADDR="192.0.2.7"
    )
    assert_locked_out(elsewhere)
    assert client.get("/").status_code == 302  # not logged in


def test_one_address_is_locked_out_across_accounts(client: Client) -> None:
    for n in range(lockout_limit()):
        make_user(f"user{n}")
        client.post(LOGIN, {"username": f"user{n}", "password": WRONG}, REMOTE_ADDR="192.0.2.1")
    make_user("carol")
    assert_locked_out(
        client.post(LOGIN, {"username": "carol", "password": PASSWORD}, REMOTE_ADDR="192.0.2.1")
    )
    other = client.post(LOGIN, {"username": "carol", "password": PASSWORD}, REMOTE_ADDR="192.0.2.2")
    assert other.status_code == 302


def test_retry_after_counts_down_and_the_lockout_ends_after_the_cooloff(client: Client) -> None:
    make_user("bob")
    for _ in range(lockout_limit()):
        client.post(LOGIN, {"username": "bob", "password": WRONG})
    # As if the failures were made (cool-off - 90 s) ago: 90 s of lockout are left.
    access_attempts().update(
        attempt_time=access_attempts().get().attempt_time
        - settings.AXES_COOLOFF_TIME
        + timedelta(seconds=90)
    )
    locked = client.post(LOGIN, {"username": "bob", "password": PASSWORD})
    assert_locked_out(locked)
    assert 60 <= int(locked["Retry-After"]) <= 90
    assert b"Try again in 2 minutes" in locked.content
    # And once the cool-off has passed, the right password logs in.
    access_attempts().update(
        attempt_time=access_attempts().get().attempt_time - timedelta(seconds=91)
    )
    assert client.post(LOGIN, {"username": "bob", "password": PASSWORD}).status_code == 302


async def test_aauthenticate_itself_refuses_a_locked_out_account() -> None:
    """The guard is in the backend, not only in the login view: axes 8 checks only the
    synchronous authenticate(), and its AxesBackend would let `aauthenticate` through."""
    from django.contrib.auth import aauthenticate
    from django.test import AsyncClient, AsyncRequestFactory

    await amake_user("bob")
    browser_ = AsyncClient()
    for _ in range(lockout_limit()):
        await browser_.post(LOGIN, {"username": "bob", "password": WRONG})
    request = AsyncRequestFactory().post(LOGIN, {"username": "bob", "password": PASSWORD})
    assert await aauthenticate(request, username="bob", password=PASSWORD) is None
    other = AsyncRequestFactory().post(LOGIN, REMOTE_ADDR="192.0.2.50")
    assert await aauthenticate(other, username="bob", password=PASSWORD) is None


def test_behind_a_proxy_the_address_it_appended_counts(client: Client, settings) -> None:
    """Every client comes from the proxy's address then; what the client writes to the left
    of the proxy's entry in X-Forwarded-For is its own invention and proves nothing."""
    settings.AXES_CLIENT_IP_CALLABLE = "carlos.login.forwarded_client_address"
    proxy = {"REMOTE_ADDR": "10.0.0.1"}
    for n in range(lockout_limit()):
        make_user(f"user{n}")
        client.post(
            LOGIN,
            {"username": f"user{n}", "password": WRONG},
            HTTP_X_FORWARDED_FOR=f"192.0.2.{n}, 203.0.113.9",
            **proxy,
        )
    make_user("carol")
    right = {"username": "carol", "password": PASSWORD}
    assert_locked_out(
        client.post(LOGIN, right, HTTP_X_FORWARDED_FOR="192.0.2.99, 203.0.113.9", **proxy)
    )
    other = client.post(LOGIN, right, HTTP_X_FORWARDED_FOR="203.0.113.10", **proxy)
    assert other.status_code == 302  # another client behind the same proxy


@pytest.mark.parametrize("round_", [1, 2])
def test_lockouts_do_not_leak_into_the_next_test(client: Client, round_: int) -> None:
    """Run twice: the second run must start as clean as the first (attempts live in the
    test database, which pytest-django empties after each test)."""
    assert not access_attempts().exists()
    make_user("bob")
    assert client.post(LOGIN, {"username": "bob", "password": WRONG}).status_code == 401
    for _ in range(lockout_limit()):
        client.post(LOGIN, {"username": "bob", "password": WRONG})
    assert_locked_out(client.post(LOGIN, {"username": "bob", "password": PASSWORD}))


async def test_a_burst_gets_no_more_guesses_than_the_limit(counting_hasher) -> None:
    """Concurrent attempts are decided one after the other per account and address: a burst
    cannot slip past the check while the first guesses are still being hashed."""
    await amake_user("bob")
    burst = 4 * lockout_limit()
    async with browser() as client:
        token = await csrf_token(client)
        answers = await asyncio.gather(
            *(post_login(client, "bob", WRONG, token) for _ in range(burst))
        )
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [401] * (lockout_limit() - 1) + [429] * (burst - lockout_limit() + 1)
        assert counting_hasher.checks == lockout_limit()  # each counted guess, no more
        assert_locked_out(await post_login(client, "bob", PASSWORD, token))
    assert counting_hasher.checks == lockout_limit()  # the locked-out try was not hashed


def test_the_admin_login_is_throttled_too(client: Client) -> None:
    make_user("root", is_staff=True, is_superuser=True)
    for _ in range(lockout_limit() - 1):
        wrong = client.post(ADMIN_LOGIN, {"username": "root", "password": WRONG})
        assert wrong.status_code == 401
    assert_locked_out(client.post(ADMIN_LOGIN, {"username": "root", "password": WRONG}))
    assert_locked_out(client.post(ADMIN_LOGIN, {"username": "root", "password": PASSWORD}))
    assert_locked_out(client.post(LOGIN, {"username": "root", "password": PASSWORD}))


def test_the_admin_login_still_logs_staff_in_and_refuses_others(client: Client) -> None:
    make_user("root", is_staff=True, is_superuser=True)
    make_user("bob")
    page = client.get(ADMIN_LOGIN)
    assert page.status_code == 200 and b"Django administration" in page.content
    refused = client.post(ADMIN_LOGIN, {"username": "bob", "password": PASSWORD})
    assert refused.status_code == 401
    assert b"staff account" in refused.content
    admitted = client.post(ADMIN_LOGIN, {"username": "root", "password": PASSWORD})
    assert admitted.status_code == 302 and admitted["Location"] == "/admin/"
    assert client.get(ADMIN_LOGIN)["Location"] == "/admin/"  # already in


# --- clear answers to bad input -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"username": "", "password": PASSWORD}, b"This field is required."),
        ({"username": "bob", "password": ""}, b"This field is required."),
        ({}, b"This field is required."),
        ({"username": "b" * 100_000, "password": PASSWORD}, b"at most 150 characters"),
    ],
    ids=["no-username", "no-password", "nothing", "huge-username"],
)
def test_incomplete_logins_are_400_and_neither_hashed_nor_counted(
    client: Client, counting_hasher, fields: dict[str, str], message: bytes
) -> None:
    make_user("bob")
    answer = client.post(LOGIN, fields)
    assert answer.status_code == 400
    assert message in answer.content
    assert counting_hasher.checks == 0
    assert not access_attempts().exists()


def test_wrong_password_is_401_and_the_right_one_follows_next(client: Client) -> None:
    make_user("bob")
    wrong = client.post(LOGIN, {"username": "bob", "password": WRONG, "next": "/designs/"})
    assert wrong.status_code == 401
    assert wrong["WWW-Authenticate"].startswith("Form")
    assert b'value="/designs/"' in wrong.content  # the form keeps where to go
    good = client.post(LOGIN, {"username": "bob", "password": PASSWORD, "next": "/designs/"})
    assert good.status_code == 302 and good["Location"] == "/designs/"
    assert client.get("/designs/").status_code == 200
    foreign = Client()
    sent_away = foreign.post(
        LOGIN, {"username": "bob", "password": PASSWORD, "next": "https://evil.example/"}
    )
    assert sent_away["Location"] == settings.LOGIN_REDIRECT_URL


def test_other_methods_are_refused(client: Client) -> None:
    assert client.put(LOGIN).status_code == 405
    assert client.delete(LOGIN).status_code == 405


def test_passwords_stay_out_of_the_records_and_the_log(client: Client, caplog) -> None:
    make_user("bob")
    with caplog.at_level(logging.DEBUG):
        for _ in range(lockout_limit() + 1):
            client.post(LOGIN, {"username": "bob", "password": WRONG})
    attempt = access_attempts().get()
    assert attempt.username == "bob" and attempt.failures_since_start == lockout_limit()
    assert WRONG not in attempt.post_data and WRONG not in attempt.get_data
    assert "AXES: Repeated login failure by {address 127.0.0.1, account #" in caplog.text
    assert WRONG not in caplog.text and "bob" not in caplog.text  # nor the account in clear
    assert "****" not in caplog.text  # which would read as a masked key


# --- a login storm never stalls other users' pages -------------------------------------------


async def test_a_password_being_hashed_holds_no_page_place(held_hasher) -> None:
    """More logins than the gate has places, each (in turn) in a hash that does not end
    until the test says so: another user's pages are served meanwhile. Before, each login
    hashed inside one of the gate's places: the page waited for their hashes."""
    from django.test import AsyncClient

    await amake_user("alice")
    session = AsyncClient()
    await session.aforce_login(await User.objects.aget(username="alice"))
    crowd = settings.MAX_CONCURRENT_REQUESTS + 2
    for n in range(crowd):
        await amake_user(f"guest{n}")
    held_hasher.entered.clear()

    async with browser() as page_user:
        page_user.cookies.set(settings.SESSION_COOKIE_NAME, session.cookies["sessionid"].value)
        assert (await page_user.get("/designs/")).status_code == 200
        logins = [asyncio.create_task(_wrong_login(f"guest{n}")) for n in range(crowd)]
        entered = await asyncio.to_thread(held_hasher.entered.wait, FAILSAFE_S)
        assert entered, "no login reached the hasher"
        try:
            page = asyncio.create_task(page_user.get("/designs/"))
            done, _ = await asyncio.wait({page}, timeout=FAILSAFE_S)
            assert page in done, "the page waited for a password hash"
            assert page.result().status_code == 200
            assert not any(login.done() for login in logins)  # still hashing, or in line
        finally:
            held_hasher.released.set()
        answers = await asyncio.gather(*logins)
    assert [answer.status_code for answer in answers] == [401] * crowd


async def _wrong_login(username: str) -> httpx.Response:
    """One wrong password for `username`, from an address of its own (no shared lockout)."""
    address = f"198.51.100.{int(username.removeprefix('guest')) + 1}"
    async with browser(address) as guest:
        return await post_login(guest, username, WRONG, await csrf_token(guest))


def test_passwords_hash_at_low_priority_with_djangos_own_pbkdf2(settings) -> None:
    """The hash is Django's PBKDF2, interchangeable both ways, computed on a thread that
    yields the CPU to the pages (a login storm used a whole core at their priority)."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher, check_password, make_password

    from carlos.login import HASHING_NICE, hashing_priority

    settings.PASSWORD_HASHERS = ["carlos.login.PBKDF2PasswordHasher"]
    ours = make_password(PASSWORD)
    assert ours.startswith("pbkdf2_sha256$")
    assert PBKDF2PasswordHasher().verify(PASSWORD, ours)
    djangos = PBKDF2PasswordHasher().encode(PASSWORD, "somesalt1234")
    assert check_password(PASSWORD, djangos) and not check_password(WRONG, djangos)
    assert hashing_priority() >= HASHING_NICE


# --- the storm measurement ------------------------------------------------------------------


def test_a_small_storm_run_reports_throttling_and_the_pages(tmp_path) -> None:
    """`manage.py loginstorm` as an operator runs it: its own server, database and page
    user; the report counts the storm's answers and times the logged-in user's pages."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    storm = ["--logins", "12", "--calm", "0.5", "--page-interval", "0.1", "--json"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "loginstorm", *storm],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    limit = 5  # the default LOGIN_FAILURE_LIMIT of the server it starts
    assert report["storm"]["statuses"] == {"401": limit - 1, "429": 12 - limit + 1}
    assert report["storm"]["throttled_429"] == 12 - limit + 1
    assert report["right_password_after_the_storm"] == 429
    for window in ("pages_before", "pages_during"):
        pages = report[window]
        assert pages["count"] > 0 and pages["not_200"] == 0, window
        assert pages["p50_ms"] <= pages["p99_ms"] <= pages["max_ms"], window
    assert report["met"] == (report["pages_during"]["p99_ms"] < 250)
    assert report["children_exit"] == {"pages": 0, "server": 0}
    assert not list(tmp_path.glob("carlos-loginstorm-*"))  # its folder went with it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "192.0.2.1"], "not a loopback address"),
        (["--logins", "0"], "--logins must be between 1 and 2000"),
        (["--logins", "10", "--accounts", "11"], "--accounts must be between 1 and --logins"),
        (["--addresses", "300"], "--addresses must be between 1 and --logins"),
        (["--page-interval", "0"], "--page-interval must be between"),
    ],
)
def test_storm_arguments_are_refused_before_anything_starts(args, message) -> None:
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match=message):
        call_command("loginstorm", *args)
