"""`kill -9` of a server in the middle of ten designs: the other server takes them over and
finishes them, and no agent that had finished is called again (issue #12).

Real processes only: the offline simulator (`manage.py llm_simulator`, keeping a log of the
requests it received) and two `manage.py serve` sharing one database: a SQLite file (no
Redis), and PostgreSQL with Redis. Server A gets all ten designs; once each has finished
agents behind it and others in flight, A is killed with SIGKILL (no drain, no goodbye).
Server B's sweeper takes every design over once A's leases have expired and resumes it from
its last finished agent. The simulator's log shows, per design and agent, every call made:
none arrives after that agent's answer was saved.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest
from django.conf import settings

from agents.options import AGENTS, DEFAULT_OPTIONS
from agents.simulated import agent_of
from pools.simulator.process import SimulatorProcess, start_simulator
from tests.helpers.services import forget_keys, run_prefix, throwaway_database
from tests.servers import (
    Server,
    child_env,
    log_in,
    migrate_with_one_user,
    start,
    stop,
    wait_healthy,
)
from tests.test_multi_instance import REDIS_URL, SERVICES_PROBLEM, submit

DESIGNS = 10
LEASE_SECONDS = 3.0
SWEEP_SECONDS = 0.5
USERNAME, PASSWORD = "crash-user", f"pw-{uuid.uuid4().hex}"
LIMIT_S = 120.0  # a fail-safe limit, not a timing assertion: a broken build must not hang


@dataclass
class Database:
    """One database both servers use, read here with its own driver."""

    url: str
    extra_env: dict[str, str]

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        if self.url.startswith("sqlite:///"):
            with sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=30) as conn:
                return conn.execute(query).fetchall()
        with psycopg.connect(self.url) as conn:
            return conn.execute(query).fetchall()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            "postgres",
            id="postgres-redis",
            marks=pytest.mark.skipif(SERVICES_PROBLEM is not None, reason=SERVICES_PROBLEM or ""),
        ),
    ]
)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        yield Database(f"sqlite:///{tmp_path / 'crash.sqlite3'}", {})
        return
    prefix = run_prefix("test-crash")  # this run's own keys
    with throwaway_database("carlos_crash") as url:
        try:
            yield Database(url, {"REDIS_URL": REDIS_URL, "REDIS_PREFIX": prefix})
        finally:
            forget_keys(REDIS_URL, prefix)


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    """Paced so that a design takes seconds and agents are in flight when A dies."""
    process = start_simulator(
        [
            "--port=0",
            "--ttft-ms=150",
            "--tokens-per-second=300",
            "--request-log=2000",
            "--responder=agents.simulated.carlos_responder",
        ],
        manage_py=settings.BASE_DIR / "manage.py",
    )
    try:
        yield process
    finally:
        process.stop()


def wait_until(condition, what: str, servers: list[Server]) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n\n".join(f"{s.name}:\n{s.tail()}" for s in servers)
            pytest.fail(f"never: {what}\n{tails}")
        time.sleep(0.05)


def as_epoch(value: Any) -> float:
    """A timestamp column as seconds since the epoch (SQLite gives text, PostgreSQL datetimes)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def test_a_killed_server_s_designs_are_taken_over_and_finish_without_repeating_agents(
    database: Database, simulator: SimulatorProcess, tmp_path: Path
) -> None:
    env = child_env(
        database.url,
        LLM_BASE_URL=simulator.base_url,
        LLM_API_KEY="any",
        DESIGNS_PER_HOUR="1000",
        POOL_SNAPSHOT_INTERVAL="0",
        DESIGN_LEASE_SECONDS=str(LEASE_SECONDS),
        DESIGN_SWEEP_SECONDS=str(SWEEP_SECONDS),
        **database.extra_env,
    )
    migrate_with_one_user(env, USERNAME, PASSWORD)
    first = start(env, tmp_path / "a.log", name="A")
    second = start(env, tmp_path / "b.log", name="B")
    servers = [first, second]
    try:
        wait_healthy(first, second)
        marker = uuid.uuid4().hex[:8]

        async def submit_all() -> list[int]:
            async with httpx.AsyncClient(base_url=first.base, timeout=30) as client:
                await log_in(client, USERNAME, PASSWORD)
                return [
                    await submit(client, f"Crash {marker}-{index}: a booking site for clinics")
                    for index in range(DESIGNS)
                ]

        ids = asyncio.run(submit_all())
        id_list = ",".join(map(str, ids))

        def every_design_in_flight() -> bool:
            # Each has a finished agent behind it and is still running.
            finished = database.rows(
                "SELECT COUNT(DISTINCT design_id) FROM agents_agentrun WHERE status = "
                f"'succeeded' AND design_id IN ({id_list})"
            )[0][0]
            running = database.rows(
                f"SELECT COUNT(*) FROM agents_design WHERE status = 'running' AND id IN ({id_list})"
            )[0][0]
            return finished == running == DESIGNS

        wait_until(every_design_in_flight, "all ten designs running with an agent done", servers)
        owners = database.rows(f"SELECT lease_owner FROM agents_design WHERE id IN ({id_list})")
        assert len(set(owners)) == 1  # all on A
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        killed_at = time.time()
        # A's leases as A left them: nobody renews them any more.
        expired_at = {
            design_id: as_epoch(expires)
            for design_id, expires in database.rows(
                f"SELECT id, lease_expires_at FROM agents_design WHERE id IN ({id_list})"
            )
        }

        def all_finished() -> bool:
            done = database.rows(
                "SELECT COUNT(*) FROM agents_design WHERE status IN ('succeeded', 'failed', "
                f"'cancelled', 'interrupted') AND id IN ({id_list})"
            )[0][0]
            return done == DESIGNS

        wait_until(all_finished, "every design finished after the kill", servers)

        statuses = dict(
            database.rows(f"SELECT id, status FROM agents_design WHERE id IN ({id_list})")
        )
        assert set(statuses.values()) == {"succeeded"}, statuses
        resumed = database.rows(
            f"SELECT COUNT(*) FROM agents_design WHERE attempts >= 2 AND id IN ({id_list})"
        )[0][0]
        assert resumed == DESIGNS

        # Every agent of every design finished exactly once, and no call for an agent arrived
        # at the endpoint after its answer was saved.
        runs = database.rows(
            "SELECT design_id, agent, status, finished_at FROM agents_agentrun "
            f"WHERE design_id IN ({id_list}) ORDER BY id"
        )
        saved_at: dict[tuple[int, str], float] = {}
        succeeded = Counter()
        for design_id, agent, status, finished_at in runs:
            if status == "succeeded":
                succeeded[(design_id, agent)] += 1
                saved_at[(design_id, agent)] = as_epoch(finished_at)
        assert set(succeeded.values()) == {1} and len(succeeded) == DESIGNS * len(AGENTS)
        log = httpx.get(f"{simulator.root_url}/_simulator/requests", timeout=10).json()
        assert log["dropped"] == 0
        by_text = {f"Crash {marker}-{index}": design_id for index, design_id in enumerate(ids)}
        calls: dict[tuple[int, str], list[float]] = defaultdict(list)
        for entry in log["requests"]:
            text = " ".join(str(m.get("content")) for m in entry["messages"] or ())
            found = [design_id for key, design_id in by_text.items() if key + ":" in text]
            if found:
                calls[(found[0], agent_of(SimpleNamespace(messages=entry["messages"])))].append(
                    entry["at"]
                )
        late = {
            key: [at - saved_at[key] for at in arrivals if at > saved_at[key]]
            for key, arrivals in calls.items()
        }
        assert not any(late.values()), late
        repeated = sum(len(arrivals) - 1 for arrivals in calls.values())
        # B took no design over while A's lease on it was alive: B's first run of each design
        # (the resume's, attempt 2) started after that lease had expired.
        resumed_at = {
            design_id: as_epoch(started)
            for design_id, started in database.rows(
                "SELECT design_id, MIN(started_at) FROM agents_agentrun WHERE attempt >= 2 "
                f"AND design_id IN ({id_list}) GROUP BY design_id"
            )
        }
        assert all(resumed_at[pk] >= expired_at[pk] for pk in ids), (resumed_at, expired_at)
        takeover = max(resumed_at.values()) - killed_at
        print(
            f"\nkill -9 of A with {DESIGNS} designs in flight: B resumed the last one "
            f"{takeover:.2f} s after the kill (lease {LEASE_SECONDS:g} s + sweep "
            f"{SWEEP_SECONDS:g} s); {DESIGNS}/{DESIGNS} succeeded; {repeated} call(s) of "
            "agents cut mid-answer made again; 0 finished agents called again"
        )
    finally:
        stop(*(server.process for server in servers))


def test_ctrl_c_drains_hands_designs_back_and_the_next_start_finishes_them(
    tmp_path: Path,
) -> None:
    """Defects: Ctrl-C stopped the offline simulator with the server, so running designs
    ended FAILED (`APIConnectionError`); agents streaming at shutdown were stored with 0
    characters. Now the server drains (the form answers 503 meanwhile), saves what stopped
    agents streamed, hands the designs back QUEUED, and the next start finishes them,
    re-using every agent that had finished."""
    database = Database(f"sqlite:///{tmp_path / 'drain.sqlite3'}", {})
    env = child_env(database.url, DESIGNS_PER_HOUR="1000", DRAIN_SECONDS="1.5")
    migrate_with_one_user(env, USERNAME, PASSWORD)
    slow = "--simulator-args=--ttft-ms 50 --tokens-per-second 40"
    server = start(env, tmp_path / "first.log", slow, name="first")
    servers = [server]
    try:
        wait_healthy(server)

        async def submit_then_interrupt() -> tuple[list[int], httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
                await log_in(client, USERNAME, PASSWORD)
                ids = [
                    await submit(client, f"Drain {index}: a wiki for 50 staff")
                    for index in range(3)
                ]
                while True:  # until each design has an agent writing (a fail-safe loop only)
                    writing = database.rows(
                        "SELECT COUNT(DISTINCT design_id) FROM agents_agentrun "
                        f"WHERE status = 'running' AND design_id IN ({','.join(map(str, ids))})"
                    )[0][0]
                    if writing == len(ids):
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # some text on the way
                os.killpg(server.process.pid, signal.SIGINT)  # a terminal's Ctrl-C
                await asyncio.sleep(0.2)
                health = await client.get("/health")
                assert health.status_code == 503, health.text  # a balancer sends no more
                refused = await client.post(
                    "/",
                    data={
                        "request_text": "One more, during the drain",
                        **DEFAULT_OPTIONS,
                        "csrfmiddlewaretoken": client.cookies["csrftoken"],
                    },
                )
                return ids, refused

        ids, refused = asyncio.run(submit_then_interrupt())
        assert refused.status_code == 503, refused.text[:300]
        assert refused.headers["Retry-After"] == "5"
        assert server.process.wait(timeout=60) == 0, server.tail()
        assert "Drained in" in server.log.read_text()
        id_list = ",".join(map(str, ids))
        designs = database.rows(
            f"SELECT status, lease_owner, error FROM agents_design WHERE id IN ({id_list})"
        )
        assert designs == [("queued", "", "")] * len(ids), designs
        stopped = database.rows(
            "SELECT agent, LENGTH(output_text) FROM agents_agentrun WHERE status = 'stopped' "
            f"AND design_id IN ({id_list})"
        )
        assert stopped and all(length > 0 for _, length in stopped), stopped
        assert not database.rows(
            "SELECT id FROM agents_agentrun WHERE status IN ('running', 'failed') "
            f"AND design_id IN ({id_list})"
        )
        before = set(
            database.rows(
                "SELECT id FROM agents_agentrun WHERE status = 'succeeded' "
                f"AND design_id IN ({id_list})"
            )
        )

        fast = "--simulator-args=--ttft-ms 20 --tokens-per-second 2000"
        server = start(env, tmp_path / "second.log", fast, name="second")
        servers.append(server)
        wait_healthy(server)

        def all_done() -> bool:
            query = "SELECT COUNT(*) FROM agents_design WHERE status = 'succeeded' AND id IN "
            return database.rows(f"{query}({id_list})")[0][0] == len(ids)

        wait_until(all_done, "the handed-back designs finished after the restart", servers)
        per_agent = Counter(
            database.rows(
                "SELECT design_id, agent FROM agents_agentrun WHERE status = 'succeeded' "
                f"AND design_id IN ({id_list})"
            )
        )
        assert set(per_agent.values()) == {1} and len(per_agent) == len(ids) * len(AGENTS)
        after = set(
            database.rows(
                "SELECT id FROM agents_agentrun WHERE status = 'succeeded' "
                f"AND design_id IN ({id_list})"
            )
        )
        assert before <= after  # what had finished before Ctrl-C was re-used, not redone
    finally:
        stop(*(server.process for server in servers))
