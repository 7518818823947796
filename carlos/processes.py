"""Child processes of this project: start a `manage.py` child, wait until it is healthy, stop it
(SIGTERM, then SIGKILL), on a free loopback port.

One copy for everything that runs the real server from outside: the load test and the login
storm (asyncio: they measure while their children run) and the tests (plain blocking calls).
Nothing here imports Django, so a helper process that uses it starts fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent  # where manage.py is
LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 20.0
SERVER_READY_TIMEOUT_S = 90.0


class ChildFailed(Exception):
    """A child process did not start, become healthy or finish; the text says why, with the
    end of its output."""


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on now (the kernel's pick), for a child to bind."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def manage_py(*args: str) -> list[str]:
    """The command line of `manage.py <args>` with this interpreter."""
    return [sys.executable, str(ROOT / "manage.py"), *args]


def tail(path: Path, lines: int = 30) -> str:
    """The end of a child's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- asyncio: the measuring runs -------------------------------------------------------------


class Children:
    """Every child process of a run, stopped in reverse start order whatever happens.

    Each child gets its own session, so a Ctrl-C in the terminal reaches only the parent,
    which then stops (say) a server before the simulator it depends on.
    """

    def __init__(self) -> None:
        self.started: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(
        self, name: str, args: Sequence[str], env: dict[str, str], **kw: Any
    ) -> asyncio.subprocess.Process:
        """Start a child; one named as an earlier one (a restart) takes its place in the
        stopping order."""
        process = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, env=env, start_new_session=True, **kw
        )
        names = [known for known, _ in self.started]
        if name in names:
            self.started[names.index(name)] = (name, process)
        else:
            self.started.append((name, process))
        return process

    async def stop_all(self) -> dict[str, int | None]:
        """SIGTERM, then SIGKILL after a grace period; returns each child's exit status."""
        codes: dict[str, int | None] = {}
        for name, process in reversed(self.started):
            codes[name] = await stop_process(process)
        return codes


async def stop_process(
    process: asyncio.subprocess.Process, grace: float = STOP_GRACE_S
) -> int | None:
    """SIGTERM (a server then closes its pools cleanly), SIGKILL if it does not exit
    within `grace` seconds."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
    return process.returncode


async def run_manage(args: Sequence[str], env: dict[str, str], timeout: float) -> str:
    """A short `manage.py` child to completion; its stdout, or ChildFailed with its output."""
    process = await asyncio.create_subprocess_exec(
        *manage_py(*args),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        await stop_process(process)
        raise
    if process.returncode != 0:
        raise ChildFailed(
            f"manage.py {args[0]} failed (exit {process.returncode}):\n"
            + (err or out).decode(errors="replace")[-3000:]
        )
    return out.decode(errors="replace")


async def wait_healthy(
    base_url: str,
    server: asyncio.subprocess.Process,
    log: Path,
    limit: float = SERVER_READY_TIMEOUT_S,
) -> None:
    """Readiness: `/health` 200 after the pools are warm, or ChildFailed with the server's
    log as soon as it exits or once `limit` seconds have passed."""
    deadline = time.monotonic() + limit
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if server.returncode is not None:
                raise ChildFailed(f"manage.py serve exited with {server.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{base_url}/health")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise ChildFailed(f"/health never answered 200 within {limit:g} s:\n{tail(log)}")


# --- blocking: the tests ---------------------------------------------------------------------


def start_serve(
    env: dict[str, str], log: Path, port: int, *options: str
) -> subprocess.Popen[bytes]:
    """`manage.py serve --port <port> <options>` in a child, stdout and stderr (in order) in
    `log`. The child leads a process group of its own, so that `kill` can take whatever it
    started with it."""
    with log.open("w") as output:
        return subprocess.Popen(
            manage_py("serve", "--port", str(port), *options),
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            process_group=0,
        )


def health_status(base_url: str, timeout: float = 2) -> int | str:
    """The status of one GET /health, or why there was none."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, http.client.HTTPException) as error:
        return f"{type(error).__name__}: {error}"


def stop(*processes: subprocess.Popen[Any], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to every process still running (each shuts down cleanly, as in production, and
    all at once), then SIGKILL to whatever runs after `grace` seconds, with its process group
    when it leads one. Processes that already exited are only reaped."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(process)
            process.wait(timeout=10)


def kill(process: subprocess.Popen[Any]) -> None:
    """SIGKILL to a process not yet reaped (so its pid is still its own), and to the process
    group it leads, if it leads one, so no child of it is left behind."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
            return
    except ProcessLookupError:
        return
    process.kill()
