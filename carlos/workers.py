"""`manage.py serve --workers N`: N server processes on one port, and the parent that runs them.

Why: one process answers pages and streams designs on one GIL; a machine with more cores
runs more processes. Each worker is a whole `serve` (its own pools, event loops, design
supervisor and instance id) and takes part in the cluster through Redis as separate
instances already do, so N workers share pool capacity, breakers, limits and live streams;
without REDIS_URL they could share none of these, so more than one is refused.

One port for all: on Linux the parent binds one socket per worker with SO_REUSEPORT (the
kernel spreads new connections over them, evenly, and none is woken for another's) after
checking that nobody holds the port; elsewhere (SO_REUSEPORT does not balance there) every
worker accepts on one socket the parent bound. Either way the parent binds, so a port in use
fails `serve` before anything starts, and each worker adopts its socket through Daphne's
`fd:` endpoint, as a single `serve` does with its own.

The parent supervises: it starts the workers (each in a session of its own), waits until
each says it is ready (a line on a pipe) and fails the start if one exits first; it forwards
SIGTERM and SIGINT (each worker then drains and closes its pools); a worker that dies while
serving stops the others and fails `serve`, so an orchestrator restarts the whole. A parent
killed outright (SIGKILL) takes its workers with it at once (Linux `PR_SET_PDEATHSIG`), as
one process would go: no orphan keeps the port or drains unsupervised, and their designs
are taken over when their leases expire, as after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.core.management.base import CommandError

from carlos.processes import manage_py
from pools.simulator.process import die_with_parent

LISTEN_BACKLOG = 50  # what Daphne's `tcp:` endpoint asked for
MAX_WORKERS = 64
READY = b"ready\n"
# After SIGTERM a worker drains (DRAIN_SECONDS) and closes its pools; past that and this
# margin it is killed, so a hung worker never keeps `serve` from exiting.
STOP_MARGIN_S = 30.0
BALANCED_REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
NO_REDIS = (
    "--workers {count} needs REDIS_URL: separate processes share pool capacity, circuit "
    "breakers, rate limits and live design streams only through Redis (without it a page "
    "served by one worker would never see a design running on another). Set REDIS_URL "
    "(e.g. redis://127.0.0.1:6379/0) or run one worker (--workers 1)."
)


def worker_count(requested: int | None, redis_url: str) -> int:
    """How many workers to run: as asked, else one per core with Redis and one without."""
    if requested is None:
        return (os.process_cpu_count() or 1) if redis_url else 1
    if not 1 <= requested <= MAX_WORKERS:
        raise CommandError(f"--workers must be between 1 and {MAX_WORKERS}, got {requested}")
    if requested > 1 and not redis_url:
        raise CommandError(NO_REDIS.format(count=requested))
    return requested


# --- the port -----------------------------------------------------------------------------------


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket listening on `host:port`, or a CommandError saying why there is none.

    IPv4 only: Daphne adopts the socket through its `fd:` endpoint, whose parser passes the
    address family on as the string it reads, so no endpoint string can name AF_INET6 (nor
    did `tcp:port=...:interface=::1` ever parse: its colons split it).
    """
    if ":" in host:
        raise CommandError(f"cannot listen on [{host}]:{port}: serve listens on IPv4 only")
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # elsewhere SO_REUSEADDR lets another process take the port
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listening.bind((host, port))
        listening.listen(LISTEN_BACKLOG)
    except OSError as exc:
        listening.close()
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listening


def listen_for_workers(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker on one port (SO_REUSEPORT), or one shared by all.

    A plain socket takes the port first: it fails when anyone holds it, a group of
    SO_REUSEPORT sockets of another `serve` included, which the group's own sockets would
    silently join. It also picks the port when `port` is 0.
    """
    first = listen(host, port)
    if not BALANCED_REUSE_PORT:
        return [first]
    port = first.getsockname()[1]
    first.close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(listen(host, port, reuse_port=True))
    except CommandError:
        for listening in sockets:
            listening.close()
        raise
    return sockets


# --- inside a worker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What the parent tells a worker (`serve --worker NUMBER:LISTEN_FD:READY_FD`)."""

    number: int
    listen_fd: int
    ready_fd: int

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        try:
            number, listen_fd, ready_fd = (int(part) for part in text.split(":"))
        except ValueError:
            raise CommandError(f"--worker takes NUMBER:LISTEN_FD:READY_FD, got {text!r}") from None
        return cls(number, listen_fd, ready_fd)

    def __str__(self) -> str:
        return f"{self.number}:{self.listen_fd}:{self.ready_fd}"

    @property
    def tag(self) -> str:
        """What starts each line this worker writes."""
        return f"[worker {self.number}] "

    def adopt_socket(self) -> socket.socket:
        """The listening socket the parent handed down."""
        return socket.socket(fileno=self.listen_fd)

    def announce_ready(self) -> None:
        """Tell the parent this worker listens and is warm (once; the pipe is closed)."""
        with contextlib.suppress(OSError):  # the parent is gone: nobody waits
            os.write(self.ready_fd, READY)
        with contextlib.suppress(OSError):
            os.close(self.ready_fd)


class TaggedFormatter(logging.Formatter):
    """A handler's own format, every line of it (tracebacks too) after the worker's tag."""

    def __init__(self, inner: logging.Formatter | None, tag: str) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.tag + line for line in self.inner.format(record).splitlines())


def tag_log_lines(tag: str) -> None:
    """Start every line the configured stream handlers write with `tag` (call it after LOGGING
    is applied, whatever its format): with several workers writing to one output, each line
    says which one wrote it. Other handlers (telemetry export) keep their records as they are."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler.formatter, TaggedFormatter
            ):
                handler.setFormatter(TaggedFormatter(handler.formatter, tag))


# --- the parent ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """How the parent runs its workers."""

    count: int
    host: str
    port: int
    verbosity: int
    drain_seconds: float


@dataclass
class Worker:
    number: int
    process: asyncio.subprocess.Process
    ready: asyncio.Task[bool]  # True once it said so; False if its pipe closed first
    exited: asyncio.Task[int]

    def describe(self) -> str:
        return f"worker {self.number} (pid {self.process.pid})"

    def ending(self) -> str:
        """How it ended, in words: `exited with status 1`, `was killed by SIGKILL`."""
        code = self.exited.result()
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"


async def _read_ready(fd: int) -> bool:
    """Whether the worker wrote its ready line before its end of the pipe closed."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        return await reader.readline() == READY
    finally:
        transport.close()


def _killed_with_parent() -> None:
    """In the worker, before exec: have Linux SIGKILL it when the parent dies."""
    die_with_parent(signal.SIGKILL)


async def start_worker(number: int, plan: WorkerPlan, listening: socket.socket) -> Worker:
    """`manage.py serve --worker ...` in a session of its own (a terminal's Ctrl-C reaches the
    parent, which forwards it), killed by Linux if the parent is."""
    read_end, write_end = os.pipe()
    spec = WorkerSpec(number, listening.fileno(), write_end)
    try:
        process = await asyncio.create_subprocess_exec(
            *manage_py(
                "serve",
                "--host",
                plan.host,
                "--port",
                str(plan.port),
                "--verbosity",
                str(plan.verbosity),
                "--worker",
                str(spec),
            ),
            pass_fds=(spec.listen_fd, spec.ready_fd),
            start_new_session=True,
            preexec_fn=_killed_with_parent,
        )
    except OSError:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the worker's copy is the only one: its exit closes the pipe
    ready = asyncio.create_task(_read_ready(read_end))
    return Worker(number, process, ready, asyncio.create_task(process.wait()))


def _signal(worker: Worker, signum: int) -> None:
    if worker.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signum)


async def stop_workers(
    workers: Sequence[Worker], signum: int, signals: asyncio.Queue[int], grace: float
) -> None:
    """`signum` to every worker; a signal arriving meanwhile is passed on too; SIGKILL to
    what still runs after `grace` seconds."""
    for worker in workers:
        _signal(worker, signum)
    exits = {worker.exited for worker in workers}
    deadline = asyncio.get_running_loop().time() + grace
    while not all(task.done() for task in exits):
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            for worker in workers:
                _signal(worker, signal.SIGKILL)
            await asyncio.wait(exits)
            return
        again = asyncio.ensure_future(signals.get())
        await asyncio.wait({*exits, again}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if again.done():
            for worker in workers:
                _signal(worker, again.result())
        else:
            again.cancel()


async def supervise(
    plan: WorkerPlan, sockets: Sequence[socket.socket], say: Callable[[str], None]
) -> str | None:
    """Run the workers until a signal (None: every worker stopped cleanly) or a failure (the
    sentence saying what went wrong). The parent's copies of `sockets` are closed once the
    workers have theirs, so a worker that dies takes its socket out of the port's group."""
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[int] = asyncio.Queue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    workers: list[Worker] = []
    failure: str | None = None
    signum = signal.SIGTERM
    try:
        try:
            for number in range(1, plan.count + 1):
                listening = sockets[(number - 1) % len(sockets)]
                workers.append(await start_worker(number, plan, listening))
        finally:
            for listening in sockets:
                listening.close()
        failure, received = await _until_ready(workers, signals)
        if failure is None and received is None:
            pids = ", ".join(str(worker.process.pid) for worker in workers)
            say(f"✅ {plan.count} workers ready on http://{plan.host}:{plan.port}/ (pids {pids})")
            failure, received = await _until_stopped(workers, signals)
        signum = received or signal.SIGTERM
    finally:
        await stop_workers(workers, signum, signals, plan.drain_seconds + STOP_MARGIN_S)
        for task in (worker.ready for worker in workers):
            task.cancel()
        for signum_handled in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum_handled)
    if failure is None:  # a worker the signal caught before Daphne handled it stopped too
        failed = [worker for worker in workers if worker.exited.result() not in (0, -signum)]
        if failed:
            failure = "; ".join(
                f"{worker.describe()} {worker.ending()} while stopping" for worker in failed
            )
    return failure


async def _until_ready(
    workers: Sequence[Worker], signals: asyncio.Queue[int]
) -> tuple[str | None, int | None]:
    """Until every worker is ready: (None, None); a worker that ends first: (why, None); a
    signal first: (None, the signal)."""
    received = asyncio.ensure_future(signals.get())
    try:
        waiting = {worker.ready for worker in workers}
        while waiting:
            exits = {worker.exited for worker in workers}
            await asyncio.wait({*waiting, *exits, received}, return_when=asyncio.FIRST_COMPLETED)
            if received.done():
                return None, received.result()
            for worker in workers:
                not_ready = worker.ready.done() and not worker.ready.result()
                if worker.exited.done() or not_ready:
                    await worker.exited
                    return (
                        f"{worker.describe()} {worker.ending()} before it was ready (its "
                        "output above says why); the other workers were stopped",
                        None,
                    )
            waiting = {task for task in waiting if not task.done()}
        return None, None
    finally:
        received.cancel()


async def _until_stopped(
    workers: Sequence[Worker], signals: asyncio.Queue[int]
) -> tuple[str | None, int | None]:
    """While serving: (None, the signal) when asked to stop; (why, None) if a worker ends."""
    received = asyncio.ensure_future(signals.get())
    try:
        exits = {worker.exited for worker in workers}
        await asyncio.wait({*exits, received}, return_when=asyncio.FIRST_COMPLETED)
        if received.done():
            return None, received.result()
        dead = next(worker for worker in workers if worker.exited.done())
        return (
            f"{dead.describe()} {dead.ending()} while serving; the other workers were stopped",
            None,
        )
    finally:
        received.cancel()
