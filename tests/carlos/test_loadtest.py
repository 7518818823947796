"""`manage.py loadtest`: a small real run, its report, its refusals and its clean stop; a
small rolling restart of two servers under load.

The runs go through the real command in a child process, which starts its own server,
simulator and database as it does for an operator; only the simulator is made fast.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.core.management import CommandError, call_command

from agents.options import AGENTS
from carlos.loadtest.checks import pool_leaks
from carlos.loadtest.report import failure_cause, format_report, summarize
from carlos.loadtest.rolling import repeated_calls
from carlos.loadtest.users import PAGES, retry_after

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--ttft-ms", "5", "--tokens-per-second", "3000", "--stall-seconds", "1"]


def loadtest_process(
    tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """The command as an operator runs it; TMPDIR shows whether its folder was removed."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # manage.py's own default, as for an operator
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "loadtest", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("carlos-loadtest-"))


def port_refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def test_small_run_reports_every_design_terminal_and_no_leak(tmp_path):
    process = loadtest_process(
        tmp_path, "--designs", "4", "--fault-rate", "0.05", "--timeout", "120", "--json", *FAST
    )
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err

    report = json.loads(out)
    designs = report["designs"]
    assert designs["submitted"] == 4 and designs["terminal"] == 4, designs
    assert designs["succeeded"] + sum(designs["failures_by_cause"].values()) == 4
    assert "not terminal" not in designs["failures_by_cause"]
    assert designs["client_errors"] == [] and designs["logins_failed"] == 0
    assert set(designs["database_statuses"]) <= {"failed", "interrupted", "succeeded"}
    assert designs["socket_events"] >= 4  # at least each design's snapshot
    assert report["leaks"] == {"found": False, "details": []}

    for page in PAGES:
        assert report["latency"][page]["count"] >= 4, page
        assert report["latency"][page]["p50_ms"] > 0, page
    health = report["health"]["whole_run"]
    assert health["count"] > 0 and health["non_200"] == 0
    assert health["p50_ms"] <= health["p99_ms"] <= health["max_ms"]
    # A visitor opens the login page once a second (this run's designs phase may be shorter).
    visits = report["health"]["login_page_during_designs"]
    assert visits["non_200"] == 0, visits

    server = report["server"]
    assert server["peak_sockets"] >= server["sockets_before"] > 0
    assert server["peak_rss_mb"] > 0
    assert report["setup"]["pools"] == {"main": 10, "ronei": 5, "mini": 10}
    assert report["setup"]["fault_rate"] == pytest.approx(0.05)
    assert report["setup"]["simulator_nice"] == 0
    assert report["setup"]["children_exit"] == {"probe": 0, "server": 0, "simulator": 0}
    assert report["upstream"]["simulator"]["chat_requests"] > 0
    assert report["upstream"]["connections_open_after"] <= 25

    targets = report["targets"]
    assert set(targets) == {"every_design_terminal", "zero_leaks", "health_p99_under_100ms"}
    assert targets["every_design_terminal"] == {"measured": "4/4", "met": True}
    assert targets["zero_leaks"] == {"measured": "none", "met": True}
    assert isinstance(targets["health_p99_under_100ms"]["met"], bool)
    assert report["met"] == all(t["met"] for t in targets.values())

    assert "loadtest: server ready at http://127.0.0.1:" in err
    assert leftovers(tmp_path) == []  # the database and logs went with the run


def test_rolling_restart_of_two_servers_loses_no_design_and_repeats_no_finished_agent(tmp_path):
    # Fast enough to stay well under a minute, slow enough that designs are still running
    # when the first server drains; a short drain, as an operator could set it.
    pacing = ["--ttft-ms", "20", "--tokens-per-second", "1000"]
    process = loadtest_process(
        tmp_path,
        *("--designs", "6", "--users", "2", "--rolling-restart", "--timeout", "100", "--json"),
        *pacing,
        env_extra={"DRAIN_SECONDS": "1"},
    )
    out, err = process.communicate(timeout=110)
    assert process.returncode == 0, err

    report = json.loads(out)
    designs = report["designs"]
    outcome = (designs["submitted"], designs["succeeded"], designs["not_terminal"])
    assert outcome == (6, 6, 0), (designs["failures_by_cause"], designs["client_errors"], err)
    assert designs["client_errors"] == [] and designs["logins_failed"] == 0
    assert report["setup"]["fault_rate"] == 0 and report["setup"]["servers"] == 2

    rolling = report["rolling_restart"]
    assert rolling["settings"] == {"DESIGN_SWEEP_SECONDS": "1", "DRAIN_SECONDS": "1"}
    assert [r["server"] for r in rolling["restarts"]] == ["A", "B"]
    for restart in rolling["restarts"]:
        assert restart["exit_code"] == 0, restart
        assert 0 <= restart["drain_s"] < 1 + 20  # the drain, then the pools closed
        assert restart["down_s"] > 0
    assert isinstance(rolling["designs_resumed"], int) and rolling["designs_resumed"] >= 0
    calls = rolling["agent_calls"]
    assert calls["log_enabled"] and calls["log_dropped"] == 0
    assert calls["calls"] >= 6 * len(AGENTS)
    assert calls["after_answer_saved"] == 0
    assert calls["again_after_stopped_mid_answer"] >= 0
    assert rolling["health_while_restarting"]["count"] > 0

    targets = report["targets"]
    assert targets["every_design_succeeded"] == {"measured": "6/6", "met": True}
    assert targets["no_completed_agent_repeated"] == {"measured": 0, "met": True}
    assert targets["every_restart_clean"] == {"measured": "A 0, B 0", "met": True}
    assert targets["every_design_terminal"] == {"measured": "6/6", "met": True}
    assert targets["zero_leaks"] == {"measured": "none", "met": True}  # both servers checked
    assert report["setup"]["children_exit"] == {
        "probe A": 0,
        "probe B": 0,
        "server A": 0,
        "server B": 0,
        "simulator": 0,
    }

    text = format_report(report)
    assert "6 succeeded, 0 failed, 0 not terminal" in text
    assert f"{rolling['designs_resumed']} resumed" in text
    assert "0 for an agent after its answer was saved" in text
    assert "server A: SIGTERM to exit" in text and "server B: SIGTERM to exit" in text
    assert "restarting server A" in err and "restarting server B" in err
    assert leftovers(tmp_path) == []


def test_repeated_calls_tell_finished_agents_from_agents_stopped_mid_answer():
    def call(number: int, agent: str, at: float) -> dict:
        messages = [
            {"role": "system", "content": f"AGENT: {agent}\nYou are an agent."},
            {"role": "user", "content": f"<request>\nA shop (load test #{number})\n</request>"},
        ]
        return {"at": at, "messages": messages}

    log = {
        "enabled": True,
        "dropped": 0,
        "requests": [
            call(0, "requirements", 1.0),
            call(0, "carlos", 2.0),  # stopped mid-answer by a drain ...
            call(0, "carlos", 5.0),  # ... and made again where the design resumed
            call(1, "requirements", 1.5),
            call(1, "requirements", 4.0),  # after its answer was saved at 3.0: a defect
            {"at": 0.5, "messages": [{"role": "user", "content": "warm-up"}]},
        ],
    }
    texts = [(10, "A shop (load test #0)"), (11, "A shop (load test #1)")]
    saved = [(10, "requirements", 1.8), (10, "carlos", 6.0), (11, "requirements", 3.0)]
    assert repeated_calls(log, texts, saved) == {
        "calls": 5,
        "unattributed": 1,
        "after_answer_saved": 1,
        "again_after_stopped_mid_answer": 1,
        "log_enabled": True,
        "log_dropped": 0,
    }


def test_interrupted_run_stops_its_children_and_removes_its_folder(tmp_path):
    # Slow tokens: the designs must still be running when the signal arrives.
    slow = ["--ttft-ms", "5", "--tokens-per-second", "20", "--stall-seconds", "1"]
    process = loadtest_process(tmp_path, "--designs", "2", "--timeout", "120", *slow)
    assert process.stderr is not None
    url = None
    deadline = time.monotonic() + 90
    while url is None and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        if "server ready at " in line:
            url = line.split("server ready at ", 1)[1].split()[0]
    assert url is not None, "the load test never reported its server ready"
    assert leftovers(tmp_path) != []

    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "interrupted; every child process was stopped" in err
    assert port_refuses(url)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "10.0.0.5"], "--host 10.0.0.5 is not a loopback address"),
        (["--host", "example.com"], "--host must be a loopback address"),
        (["--host", "::1"], "use an IPv4 loopback address"),
        (["--host", "0.0.0.0"], "is not a loopback address"),
        (["--designs", "0"], "--designs must be between 1 and 2000, got 0"),
        (["--designs", "5", "--users", "6"], "--users must be between 1 and --designs (5)"),
        (["--timeout", "0"], "--timeout must be between 1 and 3600 seconds"),
        (["--timeout", "nan"], "--timeout must be between 1 and 3600 seconds"),
        (["--fault-rate", "1.5"], "--fault-rate is a fraction between 0 and 1, got 1.5"),
        (["--reset-rate", "-0.1"], "--reset-rate is a fraction between 0 and 1"),
        (
            ["--fault-rate", "0.05", "--error-rate", "0.01"],
            "--fault-rate 0.05 differs from --error-rate + --reset-rate + --stall-rate = 0.01",
        ),
        (["--tokens-per-second", "-1"], "--tokens-per-second must be a number >= 0"),
        (["--login-concurrency", "-1"], "--login-concurrency must be 0 (all at once) or more"),
        (["--simulator-nice", "20"], "--simulator-nice must be between 0 and 19, got 20"),
        (["--designs", "many"], "argument --designs: invalid int value: 'many'"),
        (["--workers", "0"], "--workers must be between 1 and 16, got 0"),
        (
            ["--workers", "2", "--rolling-restart"],
            "--workers and --rolling-restart do not go together",
        ),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(args, message, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/14")  # never reached: refused first
    with pytest.raises(CommandError) as refused:
        call_command("loadtest", *args)
    assert message in str(refused.value)


def test_several_workers_without_redis_are_refused(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(CommandError) as refused:
        call_command("loadtest", "--workers", "2")
    assert str(refused.value).startswith("--workers 2 needs REDIS_URL")


def test_several_problems_are_named_at_once():
    with pytest.raises(CommandError) as refused:
        call_command("loadtest", "--designs", "0", "--host", "192.168.1.1", "--timeout", "-5")
    text = str(refused.value)
    assert "--designs" in text and "--host" in text and "--timeout" in text


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        ("APIConnectionError: Connection error.", "connection reset"),
        ("DeadlineExceeded: no new chunk within 30s", "deadline"),
        (
            "InternalServerError (HTTP 500): The server had an error while processing your "
            "request. Sorry about that!",
            "upstream 5xx after retries",
        ),
        (
            "CircuitOpen: the circuit for deployment 'gpt-4o' is open after upstream failures "
            "(InternalServerError (HTTP 500)); retry in 12.0s",
            "circuit open",
        ),
        ("PoolTimeout: no slot in pool 'main' within 30s", "pool refused"),
        ("RateLimitError (HTTP 429): Rate limit reached", "rate limited"),
        ("OutputFormatError: empty answer (finish reason stop)", "bad model output"),
        ("interrupted: the pipeline task was cancelled", "interrupted"),
        ("KeyError: 'surprise'", "other: KeyError: 'surprise'"),
    ],
)
def test_failures_are_grouped_by_cause(error, cause):
    assert failure_cause(error) == cause


def test_leak_check_names_what_is_not_at_rest():
    pools = {
        "main": {"total": 10, "in_use": 0, "waiting": 0, "overflow_in_use": 0},
        "mini": {"total": 10, "in_use": 2, "waiting": 1, "overflow_in_use": 1},
    }
    at_rest = {"pools": {"main": pools["main"]}, "http": {"connections_open": 10}}
    assert pool_leaks(at_rest, {"connections_open": 10}) == []

    busy = {"pools": pools, "http": {"connections_open": 23}}
    assert pool_leaks(busy, {"connections_open": 21}) == [
        "pool mini: in_use = 2",
        "pool mini: waiting = 1",
        "pool mini: overflow_in_use = 1",
        "23 upstream connections open, more than the pools' 20 slots (temporary connections "
        "not closed)",
        "the server counts 23 upstream connections open, the simulator 21",
    ]


def test_latencies_are_summarized_with_the_engines_percentile():
    values = [float(v) for v in range(200, 0, -1)]  # in any order
    assert summarize(values) == {"count": 200, "p50_ms": 100.5, "p99_ms": 198.0, "max_ms": 200.0}
    assert summarize([7.0]) == {"count": 1, "p50_ms": 7.0, "p99_ms": 7.0, "max_ms": 7.0}
    assert summarize([]) == {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("30", 30.0), ("0", 1.0), ("600", 60.0), ("soon", 5.0), ("nan", 5.0), (None, 5.0)],
)
def test_a_refused_user_waits_as_told_within_bounds(header, seconds):
    headers = {} if header is None else {"retry-after": header}
    assert retry_after(httpx.Response(503, headers=headers)) == seconds


def test_the_visitors_login_page_is_read_back_for_the_designs_phase(tmp_path):
    from carlos.loadtest.report import ProbeReadings

    log = tmp_path / "probe.log"
    log.write_text("H 1.0 2.0 200\nV 1.5 7.0 200\nV 2.5 900.0 200\nV 9.5 3.0 503\nS 1.0 10 100 1\n")
    readings = ProbeReadings.read(log)
    during = readings.visits_between(2.0, 9.0)  # the designs phase: one visit, the slow one
    assert during["count"] == 1 and during["max_ms"] == 900.0 and during["non_200"] == 0
    assert readings.visits_between(0, 10)["non_200"] == 1
    assert [ms for _, ms, _ in readings.health] == [2.0]  # the visits are not /health probes
