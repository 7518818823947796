"""`manage.py pool_status`: the pools of a running server, or their history, as a table.

With `--cluster`, every instance of a Redis-coordinated cluster as it last reported itself
(one server's `/health?scope=cluster` answers for all), and the cluster's totals per pool.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Avg, Count, Max, Sum
from django.utils import timezone

from pools.engine.intervals import parse_duration
from pools.management.commands._server import add_server_arguments
from pools.models import PoolSnapshot

TEXT_KEYS = {"pool", "model"}
# A pool's slots and its counters since start, as both tables show them.
_SLOT_COLUMNS = (
    ("size", "total"),
    ("in use", "in_use"),
    ("free", "available"),
    ("overflow", "overflow_in_use"),
    ("waiting", "waiting"),
)
_COUNTER_COLUMNS = (
    ("requests", "requests_num"),
    ("overflowed", "requests_overflow"),
    ("queued", "requests_queued"),
    ("timeouts", "requests_timeouts"),
    ("errors", "requests_errors"),
    ("avg wait ms", "avg_wait_ms"),
    ("conns open", "connections_open"),
)
LIVE_COLUMNS = (("pool", "pool"), ("model", "model"), *_SLOT_COLUMNS, *_COUNTER_COLUMNS)
CLUSTER_COLUMNS = (
    ("pool", "pool"),
    ("model", "model"),
    ("instances", "instances"),
    *_SLOT_COLUMNS,
    ("cluster waiting", "cluster_waiting"),
    ("leases held", "leases_held"),
    *_COUNTER_COLUMNS,
)
# Summed over the instances for the cluster totals (the rest are per-instance settings).
SUMMED_KEYS = (
    "total",
    "in_use",
    "available",
    "overflow_in_use",
    "waiting",
    "cluster_waiting",
    "requests_num",
    "requests_overflow",
    "requests_queued",
    "requests_timeouts",
    "requests_errors",
    "requests_wait_ms",
    "connections_num",
    "connections_closed",
)
HISTORY_COLUMNS = (
    ("pool", "pool"),
    ("rows", "rows"),
    ("instances", "instances"),
    ("avg in use", "avg_in_use"),
    ("max in use", "max_in_use"),
    ("max overflow", "max_overflow_in_use"),
    ("max waiting", "max_waiting"),
    ("requests", "requests"),
    ("overflowed", "overflow_requests"),
    ("queued", "queued_requests"),
    ("errors", "errors"),
    ("refused", "refused"),
    ("worst p95 wait ms", "worst_wait_p95_ms"),
    ("max wait ms", "max_wait_ms"),
    ("worst p95 call ms", "worst_latency_p95_ms"),
    ("worst p95 ttft ms", "worst_ttft_p95_ms"),
    ("tokens in", "tokens_in"),
    ("tokens out", "tokens_out"),
)


def table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
    """A plain aligned text table: names left, numbers right, empty cells as '-'."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    cells = [[cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [
        max([len(title), *(len(line[i]) for line in cells)]) for i, (title, _) in enumerate(columns)
    ]

    numeric = [key not in TEXT_KEYS for _, key in columns]

    def line(values: list[str]) -> str:
        return "  ".join(
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ).rstrip()

    header = line([title for title, _ in columns])
    return "\n".join([header, "-" * len(header), *(line(values) for values in cells)])


def pool_rows(pools: dict[str, dict[str, Any]], only: list[str] | None) -> list[dict[str, Any]]:
    """One table row per pool of a stats dict, with the averages and open connections."""
    rows = []
    for name, stats in pools.items():
        if only and name not in only:
            continue
        requests = stats.get("requests_num", 0)
        avg_wait = stats.get("requests_wait_ms", 0) / requests if requests else None
        opened = stats.get("connections_num", 0) - stats.get("connections_closed", 0)
        rows.append({"pool": name, **stats, "avg_wait_ms": avg_wait, "connections_open": opened})
    return rows


def cluster_totals(
    instances: dict[str, dict[str, Any]], leases: dict[str, int], only: list[str] | None
) -> dict[str, dict[str, Any]]:
    """Per pool, the sums over every instance's last report, and the leases held now."""
    totals: dict[str, dict[str, Any]] = {}
    for report in instances.values():
        for name, stats in report.get("pools", {}).items():
            if only and name not in only:
                continue
            row = totals.setdefault(
                name,
                {"model": stats.get("model"), "instances": 0, **dict.fromkeys(SUMMED_KEYS, 0)},
            )
            row["instances"] += 1
            for key in SUMMED_KEYS:
                row[key] += stats.get(key) or 0
    for name, row in totals.items():
        row["leases_held"] = leases.get(name)
    return dict(sorted(totals.items()))


DESTINATIONS = {"otlp": "OTLP", "azure_monitor": "Azure Monitor"}


def telemetry_state(section: Any) -> str:
    """For the status line: "; telemetry on", "; telemetry off (why)", or nothing when
    /health gave no operator details."""
    if not isinstance(section, dict):
        return ""
    if section.get("enabled"):
        return "; telemetry on"
    return f"; telemetry off ({section.get('reason') or 'not configured'})"


def telemetry_lines(section: dict[str, Any] | None) -> list[str]:
    """/health's `telemetry` section (operators only), when on, as lines: where traces and
    metrics go, the Azure key as the server masked it, what became of the spans."""
    if not isinstance(section, dict) or not section.get("enabled"):
        return []
    lines = [
        f"Telemetry: on, service {section.get('service_name', '?')} "
        f"(instance {section.get('service_instance_id', '?')})"
    ]
    for signal in ("traces", "metrics"):
        where = section.get(signal)
        if isinstance(where, dict):
            targets = ", ".join(
                f"{DESTINATIONS.get(name, name)} {url}"
                for name, url in where.items()
                if name != "interval_s"
            )
            if "interval_s" in where:
                targets += f" (every {where['interval_s']:g} s)"
        else:
            targets = "off"
        lines.append(f"  {signal}: {targets}")
    azure = section.get("azure_monitor")
    if isinstance(azure, dict):
        lines.append(
            f"  Azure Monitor: ingestion endpoint {azure.get('ingestion_endpoint')}, "
            f"instrumentation key {azure.get('instrumentation_key')}"
        )
    spans = section.get("spans") or {}
    for name, counts in spans.items():
        if isinstance(counts, dict):
            lines.append(
                f"  spans to {DESTINATIONS.get(name, name)}: {counts.get('exported', 0)} "
                f"exported, {counts.get('failed', 0)} failed, {counts.get('dropped', 0)} "
                f"dropped (queue full), {counts.get('waiting', 0)} waiting "
                f"(at most {spans.get('queue_limit', '?')})"
            )
    for name, error in (section.get("errors") or {}).items():
        lines.append(f"  {name}: {error}")
    return lines


class Command(BaseCommand):
    help = (
        "Show the LLM pools as a table. By default the live numbers of a running server, read "
        "from its /health endpoint (slots in use, free, temporary connections, queued callers, "
        "counters since start), and whether telemetry is exported and where. With --history "
        "1h, what the saved snapshots say about that "
        "window instead (needs no running server, only the database). With --cluster, every "
        "instance of a Redis-coordinated cluster and the cluster's totals. Exit status: 0 healthy, "
        "1 server unreachable, 2 pools degraded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_server_arguments(parser)
        parser.add_argument(
            "--history",
            metavar="WINDOW",
            help="Summarise the saved snapshots of the last WINDOW instead, e.g. 15m, 1h, 7d.",
        )
        parser.add_argument(
            "--cluster",
            action="store_true",
            help="Every instance of the cluster (from /health?scope=cluster of --url, which "
            "needs REDIS_URL on the server): a table per instance as it last reported "
            "itself, then the cluster's totals per pool with the leases held now.",
        )
        parser.add_argument("--pool", action="append", help="Only this pool (repeatable).")
        parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["history"] and options["cluster"]:
            raise CommandError("--history and --cluster cannot be combined")
        if options["history"]:
            self._history(options)
        elif options["cluster"]:
            self._cluster(options)
        else:
            self._live(options)

    # -- live, from /health ---------------------------------------------------------------------
    def _fetch(self, options: dict[str, Any], query: str = "") -> dict[str, Any]:
        url = options["url"].rstrip("/") + "/health" + query
        try:
            response = httpx.get(url, timeout=options["timeout"])
            body = response.json()
        except httpx.HTTPError as exc:
            raise CommandError(
                f"cannot reach {url} ({type(exc).__name__}: {exc}); is the server running? "
                "Start it with `manage.py serve`, or point --url at it."
            ) from None
        except ValueError:
            raise CommandError(
                f"{url} answered HTTP {response.status_code} without the health JSON; "
                "is --url a Carlos server?"
            ) from None
        return body

    def _live(self, options: dict[str, Any]) -> None:
        body = self._fetch(options)
        rows = pool_rows(body.get("pools", {}), options["pool"])
        status = body.get("status", "unknown")
        if options["json"]:
            self.stdout.write(json.dumps({"url": options["url"], **body}, indent=2))
        else:
            endpoint = body.get("endpoint", {})
            self.stdout.write(
                f"Carlos at {options['url']}: {status}"
                + (f" ({body['reason']})" if body.get("reason") else "")
                + f"; LLM endpoint {endpoint.get('kind', '?')} {endpoint.get('url', '')}"
                + telemetry_state(body.get("telemetry"))
            )
            if body.get("warmup_error"):
                self.stdout.write(f"Warm-up error: {body['warmup_error']}")
            self.stdout.write(table(rows, LIVE_COLUMNS) if rows else "No pools.")
            for line in telemetry_lines(body.get("telemetry")):
                self.stdout.write(line)
        if status != "healthy":
            raise CommandError(
                f"the pools are {status}: {body.get('reason', 'see /health')}", returncode=2
            )

    # -- the whole cluster, from one server's /health?scope=cluster ------------------------------
    def _cluster(self, options: dict[str, Any]) -> None:
        body = self._fetch(options, "?scope=cluster")
        if "cluster_view" not in body:
            raise CommandError(
                f"{options['url']} shows no cluster: {body.get('error', 'no cluster_view')}"
            )
        view = body["cluster_view"]
        if "error" in view:
            raise CommandError(f"the cluster view is unavailable: {view['error']}", returncode=2)
        instances: dict[str, dict[str, Any]] = view.get("instances", {})
        totals = cluster_totals(instances, view.get("leases_held", {}), options["pool"])
        status = body.get("status", "unknown")
        answering = (body.get("cluster") or {}).get("instance", "?")
        if options["json"]:
            payload = {
                "url": options["url"],
                "status": status,
                "answered_by": answering,
                "instances": {
                    name: {
                        "at": report.get("at"),
                        "pools": {
                            pool: stats
                            for pool, stats in report.get("pools", {}).items()
                            if not options["pool"] or pool in options["pool"]
                        },
                    }
                    for name, report in instances.items()
                },
                "totals": totals,
                "leases_held": view.get("leases_held", {}),
            }
            self.stdout.write(json.dumps(payload, indent=2))
        else:
            self.stdout.write(
                f"Carlos cluster via {options['url']} ({answering}: {status}): "
                f"{len(instances)} live instance(s)"
            )
            now = time.time()
            for name, report in sorted(instances.items()):
                age = f", reported {now - report['at']:.1f} s ago" if report.get("at") else ""
                mark = " (answered this request)" if name == answering else ""
                self.stdout.write(f"\nInstance {name}{mark}{age}")
                rows = pool_rows(report.get("pools", {}), options["pool"])
                self.stdout.write(table(rows, LIVE_COLUMNS) if rows else "No pools.")
            self.stdout.write(
                "\nCluster totals (sums over the instances; leases held: cluster-wide, now)"
            )
            rows = pool_rows(totals, None)
            self.stdout.write(table(rows, CLUSTER_COLUMNS) if rows else "No pools.")
        if status != "healthy":
            raise CommandError(
                f"the pools are {status}: {body.get('reason', 'see /health')}", returncode=2
            )

    # -- history, from the snapshots -------------------------------------------------------------
    def _history(self, options: dict[str, Any]) -> None:
        try:
            window = parse_duration(options["history"])
        except ValueError as exc:
            raise CommandError(f"--history: {exc}") from None
        since = timezone.now() - window
        rows_qs = PoolSnapshot.objects.filter(taken_at__gte=since)
        if options["pool"]:
            rows_qs = rows_qs.filter(pool__in=options["pool"])
        summary = list(
            rows_qs.order_by()
            .values("pool")
            .annotate(
                rows=Count("id"),
                instances=Count("instance", distinct=True),
                avg_in_use=Avg("in_use"),
                max_in_use=Max("in_use"),
                max_overflow_in_use=Max("overflow_in_use"),
                max_waiting=Max("waiting"),
                requests=Sum("requests"),
                overflow_requests=Sum("overflow_requests"),
                queued_requests=Sum("queued_requests"),
                errors=Sum("errors"),
                refused=Sum("refused"),
                worst_wait_p95_ms=Max("wait_p95_ms"),
                max_wait_ms=Max("wait_max_ms"),
                worst_latency_p95_ms=Max("latency_p95_ms"),
                worst_ttft_p95_ms=Max("ttft_p95_ms"),
                tokens_in=Sum("tokens_in"),
                tokens_out=Sum("tokens_out"),
            )
            .order_by("pool")
        )
        if options["json"]:
            payload = {"since": since.isoformat(), "window": options["history"], "pools": summary}
            self.stdout.write(json.dumps(payload, indent=2))
            return
        self.stdout.write(
            f"Pool history since {timezone.localtime(since):%Y-%m-%d %H:%M:%S %Z} "
            f"(last {options['history']}):"
        )
        self.stdout.write(
            table(summary, HISTORY_COLUMNS) if summary else "No snapshots in that window."
        )
