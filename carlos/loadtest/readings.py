"""Readings from /proc: a process's sockets, memory and CPU time, and the machine's CPU.

Read from outside the server, so taking them costs it nothing; Linux only (elsewhere the
readings are None and the report says "-").
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from carlos.loadtest.world import World

# --- /proc readings -------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def open_sockets(pid: int) -> int | None:
    """Sockets among the process's file descriptors (TCP, Unix, listening), None if gone."""
    count = 0
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(entry.path).startswith("socket:"):
                    count += 1
    except OSError:
        return None
    return count


def sockets_to(pid: int, port: int) -> int | None:
    """The process's TCP connections whose far end is `port` (Redis: its workers' own
    connections, opened as they are needed), None if the process is gone."""
    inodes: set[str] = set()
    try:
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as rows:
                next(rows, None)  # the header
                for row in rows:
                    fields = row.split()
                    if int(fields[2].rpartition(":")[2], 16) == port:
                        inodes.add(fields[9])
        count = 0
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(entry.path).removeprefix("socket:[").rstrip("]") in inodes:
                    count += 1
    except (OSError, ValueError, IndexError):
        return None
    return count


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) from /proc/<pid>/status, in kB."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU time so far of a process, or of one of its threads."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    try:
        with open(path) as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine: other users' load shows up here."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return float(sum(values) - idle), float(sum(values))


def total[N: (int, float)](values: Iterable[N | None]) -> N | None:
    """The sum of readings taken per server; None if one is missing."""
    known = list(values)
    if not known or any(value is None for value in known):
        return None
    return sum(value for value in known if value is not None)


@dataclass
class Mark:
    """Clock and CPU readings at a phase boundary."""

    at: float
    server_cpu: float | None  # all the servers together
    loop_cpu: float | None  # the servers' main threads, which run their event loops
    simulator_cpu: float | None
    own_cpu: float
    machine: tuple[float, float] | None
    server_pids: tuple[int, ...] = ()


def mark(world: World | None) -> Mark:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pids = world.pids if world else ()
    return Mark(
        at=time.monotonic(),
        server_cpu=total(cpu_seconds(pid) for pid in pids),
        loop_cpu=total(cpu_seconds(pid, pid) for pid in pids),
        simulator_cpu=cpu_seconds(world.simulator.pid) if world else None,
        own_cpu=usage.ru_utime + usage.ru_stime,
        machine=machine_cpu(),
        server_pids=pids,
    )


def cpu_between(start: Mark, end: Mark) -> dict[str, float | None]:
    """Average cores used in a phase by the servers, the simulator, this process, the machine.

    None for the servers across a restart: a new process's CPU time starts from zero.
    """
    span = max(end.at - start.at, 1e-9)
    same_servers = start.server_pids == end.server_pids

    def per_second(a: float | None, b: float | None) -> float | None:
        return cores_used(a, b, span)

    return {
        "server": per_second(start.server_cpu, end.server_cpu) if same_servers else None,
        "server_event_loop": per_second(start.loop_cpu, end.loop_cpu) if same_servers else None,
        "simulator": per_second(start.simulator_cpu, end.simulator_cpu),
        "load_generator": per_second(start.own_cpu, end.own_cpu),
        "machine": machine_cores(start.machine, end.machine),
    }


def cores_used(start: float | None, end: float | None, span: float) -> float | None:
    """Average cores used over `span` seconds, from two CPU times; None if one is missing."""
    if start is None or end is None or span <= 0:
        return None
    return round((end - start) / span, 2)


def machine_cores(
    start: tuple[float, float] | None, end: tuple[float, float] | None
) -> float | None:
    """Average cores the whole machine used between two `machine_cpu` readings."""
    if not start or not end or end[1] <= start[1]:
        return None
    return round((end[0] - start[0]) / (end[1] - start[1]) * (os.cpu_count() or 1), 2)
