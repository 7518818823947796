"""The real server: `manage.py serve` (Daphne) warms the pools at start and closes them at stop,
and `PoolLifespan` does the same for lifespan-aware servers such as uvicorn. `serve` binds its
port before it touches anything (a port in use fails it, designs untouched), and a terminal's
Ctrl-C reaches the server, which stops its simulator itself once it has shut down."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from carlos.lifespan import PoolLifespan
from carlos.serving import GC_YOUNG_THRESHOLD
from pools import runtime
from tests.servers import (
    HOST,
    ROOT,
    Server,
    child_env,
    free_port,
    manage,
    serving,
    start,
    stop,
    wait_healthy,
)


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def served(tmp_path):
    """`manage.py serve` in a child process with its own database and simulator port."""
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with serving(env, tmp_path / "serve.log", "--migrate") as server:
        yield server.base, server.process, server.log, int(env["LLM_SIMULATOR_PORT"])


def test_serve_warms_pools_and_shuts_down_cleanly(served):
    base, process, log, simulator_port = served
    status, body = get_json(f"{base}/health")
    assert status == 200 and body["status"] == "healthy"
    for name, size in {"main": 10, "ronei": 5, "mini": 10}.items():
        assert body["pools"][name]["total"] == size
        assert body["pools"][name]["connections_num"] == size  # warm-up opened real sockets
    assert body["http"]["connections_open"] == 25
    simulator_stats = get_json(f"http://127.0.0.1:{simulator_port}/_simulator/stats")[1]
    assert simulator_stats["connections_accepted"] == 25

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    output = log.read_text()
    assert "✅ Connection pool ready: 10 main, 5 ronei, 10 mini" in output
    assert "log in as 'demo'; the password is in" in output  # DEBUG + simulator only
    assert "LLM connection pools closed" in output
    with pytest.raises(OSError):  # the simulator child went away with the server
        get_json(f"http://127.0.0.1:{simulator_port}/_simulator/stats")


async def test_lifespan_warms_and_closes(installed_registry, simulator):
    """What uvicorn would do: lifespan.startup warms, lifespan.shutdown closes."""
    app = PoolLifespan(lambda scope, receive, send: None)
    inbox: asyncio.Queue = asyncio.Queue()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        await inbox.put(message)
    task = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
    thresholds = gc.get_threshold()
    try:
        await asyncio.wait_for(task, 10)
        assert gc.get_freeze_count() > 0  # start-up objects are out of the collector's way
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert simulator.stats.connections_accepted == 25
    assert runtime.get_pool() is installed_registry and installed_registry.closed


async def test_pool_over_tls_reuses_its_connections(make_registry, simulator_factory, tmp_path):
    simulator = await simulator_factory(tls=True)
    ca_file = tmp_path / "ca.pem"
    simulator.write_ca_pem(ca_file)
    from pools.engine.config import parse_config
    from pools.engine.registry import PoolRegistry

    registry = PoolRegistry(
        parse_config(
            {
                "ENDPOINT": {"SIMULATOR_URL": simulator.base_url, "CA_BUNDLE": str(ca_file)},
                "POOLS": {"main": {"SIZE": 2}},
            }
        )
    )
    try:
        await registry.initialize()
        for _ in range(4):
            async with registry.get_main_llm() as llm:
                assert (await llm.ainvoke([{"role": "user", "content": "hi"}])).text
        assert simulator.stats.connections_accepted == 2
    finally:
        await registry.close()


def test_a_killed_server_takes_its_simulator_with_it(served):
    _, process, _, simulator_port = served
    assert get_json(f"http://127.0.0.1:{simulator_port}/_simulator/stats")[0] == 200
    process.send_signal(signal.SIGKILL)  # no shutdown hook runs
    process.wait()
    deadline = time.monotonic() + 20  # generous: only keeps a broken build from hanging
    while time.monotonic() < deadline:
        try:
            get_json(f"http://127.0.0.1:{simulator_port}/_simulator/stats")
        except OSError:
            return  # the orphaned simulator was stopped by the kernel's parent-death signal
        time.sleep(0.1)
    pytest.fail("the simulator outlived its killed server")


# == the port first, then everything else =====================================================


def shell(env: dict[str, str], code: str) -> str:
    """What `code` prints, run by `manage.py shell` on the database of `env`."""
    return manage(env, "shell", "--verbosity", "0", "-c", code).stdout.strip()


def test_a_second_server_on_a_port_in_use_fails_and_leaves_the_designs_alone(tmp_path):
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    manage(env, "migrate", "--verbosity", "0")
    design = shell(
        env,
        "from django.contrib.auth import get_user_model; from agents.models import Design; "
        "owner = get_user_model().objects.create_user('owner'); "
        "print(Design.objects.create(owner=owner, request_text='A shop', status='running').pk)",
    )
    with socket.socket() as taken:  # the first server's port
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = manage(env, "serve", "--migrate", "--port", str(port), check=False, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"CommandError: cannot listen on {HOST}:{port}: {os.strerror(errno.EADDRINUSE)}"
    ), done.stderr
    assert done.stdout == ""  # no demo account, no simulator: nothing started
    status = f"from agents.models import Design; print(Design.objects.get(pk={design}).status)"
    assert shell(env, status) == "running"  # a live server's design, for all this one knows


def test_a_listen_failure_daphne_reports_fails_the_command(tmp_path):
    """Whatever else keeps Daphne from listening (here an endpoint made to refuse), `serve`
    exits non-zero: Daphne itself only logs it and returns."""
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    refusing = (
        "import runpy, sys\n"
        "from twisted.internet import defer, endpoints, error\n"
        "class Refusing:\n"
        "    def listen(self, factory):\n"
        "        return defer.fail(error.CannotListenError('', 0, OSError('refused')))\n"
        "endpoints.serverFromString = lambda reactor, description: Refusing()\n"
        "sys.argv = ['manage.py', *sys.argv[1:]]\n"
        "runpy.run_path('manage.py', run_name='__main__')\n"
    )
    port = free_port()
    serve = ["serve", "--migrate", "--no-simulator", "--port", str(port)]
    done = subprocess.run(
        [sys.executable, "-c", refusing, *serve],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"CommandError: cannot listen on {HOST}:{port}: Daphne could not" in done.stderr


def test_serve_refuses_an_ipv6_host_at_once(tmp_path):
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    done = manage(env, "serve", "--host", "::1", "--port", str(free_port()), check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].endswith("serve listens on IPv4 only"), done.stderr
    assert done.stdout == ""


# == Ctrl-C: the server first, then its simulator =============================================


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def simulator_of(pid: int) -> int:
    """The pid of the `llm_simulator` child of server process `pid`."""
    for child in children(pid):
        if b"llm_simulator" in Path(f"/proc/{child}/cmdline").read_bytes():
            return child
    pytest.fail(f"process {pid} has no simulator child")


def running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its parent no longer does)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def assert_ends(pid: int, limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    while running(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs: an orphan"
        time.sleep(0.05)


def test_ctrl_c_reaches_the_server_which_then_stops_its_simulator(served):
    """A terminal's Ctrl-C is SIGINT to its whole foreground process group. The simulator is
    out of that group, so it serves the designs still running until the server has shut down
    and stops it."""
    _, process, log, _ = served
    simulator = simulator_of(process.pid)
    assert os.getpgid(simulator) != os.getpgid(process.pid)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does; `served` leads its own group
    assert process.wait(timeout=30) == 0
    assert "LLM connection pools closed" in log.read_text()
    assert_ends(simulator)


def test_dev_run_waits_for_the_server_on_ctrl_c(tmp_path):
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    port = free_port()
    log = tmp_path / "dev.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "dev.py", "run", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            process_group=0,  # a terminal's foreground job
        )
    try:
        wait_healthy(Server("dev.py run", port, process, log))
        (server,) = children(process.pid)
        simulator = simulator_of(server)
        assert os.getpgid(server) == os.getpgid(process.pid) != os.getpgid(simulator)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert not running(server)  # waited for, not left closing behind the shell
        assert "LLM connection pools closed" in log.read_text()
        assert_ends(simulator)
    finally:
        stop(process)


def test_serve_never_says_ready_while_the_endpoint_is_unreachable(tmp_path):
    """Reproduces (issue 15): with nothing at the endpoint, `serve` logged the failed warm-up,
    then "Connection pool ready: 0 main..." and "Backend ready to serve requests"."""
    env = child_env(f"sqlite:///{tmp_path / 'db.sqlite3'}")  # nothing listens on its port
    server = start(env, tmp_path / "serve.log", "--migrate", "--no-simulator")
    try:
        deadline = time.monotonic() + 60
        while "unready until the LLM endpoint answers" not in server.log.read_text():
            assert server.process.poll() is None, server.tail()
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.2)
        assert get_json(f"{server.base}/health")[0] == 503
    finally:
        stop(server.process)
    output = server.log.read_text()
    assert "Warm-up could not reach the LLM endpoint" in output
    assert "Connection pool ready" not in output and "Backend ready" not in output, output
