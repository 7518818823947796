"""`manage.py llm_simulator`: run the offline OpenAI-compatible LLM simulator.

Why: development, demos and cross-process tests need an LLM endpoint that costs nothing,
needs no network and can be made slow or faulty on purpose. The simulator itself is
Django-free (`python -m pools.simulator`); this command only gives its flags the project's
settings as defaults (LLM_SIMULATOR_HOST, _PORT, _RESPONDER) and loads the apps, so a
responder from them (agents.simulated.carlos_responder) can be named.
"""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pools.simulator import cli


class Command(BaseCommand):
    help = cli.description("manage.py llm_simulator")
    # The simulator needs no database or app checks; starting fast matters for tests.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        defaults = cli.Defaults(
            host=getattr(settings, "LLM_SIMULATOR_HOST", "127.0.0.1"),
            port=getattr(settings, "LLM_SIMULATOR_PORT", 8765),
            responder=getattr(settings, "LLM_SIMULATOR_RESPONDER", cli.DEFAULT_RESPONDER),
            source="settings.LLM_SIMULATOR_",
        )
        cli.add_arguments(parser, defaults)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            cli.run(options, self._announce)
        except cli.UsageError as exc:
            raise CommandError(str(exc)) from exc

    def _announce(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
