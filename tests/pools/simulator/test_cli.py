"""The command line: `manage.py llm_simulator` and `python -m pools.simulator`.

Both are run for real, in a child process, since what matters is what a child prints and
serves: the flags, the ready line, a clean exit on SIGTERM.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pools.management.commands.llm_simulator import Command as LLMSimulatorCommand
from pools.simulator.process import start_simulator
from tests.pools.simulator.helpers import MESSAGES, REPO

# The two ways to run the simulator: with the project's settings as defaults, or on its own.
LAUNCHERS = {
    "manage.py": ("manage.py", "llm_simulator"),
    "module": ("-m", "pools.simulator"),
}


@contextlib.contextmanager
def llm_simulator_command(*args: str, launcher: str = "manage.py") -> Iterator[str]:
    """Run the simulator with `--port 0 ARGS`; yield its base URL; stop it with SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, *LAUNCHERS[launcher], "--port", "0", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("LLM simulator listening on http://127.0.0.1:"), line
        base_url = line.rsplit(" ", 1)[1]
        assert base_url.endswith("/v1") and not base_url.endswith(":0/v1")
        yield base_url
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_serves_and_stops_on_sigterm(launcher: str) -> None:
    with (
        llm_simulator_command("--ttft-ms", "1", "--request-log", "3", launcher=launcher) as url,
        openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client,
    ):
        result = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        log = httpx.get(url.removesuffix("/v1") + "/_simulator/requests").json()
    assert result.choices[0].message.content
    assert log["enabled"] is True
    assert [(e["model"], e["messages"], e["outcome"]) for e in log["requests"]] == [
        ("gpt-4o", MESSAGES, "completed")
    ]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_sets_every_mode(launcher: str) -> None:
    flags = [
        *("--quota-rpm", "7", "--quota-tpm", "9000", "--quota-window", "2.5"),
        *("--ttft-per-request-ms", "15", "--retry-after", "40", "--next-429", "2"),
        *("--retry-after-mode", "date", "--ratelimit-headers", "negative"),
        *("--truncate-rate", "0.1", "--malformed-rate", "0.2", "--empty-rate", "0.3"),
        *("--length-rate", "0.4", "--content-filter-rate", "0.5", "--no-usage"),
        *("--fault-model", "gpt-4o-mini", "--keepalive-timeout", "4"),
    ]
    with llm_simulator_command(*flags, launcher=launcher) as base_url:
        settings = httpx.get(base_url.removesuffix("/v1") + "/_simulator/faults").json()
    assert (
        settings
        | {
            "quota_rpm": 7,
            "quota_tpm": 9000,
            "quota_window_s": 2.5,
            "ttft_per_request_ms": 15.0,
            "retry_after_s": 40.0,
            "next_429": 2,
            "retry_after_mode": "date",
            "ratelimit_headers": "negative",
            "truncate_rate": 0.1,
            "malformed_rate": 0.2,
            "empty_rate": 0.3,
            "length_rate": 0.4,
            "content_filter_rate": 0.5,
            "no_usage": 1,
            "fault_model": "gpt-4o-mini",
            "keepalive_timeout_s": 4.0,
        }
        == settings
    )


def test_management_command_refuses_an_unknown_mode() -> None:
    parser = LLMSimulatorCommand().create_parser("manage.py", "llm_simulator")
    with pytest.raises(CommandError, match="invalid choice: 'soon'"):
        parser.parse_args(["--retry-after-mode", "soon"])
    with pytest.raises(CommandError, match="must be greater than 0"):
        parser.parse_args(["--quota-window", "0"])


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m pools.simulator ARGS` for flags it refuses before serving."""
    return subprocess.run(
        [sys.executable, "-m", "pools.simulator", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_flags_that_make_no_sense_together_are_refused_by_both() -> None:
    with pytest.raises(CommandError, match="--ca-file only makes sense together with --tls"):
        call_command("llm_simulator", "--ca-file", "ca.pem")
    refused = run_module("--ca-file", "ca.pem")
    assert refused.returncode == 1
    assert "error: --ca-file only makes sense together with --tls" in refused.stderr
    responder = run_module("--responder", "pools.simulator.nothing")
    assert responder.returncode == 1
    assert "Cannot import responder 'pools.simulator.nothing'" in responder.stderr


def test_the_package_runs_without_django() -> None:
    """Importing every module of the package, and its entry point, loads no Django at all."""
    modules = sorted(
        f"pools.simulator.{path.stem}"
        for path in (REPO / "pools" / "simulator").glob("*.py")
        if path.stem not in ("__init__", "__main__")
    )
    code = (
        f"import sys, {', '.join(modules)}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'agents', 'carlos'}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_start_simulator_without_manage_py_runs_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`manage_py=None`: `python -m pools.simulator`, found from any working directory."""
    monkeypatch.chdir(tmp_path)
    simulator = start_simulator(["--port", "0"], manage_py=None)
    try:
        cmdline = Path(f"/proc/{simulator.process.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"pools.simulator"]
        stats = httpx.get(simulator.root_url + "/_simulator/stats").json()
        assert stats["chat_requests"] == 0
    finally:
        simulator.stop()
    assert simulator.process.returncode == 0
