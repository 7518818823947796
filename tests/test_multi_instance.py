"""Several Carlos instances as one cluster, proven with real processes (issue #6, scale out).

The processes: the LLM simulator (`manage.py llm_simulator`), and `manage.py serve` twice
(a third time for the restart), sharing one PostgreSQL database and one Redis (database 14).
What they show: (a) designs submitted to both instances never run more LLM calls at once
than the cluster's capacity (8 over the three pools, while each instance alone could run
8), (b) `kill -9` of an instance holding leases gives its capacity back within the lease
time to the survivor, the dead instance leaves the cluster view, the survivor takes the dead
instance's designs over and finishes them, and a restart leaves live designs alone, (c) a
design running on one instance streams live to a WebSocket on the other. Around them: the
operators' views of a cluster (the admin chart summed over instances, `pool_status
--cluster`), and an engine bug found on the way (the wait for a cluster lease).

Nothing is mocked. The instances use a Redis prefix of this run's own (REDIS_PREFIX) in Redis
database 14, whose keys are deleted before and after.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client

from agents.options import AGENTS, DEFAULT_OPTIONS
from pools.admin import chart_data
from pools.engine.config import parse_config
from pools.engine.registry import PoolRegistry
from pools.models import PoolSnapshot
from tests.helpers import services
from tests.helpers.services import (
    forget_keys,
    postgres_problem,
    redis_problem,
    run_prefix,
    throwaway_database,
)
from tests.helpers.snapshots import snap
from tests.helpers.waiting import eventually
from tests.servers import (
    Server,
    child_env,
    log_in,
    migrate_with_one_user,
    start,
    stop,
    wait_healthy,
)

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = services.CLUSTER_REDIS_URL
# This run's own keys (REDIS_PREFIX): test runs sharing the machine's Redis never meet.
PREFIX = run_prefix("test-cluster")
LEASE_SECONDS = 2.0
CAPACITY = {"main": 3, "ronei": 2, "mini": 3}  # 8 in all; no overflow anywhere
USERNAME, PASSWORD = "cluster-user", f"pw-{uuid.uuid4().hex}"
START_LIMIT_S = 90.0  # fail-safe limits, not timing assertions: a broken build must not hang
DESIGN_LIMIT_S = 90.0
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


REDIS_PROBLEM = redis_problem(REDIS_URL)
SERVICES_PROBLEM = REDIS_PROBLEM or postgres_problem()
needs_redis = services.needs_redis(REDIS_URL)
needs_services = pytest.mark.skipif(SERVICES_PROBLEM is not None, reason=SERVICES_PROBLEM or "")
__all__ = ["REDIS_URL", "SERVICES_PROBLEM", "submit"]  # tests/test_crash.py


# == the admin chart: the cluster summed per time bucket, or one instance =========================
def snapshot(instance: str, second: int, in_use: int) -> PoolSnapshot:
    return snap("main", T0 + timedelta(seconds=second), in_use, instance=instance)


# web-1 reports 2, 4 and 0; web-2 reports 5, 1 and 3 (seconds 0..3).
TWO_INSTANCES = [
    ("web-1:1", 0, 2),
    ("web-2:2", 0, 5),
    ("web-1:1", 1, 4),
    ("web-2:2", 2, 1),
    ("web-1:1", 3, 0),
    ("web-2:2", 3, 3),
]


@pytest.fixture
def two_instances(db) -> None:
    PoolSnapshot.objects.bulk_create([snapshot(*row) for row in TWO_INSTANCES])


def test_chart_sums_each_instances_average_per_bucket(two_instances):
    # Two 2-second buckets. Seconds 0-1: web-1 averages (2+4)/2 = 3, web-2 5: the cluster ran 8
    # (a plain average of the rows would say 3.7, a plain sum 11). Seconds 2-3: 0 + 2 = 2.
    data = chart_data(PoolSnapshot.objects.all(), max_points=2)
    assert data.bucket_seconds == 2
    assert data.instances == ("web-1:1", "web-2:2")
    buckets = data.pools["main"]
    assert [(b.in_use, b.available, b.size, b.rows, b.instances) for b in buckets] == [
        (8.0, 12.0, 20, 3, 2),
        (2.0, 18.0, 20, 3, 2),
    ]
    one = chart_data(PoolSnapshot.objects.filter(instance="web-1:1"), max_points=2)
    assert [(b.in_use, b.size, b.rows, b.instances) for b in one.pools["main"]] == [
        (3.0, 10, 2, 1),
        (0.0, 10, 1, 1),
    ]


def polyline(svg: str, series: str) -> str:
    found = re.search(rf'<polyline data-series="{series}"[^>]* points="([^"]*)"', svg)
    assert found, f"no {series} line"
    return found[1]


def test_admin_chart_shows_the_cluster_or_one_instance(two_instances):
    boss = User.objects.create_superuser("boss", "boss@example.com", "pw-boss-123")
    client = Client()
    client.force_login(boss)
    chart = "/admin/pools/poolsnapshot/chart.svg"
    svg = client.get(chart).content.decode()
    # One bucket per second. The sums 7, 4, 1, 3 on a y axis to 20 (two sizes of 10):
    # y(v) = 12 + 142 - v / 20 * 142, x from 44 (second 0) to 748 (second 3).
    assert 'data-scope="cluster total of 2 instances"' in svg
    assert 'data-y-max="20"' in svg
    assert polyline(svg, "in_use") == "44.0,104.3 278.7,125.6 513.3,146.9 748.0,132.7"
    assert "cluster total of 2 instances: size 20" in svg

    svg = client.get(chart, {"instance": "web-1:1"}).content.decode()
    # web-1 alone: 2, 4, 0 at seconds 0, 1, 3 on an axis to 10.
    assert 'data-scope="instance web-1:1"' in svg
    assert polyline(svg, "in_use") == "44.0,125.6 278.7,97.2 748.0,154.0"

    page = client.get("/admin/pools/poolsnapshot/").content.decode()
    assert 'data-scope="cluster total of 2 instances"' in page


# == found in the engine (pools/engine/registry.py) and fixed ============================
@needs_redis
async def test_the_wait_for_a_cluster_lease_counts_as_waiting():
    prefix = run_prefix()
    raw = {
        "ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"},  # no call is made
        "POOLS": {"main": {"SIZE": 1, "MAX_OVERFLOW": 0, "TIMEOUT": 20}},
        "CLUSTER": {"REDIS_URL": REDIS_URL, "PREFIX": prefix, "LEASE_SECONDS": 30},
    }
    holder, waiter = PoolRegistry(parse_config(raw)), PoolRegistry(parse_config(raw))

    async def second_caller() -> float:
        async with waiter.acquire("main") as handle:
            return handle.wait_ms

    try:
        async with holder.acquire("main"):
            caller = asyncio.create_task(second_caller())
            await eventually(
                lambda: waiter.stats().pools["main"].cluster_waiting,
                what="the second caller waits for a cluster lease",
            )
            await asyncio.sleep(0.3)  # the second caller waits at least this long
        waited_ms = await caller
        assert waited_ms >= 300
        assert waiter.stats().pools["main"].requests_wait_ms >= 300
    finally:
        await holder.close()
        await waiter.close()
        forget_keys(REDIS_URL, prefix)


# == the real cluster ===========================================================================
def instance_of(server: Server) -> str:
    """The server's name in the cluster, as its /health reports it."""
    return httpx.get(f"{server.base}/health", timeout=5).json()["cluster"]["instance"]


@dataclass
class Cluster:
    env: dict[str, str]
    database_url: str
    simulator: str  # the simulator's root URL (control endpoints under /_simulator/)
    servers: dict[str, Server]
    folder: Path

    def start(self, name: str) -> Server:
        server = start(self.env, self.folder / f"serve-{name}.log", name=name)
        self.servers[name] = server
        return server

    def simulator_stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.simulator}/_simulator/stats", timeout=5).json()

    def simulator_set(self, **settings: float) -> None:
        response = httpx.post(f"{self.simulator}/_simulator/faults", json=settings, timeout=5)
        response.raise_for_status()

    def simulator_reset(self) -> None:
        httpx.post(f"{self.simulator}/_simulator/reset", timeout=5).raise_for_status()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The simulator, a fresh PostgreSQL database with one user, instances A and B."""
    if SERVICES_PROBLEM:
        pytest.skip(SERVICES_PROBLEM)
    folder = tmp_path_factory.mktemp("cluster")
    with contextlib.ExitStack() as cleanup:
        database_url = cleanup.enter_context(throwaway_database())
        cleanup.callback(forget_keys, REDIS_URL, PREFIX)
        yield from run_cluster(database_url, folder)


def run_cluster(database_url: str, folder: Path) -> Iterator[Cluster]:
    """The simulator and instances A and B on `database_url`; stopped when the caller ends."""
    forget_keys(REDIS_URL, PREFIX)
    simulator = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "llm_simulator",
            "--port",
            "0",
            "--ttft-ms",
            "50",
            "--responder",
            "agents.simulated.carlos_responder",
        ],
        cwd=ROOT,
        env={**os.environ, "DJANGO_DEBUG": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    servers: dict[str, Server] = {}
    try:
        assert simulator.stdout is not None
        line = simulator.stdout.readline()
        found = re.search(r"listening on (http://\S+)/v1", line)
        assert found, f"the simulator said {line!r}"
        env = child_env(
            database_url,
            REDIS_URL=REDIS_URL,
            REDIS_PREFIX=PREFIX,
            POOL_LEASE_SECONDS=str(LEASE_SECONDS),
            DESIGN_LEASE_SECONDS=str(LEASE_SECONDS),
            DESIGN_SWEEP_SECONDS="0.5",
            POOL_SNAPSHOT_INTERVAL="0",
            # An OpenAI-compatible endpoint shared by the instances (the simulator): each serve
            # starts no simulator of its own and makes no demo account.
            LLM_BASE_URL=f"{found[1]}/v1",
            LLM_API_KEY="any",
            DESIGNS_PER_HOUR="1000",
        )
        for pool, size in CAPACITY.items():
            env[f"POOL_{pool.upper()}_SIZE"] = str(size)
            env[f"POOL_{pool.upper()}_MAX_OVERFLOW"] = "0"
            env[f"POOL_{pool.upper()}_TIMEOUT"] = "60"  # callers wait for capacity, never fail
        migrate_with_one_user(env, USERNAME, PASSWORD)
        state = Cluster(env, env["DATABASE_URL"], found[1], servers, folder)
        first, second = state.start("A"), state.start("B")
        wait_healthy(first, second, limit=START_LIMIT_S)
        yield state
    finally:
        stop(*(server.process for server in servers.values()), simulator)


# -- a user's browser, in code ------------------------------------------------------------------
@contextlib.asynccontextmanager
async def browser(server: Server, cookies: httpx.Cookies | None = None) -> AsyncIterator[Any]:
    """An HTTP client logged in through the real login form (or with another's cookies)."""
    async with httpx.AsyncClient(base_url=server.base, timeout=30, cookies=cookies) as client:
        if cookies is None:
            await log_in(client, USERNAME, PASSWORD)
        yield client


async def submit(client: httpx.AsyncClient, text: str) -> int:
    """POST the request form (with its CSRF token); the new design's id from the redirect."""
    response = await client.post(
        "/",
        data={
            "request_text": text,
            **DEFAULT_OPTIONS,
            "csrfmiddlewaretoken": client.cookies["csrftoken"],
        },
    )
    assert response.status_code == 302, response.text[:500]
    found = re.fullmatch(r"/designs/(\d+)/", response.headers["location"])
    assert found, response.headers["location"]
    return int(found[1])


async def design_statuses(cluster: Cluster, ids: list[int]) -> dict[int, str]:
    async with await psycopg.AsyncConnection.connect(cluster.database_url) as conn:
        cursor = await conn.execute(
            "SELECT id, status FROM agents_design WHERE id = ANY(%s)", (ids,)
        )
        return dict(await cursor.fetchall())


async def wait_statuses(cluster: Cluster, ids: list[int], wanted: set[str]) -> dict[int, str]:
    """Poll the database until every design is in one of `wanted` (fail-safe limit only)."""
    latest: dict[int, str] = {}

    async def arrived() -> dict[int, str] | None:
        latest.clear()
        latest.update(await design_statuses(cluster, ids))
        done = len(latest) == len(ids) and set(latest.values()) <= wanted
        return dict(latest) if done else None

    return await eventually(
        arrived, DESIGN_LIMIT_S, what=f"designs reach {wanted}", state=lambda: latest, interval=0.1
    )


TERMINAL = {"succeeded", "failed", "interrupted"}


async def health(server: Server, scope: str = "instance") -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"{server.base}/health", params={"scope": scope})).json()


# -- (a) one capacity for the whole cluster ------------------------------------------------------
@needs_services
async def test_designs_on_both_instances_never_exceed_the_cluster_capacity(cluster: Cluster):
    first, second = cluster.servers["A"], cluster.servers["B"]
    cluster.simulator_reset()
    # A slower first token keeps calls open long enough to overlap: uncoordinated, the two
    # instances would run up to 16 at once (12 seen), coordinated they reach the 8.
    cluster.simulator_set(ttft_ms=250)
    try:
        async with browser(first) as on_a, browser(second, on_a.cookies) as on_b:
            ids = await asyncio.gather(
                *(
                    submit(on_a if index % 2 else on_b, f"Design {index}: a shop for {index}k")
                    for index in range(12)
                )
            )
        statuses = await wait_statuses(cluster, ids, TERMINAL)
    finally:
        cluster.simulator_set(ttft_ms=50)
    assert set(statuses.values()) == {"succeeded"}, statuses

    stats = cluster.simulator_stats()
    print(f"\n(a) {stats['chat_requests']} LLM calls, peak in flight {stats['peak_in_flight']}")
    assert stats["chat_requests"] >= 100
    # Each instance alone may run 8 calls at once (3 main + 2 ronei + 3 mini); together, too.
    assert stats["peak_in_flight"] <= sum(CAPACITY.values())
    for server in (first, second):
        body = await health(server)
        assert sum(pool["requests_num"] for pool in body["pools"].values()) > 0, server.name
        assert body["cluster"]["mode"] == "cluster" and body["cluster"]["leases_granted"] > 0
    # The load exceeded the capacity (callers had to wait), so the bound was really tested.
    async with await psycopg.AsyncConnection.connect(cluster.database_url) as conn:
        cursor = await conn.execute(
            "SELECT max(wait_ms), count(*) FROM agents_agentrun WHERE design_id = ANY(%s)", (ids,)
        )
        longest_wait, runs = await cursor.fetchone()
    print(f"(a) {runs} agent runs; longest wait for a slot {longest_wait:.0f} ms")
    assert longest_wait > 0


# -- operators: pool_status --cluster --------------------------------------------------------------
@needs_services
def test_pool_status_cluster_shows_every_instance_and_the_totals(cluster: Cluster):
    first, second = cluster.servers["A"], cluster.servers["B"]
    name_a, name_b = instance_of(first), instance_of(second)
    names = {name_a, name_b}
    out = StringIO()
    call_command("pool_status", url=second.base, cluster=True, json=True, stdout=out)
    report = json.loads(out.getvalue())
    assert report["status"] == "healthy" and report["answered_by"] == name_b
    assert set(report["instances"]) == names
    for pool, size in CAPACITY.items():
        total = report["totals"][pool]
        assert total["instances"] == 2 and total["total"] == 2 * size
        assert total["requests_num"] == sum(
            report["instances"][name]["pools"][pool]["requests_num"] for name in names
        )
        assert total["leases_held"] == 0  # idle now

    out = StringIO()
    call_command("pool_status", url=first.base, cluster=True, pool=["main"], stdout=out)
    text = out.getvalue()
    assert text.startswith(f"Carlos cluster via {first.base} ({name_a}: healthy): 2 live")
    assert f"Instance {name_a} (answered this request)" in text
    assert f"Instance {name_b}, reported" in text
    totals = text.split("Cluster totals")[1].splitlines()
    header = totals[1].split()
    assert header[:3] == ["pool", "model", "instances"]
    main = totals[3].split()
    assert main[:4] == ["main", "gpt-4o", "2", "6"]  # two instances of 3 slots
    assert "mini" not in text


@contextlib.asynccontextmanager
async def holding(cluster: Cluster, pool: str) -> AsyncIterator[None]:
    """Every lease of `pool`, taken by a registry in this process (a third member of the
    cluster), so the instances' calls on that pool wait until the block ends."""
    registry = PoolRegistry(
        parse_config(
            {
                "ENDPOINT": {"BASE_URL": f"{cluster.simulator}/v1", "API_KEY": "any"},
                "POOLS": {
                    pool: {
                        "MODEL": "gpt-4o-mini" if pool == "mini" else "gpt-4o",
                        "SIZE": CAPACITY[pool],
                        "MAX_OVERFLOW": 0,
                        "TIMEOUT": 60,
                    }
                },
                "CLUSTER": {
                    "REDIS_URL": REDIS_URL,
                    "PREFIX": PREFIX,
                    "LEASE_SECONDS": LEASE_SECONDS,
                },
            }
        )
    )
    try:
        async with contextlib.AsyncExitStack() as leases:
            for _ in range(CAPACITY[pool]):
                await leases.enter_async_context(registry.acquire(pool))
            yield
    finally:
        await registry.close()


# -- (c) a design on A watched live from B ---------------------------------------------------------
# A WebSocket client in a few lines of RFC 6455, as the project's dependencies bring none for
# asyncio that can share a process with Daphne's Twisted (autobahn's txaio allows one framework).
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def watch(
    server: Server, design_id: int, cookies: httpx.Cookies, opened: asyncio.Event
) -> list[dict[str, Any]]:
    """Every event of the design's WebSocket on `server` until its terminal status; `opened`
    is set once the first (the snapshot) has arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    cookie = "; ".join(f"{name}={value}" for name, value in cookies.items())
    writer.write(
        (
            f"GET /ws/designs/{design_id}/ HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\nOrigin: {server.base}\r\nCookie: {cookie}\r\n\r\n"
        ).encode()
    )
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    assert head.startswith("HTTP/1.1 101") and accept in head, head

    def frame(opcode: int, payload: bytes) -> bytes:
        """A client frame (clients must mask; payloads here stay under 126 bytes)."""
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked

    events: list[dict[str, Any]] = []
    message = b""
    try:
        while True:
            first, second = await asyncio.wait_for(reader.readexactly(2), DESIGN_LIMIT_S)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(length)  # a server's frames are not masked
            opcode = first & 0x0F
            if opcode == 0x9:  # ping
                writer.write(frame(0xA, payload))
                continue
            if opcode == 0x8:  # close
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                events.append({"kind": "closed", "code": code})
                return events
            message += payload
            if not first & 0x80:  # more fragments follow
                continue
            event = json.loads(message)
            message = b""
            events.append(event)
            opened.set()
            if event["kind"] == "design_status" and event["status"] in TERMINAL:
                writer.write(frame(0x8, struct.pack("!H", 1000)))
                return events
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@needs_services
async def test_a_design_on_one_instance_streams_live_to_the_other(cluster: Cluster):
    first, second = cluster.servers["A"], cluster.servers["B"]
    opened = asyncio.Event()
    async with browser(first) as on_a:
        # The design waits for its first call's lease until the socket on B is open, so
        # everything after its first agent_started happens while B watches.
        async with holding(cluster, "mini"):
            design_id = await submit(on_a, "A ticket shop watched from the other instance")
            feed = asyncio.create_task(watch(second, design_id, on_a.cookies, opened))
            await asyncio.wait_for(opened.wait(), DESIGN_LIMIT_S)
        events = await feed
    kinds = [event["kind"] for event in events]
    print(f"\n(c) on B for a design on A: {len(events)} events, {kinds.count('tokens')} tokens")
    assert kinds[0] == "snapshot"
    assert events[-1]["kind"] == "design_status" and events[-1]["status"] == "succeeded"
    started = {event["agent"] for event in events if event["kind"] == "agent_started"}
    streamed = {event["agent"] for event in events if event["kind"] == "tokens"}
    everyone = set(AGENTS)
    assert started | {"requirements"} == everyone  # requirements may be in the snapshot
    assert streamed == everyone
    text = "".join(e["text"] for e in events if e["kind"] == "tokens" and e["agent"] == "terraform")
    assert "resource" in text  # Terraform, streamed token by token from A's pipeline
    assert (await design_statuses(cluster, [design_id]))[design_id] == "succeeded"


# -- (b) kill -9 an instance holding leases -------------------------------------------------------
def held_leases(instance: str) -> dict[str, list[float]]:
    """Per pool, the expiry times (Redis ms) of the unexpired leases `instance` holds."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    held = {
        pool: [
            score
            for member, score in client.zrange(
                f"{PREFIX}:pool:{pool}:leases", 0, -1, withscores=True
            )
            if member.startswith(f"{instance}:") and score > now
        ]
        for pool in CAPACITY
    }
    client.close()
    return held


def redis_ms() -> int:
    client = redis.Redis.from_url(REDIS_URL)
    seconds, micros = client.time()
    client.close()
    return seconds * 1000 + micros // 1000


@needs_services
async def test_a_killed_instance_gives_its_capacity_back(cluster: Cluster):
    first, second = cluster.servers["A"], cluster.servers["B"]
    dead = (await health(first))["cluster"]["instance"]
    survivor = (await health(second))["cluster"]["instance"]

    # A runs four designs with slow calls; their requirements step takes every mini lease.
    cluster.simulator_set(ttft_ms=3000)
    async with browser(first) as on_a:
        orphans = [await submit(on_a, f"Orphan {index}") for index in range(4)]
    # All four have started (a design starts on A's LLM loop just after its submit answers).
    await wait_statuses(cluster, orphans, {"running"})
    await eventually(
        lambda: len(held_leases(dead)["mini"]) == CAPACITY["mini"],
        DESIGN_LIMIT_S,
        what="A holds the mini pool's capacity",
        interval=0.05,
    )

    first.process.send_signal(signal.SIGKILL)  # no release, no goodbye
    first.process.wait()
    killed_at = redis_ms()
    left = held_leases(dead)
    assert len(left["mini"]) == CAPACITY["mini"]  # still held by the dead
    # Leases are renewed to "now + lease time" and nobody renews them any more.
    last_expiry = max(max(scores) for scores in left.values() if scores)
    assert last_expiry <= killed_at + LEASE_SECONDS * 1000
    cluster.simulator_set(ttft_ms=50)

    # B's designs need mini leases, so they finish only once A's have expired.
    async with browser(second) as on_b:
        ids = [await submit(on_b, f"Survivor {index}") for index in range(3)]
        expired_at = await eventually(
            lambda: not any(held_leases(dead).values()) and redis_ms(),
            DESIGN_LIMIT_S,
            what="the dead instance's leases expire",
            interval=0.02,
        )
        statuses = await wait_statuses(cluster, ids, TERMINAL)
        assert set(statuses.values()) == {"succeeded"}, statuses
        print(
            f"\n(b) kill -9 of A holding {sum(map(len, left.values()))} leases; their expiry "
            f"{(last_expiry - killed_at) / 1000:.2f} s after the kill by their scores, seen "
            f"gone after {(expired_at - killed_at) / 1000:.2f} s (lease time "
            f"{LEASE_SECONDS:g} s); B then finished {len(ids)} designs"
        )
        async with await psycopg.AsyncConnection.connect(cluster.database_url) as conn:
            cursor = await conn.execute(
                "SELECT max(finished_at - started_at) FROM agents_agentrun "
                "WHERE design_id = ANY(%s) AND agent = 'requirements'",
                (ids,),
            )
            (longest,) = await cursor.fetchone()
        print(f"(b) B's longest requirements step (waiting for A's leases): {longest}")

        # The dead instance's heartbeat expires too: the survivor then lists only itself.
        async def only_the_survivor_listed() -> bool:
            view = (await health(second, "cluster"))["cluster_view"]
            return set(view["instances"]) == {survivor}

        await eventually(
            only_the_survivor_listed, START_LIMIT_S, what="B lists only itself", interval=0.1
        )
        print(f"(b) B lists only itself {(redis_ms() - killed_at) / 1000:.2f} s after the kill")

        # A's orphans: B's sweeper took them over once their design leases expired and
        # resumed them; each agent A had finished was not asked again (tests/test_crash.py
        # counts that with the simulator's request log).
        statuses = await wait_statuses(cluster, orphans, TERMINAL)
        assert set(statuses.values()) == {"succeeded"}, statuses

        # A restart (instance C) while B runs designs leaves B's designs alone: their leases
        # are alive. B's designs are held at their first step by a holder of every mini
        # lease, so they are certainly running while C starts.
        async with holding(cluster, "mini"):
            busy = [await submit(on_b, f"Busy {index}") for index in range(2)]
            await wait_statuses(cluster, busy, {"running"})
            restarted = await asyncio.to_thread(cluster.start, "C")
            await asyncio.to_thread(wait_healthy, restarted, limit=START_LIMIT_S)
            assert set((await design_statuses(cluster, busy)).values()) == {"running"}
        statuses = await wait_statuses(cluster, busy, TERMINAL)  # the holder let go
        assert set(statuses.values()) == {"succeeded"}, statuses
