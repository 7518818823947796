"""The operator's commands: pool_status, warm_pools, snapshot_pools, prune_pool_snapshots.

Live numbers come from a real `manage.py serve` child process (its own database and
simulator); the endpoint failures come from the offline simulator configured to refuse.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from dataclasses import replace
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.test import override_settings
from django.utils import timezone

from pools.models import PoolSnapshot
from tests.helpers.snapshots import snap
from tests.servers import child_env, free_port, manage, serving

HELLO = [{"role": "user", "content": "hello"}]
COMMANDS = ("pool_status", "warm_pools", "snapshot_pools", "prune_pool_snapshots")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`manage.py serve` with the sampler every 0.5 s, shared by this module's tests."""
    folder = tmp_path_factory.mktemp("served")
    database = folder / "db.sqlite3"
    env = child_env(f"sqlite:///{database}", POOL_SNAPSHOT_INTERVAL="0.5", POOL_SNAPSHOT_JITTER="0")
    with serving(env, folder / "serve.log", "--migrate") as served:
        yield {
            "base": served.base,
            "process": served.process,
            "log": served.log,
            "env": env,
            "database": database,
        }


# -- help ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_explains_itself(name):
    parser = load_command_class("pools", name).create_parser("manage.py", name)
    text = parser.format_help()
    assert len(parser.description) > 120  # a paragraph an operator can act on
    for option in parser._actions:
        if option.option_strings and option.dest not in {"help", "version"}:
            assert option.help, f"{name} {option.option_strings} has no help"
    assert "usage: manage.py " + name in text


# -- pool_status -----------------------------------------------------------------------------------
def test_pool_status_shows_the_live_pools(server):
    out = StringIO()
    call_command("pool_status", url=server["base"], stdout=out)
    text = out.getvalue()
    assert f"Carlos at {server['base']}: healthy; LLM endpoint simulator" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines()[1:]}
    assert lines["pool"][:4] == ["pool", "model", "size", "in"]
    # pool, model, size, in use, free, overflow, waiting ... conns open (last)
    assert lines["main"][1:7] == ["gpt-4o", "10", "0", "10", "0", "0"]
    assert lines["ronei"][2] == "5" and lines["ronei"][-1] == "5"
    assert lines["mini"][1:3] == ["gpt-4o-mini", "10"]


def test_pool_status_json_and_pool_filter(server):
    out = StringIO()
    call_command("pool_status", url=server["base"], json=True, stdout=out)
    body = json.loads(out.getvalue())
    assert body["status"] == "healthy" and body["url"] == server["base"]
    assert body["pools"]["ronei"]["total"] == 5
    out = StringIO()
    call_command("pool_status", url=server["base"], pool=["mini"], stdout=out)
    names = [line.split()[0] for line in out.getvalue().splitlines()[3:]]
    assert names == ["mini"]


def test_pool_status_says_when_no_server_answers():
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CommandError, match=r"cannot reach .* is the server running") as error:
        call_command("pool_status", url=closed, stdout=StringIO())
    assert error.value.returncode == 1


def _rows_in(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT COUNT(*) FROM pools_poolsnapshot").fetchone()[0]


def test_the_server_samples_and_pool_status_reads_the_history(server):
    deadline = time.monotonic() + 30
    while _rows_in(server["database"]) < 6:  # two intervals of three pools
        assert time.monotonic() < deadline, server["log"].read_text()
        time.sleep(0.2)
    result = manage(server["env"], "pool_status", "--history", "1h", check=False)
    assert result.returncode == 0, result.stderr
    assert "Pool history since" in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[3:]}
    assert set(rows) == {"main", "ronei", "mini"}
    assert int(rows["main"][1]) >= 2  # rows
    assert rows["main"][2] == "1"  # one server process
    result = manage(
        server["env"], "pool_status", "--history", "1h", "--json", "--pool", "ronei", check=False
    )
    summary = json.loads(result.stdout)
    assert [pool["pool"] for pool in summary["pools"]] == ["ronei"]
    assert summary["pools"][0]["max_in_use"] == 0
    assert summary["pools"][0]["requests"] == 0


@pytest.mark.django_db
def test_pool_status_history_from_snapshots():
    now = timezone.now()
    PoolSnapshot.objects.bulk_create(
        [
            snap(
                "main",
                now - timedelta(minutes=minutes),
                in_use,
                instance=instance,
                waiting=waiting,
                requests=requests,
                errors=errors,
                wait_p95_ms=wait_p95,
                wait_max_ms=wait_p95 * 2,
                tokens_in=100,
                tokens_out=10,
            )
            for minutes, instance, in_use, waiting, requests, errors, wait_p95 in (
                (5, "a:1", 4, 0, 10, 0, 1.0),
                (10, "b:2", 12, 3, 30, 2, 250.0),
                (90, "a:1", 10, 9, 99, 9, 999.0),  # outside the hour
            )
        ]
    )
    out = StringIO()
    call_command("pool_status", history="1h", json=True, stdout=out)
    (main,) = json.loads(out.getvalue())["pools"]
    assert main["rows"] == 2 and main["instances"] == 2
    assert (main["max_in_use"], main["max_overflow_in_use"], main["max_waiting"]) == (12, 2, 3)
    assert (main["requests"], main["errors"], main["tokens_in"]) == (40, 2, 200)
    assert main["avg_in_use"] == pytest.approx(8.0)
    assert (main["worst_wait_p95_ms"], main["max_wait_ms"]) == (250.0, 500.0)
    out = StringIO()
    call_command("pool_status", history="1m", stdout=out)
    assert "No snapshots in that window." in out.getvalue()
    with pytest.raises(CommandError, match="--history: '1 hour' is not a duration"):
        call_command("pool_status", history="1 hour", stdout=StringIO())


# -- snapshot_pools ----------------------------------------------------------------------------
@pytest.mark.django_db
def test_snapshot_pools_saves_rows_from_a_running_server(server):
    out = StringIO()
    call_command("snapshot_pools", url=server["base"], stdout=out)
    assert f"Saved 3 pool snapshot(s) from {server['base']} (healthy)" in out.getvalue()
    call_command("snapshot_pools", url=server["base"] + "/", stdout=StringIO())
    rows = list(PoolSnapshot.objects.filter(pool="main").order_by("taken_at"))
    assert len(rows) == 2 and {row.instance for row in rows} == {server["base"]}
    first, second = rows
    assert (second.size, second.in_use, second.available) == (10, 0, 10)
    assert first.interval_s is None and second.interval_s > 0
    assert second.counters["connections_num"] == 10
    assert second.requests == 0 and second.tokens_in is None and second.wait_p50_ms is None


@pytest.mark.django_db
def test_snapshot_pools_without_a_server_saves_nothing():
    with pytest.raises(CommandError, match="Nothing was saved") as error:
        call_command("snapshot_pools", url=f"http://127.0.0.1:{free_port()}", stdout=StringIO())
    assert error.value.returncode == 1
    assert PoolSnapshot.objects.count() == 0


async def test_cron_snapshot_counts_the_increase_since_the_previous_row(installed_registry):
    from pools.management.commands.snapshot_pools import snapshot_from_health

    registry = installed_registry
    await registry.initialize()
    for _ in range(2):
        async with registry.get_main_llm() as llm:
            await llm.ainvoke(HELLO)
    start = timezone.now()
    first = snapshot_from_health("cron", start, "main", registry.stats().pools["main"], None)
    assert first.requests == 2 and first.interval_s is None  # since the server started
    for _ in range(3):
        async with registry.get_main_llm() as llm:
            await llm.ainvoke(HELLO)
    later = start + timedelta(seconds=60)
    stats = registry.stats().pools["main"]
    second = snapshot_from_health("cron", later, "main", stats, first)
    assert (second.requests, second.errors, second.interval_s) == (3, 0, 60.0)
    # A restarted server's counters start again from zero: its whole count is the interval.
    restarted = snapshot_from_health("cron", later, "main", replace(stats, requests_num=1), second)
    assert restarted.requests == 1


# -- prune_pool_snapshots --------------------------------------------------------------------------
@pytest.fixture
def aged_snapshots(db):
    now = timezone.now()
    PoolSnapshot.objects.bulk_create(
        [
            snap("main", now - age, 0, size=1, instance="h:1")
            for age in (
                timedelta(minutes=30),
                timedelta(hours=13),
                timedelta(days=2),
                timedelta(days=40),
            )
        ]
    )


def test_prune_deletes_rows_older_than_the_age(aged_snapshots):
    out = StringIO()
    call_command("prune_pool_snapshots", older_than="12h", dry_run=True, stdout=out)
    assert "Would delete 3 pool snapshots" in out.getvalue()
    assert PoolSnapshot.objects.count() == 4
    out = StringIO()
    call_command("prune_pool_snapshots", older_than="12h", stdout=out)
    assert "Deleted 3 pool snapshots taken before" in out.getvalue()
    assert "(older than 12h); 1 kept." in out.getvalue()
    assert PoolSnapshot.objects.count() == 1


def test_prune_defaults_to_the_retention_setting(aged_snapshots):
    call_command("prune_pool_snapshots", stdout=StringIO())  # 30d by default
    assert PoolSnapshot.objects.count() == 3
    with override_settings(POOL_SNAPSHOT_RETENTION="90m"):
        call_command("prune_pool_snapshots", stdout=StringIO())
    assert PoolSnapshot.objects.count() == 1


def test_prune_rejects_a_bad_age_clearly(aged_snapshots):
    with pytest.raises(CommandError, match=r"--older-than: '30 days' is not a duration"):
        call_command("prune_pool_snapshots", older_than="30 days", stdout=StringIO())
    with (
        override_settings(POOL_SNAPSHOT_RETENTION="forever"),
        pytest.raises(CommandError, match="POOL_SNAPSHOT_RETENTION: 'forever'"),
    ):
        call_command("prune_pool_snapshots", stdout=StringIO())
    assert PoolSnapshot.objects.count() == 4


# -- warm_pools -------------------------------------------------------------------------------
def pools_setting(url: str, **endpoint: str) -> dict:
    return {
        "ENDPOINT": {"SIMULATOR_URL": url, **endpoint},
        "POOLS": {
            "main": {"MODEL": "gpt-4o", "TEMPERATURE": 0.7, "SIZE": 2},
            "mini": {"MODEL": "gpt-4o-mini", "TEMPERATURE": 0.7, "SIZE": 1},
        },
    }


async def warm(url: str, *args: str, **endpoint: str) -> tuple[str, CommandError | None]:
    """Run warm_pools in a thread (it runs its own event loop) against `url`."""
    out = StringIO()
    with override_settings(CARLOS_POOLS=pools_setting(url, **endpoint)):
        try:
            await asyncio.to_thread(call_command, "warm_pools", *args, stdout=out)
        except CommandError as error:
            return out.getvalue(), error
    return out.getvalue(), None


async def test_warm_pools_reports_connect_and_first_call(simulator):
    text, error = await warm(simulator.base_url)
    assert error is None, text
    assert f"Warming 2 pool(s) at simulator {simulator.base_url.removesuffix('/v1')}" in text
    assert "✅ main     gpt-4o           connections 2/2, connect " in text
    assert "✅ mini     gpt-4o-mini      connections 1/1, connect " in text
    assert "✅ All 2 pool(s) are warm." in text
    assert simulator.stats.connections_accepted == 3  # every slot's connection, then reused
    assert simulator.stats.chat_requests == 2

    text, error = await warm(simulator.base_url, "--json", "--pool", "mini")
    assert error is None
    (mini,) = json.loads(text)["pools"]
    assert mini["ok"] and mini["connections_opened"] == 1
    assert mini["connect_ms"] > 0 and mini["first_call_ms"] > 0


async def test_warm_pools_diagnoses_a_refused_key(simulator_factory):
    simulator = await simulator_factory(api_key="right")  # the config sends another key
    text, error = await warm(simulator.base_url)
    assert error is not None and error.returncode == 1
    assert str(error) == "2 of 2 pool(s) failed to warm: main, mini"
    assert "problem: HTTP 401: the endpoint refused the API key" in text
    assert "advice:  check the simulator's --api-key" in text


async def test_warm_pools_diagnoses_an_unknown_deployment(simulator_factory):
    simulator = await simulator_factory(deployments=("gpt-4o-mini",))
    text, error = await warm(simulator.base_url)
    assert error is not None and str(error) == "1 of 2 pool(s) failed to warm: main"
    assert "problem: HTTP 404: unknown model 'gpt-4o'" in text
    assert "✅ mini" in text


async def test_warm_pools_names_a_base_url_without_its_api_path(simulator):
    """Reproduces: LLM_BASE_URL without /v1 was diagnosed as "unknown model 'gpt-4o'"."""
    text, error = await warm(simulator.root_url, "--pool", "main")
    assert error is not None
    assert "has no API path" in text and "unknown model" not in text
    assert f"{simulator.root_url}/v1" in text


async def test_warm_pools_diagnoses_an_untrusted_certificate(simulator_factory):
    simulator = await simulator_factory(tls=True)  # self-signed, and no CA bundle configured
    text, error = await warm(simulator.base_url, "--pool", "main")
    assert error is not None
    assert "problem: TLS certificate not trusted" in text
    assert "LLM_CA_BUNDLE" in text


async def test_warm_pools_trusts_a_configured_ca_bundle(simulator_factory, tmp_path):
    simulator = await simulator_factory(tls=True)
    simulator.write_ca_pem(tmp_path / "ca.pem")
    text, error = await warm(simulator.base_url, CA_BUNDLE=str(tmp_path / "ca.pem"))
    assert error is None, text


async def test_warm_pools_diagnoses_a_closed_port():
    closed = f"http://127.0.0.1:{free_port()}/v1"
    text, error = await warm(closed)
    assert error is not None and error.returncode == 1
    assert "❌ main     gpt-4o           connections 0/2, connect" in text
    assert "problem: connection refused by http://127.0.0.1:" in text
    assert "no simulator is running there: start `manage.py llm_simulator`" in text


def test_warm_pools_exits_non_zero_when_nothing_listens(tmp_path):
    result = manage(child_env(f"sqlite:///{tmp_path / 'db'}"), "warm_pools", check=False)
    assert result.returncode == 1
    assert "connection refused" in result.stdout
    assert "3 of 3 pool(s) failed to warm: main, ronei, mini" in result.stderr


# -- the server's sampler at shutdown (last: it stops the module's server) -----------------------
def test_the_server_stops_its_sampler_before_closing_the_pools(server):
    process, log = server["process"], server["log"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    text = log.read_text()
    assert "📈 Pool snapshots every 0.5s" in text
    assert "LLM connection pools closed" in text
    assert "Could not save pool snapshots" not in text
    assert "Task was destroyed but it is pending" not in text


def test_warm_pools_never_contradicts_itself(tmp_path):
    """Reproduces (issue 15): with nothing listening, warm_pools printed the engine's "Warm-up
    could not reach ... probed again in the background", then "✅ Connection pool ready: 0
    main", and a connect time for connections that never opened."""
    result = manage(child_env(f"sqlite:///{tmp_path / 'db'}"), "warm_pools", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "ready" not in output and "✅" not in output, output
    assert "probed again in the background" not in output  # the command does not stay
    assert output.count("problem: connection refused") == 3, output  # once per pool
    for pool, size in {"main": 10, "ronei": 5, "mini": 10}.items():
        assert f" {pool:<8}" in output and f"connections 0/{size}, connect -, " in output
