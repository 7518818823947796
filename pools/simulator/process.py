"""Run the offline simulator as a child process, as `serve` and the benchmarks do.

A child process is what a real endpoint is to Carlos: on other CPUs, reached over sockets.
The child is asked to die with its parent (Linux `PR_SET_PDEATHSIG`), so a killed server
never leaves an orphaned simulator holding its port. It runs in a session of its own, so a
terminal's Ctrl-C (SIGINT to the whole foreground process group) reaches the parent only: the
parent stops the simulator itself once it has shut down, and the designs still running until
then keep their endpoint instead of failing with connection errors.

Django-free like the rest of the package: a caller inside the project passes its `manage.py`
(`settings.BASE_DIR / "manage.py"`), so the child is `manage.py llm_simulator` with the
settings as defaults; without one it is `python -m pools.simulator`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1  # prctl(2)
_READY = re.compile(r"listening on (https?://\S+/v1)")


class SimulatorDidNotStart(RuntimeError):
    pass


@dataclass
class SimulatorProcess:
    process: subprocess.Popen
    base_url: str
    ready_line: str

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def die_with_parent(signal_number: int = signal.SIGTERM) -> None:
    """In the child, before exec: have Linux send it `signal_number` when the parent dies,
    even by SIGKILL."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal_number)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own shutdown still stops the child


# The folder `pools` is in, so `python -m pools.simulator` finds it from any directory.
_IMPORT_ROOT = str(Path(__file__).resolve().parents[2])


def simulator_command(manage_py: str | os.PathLike[str] | None) -> list[str]:
    """How to run the simulator: through `manage_py` (settings as defaults) or on its own."""
    if manage_py is None:
        return [sys.executable, "-m", "pools.simulator"]
    return [sys.executable, os.fspath(manage_py), "llm_simulator"]


def start_simulator(
    arguments: Sequence[str],
    *,
    manage_py: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
) -> SimulatorProcess:
    """The simulator with ARGUMENTS in a child; returns once it listens (blocking).

    `manage_py`: the project's manage.py, or None for `python -m pools.simulator` (see the
    module docstring). Call it at start-up or through `asyncio.to_thread`, never on a running
    event loop.
    """
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if manage_py is None:
        path = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [_IMPORT_ROOT, path]))
    process = subprocess.Popen(
        [*simulator_command(manage_py), *arguments],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env,
        start_new_session=True,  # out of the terminal's Ctrl-C: see the module docstring
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = _READY.search(line)
    if not match:
        process.kill()
        process.wait()
        raise SimulatorDidNotStart(f"the offline LLM simulator did not start: {line.strip()!r}")
    return SimulatorProcess(process, match.group(1), line.strip())
