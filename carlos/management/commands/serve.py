"""`manage.py serve`: Carlos under Daphne, with the pools warmed at start and closed at stop.

Daphne sends no ASGI lifespan events, so this command hooks Daphne's own start (its
`ready_callable`) and Twisted's shutdown trigger instead. With no LLM endpoint configured it
also starts the offline simulator in a child process and stops it on exit. Outside DEBUG it
first refuses a configuration that cannot serve pages safely (carlos.startup). Then it binds
its port itself and hands the socket to Daphne: a port in use stops it with a non-zero exit
before it migrates, touches a design or starts the simulator (Daphne alone would only log it
and exit 0, after all of that).

With `--workers N` (the default with REDIS_URL: one per core) this process becomes the parent
of N such servers on one port, each started as `serve --worker ...` (carlos.workers): it binds
the port, migrates, makes the demo account and starts the one simulator they share, then
supervises them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from carlos.serving import shut_down, tune_gc_for_serving, warm_up
from carlos.startup import refuse_to_start_wrong
from carlos.workers import (
    WorkerPlan,
    WorkerSpec,
    listen,
    listen_for_workers,
    supervise,
    tag_log_lines,
    worker_count,
)
from pools.engine.metrics import metrics_for
from pools.engine.registry import PoolRegistry
from pools.management.commands._server import add_simulator_arguments
from pools.runtime import get_pool, load_config
from pools.sampler import SnapshotSampler, start_sampler
from pools.simulator.process import SimulatorDidNotStart, SimulatorProcess, start_simulator

logger = logging.getLogger("pools")


class Command(BaseCommand):
    help = (
        "Serve Carlos over HTTP and WebSockets with Daphne. The LLM pools are warmed before "
        "the first request and closed cleanly on Ctrl-C / SIGTERM. With no endpoint "
        "configured (no AZURE_OPENAI_ENDPOINT or LLM_BASE_URL) the offline LLM simulator is "
        "started too."
    )
    tag = ""  # what starts each line a worker writes; nothing in a single process

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--host", default="127.0.0.1", help="IPv4 interface to bind (default 127.0.0.1)."
        )
        parser.add_argument("--port", type=int, default=8000, help="Port to bind (default 8000).")
        parser.add_argument(
            "--workers",
            type=int,
            default=None,
            help="Server processes on the port, sharing capacity, breakers, limits and live "
            "streams through Redis (default: one per core with REDIS_URL, else 1; more than "
            "one needs REDIS_URL).",
        )
        add_simulator_arguments(parser)
        parser.add_argument(
            "--migrate", action="store_true", help="Apply database migrations before serving."
        )
        # One of the workers of a `serve --workers N` parent: NUMBER:LISTEN_FD:READY_FD.
        parser.add_argument("--worker", help=argparse.SUPPRESS)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["worker"]:  # the parent checked the configuration and holds the rest
            worker = WorkerSpec.parse(options["worker"])
            self.tag = worker.tag
            with worker.adopt_socket() as listening:
                self._serve(listening, options, worker)
            return
        try:
            refuse_to_start_wrong()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        count = worker_count(options["workers"], settings.REDIS_URL)
        if count > 1:
            self._supervise(count, options)
            return
        with listen(options["host"], options["port"]) as listening:
            self._serve(listening, options)

    def say(self, line: str) -> None:
        self.stdout.write(f"{self.tag}{line}")

    def _prepare(self, options: dict[str, Any]) -> SimulatorProcess | None:
        """What one machine does once: migrations, the demo account, the simulator."""
        from agents.demo import credentials_path, ensure_demo_account

        if options["migrate"]:
            call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("🚀 Starting Carlos the Architect...")
        demo = ensure_demo_account()
        if demo is not None:
            # The password stays in its file (mode 600), out of terminals and log collectors.
            self.stdout.write(
                f"👤 Demo account (local, offline simulator only): log in as {demo[0]!r}; "
                f"the password is in {credentials_path()}"
            )
        endpoint = load_config().endpoint
        if endpoint.kind == "simulator" and not options["no_simulator"]:
            return self._start_simulator(endpoint.base_url, options)
        return None

    def _supervise(self, count: int, options: dict[str, Any]) -> None:
        """The parent of `count` workers: the port, what is done once, then the workers."""
        from agents.leases import LeaseSettings

        sockets = listen_for_workers(options["host"], options["port"], count)
        try:
            simulator = self._prepare(options)
        except BaseException:
            for listening in sockets:
                listening.close()
            raise
        plan = WorkerPlan(
            count=count,
            host=options["host"],
            port=sockets[0].getsockname()[1],
            verbosity=options["verbosity"],
            drain_seconds=LeaseSettings.current().drain_seconds,
        )
        self.stdout.write(f"👥 Starting {count} workers on {plan.host}:{plan.port}")
        try:
            failure = asyncio.run(supervise(plan, sockets, self.stdout.write))
        finally:
            if simulator is not None:  # after the workers: their designs kept their endpoint
                simulator.stop()
        if failure is not None:
            raise CommandError(failure)

    def _serve(
        self,
        listening: socket.socket,
        options: dict[str, Any],
        worker: WorkerSpec | None = None,
    ) -> None:
        """Everything after the port is ours: migrations, demo account, simulator, Daphne
        (a worker: Daphne only, its parent did the rest)."""
        from daphne.server import Server  # installs Twisted's asyncio reactor: import late

        from carlos.asgi import application

        if worker is None:
            simulator = self._prepare(options)
        else:
            simulator = None
            tag_log_lines(worker.tag)  # once the ASGI application has set up Django's logging
            self.say(f"🚀 Worker {worker.number} starting (pid {os.getpid()})")
        registry = get_pool()
        metrics_for(registry)  # histograms count from the first call, not the first scrape
        from carlos import lifecycle

        lifecycle.starting()  # telemetry export, when configured, before the first request

        background: set[asyncio.Task] = set()

        def on_ready() -> None:
            task = asyncio.get_event_loop().create_task(self._warm_up(options, worker))
            background.add(task)
            task.add_done_callback(background.discard)

        def on_shutdown() -> Any:
            from twisted.internet import defer

            return defer.Deferred.fromFuture(asyncio.ensure_future(self._shut_down(registry)))

        from twisted.internet import reactor

        reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
        server = Server(
            application=application,
            # Twisted closes the descriptor it adopts: a duplicate, so `listening` stays valid.
            endpoints=[f"fd:fileno={os.dup(listening.fileno())}"],
            signal_handlers=True,
            ready_callable=on_ready,
            verbosity=options["verbosity"],
        )
        try:
            server.run()
        finally:
            listening.close()  # the port is free at once, not after the simulator stopped
            # After the server's own shutdown: designs still running kept their endpoint.
            if simulator is not None:
                simulator.stop()
        if not server.listening_addresses:  # Daphne logs a listen failure and returns
            raise CommandError(
                f"cannot listen on {options['host']}:{options['port']}: Daphne could not "
                "adopt the socket (its 'Listen failure' above says why)"
            )

    async def _warm_up(self, options: dict[str, Any], worker: WorkerSpec | None) -> None:
        registry = get_pool()
        try:
            await warm_up(registry)
        except Exception:
            logger.exception("pool warm-up failed")
            return
        finally:
            # Pool history starts after warm-up, degraded or not: that is worth recording too.
            if not registry.closed:
                self._sampler = start_sampler(registry)
                await self._designs_started()
            tune_gc_for_serving()
            if worker is not None:  # warm or degraded, it serves: the parent may go on
                worker.announce_ready()
        address = f"http://{options['host']}:{options['port']}/"
        if registry.warmup_error is not None:  # it serves, but never says "ready" meanwhile
            self.say(f"⚠️ Serving on {address}, unready until the LLM endpoint answers (/health)")
        else:
            self.say(f"✅ Backend ready to serve requests on {address}")

    async def _designs_started(self) -> None:
        """Listening and warm: take over what no live server holds, keep our leases."""
        from carlos import lifecycle

        try:
            await lifecycle.listening()
        except Exception:  # the database unreachable: the pages still say so; log it here
            logger.exception("the design supervisor did not start")

    async def _shut_down(self, registry: PoolRegistry) -> None:
        """Drain the running designs (carlos.lifecycle), stop the snapshot sampler (saving
        the last interval), then stop what still runs on the LLM loop and close the pools;
        last, flush the telemetry export."""
        from carlos import lifecycle

        report = await lifecycle.stopping()
        if report.stopped or report.finished:
            self.say(
                f"⏸  Drained in {report.seconds:.1f}s: {report.finished} design(s) handed on at "
                f"a checkpoint, {report.stopped} stopped mid-agent (their text saved)"
            )
        sampler: SnapshotSampler | None = getattr(self, "_sampler", None)
        if sampler is not None:
            try:
                await sampler.stop()
            except Exception:
                logger.exception("stopping the pool snapshot sampler failed")
        await shut_down(registry)
        await lifecycle.stopped()  # the last spans and metrics, within a bound

    def _start_simulator(self, base_url: str, options: dict[str, Any]) -> SimulatorProcess:
        parts = urlsplit(base_url)
        arguments = [
            "--host",
            parts.hostname or "127.0.0.1",
            "--port",
            str(parts.port or 80),
            *options["simulator_args"].split(),
        ]
        if parts.scheme == "https":
            arguments.append("--tls")
        try:
            simulator = start_simulator(arguments, manage_py=settings.BASE_DIR / "manage.py")
        except SimulatorDidNotStart as exc:
            raise CommandError(
                f"{exc}; is port {parts.port} already in use? Run with --no-simulator if one "
                "already runs."
            ) from None
        self.stdout.write(f"🤖 Offline LLM simulator: {simulator.ready_line}")
        return simulator
