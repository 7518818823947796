"""A plain `daphne carlos.asgi:application`, the way the Channels docs deploy: no `serve`, no
ASGI lifespan events (Daphne sends none). Its first request warms the pools by itself, once
however many requests come first, without holding that request up; SIGTERM drains and closes
them; and its output says each thing once, with no misleading notice.

Reproduces (issue 15): /health stayed 503 "pools not initialized" for ever under a plain
Daphne; every django.request line was printed twice in DEBUG; Daphne's "HTTP/2 support not
enabled" at every start.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pools.endpoints import WARMING_UP
from pools.simulator.process import start_simulator
from tests.helpers.waiting import eventually
from tests.servers import HOST, ROOT, START_LIMIT_S, child_env, free_port, manage, stop

CONCURRENT_FIRST_REQUESTS = 12
DAPHNE = (sys.executable, "-m", "daphne")


@dataclass
class Daphne:
    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_listening(server: Daphne, port: int) -> None:
    """Until the port accepts a connection (nothing is sent: a request would start the
    server). A fail-safe limit, not a timing assertion."""
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"daphne exited with {server.process.returncode}:\n{server.output()}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"daphne did not listen within {START_LIMIT_S:g} s:\n{server.output()}")


@pytest.fixture(scope="module")
def daphne(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daphne]:
    """A plain Daphne (DEBUG, its own database) beside the offline simulator, both stopped
    after the module; the tests run in order, the last one stops Daphne itself."""
    folder = tmp_path_factory.mktemp("daphne")
    env = child_env(f"sqlite:///{folder / 'db.sqlite3'}")
    manage(env, "migrate", "--verbosity", "0")
    simulator = start_simulator(
        ["--host", HOST, "--port", env["LLM_SIMULATOR_PORT"]], manage_py=None, env=env
    )
    port = free_port()
    log = folder / "daphne.log"
    try:
        with log.open("w") as output:
            process = subprocess.Popen(
                [*DAPHNE, "-b", HOST, "-p", str(port), "carlos.asgi:application"],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        server = Daphne(process, f"http://{HOST}:{port}", log)
        try:
            wait_listening(server, port)
            yield server
        finally:
            stop(process)
    finally:
        simulator.stop()


async def test_the_first_requests_start_the_server_once_and_health_turns_200(daphne: Daphne):
    async with httpx.AsyncClient(base_url=daphne.base, timeout=30) as client:
        first = await asyncio.gather(
            *(client.get("/health") for _ in range(CONCURRENT_FIRST_REQUESTS)),
            client.get("/accounts/login/"),
        )
        *probes, page = first
        # Answered at once, warming or not: the first one processed cannot find the pools warm.
        assert {probe.status_code for probe in probes} <= {200, 503}
        warming = [probe for probe in probes if probe.status_code == 503]
        assert warming, "no probe saw the pools warming: were they warm before any request?"
        assert {probe.json()["reason"] for probe in warming} == {WARMING_UP}  # loopback: details
        assert page.status_code == 200  # pages are served while the pools warm

        async def healthy() -> bool:
            return (await client.get("/health")).status_code == 200

        await eventually(healthy, START_LIMIT_S, what="/health 200", state=daphne.output)
        body = (await client.get("/health")).json()
        assert body["status"] == "healthy"
        assert body["pools"]["main"]["connections_num"] == 10  # warm: every slot's connection
    output = daphne.output()
    assert output.count("the first request warms the pools") == 1, output
    assert output.count("Warming up LLM connection pools") == 1, output


async def test_each_log_event_is_one_line_and_no_misleading_notice(daphne: Daphne):
    async with httpx.AsyncClient(base_url=daphne.base, timeout=30) as client:
        assert (await client.get("/no-such-page")).status_code == 404

        def logged() -> bool:
            return "Not Found: /no-such-page" in daphne.output()

        await eventually(logged, 30, what="the 404 logged", state=daphne.output)
    output = daphne.output()
    [line] = [line for line in output.splitlines() if "Not Found: /no-such-page" in line]
    assert " WARNING django.request: " in line  # once, through the configured format
    assert "HTTP/2" not in output


def test_sigterm_drains_and_closes_the_pools(daphne: Daphne):
    daphne.process.send_signal(signal.SIGTERM)
    assert daphne.process.wait(timeout=START_LIMIT_S) == 0
    output = daphne.output()
    # The drain first (no design ran), then the pools closed.
    drained, closed = "drained: no design was running", "LLM connection pools closed"
    assert drained in output and closed in output, output
    assert output.index(drained) < output.index(closed)
    assert "Killed 0 pending application instances" not in output
    assert "Traceback" not in output, output
