"""`manage.py runserver`: Django's development server, with what Carlos needs to work.

Why: with `daphne` in INSTALLED_APPS, `runserver` is Daphne's (as the Channels docs set it
up): an ASGI server with the autoreloader, but none of Carlos's start. With no endpoint
configured nothing answered at the simulator's address, so /health stayed 503 and every
design failed with a bare `APIConnectionError: Connection error.`

A Django user types `runserver` and expects the site to work, so it brings what `manage.py
serve` brings (the offline simulator when no endpoint is configured, the demo account, the
pools warmed once Daphne listens) and keeps what makes it `runserver`: the autoreloader, the
static files, its options. The simulator belongs to the process that lives across reloads
(the reloader's parent, or the only one with --noreload), so a reload never restarts it; the
server process warms its own pools (carlos.lifespan). `serve` stays the production command
(drain on SIGTERM, port bound first, workers).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from daphne.management.commands.runserver import Command as DaphneRunserver
from daphne.server import Server
from django.utils.autoreload import DJANGO_AUTORELOAD_ENV

from carlos.management.commands.serve import Command as Serve
from pools.management.commands._server import add_simulator_arguments
from pools.runtime import load_config
from pools.simulator.process import SimulatorProcess


class Command(DaphneRunserver):
    help = (
        "Django's development server (Daphne, with the autoreloader) for Carlos: with no LLM "
        "endpoint configured (no AZURE_OPENAI_ENDPOINT or LLM_BASE_URL) it starts the offline "
        "simulator once, and the pools are warmed as soon as the server listens, as "
        "`manage.py serve` does. Use `manage.py serve` (or `python3 dev.py run`) to serve for "
        "real: it drains running designs on Ctrl-C and SIGTERM."
    )

    def add_arguments(self, parser: Any) -> None:
        super().add_arguments(parser)
        add_simulator_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        simulator = None
        if os.environ.get(DJANGO_AUTORELOAD_ENV) != "true":  # not a reloaded server process
            simulator = self._start_what_outlives_reloads(options)
        try:
            super().handle(*args, **options)
        finally:
            if simulator is not None:
                simulator.stop()

    def _start_what_outlives_reloads(self, options: dict[str, Any]) -> SimulatorProcess | None:
        """The demo account and the simulator, as `serve` makes them (its own words too)."""
        from agents.demo import credentials_path, ensure_demo_account

        if not self.check_migrations_applied():
            return self._simulator(options)  # runserver says what to migrate; no account yet
        demo = ensure_demo_account()
        if demo is not None:
            self.stdout.write(
                f"👤 Demo account (local, offline simulator only): log in as {demo[0]!r}; "
                f"the password is in {credentials_path()}"
            )
        return self._simulator(options)

    def _simulator(self, options: dict[str, Any]) -> SimulatorProcess | None:
        endpoint = load_config().endpoint
        if endpoint.kind != "simulator" or options["no_simulator"]:
            return None
        serve = Serve(stdout=self.stdout._out, stderr=self.stderr._out)
        return serve._start_simulator(endpoint.base_url, options)

    def check_migrations_applied(self) -> bool:
        """Whether the database is migrated (the demo account needs its tables)."""
        from django.db import DEFAULT_DB_ALIAS, connections
        from django.db.migrations.executor import MigrationExecutor

        executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
        return not executor.migration_plan(executor.loader.graph.leaf_nodes())

    def inner_run(self, *args: Any, **options: Any) -> None:
        if options.get("use_asgi", True):
            # Daphne's ready callback: warm the pools once it listens (carlos.lifespan).
            self.server_cls = partial(Server, ready_callable=_start_carlos)
        super().inner_run(*args, **options)


def _start_carlos() -> None:
    """Once Daphne listens: the server's start, in the background on Daphne's loop."""
    from twisted.internet import reactor

    from carlos.asgi import application

    application.start_under_daphne(reactor, "runserver warms the pools as it starts")
