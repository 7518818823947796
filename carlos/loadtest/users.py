"""The simulated users: log in, submit a design, watch it over the WebSocket to its end.

Each user has its own cookie jar and connections, as separate browsers would, and does what
the page does when something goes wrong (a 503 is waited out and sent again, a closed socket
reconnects); what it could not do is recorded as a client failure, never as a stuck design.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from carlos.loadtest.options import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RESUBMITS,
    MAX_RETRY_AFTER_S,
    SNAPSHOT_POLL_S,
    SOCKET_RETRY_FIRST_S,
    SOCKET_RETRY_MAX_S,
    TERMINAL_STATUSES,
    USERNAME_PREFIX,
    LoadTestOptions,
)

if TYPE_CHECKING:
    from carlos.loadtest.world import World

PAGES = ("login_page", "login", "form", "submit", "design_page", "socket_snapshot")
CSRF_TOKEN = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
_DESIGN_URL = re.compile(r"/designs/(\d+)/$")
REQUESTS = (
    "An online bookshop for 50,000 daily users in Europe with payments and search",
    "Ingest telemetry from 5,000 IoT devices and build operations dashboards",
    "Order processing microservices with payments, inventory and notifications",
    "A patient portal for a clinic network with appointment booking",
    "A multiplayer game backend with leaderboards and matchmaking",
    "A data warehouse for retail sales with nightly reporting and forecasts",
)
# --- virtual users --------------------------------------------------------------------------


@dataclass
class DesignRun:
    """One design as its user saw it: how far it got and how it ended."""

    number: int
    user: int
    stage: str = "waiting for login"
    design_id: int | None = None
    status: str | None = None
    error: str = ""
    client_failure: str | None = None  # what a browser user would have seen go wrong
    submitted_at: float | None = None
    finished_at: float | None = None
    events: int = 0
    reconnects: int = 0
    socket_error: str = ""  # the last failed handshake, if any
    refusals: int = 0  # submits answered 503 (busy), each sent again after Retry-After


@dataclass
class Recorder:
    """Everything the users measure, shared by all of them (one event loop, no locks)."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PAGES})
    designs: list[DesignRun] = field(default_factory=list)
    logins_ok: int = 0
    logins_failed: int = 0
    socket_events: int = 0
    failovers: int = 0  # requests sent to another server as the user's own refused them
    refused_while_draining: int = 0  # submits answered 503 by a server being restarted


class PageError(Exception):
    """A page answered something a browser user would see as an error."""


async def timed(
    recorder: Recorder, page: str, request: Callable[[], Awaitable[httpx.Response]]
) -> httpx.Response:
    started = time.perf_counter()
    response = await request()
    recorder.latencies[page].append((time.perf_counter() - started) * 1000)
    return response


def retry_after(answer: httpx.Response) -> float:
    """The seconds a 503 asks to wait (Retry-After), within sensible bounds."""
    try:
        seconds = float(answer.headers.get("retry-after", ""))
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER_S
    if not math.isfinite(seconds):
        seconds = DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 1.0), MAX_RETRY_AFTER_S)


def csrf_token(response: httpx.Response, page: str) -> str:
    match = CSRF_TOKEN.search(response.text)
    if match is None:
        raise PageError(f"{page}: no CSRF token in the page (HTTP {response.status_code})")
    return match[1]


def form_fields() -> dict[str, str]:
    """The design form's option fields at their defaults, as the browser would post them."""
    from agents.options import DEFAULT_OPTIONS

    return dict(DEFAULT_OPTIONS)


class VirtualUsers:
    """N users: log in (a few at a time), then all submit at once and watch each design to
    its end, each with its own cookie jar and connections, as separate browsers would.

    With several servers, user i uses server i % n, and the next one while its own refuses
    connections (a restart): the servers share the database, so the session holds on both.
    """

    def __init__(
        self,
        world: World,
        options: LoadTestOptions,
        recorder: Recorder,
        on_logged_in: Callable[[], None],
    ) -> None:
        self.world = world
        self.options = options
        self.recorder = recorder
        self.on_logged_in = on_logged_in  # called once, when the last login has finished
        self.fields = form_fields()
        self.logged_in = asyncio.Event()
        self.pending_logins = options.user_count
        self.login_slots = asyncio.Semaphore(options.login_concurrency or options.user_count)
        for number in range(options.designs):
            recorder.designs.append(DesignRun(number=number, user=number % options.user_count))

    def designs_of(self, user: int) -> list[DesignRun]:
        return [run for run in self.recorder.designs if run.user == user]

    async def send(
        self, client: httpx.AsyncClient, user: int, page: str, method: str, path: str, **kw: Any
    ) -> httpx.Response:
        """`path` on the user's server, or on the next while that one is down. A GET is also
        sent again after a connection cut mid-request; a POST only after a refused
        connection, which cannot have reached the server (no design submitted twice)."""
        servers = self.world.servers
        order = [servers[(user + step) % len(servers)] for step in range(len(servers))]
        retry_on = httpx.TransportError if method == "GET" else httpx.ConnectError
        for server in order[:-1]:
            request = functools.partial(client.request, method, server.base_url + path, **kw)
            try:
                return await timed(self.recorder, page, request)
            except retry_on:
                self.recorder.failovers += 1
        request = functools.partial(client.request, method, order[-1].base_url + path, **kw)
        return await timed(self.recorder, page, request)

    async def user(self, index: int) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(self.options.timeout)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            try:
                async with self.login_slots:
                    await self.log_in(client, index)
                self.recorder.logins_ok += 1
            except (PageError, httpx.HTTPError) as exc:
                self.recorder.logins_failed += 1
                for run in self.designs_of(index):
                    run.client_failure = describe(exc)
                return
            finally:
                self.pending_logins -= 1
                if self.pending_logins == 0:
                    self.on_logged_in()
                    self.logged_in.set()
            await self.logged_in.wait()  # every user submits at the same moment
            await asyncio.gather(*(self.design(client, run) for run in self.designs_of(index)))

    async def log_in(self, client: httpx.AsyncClient, index: int) -> None:
        for run in self.designs_of(index):
            run.stage = "logging in"
        page = await self.send(client, index, "login_page", "GET", "/accounts/login/")
        if page.status_code != 200:
            raise PageError(f"login page answered HTTP {page.status_code}")
        data = {
            "csrfmiddlewaretoken": csrf_token(page, "login page"),
            "username": f"{USERNAME_PREFIX}{index:04d}",
            "password": self.world.password,
            "next": "/",
        }
        answer = await self.send(client, index, "login", "POST", "/accounts/login/", data=data)
        if answer.status_code != 302:
            raise PageError(f"login answered HTTP {answer.status_code}, not a redirect")

    async def design(self, client: httpx.AsyncClient, run: DesignRun) -> None:
        try:
            run.stage = "opening the form"
            form = await self.send(client, run.user, "form", "GET", "/")
            if form.status_code != 200:
                raise PageError(f"form page answered HTTP {form.status_code}")
            data = {
                "csrfmiddlewaretoken": csrf_token(form, "form page"),
                "request_text": f"{REQUESTS[run.number % len(REQUESTS)]} (load test #{run.number})",
                **self.fields,
            }
            run.stage = "submitting"
            run.submitted_at = time.monotonic()
            answer = await self.send(client, run.user, "submit", "POST", "/", data=data)
            # As a user told "busy, try again in N seconds" (an open circuit, full pools, a
            # server stopping): wait as told, then send the form again.
            while answer.status_code == 503 and run.refusals < MAX_RESUBMITS:
                run.refusals += 1
                if self.world.answered_while_draining(answer):
                    self.recorder.refused_while_draining += 1
                run.stage = "waiting to submit again"
                await asyncio.sleep(retry_after(answer))
                run.stage = "submitting"
                answer = await self.send(client, run.user, "submit", "POST", "/", data=data)
            match = _DESIGN_URL.search(answer.headers.get("location", ""))
            if answer.status_code != 302 or match is None:
                raise PageError(f"submit answered HTTP {answer.status_code}")
            run.design_id = int(match[1])
            run.stage = "loading the design page"
            page = await self.send(client, run.user, "design_page", "GET", match[0])
            if page.status_code != 200:
                raise PageError(f"design page answered HTTP {page.status_code}")
            run.stage = "watching"
            await self.watch(client, run)
        except (PageError, httpx.HTTPError, OSError) as exc:
            run.client_failure = describe(exc)
        except Exception as exc:  # a bug on our side must not pass for a stuck design
            run.client_failure = f"load generator error: {describe(exc)}"

    async def watch(self, client: httpx.AsyncClient, run: DesignRun) -> None:
        """Follow the socket to a terminal status, reconnecting as the page script does:
        forever, 0.5 s doubling to 10 s between tries, back to 0.5 s once a socket opens;
        only the run's deadline ends it (the design is then reported not terminal). With
        several servers each try goes to the next one (the last may be restarting), and the
        socket asks for snapshots (another server may be running the design)."""
        from websockets.exceptions import InvalidHandshake

        cookie = "; ".join(f"{c.name}={c.value}" for c in client.cookies.jar)
        servers = self.world.servers
        poll_every = SNAPSHOT_POLL_S if len(servers) > 1 else None
        target = run.user % len(servers)
        delay = SOCKET_RETRY_FIRST_S
        while True:
            server = servers[target]
            url = f"{server.base_url.replace('http', 'ws', 1)}/ws/designs/{run.design_id}/"
            try:
                code, opened = await watch_socket(
                    url, server.base_url, cookie, run, self.recorder, poll_every
                )
            except (InvalidHandshake, OSError) as exc:
                code, opened = None, False
                run.socket_error = describe(exc)
            if run.status in TERMINAL_STATUSES:
                run.finished_at = time.monotonic()
                return
            if code in (4403, 4404):
                raise PageError(f"the socket was refused with close code {code}")
            if opened:
                delay = SOCKET_RETRY_FIRST_S
            run.reconnects += 1
            target = (target + 1) % len(servers)
            await asyncio.sleep(delay)
            delay = min(delay * 2, SOCKET_RETRY_MAX_S)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def watch_socket(
    url: str,
    origin: str,
    cookie: str,
    run: DesignRun,
    recorder: Recorder,
    poll_every: float | None = None,
) -> tuple[int | None, bool]:
    """One socket connection: snapshot, then events until terminal.

    Returns the close code and whether the socket had opened.

    The handshake carries the session cookie and this site's Origin, as the page's does
    (the consumer sits behind AllowedHostsOriginValidator). Opening is bounded by the run's
    deadline, not by a timeout of its own: a slow handshake under load is a figure. With
    `poll_every`, the socket asks for a snapshot whenever it has heard nothing (nor asked)
    for that long.
    """
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed

    heard = time.monotonic()  # the last message; read by the poller

    async def ask_for_snapshots(socket: ClientConnection, every: float) -> None:
        asked = 0.0
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(max(0.0, max(heard, asked) + every - time.monotonic()))
                if time.monotonic() - max(heard, asked) >= every:
                    asked = time.monotonic()
                    await socket.send(json.dumps({"kind": "snapshot"}))

    started = time.perf_counter()
    opened = False
    snapshots = 0
    try:
        async with connect(
            url,
            origin=origin,
            additional_headers={"Cookie": cookie},
            open_timeout=None,
            ping_interval=None,  # browsers do not ping; Daphne pings them
        ) as socket:
            opened = True
            poller = None
            if poll_every is not None:
                poller = asyncio.create_task(ask_for_snapshots(socket, poll_every))
            try:
                async for message in socket:
                    heard = time.monotonic()
                    event = json.loads(message)
                    run.events += 1
                    recorder.socket_events += 1
                    if event.get("kind") == "snapshot":
                        if not snapshots:  # later ones: resyncs, and answers to our asking
                            recorder.latencies["socket_snapshot"].append(
                                (time.perf_counter() - started) * 1000
                            )
                        snapshots += 1
                        state = event.get("design") or {}
                        run.status, run.error = state.get("status"), state.get("error") or ""
                    elif event.get("kind") == "design_status":
                        run.status, run.error = event.get("status"), event.get("error") or ""
                    if run.status in TERMINAL_STATUSES:
                        return 1000, opened  # leaving the block closes the socket with 1000
            finally:
                if poller is not None:
                    poller.cancel()
                    await asyncio.wait([poller])
            return socket.close_code, opened
    except ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd is not None else None), opened
