"""`manage.py prune_pool_snapshots`: delete pool history older than a given age."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from pools.engine.intervals import parse_duration
from pools.models import PoolSnapshot


class Command(BaseCommand):
    help = (
        "Delete pool snapshots (the history behind the admin chart and `pool_status "
        "--history`) older than an age. Run it daily from cron, e.g. "
        "`manage.py prune_pool_snapshots --older-than 30d`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        default = getattr(settings, "POOL_SNAPSHOT_RETENTION", "30d")
        parser.add_argument(
            "--older-than",
            default=None,
            metavar="AGE",
            help="Age of the rows to delete: a number and a unit, e.g. 90m, 12h, 30d "
            f"(s, m, h, d or w). Default: POOL_SNAPSHOT_RETENTION, now {default}.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Only count the rows that would be deleted."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        given = options["older_than"]
        text = given if given is not None else getattr(settings, "POOL_SNAPSHOT_RETENTION", "30d")
        try:
            age = parse_duration(text)
        except ValueError as exc:
            source = "--older-than" if given is not None else "POOL_SNAPSHOT_RETENTION"
            raise CommandError(f"{source}: {exc}") from None
        cutoff = timezone.now() - age
        old = PoolSnapshot.objects.filter(taken_at__lt=cutoff)
        when = f"taken before {timezone.localtime(cutoff):%Y-%m-%d %H:%M:%S %Z} (older than {text})"
        if options["dry_run"]:
            self.stdout.write(f"Would delete {old.count()} pool snapshots {when}.")
            return
        deleted, _ = old.delete()
        kept = PoolSnapshot.objects.count()
        self.stdout.write(f"Deleted {deleted} pool snapshots {when}; {kept} kept.")
