"""`manage.py runserver`, the command a Django user types first, run for real (with its
autoreloader): it brings the offline simulator and warms the pools as `serve` does, and
Ctrl-C takes the simulator down with it.

Reproduces (issue 15): runserver (Daphne's) started without the simulator or warm-up, so
/health stayed 503 and every design failed with `APIConnectionError: Connection error.`
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carlos.processes import health_status, manage_py
from tests.servers import HOST, ROOT, START_LIMIT_S, child_env, free_port, manage


def listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def runserver(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, int]]:
    """`manage.py runserver HOST:PORT` in a process group of its own (its reloaded child and
    the simulator with it), on its own database and simulator port; killed if a test leaves
    it running."""
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    manage(env, "migrate", "--verbosity", "0")
    port, log = free_port(), tmp_path / "runserver.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            manage_py("runserver", f"{HOST}:{port}"),
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    try:
        yield process, f"http://{HOST}:{port}", log, int(env["LLM_SIMULATOR_PORT"])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_runserver_brings_the_simulator_and_warm_pools_and_ctrl_c_stops_both(runserver):
    process, base, log, simulator_port = runserver
    deadline = time.monotonic() + START_LIMIT_S  # a fail-safe limit, not a timing assertion
    while health_status(base) != 200:
        assert process.poll() is None, f"runserver exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"/health never 200:\n{log.read_text()}"
        time.sleep(0.1)
    output = log.read_text()
    assert output.count("🤖 Offline LLM simulator: LLM simulator listening on") == 1
    assert "runserver warms the pools as it starts" in output
    assert "✅ Connection pool ready: 10 main, 5 ronei, 10 mini" in output
    assert listening(simulator_port)

    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole group
    process.wait(timeout=START_LIMIT_S)
    deadline = time.monotonic() + START_LIMIT_S
    while listening(simulator_port):  # stopped by runserver (or with it, PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, "the simulator outlived runserver"
        time.sleep(0.1)
    assert "Traceback" not in log.read_text(), log.read_text()
