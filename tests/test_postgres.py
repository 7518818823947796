"""PostgreSQL through DATABASE_URL: real work in child processes against a throwaway database.

The suite itself runs on SQLite; these tests prove the PostgreSQL path end to end: the
migrations, a whole design through the pipeline (`manage.py design --fast --json`) with its
rows read back through psycopg, and the SQL that differs per database (the admin chart's
epoch buckets and per-instance sums, `pool_status --history`). Each run creates a uniquely
named database and drops it afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agents.options import AGENT_POOLS, AGENTS
from tests.helpers.services import needs_postgres, throwaway_database

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs_postgres()


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (its URL); dropped after the module."""
    with throwaway_database() as url:
        manage(url, "migrate", "--verbosity", "0")
        yield url


def manage(database_url: str, *args: str) -> str:
    """`manage.py` in a child process on `database_url`; its stdout, or the test fails."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "carlos.settings",
        "DJANGO_DEBUG": "1",
        "DATABASE_URL": database_url,
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("AZURE_OPENAI_ENDPOINT", "LLM_BASE_URL", "LLM_SIMULATOR_URL", "REDIS_URL"):
        env.pop(name, None)  # the in-process simulator, one standalone process
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"manage.py {args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_migrations_and_a_whole_design_on_postgres(database: str):
    with psycopg.connect(database) as conn:
        applied = conn.execute(
            "SELECT app, count(*) FROM django_migrations GROUP BY app ORDER BY app"
        ).fetchall()
    assert {"agents", "pools", "auth"} <= {app for app, _ in applied}

    document = json.loads(
        manage(database, "design", "A booking site for 20 clinics", "--fast", "--json")
    )
    design_id = document["design"]["id"]
    assert document["design"]["status"] == "succeeded"

    with psycopg.connect(database) as conn:
        status, verdict, recommendation, attempts, owner = conn.execute(
            "SELECT d.status, d.verdict, d.recommendation, d.attempts, u.username "
            "FROM agents_design d JOIN auth_user u ON u.id = d.owner_id WHERE d.id = %s",
            (design_id,),
        ).fetchone()
        runs = conn.execute(
            "SELECT agent, pool, status, tokens_out, output_json IS NOT NULL, "
            "pg_typeof(output_json)::text FROM agents_agentrun WHERE design_id = %s ORDER BY id",
            (design_id,),
        ).fetchall()
    assert (status, attempts, owner) == ("succeeded", 1, "cli")
    assert verdict == document["design"]["verdict"] and verdict
    assert recommendation == document["design"]["recommendation"] and recommendation
    assert len(runs) == len(document["runs"]) >= len(AGENTS)
    assert {run[0] for run in runs} == set(AGENTS)
    for agent, pool, run_status, tokens_out, has_json, json_type in runs:
        assert run_status == "succeeded" and tokens_out > 0, agent
        assert pool == AGENT_POOLS[agent]
        assert json_type == "jsonb"
        if agent in {"security", "cost", "reliability"}:
            assert has_json, f"{agent}'s report was not stored as JSON"


# Two instances' snapshots (web-1: 2, 4, 0 and web-2: 5, 1, 3 at seconds 0..3), the admin
# chart's aggregation and `pool_status --history` over them, all run on PostgreSQL.
CHART = """
import json
from datetime import UTC, datetime, timedelta
from io import StringIO
from django.core.management import call_command
from django.db import connection
from pools.admin import chart_data
from pools.models import PoolSnapshot

t0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
rows = [("web-1:1", 0, 2), ("web-2:2", 0, 5), ("web-1:1", 1, 4), ("web-2:2", 2, 1),
        ("web-1:1", 3, 0), ("web-2:2", 3, 3)]
PoolSnapshot.objects.bulk_create([
    PoolSnapshot(taken_at=t0 + timedelta(seconds=s), instance=i, pool="main", size=10,
                 in_use=n, available=10 - n, overflow_in_use=0, waiting=0, requests=n)
    for i, s, n in rows
])

def points(queryset, max_points):
    data = chart_data(queryset, max_points=max_points)
    return {
        "bucket_seconds": data.bucket_seconds,
        "instances": list(data.instances),
        "main": [[b.at.isoformat(), b.in_use, b.size, b.rows, b.instances]
                 for b in data.pools["main"]],
    }

history = StringIO()
call_command("pool_status", history="100000d", json=True, stdout=history)
print(json.dumps({
    "vendor": connection.vendor,
    "cluster": points(PoolSnapshot.objects.all(), 2),
    "per_second": points(PoolSnapshot.objects.all(), 200),
    "web_1": points(PoolSnapshot.objects.filter(instance="web-1:1"), 2),
    "history": json.loads(history.getvalue())["pools"],
}))
"""


def test_chart_and_history_aggregate_on_postgres(database: str):
    output = manage(database, "shell", "--no-imports", "-c", CHART)
    result = json.loads(output.strip().splitlines()[-1])
    assert result["vendor"] == "postgresql"
    cluster = result["cluster"]
    assert cluster["bucket_seconds"] == 2
    assert cluster["instances"] == ["web-1:1", "web-2:2"]
    # Seconds 0-1: web-1's average 3 plus web-2's 5; seconds 2-3: 0 + 2.
    assert cluster["main"] == [
        ["2026-01-01T12:00:00+00:00", 8.0, 20, 3, 2],
        ["2026-01-01T12:00:02+00:00", 2.0, 20, 3, 2],
    ]
    assert [point[1] for point in result["per_second"]["main"]] == [7.0, 4.0, 1.0, 3.0]
    assert result["web_1"]["main"] == [
        ["2026-01-01T12:00:00+00:00", 3.0, 10, 2, 1],
        ["2026-01-01T12:00:02+00:00", 0.0, 10, 1, 1],
    ]
    (main,) = result["history"]
    assert (main["pool"], main["rows"], main["instances"]) == ("main", 6, 2)
    assert (main["max_in_use"], main["requests"]) == (5, 15)
