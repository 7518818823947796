"""`manage.py snapshot_pools`: save one pool snapshot now, from a running server (for cron)."""

from __future__ import annotations

from typing import Any

import httpx
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from pools.engine.stats import PoolStats
from pools.management.commands._server import add_server_arguments
from pools.models import PoolSnapshot
from pools.sampler import gauges

# Cumulative counter in /health -> the row's interval field that its increase fills.
DELTAS = {
    "requests_num": "requests",
    "requests_overflow": "overflow_requests",
    "requests_queued": "queued_requests",
    "requests_errors": "errors",
}
REFUSALS = ("requests_timeouts", "requests_refused")


def snapshot_from_health(
    instance: str, taken_at: Any, name: str, stats: PoolStats, previous: PoolSnapshot | None
) -> PoolSnapshot:
    """A row from one pool of /health; its interval figures are the counters' increase since
    `previous` (or since the server started, when there is none or the server restarted)."""
    now_counters = stats.counters()
    before = previous.counters if previous is not None else {}
    restarted = any(now_counters.get(key, 0) < before.get(key, 0) for key in now_counters)
    base = {} if restarted else before
    increase = {key: now_counters.get(key, 0) - base.get(key, 0) for key in now_counters}
    return PoolSnapshot(
        taken_at=taken_at,
        instance=instance,
        pool=name,
        **gauges(stats),
        interval_s=(
            round((taken_at - previous.taken_at).total_seconds(), 3)
            if previous is not None
            else None
        ),
        **{field: int(increase.get(key, 0)) for key, field in DELTAS.items()},
        refused=int(sum(increase.get(key, 0) for key in REFUSALS)),
        counters=now_counters,
    )


class Command(BaseCommand):
    help = (
        "Save one snapshot row per pool now, read from a running server's /health: what the "
        "built-in sampler does every POOL_SNAPSHOT_INTERVAL seconds, for operators who prefer "
        "cron (set POOL_SNAPSHOT_INTERVAL=0 on the server, then e.g. `* * * * * manage.py "
        "snapshot_pools --url http://127.0.0.1:8000`). Counts are the increase since the "
        "previous row for the same URL; /health has no percentiles, tokens, interval peaks "
        "or pauses, so those stay empty in these rows (the chart draws a row's moment where "
        "its peak is missing)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_server_arguments(parser, url_role="; the rows' instance")

    def handle(self, *args: Any, **options: Any) -> None:
        base = options["url"].rstrip("/")
        try:
            response = httpx.get(f"{base}/health", timeout=options["timeout"])
            body = response.json()
            pools = {name: PoolStats.from_json(pool) for name, pool in body["pools"].items()}
        except httpx.HTTPError as exc:
            raise CommandError(
                f"cannot reach {base}/health ({type(exc).__name__}: {exc}); is the server "
                "running? Nothing was saved."
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CommandError(
                f"{base}/health answered HTTP {response.status_code} without the pools' JSON; "
                "is --url a Carlos server? Nothing was saved."
            ) from None
        taken_at = timezone.now()
        rows = []
        for name, stats in pools.items():
            previous = (
                PoolSnapshot.objects.filter(instance=base, pool=name).order_by("-taken_at").first()
            )
            rows.append(snapshot_from_health(base, taken_at, name, stats, previous))
        PoolSnapshot.objects.bulk_create(rows)
        status = body.get("status", "unknown")
        self.stdout.write(
            f"Saved {len(rows)} pool snapshot(s) from {base} ({status}): "
            + ", ".join(
                f"{row.pool} {row.in_use}/{row.size} in use, {row.waiting} waiting, "
                f"{row.requests} requests"
                for row in rows
            )
        )
