"""The real server: `manage.py serve` (Daphne) warms the pools at start and closes them at stop,
and `PoolLifespan` does the same for lifespan-aware servers such as uvicorn."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import time
import urllib.error
import urllib.request

import pytest

from pools import runtime
from pools.lifespan import PoolLifespan
from tests.servers import child_env, serving


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
        assert gc.get_threshold()[0] == runtime.GC_YOUNG_THRESHOLD
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
    from pools.config import parse_config
    from pools.registry import PoolRegistry

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
