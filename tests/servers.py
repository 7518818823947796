"""Real `manage.py serve` processes for the tests that need the whole server, not a test client.

One copy of what those tests share: the child's environment, the start, the wait for
`/health`, and a stop that leaves nothing running whatever the test did. The process work
itself (free port, command line, SIGTERM then SIGKILL) is `carlos.processes`, as for the load
test. What a test asserts about a server (its output, its exit status, a deliberate SIGKILL)
stays in the test: `Server` hands out the process and its log, and `stop` does nothing to a
process that has already exited.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from carlos import processes
from carlos.processes import LOOPBACK, ROOT, free_port, manage_py, start_serve, stop, tail

HOST = LOOPBACK
START_LIMIT_S = 90.0  # fail-safe limits, not timing assertions: a broken build must not hang
TAIL_LINES = 80


def child_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a `manage.py` child: the real settings with DEBUG, its own database,
    and, unless `extra` names an endpoint, the offline simulator on a free port of its own
    (no endpoint leaks in from the environment the tests run in)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "carlos.settings",
        "DJANGO_DEBUG": "1",
        "DATABASE_URL": database_url,
        "LLM_SIMULATOR_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("AZURE_OPENAI_ENDPOINT", "LLM_BASE_URL", "LLM_SIMULATOR_URL"):
        env.pop(name, None)
    return {**env, **extra}


def manage(
    env: Mapping[str, str], *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`manage.py <args>` run to its end, output captured; with `check`, a failure fails the
    test showing that output."""
    done = subprocess.run(
        manage_py(*args),
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, (
            f"manage.py {args[0]} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


@dataclass
class Server:
    """A server child process: where it listens, and the file collecting its output."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The end of the server's output, for failure messages."""
        return tail(self.log, lines)


def start(env: Mapping[str, str], log: Path, *options: str, name: str = "serve") -> Server:
    """`manage.py serve --port <free port> <options>` in a child process, stdout and stderr
    (in order) in `log`, leading a process group of its own (see `carlos.processes`).

    One worker unless `options` ask for more: these servers stand for separate instances
    (with REDIS_URL, `serve` would otherwise start one worker per core)."""
    if not any(option.startswith("--workers") for option in options):
        options = ("--workers", "1", *options)
    port = free_port()
    return Server(name, port, start_serve(dict(env), log, port, *options), log)


def health_status(server: Server, timeout: float = 2) -> int | str:
    """The status of one GET /health of `server`, or why there was none."""
    return processes.health_status(server.base, timeout)


def wait_healthy(*servers: Server, limit: float = START_LIMIT_S) -> None:
    """Readiness, not performance: poll each server's /health until it answers 200. Fails the
    test, with the end of its output, as soon as a server exits, or if one is not healthy
    within `limit` seconds."""
    pending = list(servers)
    last: dict[str, int | str] = {}
    deadline = time.monotonic() + limit
    while pending:
        for server in list(pending):
            if server.process.poll() is not None:
                pytest.fail(
                    f"{server.name} exited with {server.process.returncode} before /health "
                    f"answered 200; its output ends:\n{server.tail()}"
                )
            last[server.name] = health_status(server)
            if last[server.name] == 200:
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            pytest.fail(
                "\n\n".join(
                    f"{server.name}: /health did not answer 200 within {limit:g} s (last: "
                    f"{last[server.name]}); its output ends:\n{server.tail()}"
                    for server in pending
                )
            )
        if pending:
            time.sleep(0.1)


@contextmanager
def serving(
    env: Mapping[str, str],
    log: Path,
    *options: str,
    name: str = "serve",
    limit: float = START_LIMIT_S,
) -> Iterator[Server]:
    """A healthy `manage.py serve` for the block (see `start`), stopped however it ends."""
    server = start(env, log, *options, name=name)
    try:
        wait_healthy(server, limit=limit)
        yield server
    finally:
        stop(server.process)


async def log_in(client: Any, username: str, password: str) -> None:
    """Log `client` (an httpx.AsyncClient on a served site) in through the real login form."""
    page = await client.get("/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token, page.text[:300]
    response = await client.post(
        "/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token[1]},
    )
    assert response.status_code == 302, response.text[:500]


def migrate_with_one_user(env: Mapping[str, str], username: str, password: str) -> None:
    """Migrate the database `env` names and create one user in it, in one child process."""
    script = (
        "from django.contrib.auth import get_user_model\n"
        "from django.core.management import call_command\n"
        'call_command("migrate", interactive=False, verbosity=0)\n'
        f"get_user_model().objects.create_user({username!r}, password={password!r})\n"
    )
    manage(env, "shell", "-c", script)


@dataclass
class Site:
    """A served site with one user, for the browser tests (see `site_with_one_user`)."""

    server: Server
    database: Path
    env: dict[str, str]


@contextmanager
def site_with_one_user(
    label: str, log: Path, username: str, password: str, *options: str, limit: float
) -> Iterator[Site]:
    """`manage.py serve <options>` on free ports with a throwaway SQLite database (removed
    after) holding one user; always against the offline simulator."""
    database = Path(f"/tmp/carlos-{label}-{uuid.uuid4().hex}.sqlite3")
    env = child_env(f"sqlite:///{database}")
    try:
        migrate_with_one_user(env, username, password)
        with serving(env, log, *options, limit=limit) as served:
            yield Site(served, database, env)
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
