"""Timing processes: the load test's /health probe and the login storm's page user.

Each is a process of its own, so its latencies are the server's, not those of the event loop
generating the load. Requests leave on a fixed schedule whether or not the previous one has
answered (a slow server must not get fewer samples: no coordinated omission), and one line
per answer goes to a file the parent reads back once the process has stopped (SIGTERM).
The module imports nothing heavy (no Django, no engine), so the process is up within a
moment:

    python -m carlos.loadtest.probe health --url URL --pid-file FILE --out FILE [--interval S]
    python -m carlos.loadtest.probe pages --url URL --out FILE [--interval S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx

from carlos.loadtest.options import SIMULATOR_READY_TIMEOUT_S, LoadTestError
from carlos.loadtest.readings import memory_kb, open_sockets
from carlos.processes import Children

if TYPE_CHECKING:
    from carlos.loadtest.options import LoadTestOptions
    from carlos.loadtest.world import Server

PROBE_TIMEOUT_S = 30.0
# A visitor opening the login page (no session) while the users work: the page everyone sees
# first, timed through the designs phase as well as /health.
VISITOR_PATH = "/accounts/login/"
VISITOR_INTERVAL_S = 1.0
PAGE_TIMEOUT_S = 60.0
STORM_PAGES = ("/designs/", "/")  # what the login storm's page user loads, in turn
SESSION_VARIABLE = "LOGINSTORM_SESSION"  # the page user's cookie: kept out of `ps`


class InFlight:
    """The requests sent on the schedule and not answered yet."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, request: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(request)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def __len__(self) -> int:
        return len(self.tasks)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: the parent's way of ending the process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def timed_get(
    client: httpx.AsyncClient, target: str, out: TextIO, tag: str, note: str = ""
) -> None:
    """GET `target`; one line `<tag> <sent, monotonic s> <ms> <status><note>` (status 0: no
    answer)."""
    sent = time.monotonic()
    try:
        status = (await client.get(target)).status_code
    except httpx.HTTPError:
        status = 0
    out.write(f"{tag} {sent:.6f} {(time.monotonic() - sent) * 1000:.3f} {status}{note}\n")


def read_pids(path: Path) -> tuple[int, ...]:
    """The server's processes (one, or a parent and its workers); none if unreadable."""
    try:
        return tuple(int(pid) for pid in path.read_text().split())
    except (OSError, ValueError):
        return ()


def server_sample(pids: tuple[int, ...]) -> tuple[int, int] | None:
    """Sockets and RSS (kB) of the server's processes together; None if one is gone."""
    sockets = [open_sockets(pid) for pid in pids]
    rss = [memory_kb(pid).get("VmRSS") for pid in pids]
    if not pids or None in sockets or None in rss:
        return None
    return sum(s for s in sockets if s is not None), sum(r for r in rss if r is not None)


async def probe_health(url: str, pid_file: Path, out_path: Path, interval: float) -> None:
    """Time `url` (/health) every `interval` s and sample the server's sockets and RSS.

    One that times out counts as PROBE_TIMEOUT_S with status 0. Lines: `H <sent> <ms>
    <status>`, `S <at> <sockets> <rss kB> <probes in flight>`, sockets and RSS summed over the
    server's processes (its workers too), and every VISITOR_INTERVAL_S the login page as a
    visitor without a session sees it, `V <sent> <ms> <status>`. The pids are read from
    `pid_file` at each sample, so a restarted server is followed.
    """
    stop = stop_on_signals()
    # Enough connections that every scheduled probe leaves even if each takes the timeout.
    most = math.ceil(PROBE_TIMEOUT_S / interval) + 1
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=1)
    in_flight = InFlight()
    visitor_url = url.removesuffix("/health") + VISITOR_PATH
    with out_path.open("w", buffering=1) as out:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, limits=limits) as client:
            next_probe = next_sample = next_visit = time.monotonic()
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_probe:
                    in_flight.send(timed_get(client, url, out, "H"))
                    next_probe += interval
                if now >= next_visit:
                    client.cookies.clear()  # a new visitor each time
                    in_flight.send(timed_get(client, visitor_url, out, "V"))
                    next_visit += VISITOR_INTERVAL_S
                if now >= next_sample:
                    sample = server_sample(read_pids(pid_file))
                    if sample is not None:
                        # Our own probes in flight hold server sockets too: report them.
                        out.write(f"S {now:.6f} {sample[0]} {sample[1]} {len(in_flight)}\n")
                    next_sample = now + max(interval, 0.2)
                wake = min(next_probe, next_sample, next_visit)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wake - now)
            for task in list(in_flight.tasks):
                task.cancel()
            if in_flight.tasks:
                await asyncio.wait(in_flight.tasks)


async def load_pages(url: str, session: str, out_path: Path, interval: float) -> None:
    """The login storm's logged-in user: STORM_PAGES in turn every `interval` s with the
    session cookie. Lines: `P <sent> <ms> <status> <path>`."""
    stop = stop_on_signals()
    most = math.ceil(PAGE_TIMEOUT_S / interval) + 1
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=4)
    in_flight = InFlight()
    with out_path.open("w", buffering=1) as out:
        async with httpx.AsyncClient(
            base_url=url, timeout=PAGE_TIMEOUT_S, limits=limits, cookies={"sessionid": session}
        ) as client:
            next_at, turn = time.monotonic(), 0
            while not stop.is_set():
                path = STORM_PAGES[turn % len(STORM_PAGES)]
                in_flight.send(timed_get(client, path, out, "P", f" {path}"))
                turn += 1
                next_at += interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
            if in_flight.tasks:
                await asyncio.wait(in_flight.tasks, timeout=PAGE_TIMEOUT_S)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m carlos.loadtest.probe")
    kinds = parser.add_subparsers(dest="kind", required=True)
    health = kinds.add_parser("health", help="time /health and sample the server")
    health.add_argument("--pid-file", required=True)
    pages = kinds.add_parser(
        "pages", help=f"the logged-in user's pages (cookie: ${SESSION_VARIABLE})"
    )
    for kind, interval in ((health, 0.1), (pages, 0.05)):
        kind.add_argument("--url", required=True)
        kind.add_argument("--out", required=True)
        kind.add_argument("--interval", type=float, default=interval)
    args = parser.parse_args(argv)
    if args.kind == "health":
        asyncio.run(probe_health(args.url, Path(args.pid_file), Path(args.out), args.interval))
    else:
        session = os.environ.get(SESSION_VARIABLE, "")
        asyncio.run(load_pages(args.url, session, Path(args.out), args.interval))


def probe_command(kind: str, url: str, out: Path, interval: float, *options: str) -> list[str]:
    """The command line of one of these processes."""
    return [
        sys.executable,
        "-m",
        "carlos.loadtest.probe",
        kind,
        "--url",
        url,
        "--out",
        str(out),
        "--interval",
        f"{interval:g}",
        *options,
    ]


# --- the parent's side -----------------------------------------------------------------------


async def wait_for_probe(path: Path, probe: asyncio.subprocess.Process) -> None:
    """Until the probe has answered once, so its connection is in the baseline."""
    deadline = time.monotonic() + SIMULATOR_READY_TIMEOUT_S
    while time.monotonic() < deadline and probe.returncode is None:
        with contextlib.suppress(OSError):
            text = await asyncio.to_thread(path.read_text)
            if text.startswith("H ") or "\nH " in text:
                return
        await asyncio.sleep(0.05)
    raise LoadTestError("the /health probe process did not start")


async def start_probe(
    server: Server, options: LoadTestOptions, env: dict[str, str], tmp: Path, children: Children
) -> tuple[asyncio.subprocess.Process, Path]:
    """The /health probe of one server (it follows the server across restarts); returns
    once it has answered once, so its connection is in the baseline."""
    suffix = f"-{server.label}" if server.label else ""
    out = tmp / f"probe{suffix}.log"
    command = probe_command(
        "health",
        f"{server.base_url}/health",
        out,
        options.probe_interval,
        "--pid-file",
        str(server.pid_file),
    )
    probe = await children.start(f"probe {server.label}".strip(), command, env)
    await wait_for_probe(out, probe)
    return probe, out


if __name__ == "__main__":
    main(sys.argv[1:])
