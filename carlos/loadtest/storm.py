"""`manage.py loginstorm`: hundreds of wrong-password logins while a logged-in user reads pages.

Why: every login hashes a password (PBKDF2, about half a second of one core). When that
ran on the thread that serves every page's database queries, and inside one of the page
gate's places, 40 wrong logins took another user's `/designs/` from 9 ms to 6.7 s. This
measures what a storm does to such a user now, on loopback and nowhere else.

The run builds its own world, as `manage.py loadtest` does: a throwaway SQLite database
with the page user (and designs on their list) and the storm's target accounts, and
`manage.py serve` as a child process (production settings, plain HTTP on loopback). The
logged-in user's pages are timed by a process of its own (`carlos.loadtest.probe pages`),
on a fixed schedule whatever the answers take, so that neither the storm's CPU nor a slow
answer flatters the figure. This process sends the storm: all the wrong logins at once,
from `--addresses` loopback addresses (127.0.0.2 and up) against `--accounts` accounts,
then checks that the right password of a stormed account is refused too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from carlos.loadtest.options import MAX_NICE, SETUP_TIMEOUT_S, LoadTestError, loopback_host
from carlos.loadtest.probe import SESSION_VARIABLE, probe_command
from carlos.loadtest.readings import cores_used, cpu_seconds, machine_cores, machine_cpu
from carlos.loadtest.report import answers_summary, summarize
from carlos.loadtest.users import CSRF_TOKEN
from carlos.loadtest.world import server_env
from carlos.processes import (
    Children,
    free_port,
    manage_py,
    run_manage,
    stop_process,
    tail,
    wait_healthy,
)

PAGE_P99_TARGET_MS = 250.0
MAX_LOGINS = 2000
MAX_ADDRESSES = 250  # 127.0.0.2 ... 127.0.0.251
PAGE_USER = "reader"
TARGET_PREFIX = "target-"
DESIGNS_ON_THE_LIST = 20


@dataclass(frozen=True)
class StormOptions:
    """What to run; `validated()` refuses what makes no sense, naming each option."""

    logins: int = 200
    accounts: int = 1
    addresses: int = 1
    calm: float = 3.0  # seconds of pages before the storm, for comparison
    page_interval: float = 0.05
    timeout: float = 600.0
    host: str = "127.0.0.1"
    keep: bool = False
    # The storm's sender stands in for attackers elsewhere: at a nice level above 0 its own
    # CPU does not preempt the server measured on the same machine (0: the same priority).
    storm_nice: int = 0

    def validated(self) -> StormOptions:
        problems = []
        if not 1 <= self.logins <= MAX_LOGINS:
            problems.append(f"--logins must be between 1 and {MAX_LOGINS}, got {self.logins}")
        if not 1 <= self.accounts <= max(self.logins, 1):
            problems.append(f"--accounts must be between 1 and --logins, got {self.accounts}")
        if not 1 <= self.addresses <= min(self.logins, MAX_ADDRESSES):
            problems.append(
                f"--addresses must be between 1 and --logins (at most {MAX_ADDRESSES}), "
                f"got {self.addresses}"
            )
        for name, low, high in (
            ("calm", 0.0, 60.0),
            ("page_interval", 0.01, 5.0),
            ("timeout", 10.0, 3600.0),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                flag = "--" + name.replace("_", "-")
                problems.append(f"{flag} must be between {low:g} and {high:g}, got {value}")
        try:
            loopback_host(self.host)
        except LoadTestError as exc:
            problems.append(str(exc))
        if not 0 <= self.storm_nice <= MAX_NICE:
            problems.append(f"--storm-nice must be between 0 and {MAX_NICE}, got {self.storm_nice}")
        if problems:
            raise LoadTestError("; ".join(problems))
        return self


# --- the world ------------------------------------------------------------------------------

# One hash for every target account (they are never logged into), one for the page user.
_SETUP_CODE = """
import os
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.management import call_command
from agents.models import Design
from agents.options import DEFAULT_OPTIONS
call_command("migrate", interactive=False, verbosity=0)
User = get_user_model()
reader = User.objects.create_user(os.environ["STORM_READER"], password=os.environ["STORM_PASSWORD"])
Design.objects.bulk_create(
    Design(owner=reader, request_text=f"A shop for {n} thousand users", options=DEFAULT_OPTIONS,
           status="succeeded")
    for n in range(int(os.environ["STORM_DESIGNS"]))
)
encoded = make_password(os.environ["STORM_TARGET_PASSWORD"])
User.objects.bulk_create(
    User(username=f"{os.environ['STORM_PREFIX']}{i:04d}", password=encoded)
    for i in range(int(os.environ["STORM_ACCOUNTS"]))
)
"""


def world_env(options: StormOptions, database: Path) -> dict[str, str]:
    """The load test's server environment, and a simulator port of this run's own."""
    host = loopback_host(options.host)
    return {**server_env(options.host, database), "LLM_SIMULATOR_PORT": str(free_port(host))}


@dataclass
class World:
    base_url: str
    server: asyncio.subprocess.Process
    server_log: Path
    reader_password: str
    target_password: str


async def start_world(options: StormOptions, tmp: Path, children: Children) -> World:
    env = world_env(options, tmp / "db.sqlite3")
    reader_password, target_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    setup_env = {
        **env,
        "STORM_READER": PAGE_USER,
        "STORM_PASSWORD": reader_password,
        "STORM_DESIGNS": str(DESIGNS_ON_THE_LIST),
        "STORM_TARGET_PASSWORD": target_password,
        "STORM_PREFIX": TARGET_PREFIX,
        "STORM_ACCOUNTS": str(options.accounts),
    }
    await run_manage(["shell", "-c", _SETUP_CODE], setup_env, SETUP_TIMEOUT_S)
    host = loopback_host(options.host)
    port = free_port(host)
    log = tmp / "serve.log"
    with log.open("wb") as output:
        server = await children.start(
            "server",
            manage_py("serve", "--host", host, "--port", str(port)),
            env,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
    base_url = f"http://{host}:{port}"
    await wait_healthy(base_url, server, log)
    return World(base_url, server, log, reader_password, target_password)


async def log_in(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    """GET the login page for its CSRF token, then POST the form, as a browser does."""
    page = await client.get("/accounts/login/")
    match = CSRF_TOKEN.search(page.text)
    if page.status_code != 200 or match is None:
        raise LoadTestError(f"the login page answered HTTP {page.status_code} without a form")
    return await client.post(
        "/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": match[1]},
    )


def read_pages(path: Path) -> list[tuple[float, float, int]]:
    """(sent, ms, status) of every page the page user loaded."""
    samples = []
    with contextlib.suppress(OSError), path.open() as lines:
        for line in lines:
            parts = line.split()
            with contextlib.suppress(ValueError, IndexError):
                if parts[0] == "P":
                    samples.append((float(parts[1]), float(parts[2]), int(parts[3])))
    return samples


def pages_between(samples: list[tuple[float, float, int]], start: float, end: float) -> dict:
    window = [(ms, status) for sent, ms, status in samples if start <= sent < end]
    return answers_summary(window, failed_key="not_200")


# --- the storm ------------------------------------------------------------------------------


def storm_address(index: int) -> str:
    return f"127.0.0.{index + 2}"


async def storm(world: World, options: StormOptions) -> dict[str, Any]:
    """Each address's login form and CSRF cookie, `options.calm` seconds of quiet (the pages
    before), then every wrong login at once."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    clients = [
        httpx.AsyncClient(
            base_url=world.base_url,
            timeout=options.timeout,
            limits=limits,
            transport=httpx.AsyncHTTPTransport(local_address=storm_address(n), limits=limits),
        )
        for n in range(options.addresses)
    ]
    try:
        tokens = []
        for client in clients:  # before the clock starts: each address's form and cookie
            page = await client.get("/accounts/login/")
            match = CSRF_TOKEN.search(page.text)
            if match is None:
                raise LoadTestError(f"no login form for the storm (HTTP {page.status_code})")
            tokens.append(match[1])
        calm_started, calm_machine = time.monotonic(), machine_cpu()
        await asyncio.sleep(options.calm)
        calm_machine_cores = machine_cores(calm_machine, machine_cpu())
        latencies: list[float] = []
        statuses: Counter[str] = Counter()

        async def wrong_login(number: int) -> None:
            client, token = clients[number % len(clients)], tokens[number % len(clients)]
            data = {
                "username": f"{TARGET_PREFIX}{number % options.accounts:04d}",
                "password": f"wrong-{number}",
                "csrfmiddlewaretoken": token,
            }
            sent = time.monotonic()
            try:
                status = str((await client.post("/accounts/login/", data=data)).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append((time.monotonic() - sent) * 1000)
            statuses[status] += 1

        started = time.monotonic()
        started_cpu = cpu_seconds(world.server.pid)
        started_machine = machine_cpu()
        await asyncio.gather(*(wrong_login(number) for number in range(options.logins)))
        ended = time.monotonic()
        return {
            "calm_started": calm_started,
            "calm_machine_cpu_cores": calm_machine_cores,
            "started": started,
            "ended": ended,
            "statuses": dict(sorted(statuses.items())),
            "latency": summarize(latencies),
            "server_cpu_cores": cores_used(
                started_cpu, cpu_seconds(world.server.pid), ended - started
            ),
            "machine_cpu_cores": machine_cores(started_machine, machine_cpu()),
        }
    finally:
        for client in clients:
            await client.aclose()


async def right_password_after(world: World, options: StormOptions) -> int:
    """What the right password of the first stormed account gets, from the storm's first
    address, once the storm is over: 302 logged in, 429 locked out."""
    transport = httpx.AsyncHTTPTransport(local_address=storm_address(0))
    async with httpx.AsyncClient(
        base_url=world.base_url, transport=transport, timeout=options.timeout
    ) as client:
        answer = await log_in(client, f"{TARGET_PREFIX}0000", world.target_password)
        return answer.status_code


# --- the run --------------------------------------------------------------------------------


async def run_storm(
    options: StormOptions, progress: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    options = options.validated()
    children = Children()
    with tempfile.TemporaryDirectory(prefix="carlos-loginstorm-", delete=not options.keep) as name:
        tmp = Path(name)
        try:
            progress("building the world: database, accounts, server")
            world = await start_world(options, tmp, children)
            async with httpx.AsyncClient(base_url=world.base_url) as client:
                answer = await log_in(client, PAGE_USER, world.reader_password)
                if answer.status_code != 302:
                    raise LoadTestError(f"the page user's login answered {answer.status_code}")
                session = client.cookies.get("sessionid", "")
            pages_log = tmp / "pages.log"
            pages = await children.start(
                "pages",
                probe_command("pages", world.base_url, pages_log, options.page_interval),
                {**os.environ, SESSION_VARIABLE: session},
            )
            progress(
                f"storm: {options.logins} wrong logins against {options.accounts} account(s) "
                f"from {options.addresses} address(es)"
            )
            if options.storm_nice:
                # This process only, and after the server and the page user started: they
                # keep the priority they have.
                os.setpriority(os.PRIO_PROCESS, 0, options.storm_nice)
            result = await storm(world, options)
            after = await right_password_after(world, options)
            await asyncio.sleep(options.page_interval * 4)  # the last pages sent answer
            await stop_process(pages)
            samples = read_pages(pages_log)
            if not samples:
                raise LoadTestError(f"the page user recorded nothing:\n{tail(world.server_log)}")
        finally:
            exits = await children.stop_all()
            if options.keep:
                progress(f"kept the database and logs in {tmp}")
    during = pages_between(samples, result["started"], result["ended"])
    return {
        "options": asdict(options),
        "cpu_count": os.cpu_count(),
        "pages_before": pages_between(samples, result["calm_started"], result["started"]),
        "machine_cpu_cores_before": result["calm_machine_cpu_cores"],
        "pages_during": during,
        "storm": {
            "seconds": round(result["ended"] - result["started"], 2),
            "statuses": result["statuses"],
            "throttled_429": result["statuses"].get("429", 0),
            "refused_401": result["statuses"].get("401", 0),
            "login_latency": result["latency"],
            "server_cpu_cores": result["server_cpu_cores"],
            "machine_cpu_cores": result["machine_cpu_cores"],
        },
        "right_password_after_the_storm": after,
        "target_page_p99_ms": PAGE_P99_TARGET_MS,
        "met": during["p99_ms"] is not None
        and during["p99_ms"] < PAGE_P99_TARGET_MS
        and during["not_200"] == 0,
        "children_exit": exits,
    }


def format_report(report: dict[str, Any]) -> str:
    options, storm_ = report["options"], report["storm"]

    def pages(figures: dict[str, Any]) -> str:
        return (
            f"{figures['count']} pages, p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
            f"max {figures['max_ms']} ms, {figures['not_200']} not 200"
        )

    lines = [
        f"login storm: {options['logins']} wrong-password logins at once against "
        f"{options['accounts']} account(s) from {options['addresses']} address(es), "
        f"{report['cpu_count']} cores, storm sender at nice {options['storm_nice']}",
        f"  the logged-in user, before:  {pages(report['pages_before'])} (machine CPU "
        f"{report['machine_cpu_cores_before']} cores)",
        f"  the logged-in user, during:  {pages(report['pages_during'])}",
        f"  storm: {storm_['seconds']} s; answers {storm_['statuses']} "
        f"(throttled 429: {storm_['throttled_429']}, wrong password 401: "
        f"{storm_['refused_401']}); login p50 {storm_['login_latency']['p50_ms']} ms, "
        f"p99 {storm_['login_latency']['p99_ms']} ms",
        f"  CPU during the storm: server {storm_['server_cpu_cores']} cores, machine "
        f"{storm_['machine_cpu_cores']} cores",
        "  the right password of a stormed account, afterwards: HTTP "
        f"{report['right_password_after_the_storm']}",
        f"  target: page p99 < {report['target_page_p99_ms']:g} ms during the storm: "
        + ("met" if report["met"] else "MISSED"),
    ]
    return "\n".join(lines)
