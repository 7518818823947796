"""`manage.py benchmark_pool_history`: how long the pool history pages take on many rows."""

from __future__ import annotations

import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from django.utils import timezone

CHILD = "CARLOS_POOL_HISTORY_BENCHMARK_CHILD"
POOLS = ("main", "ronei", "mini")
INSTANCES = ("web-1:101", "web-2:202")
INTERVAL_S = 30
PAGES = (
    ("list, overview", "/admin/pools/poolsnapshot/", {}),
    ("list, peaks", "/admin/pools/poolsnapshot/", {"metric": "peaks"}),
    ("list, requests", "/admin/pools/poolsnapshot/", {"metric": "requests"}),
    ("list, errors by kind", "/admin/pools/poolsnapshot/", {"metric": "errors"}),
    ("list, 429s and pauses", "/admin/pools/poolsnapshot/", {"metric": "rate_limits"}),
    ("list, tokens", "/admin/pools/poolsnapshot/", {"metric": "tokens"}),
    ("list, limit", "/admin/pools/poolsnapshot/", {"metric": "limit"}),
    (
        "list, peaks per instance",
        "/admin/pools/poolsnapshot/",
        {"metric": "peaks", "per": "instance"},
    ),
    ("list, one pool", "/admin/pools/poolsnapshot/", {"pool": "main"}),
    ("list, last 24 hours", "/admin/pools/poolsnapshot/", {"within": "24h"}),
    ("chart.svg, overview", "/admin/pools/poolsnapshot/chart.svg", {}),
    ("admin index (last hour)", "/admin/", {}),
)


class Command(BaseCommand):
    help = (
        "Time the pool history pages of the admin (the list with its chart for each metric, "
        "chart.svg, the admin index) on --rows snapshots of three pools on two instances, "
        "one row per pool and instance every 30 s, in a throwaway SQLite database (the "
        "configured one is never touched). Prints the median and the slowest of --repeat "
        "requests per page, in wall-clock time and in this process's CPU time (which "
        "includes SQLite's work, and other load on the machine does not inflate)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rows", type=int, default=100_000, help="Snapshots (100,000).")
        parser.add_argument("--repeat", type=int, default=5, help="Requests per page (5).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["rows"] < len(POOLS) * len(INSTANCES) or options["repeat"] < 1:
            raise CommandError("--rows must be at least 6 and --repeat at least 1")
        if os.environ.get(CHILD) == "1":
            self._measure(options["rows"], options["repeat"])
            return
        with tempfile.TemporaryDirectory() as tmp:
            database = Path(tmp) / "pool-history.sqlite3"
            env = {
                **os.environ,
                CHILD: "1",
                "DATABASE_URL": f"sqlite:///{database}",
                "POOL_SNAPSHOT_INTERVAL": "0",
                # Only signs the throwaway database's one session.
                "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(),
            }
            command = [
                sys.executable,
                str(settings.BASE_DIR / "manage.py"),
                "benchmark_pool_history",
                "--rows",
                str(options["rows"]),
                "--repeat",
                str(options["repeat"]),
            ]
            done = subprocess.run(command, env=env, check=False)
            if done.returncode:
                raise CommandError(f"the measuring process failed (exit {done.returncode})")

    def _measure(self, rows: int, repeat: int) -> None:
        from django.contrib.auth.models import User
        from django.test import Client
        from django.test.utils import setup_test_environment

        call_command("migrate", verbosity=0)
        started = time.perf_counter()
        self._fill(rows)
        filled_s = time.perf_counter() - started
        setup_test_environment()
        client = Client()
        client.force_login(User.objects.create_superuser("bench", "bench@example.com", "pw"))
        size_mb = Path(connection.settings_dict["NAME"]).stat().st_size / 1e6
        self.stdout.write(
            f"{rows:,} pool snapshots in SQLite ({size_mb:.0f} MB, filled in {filled_s:.1f} s); "
            f"{repeat} requests per page after one warm-up\n"
        )
        self.stdout.write(f"{'page':<28} {'median ms':>10} {'slowest ms':>11} {'CPU ms':>8}")
        for label, url, params in PAGES:
            response = client.get(url, params)
            if response.status_code != 200:
                raise CommandError(f"{label}: HTTP {response.status_code}")
            times, cpu = [], []
            for _ in range(repeat):
                started, started_cpu = time.perf_counter(), time.process_time()
                client.get(url, params)
                times.append((time.perf_counter() - started) * 1000)
                cpu.append((time.process_time() - started_cpu) * 1000)
            self.stdout.write(
                f"{label:<28} {statistics.median(times):>10.0f} {max(times):>11.0f} "
                f"{statistics.median(cpu):>8.0f}"
            )

    def _fill(self, rows: int) -> None:
        from pools.models import PoolSnapshot

        rng = random.Random(15)
        per_moment = len(POOLS) * len(INSTANCES)
        moments = rows // per_moment
        start = timezone.now() - timedelta(seconds=moments * INTERVAL_S)
        batch: list[PoolSnapshot] = []
        for index in range(moments * per_moment):
            moment, rest = divmod(index, per_moment)
            pool, instance = POOLS[rest % len(POOLS)], INSTANCES[rest // len(POOLS)]
            busy = rng.random()
            requests = int(busy * 120)
            errors = int(busy > 0.9) * rng.randint(1, 4)
            in_use = int(busy * 12)
            batch.append(
                PoolSnapshot(
                    taken_at=start + timedelta(seconds=moment * INTERVAL_S),
                    instance=instance,
                    pool=pool,
                    size=10,
                    in_use=min(in_use, 10) // 2,
                    available=10 - min(in_use, 10) // 2,
                    overflow_in_use=0,
                    waiting=0,
                    concurrency_limit=20 - int(busy > 0.95) * 6,
                    limit_reason="start",
                    deployment_in_flight=in_use,
                    deployment_waiting=0,
                    paused_s=0.0,
                    interval_s=INTERVAL_S,
                    requests=requests,
                    overflow_requests=max(0, requests - 100),
                    queued_requests=int(busy > 0.8) * 5,
                    errors=errors,
                    rate_limited=int(busy > 0.95),
                    pauses=int(busy > 0.95),
                    in_use_peak=in_use,
                    overflow_in_use_peak=max(0, in_use - 10),
                    waiting_peak=int(busy > 0.8) * 3,
                    deployment_waiting_peak=int(busy > 0.9),
                    wait_p95_ms=busy * 40,
                    latency_p95_ms=600 + busy * 900,
                    ttft_p95_ms=150 + busy * 300,
                    tokens_in=requests * 300,
                    tokens_out=requests * 120,
                    error_kinds=(
                        {rng.choice(("APIConnectionError", "DeadlineExceeded")): errors}
                        if errors
                        else {}
                    ),
                )
            )
            if len(batch) == 5000:
                PoolSnapshot.objects.bulk_create(batch)
                batch = []
        PoolSnapshot.objects.bulk_create(batch)
