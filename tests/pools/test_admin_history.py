"""Pool history that shows what happened: a burst between two snapshots, the metric chooser,
the chart's text alternative, and the last hour on the admin index."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.models import QuerySet
from django.test import Client
from django.utils import timezone

from pools.chart_data import chart_data
from pools.charts import METRICS
from pools.models import PoolSnapshot
from pools.sampler import SnapshotSampler
from tests.helpers.services import needs_postgres, throwaway_database
from tests.helpers.snapshots import snap
from tests.servers import child_env, manage

HELLO = [{"role": "user", "content": "hello"}]
LIST = "/admin/pools/poolsnapshot/"
CHART = "/admin/pools/poolsnapshot/chart.svg"


def figure(html: str, pool: str, series: str) -> list[str]:
    """The text-alternative table's cells of one series of one pool, in time order."""
    table = re.search(rf'<table class="pool-figures" data-pool="{pool}".*?</table>', html, re.S)
    assert table, f"no table of figures for {pool}"
    return re.findall(rf'<td data-series="{series}"[^>]*>([^<]*)<', table[0])


def superuser_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-ops-123"))
    return client


@pytest.mark.django_db(transaction=True)
async def test_a_busy_minute_between_two_snapshots_shows_its_peak_and_its_requests(
    make_registry, simulator
):
    # main: 2 slots and 2 temporary connections; 7 calls at once, so 3 of them queue.
    registry = make_registry(simulator, pools={"main": {"size": 2, "max_overflow": 2}, "mini": {}})
    await registry.initialize()
    simulator.config.ttft_ms = 40

    async def call() -> None:
        async with registry.get_main_llm() as llm:
            await llm.ainvoke(HELLO)

    sampler = SnapshotSampler(registry, interval_s=60, instance="busy:1")
    sampler.start()
    try:
        quiet = {row.pool: row for row in await sampler.snapshot_once()}
        await asyncio.gather(*(call() for _ in range(7)))  # the whole burst between two rows
        busy = {row.pool: row for row in await sampler.snapshot_once()}
    finally:
        await sampler.stop(flush=False)

    assert quiet["main"].requests == 0
    main = busy["main"]
    # The moment the row is taken is idle: an instant's sample alone would show a flat 0.
    assert (main.in_use, main.overflow_in_use, main.waiting) == (0, 0, 0)
    # The interval's peaks and its calls.
    assert main.waiting_peak == 3
    assert main.in_use_peak == 4
    assert main.overflow_in_use_peak == 2
    assert (main.requests, main.queued_requests) == (7, 3)
    assert main.overflow_requests >= 2
    assert main.tokens_out > 0 and main.latency_p95_ms >= 40

    client = await sync_to_async(superuser_client)()
    page = await sync_to_async(client.get)(LIST, {"pool": "main", "metric": "peaks"})
    html = page.content.decode()
    # The two rows may share a time bucket (they are a moment apart here): the busy row's
    # peaks are in the chart's text alternative either way, as the bucket's highest.
    assert figure(html, "main", "in_use")[-1] == "4"
    assert figure(html, "main", "overflow")[-1] == "2"
    assert figure(html, "main", "waiting")[-1] == "3"
    assert "in use (peak): highest 4; overflow (peak): highest 2; waiting (peak): highest 3" in html
    svg = (await sync_to_async(client.get)(CHART, {"pool": "main", "metric": "peaks"})).content
    assert "in use (peak): highest 4" in svg.decode()
    assert re.search(r'<polyline data-series="in_use"|<circle data-series="in_use"', svg.decode())

    page = await sync_to_async(client.get)(LIST, {"pool": "main", "metric": "requests"})
    html = page.content.decode()
    assert sum(int(cell.split()[0]) for cell in figure(html, "main", "requests")) == 7
    assert "7 requests, up to " in html
    assert "3 queued first" in html


# -- the metric chooser ------------------------------------------------------------------------
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def busy_history(db) -> None:
    """main on two instances over a minute, with errors of two kinds, 429s, pauses and
    tokens; mini idle."""
    rows = []
    for i in range(3):
        at = T0 + timedelta(seconds=30 * i)
        for instance, share in (("web-1:1", 1), ("web-2:2", 2)):
            rows.append(
                snap(
                    "main",
                    at,
                    0,
                    instance=instance,
                    in_use_peak=4 * share,
                    overflow_in_use_peak=share,
                    waiting_peak=share + i,
                    concurrency_limit=20 - i,
                    deployment_in_flight=share,
                    interval_s=30,
                    requests=10 * share,
                    queued_requests=share,
                    errors=2 * share,
                    refused=1,
                    rate_limited=share,
                    pauses=1,
                    tokens_in=100 * share,
                    tokens_out=50 * share,
                    wait_p95_ms=5.0 * share,
                    wait_max_ms=9.0 * share,
                    latency_p95_ms=400.0 * share,
                    ttft_p95_ms=120.0 * share,
                    error_kinds={
                        "APIConnectionError": share,
                        "RateLimited": share,
                        "PoolTimeout": 1,
                    },
                )
            )
        rows.append(snap("mini", at, 0, interval_s=30))
    PoolSnapshot.objects.bulk_create(rows)


@pytest.fixture
def staff(db) -> Client:
    return superuser_client()


@pytest.mark.parametrize("metric", list(METRICS))
def test_every_metric_draws_a_chart_with_its_figures_as_text(staff, busy_history, metric):
    page = staff.get(LIST, {"metric": metric})
    assert page.status_code == 200
    html = page.content.decode()
    assert f'data-metric="{metric}"' in html
    assert html.count('<table class="pool-figures"') == 2  # main and mini
    assert 'aria-describedby="pool-chart-desc"' in html and '<desc id="pool-chart-desc">' in html
    svg = staff.get(CHART, {"metric": metric, "pool": "main"})
    assert svg.status_code == 200 and svg["Content-Type"].startswith("image/svg+xml")
    assert "<script" not in svg.content.decode()


def test_the_metrics_show_the_intervals_figures(staff, busy_history):
    def page(metric: str, **params: str) -> str:
        return staff.get(LIST, {"metric": metric, "pool": "main", **params}).content.decode()

    # Summed over the two instances per 30-second bucket: 4 + 8 in use at the peak, ...
    html = page("peaks")
    assert figure(html, "main", "in_use") == ["12", "12", "12"]
    assert figure(html, "main", "overflow") == ["3", "3", "3"]
    assert figure(html, "main", "waiting") == ["3", "5", "7"]
    # 10 + 20 requests in each 30 s row: 60 a minute.
    html = page("requests")
    assert figure(html, "main", "requests") == ["30 (60 a minute)"] * 3
    assert "90 requests, up to 60 a minute" in html
    html = page("rate_limits")
    assert figure(html, "main", "rate_limited") == ["3 (6 a minute)"] * 3
    assert figure(html, "main", "pauses") == ["2 (4 a minute)"] * 3
    assert figure(page("wait"), "main", "wait_p95") == ["10 ms"] * 3  # the worst instance
    assert figure(page("latency"), "main", "latency_p95") == ["800 ms"] * 3
    assert figure(page("ttft"), "main", "ttft_p95") == ["240 ms"] * 3
    assert figure(page("tokens"), "main", "tokens_out") == ["150 (300 a minute)"] * 3
    html = page("limit")
    assert figure(html, "main", "limit") == ["40", "38", "36"]  # each instance's, summed
    assert "limit: lowest 36" in html


def test_errors_are_drawn_by_kind(staff, busy_history):
    html = staff.get(LIST, {"metric": "errors", "pool": "main"}).content.decode()
    # The kinds ordered by how often they came: 9 connection errors, 9 429s, 6 timeouts.
    table = re.search(r'<table class="pool-figures" data-pool="main".*?</table>', html, re.S)[0]
    assert re.findall(r'<th scope="col">([^<]*)</th>', table)[1:] == [
        "APIConnectionError",
        "RateLimited",
        "PoolTimeout",
    ]
    assert figure(html, "main", "kind-0") == ["3 (6 a minute)"] * 3
    assert figure(html, "main", "kind-2") == ["2 (4 a minute)"] * 3
    assert "9 APIConnectionError, up to 6 a minute" in html
    assert 'data-series="kind-1"' in html  # a line per kind


def test_per_instance_draws_a_panel_per_pool_and_instance(staff, busy_history):
    html = staff.get(LIST, {"metric": "peaks", "per": "instance", "pool": "main"}).content.decode()
    assert html.count('data-panel="peaks"') == 2
    assert 'data-instance="web-1:1"' in html and 'data-instance="web-2:2"' in html
    assert "main @ web-2:2" in html
    web_2 = re.search(
        r'<table class="pool-figures" data-pool="main" data-instance="web-2:2".*?</table>',
        html,
        re.S,
    )
    assert web_2 and re.findall(r'<td data-series="in_use">([^<]*)<', web_2[0]) == ["8"] * 3


def test_the_chooser_keeps_the_filters_and_the_filters_keep_the_metric(staff, busy_history):
    html = staff.get(LIST, {"metric": "tokens", "pool": "main"}).content.decode()
    chooser = re.search(r'<nav class="pool-chart-metrics".*?</nav>', html, re.S)[0]
    assert '<a href="?metric=requests&amp;pool=main">Requests</a>' in chooser
    assert 'href="?metric=tokens&amp;pool=main" aria-current="true"' in chooser
    # The pool filter's links keep the metric; it is never taken for a filter.
    assert 'href="?metric=tokens&amp;pool=mini"' in html
    assert "main: 90 requests, 18 errors, 6 refused, 9 429s, 6 pauses, 1350 tokens" in html


@pytest.mark.parametrize("url", [LIST, CHART])
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"metric": "bogus"}, "unknown chart metric 'bogus'; choose one of overview, peaks"),
        ({"metric": "<script>"}, "unknown chart metric"),
        ({"per": "host"}, "unknown chart grouping per='host'; choose pool or instance"),
    ],
)
def test_an_unknown_metric_is_a_clear_400(staff, busy_history, url, params, message):
    response = staff.get(url, params)
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/plain")
    assert message in response.content.decode()


def test_the_period_filter_moves_with_the_clock(staff, db):
    now = timezone.now()
    PoolSnapshot.objects.bulk_create(
        [
            snap("main", now - timedelta(minutes=10), 3, requests=5, interval_s=30),
            snap("main", now - timedelta(hours=3), 9, requests=50, interval_s=30),
        ]
    )
    html = staff.get(LIST, {"within": "1h", "metric": "requests"}).content.decode()
    assert "main: 5 requests" in html
    html = staff.get(LIST, {"within": "6h", "metric": "requests"}).content.decode()
    assert "main: 55 requests" in html
    # A fixed range in the address works too.
    since = (now - timedelta(hours=4)).isoformat()
    until = (now - timedelta(hours=1)).isoformat()
    html = staff.get(LIST, {"taken_at__gte": since, "taken_at__lt": until}).content.decode()
    assert "main: 50 requests" in html
    # A period that is not one: the list's usual "?e=1", the chart a 400; never a 500.
    assert staff.get(LIST, {"within": "soon"}).status_code == 302
    assert staff.get(CHART, {"within": "soon"}).status_code == 400


# -- the admin index ----------------------------------------------------------------------------
@pytest.fixture
def last_hour(db) -> None:
    now = timezone.now()
    PoolSnapshot.objects.bulk_create(
        [
            snap("main", now - timedelta(minutes=20), 0, in_use_peak=7, requests=42, interval_s=30),
            snap("mini", now - timedelta(minutes=20), 0, in_use_peak=1, interval_s=30),
            snap("main", now - timedelta(hours=2), 0, in_use_peak=9, requests=500, interval_s=30),
        ]
    )


def test_staff_see_the_last_hour_on_the_admin_index(staff, last_hour):
    html = staff.get("/admin/").content.decode()
    module = re.search(
        r'<div class="module pool-history" id="pool-history-last-hour">.*?</details>', html, re.S
    )
    assert module, "no pool history on the admin index"
    assert "Pools, last hour" in module[0]
    assert 'data-pool="main"' in module[0] and 'data-pool="mini"' in module[0]
    assert "main: 42 requests" in module[0]  # the row from two hours ago is not in it
    assert figure(module[0], "main", "in_use") == ["7"]
    assert '<a href="/admin/pools/poolsnapshot/?within=1h">' in html
    assert html.index("pool-history-last-hour") < html.index('id="content-main"')


def test_the_admin_index_shows_no_pools_without_the_view_permission(client, last_hour):
    user = User.objects.create_user("clerk", password="pw-clerk-123", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_design"))
    client.force_login(user)
    html = client.get("/admin/").content.decode()
    assert client.get("/admin/").status_code == 200
    assert "pool-history" not in html and "Pools, last hour" not in html
    user.user_permissions.add(Permission.objects.get(codename="view_poolsnapshot"))
    assert "Pools, last hour" in client.get("/admin/").content.decode()


def test_the_admin_index_is_not_for_users_who_are_not_staff(client, last_hour):
    client.force_login(User.objects.create_user("visitor", password="pw-visitor-123"))
    response = client.get("/admin/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    response = client.get("/admin/", follow=True)
    assert "Pools, last hour" not in response.content.decode()


def test_the_admin_index_without_snapshots_says_so(staff):
    html = staff.get("/admin/").content.decode()
    assert "Pools, last hour" in html and "No snapshots in this range." in html


# -- the migration ------------------------------------------------------------------------------
def test_the_models_and_the_migrations_agree(db):
    call_command("makemigrations", "pools", "--check", "--dry-run", verbosity=0)


@pytest.mark.django_db(transaction=True)
def test_the_peaks_migration_keeps_older_rows_with_empty_new_figures():
    executor = MigrationExecutor(connection)
    before, after = (
        [("pools", "0002_poolsnapshot_concurrency_and_peaks")],
        [("pools", "0003_poolsnapshot_overflow_peak_and_pauses")],
    )
    try:
        executor.migrate(before)
        old = executor.loader.project_state(before).apps.get_model("pools", "PoolSnapshot")
        old.objects.create(
            taken_at=T0,
            instance="old:1",
            pool="main",
            size=10,
            in_use=3,
            available=7,
            overflow_in_use=0,
            waiting=0,
            in_use_peak=5,
        )
        executor = MigrationExecutor(connection)
        executor.migrate(after)
        row = PoolSnapshot.objects.get(instance="old:1")
        assert (row.in_use_peak, row.overflow_in_use_peak, row.pauses) == (5, None, None)
        # Such rows chart their moment where the new peak is missing.
        data = chart_data(PoolSnapshot.objects.all())
        assert data.pools["main"][0].overflow_peak == 0
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes("pools"))


# -- the date drill-down at any size ---------------------------------------------------------
@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/Sao_Paulo"])
def test_the_date_drill_down_finds_the_periods_django_would(db, zone):
    moments = ["2025-12-31T23:30", "2026-01-01T00:10", "2026-01-03T12:00", "2026-03-29T01:30"]
    PoolSnapshot.objects.bulk_create(
        [snap("main", datetime.fromisoformat(at).replace(tzinfo=UTC), 1) for at in moments]
    )
    rows = PoolSnapshot.objects.all()
    with timezone.override(zone):
        for kind, scope in (("year", {}), ("month", {"taken_at__year": 2026})):
            for order in ("ASC", "DESC"):
                probed = list(rows.filter(**scope).datetimes("taken_at", kind, order))
                truncated = list(QuerySet.datetimes(rows.filter(**scope), "taken_at", kind, order))
                assert probed == truncated, (kind, order)
        month = rows.filter(taken_at__year=2026, taken_at__month=1)
        assert list(month.datetimes("taken_at", "day")) == list(
            QuerySet.datetimes(month, "taken_at", "day")
        )
    assert list(rows.filter(pool="ronei").datetimes("taken_at", "year")) == []


def test_the_list_drills_down_by_date(staff, busy_history):
    html = staff.get(LIST).content.decode()
    assert 'href="?taken_at__day=1&amp;taken_at__month=1&amp;taken_at__year=2026"' in html
    html = staff.get(LIST, {"taken_at__year": "2026", "taken_at__month": "1", "taken_at__day": "1"})
    assert "main: 90 requests" in html.content.decode()


# -- the same figures on PostgreSQL --------------------------------------------------------------
# main on two instances, 30 s apart, with errors of two kinds; every metric, cluster and per
# instance, through the admin in a child process on a throwaway PostgreSQL database.
ON_POSTGRES = """
import json
from datetime import UTC, datetime, timedelta
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import setup_test_environment
from pools.chart_data import chart_data
from pools.charts import METRICS
from pools.models import PoolSnapshot

t0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
PoolSnapshot.objects.bulk_create([
    PoolSnapshot(taken_at=t0 + timedelta(seconds=30 * i), instance=instance, pool="main",
                 size=10, in_use=0, available=10, overflow_in_use=0, waiting=0,
                 in_use_peak=4 * share, overflow_in_use_peak=share, interval_s=30,
                 requests=10 * share, errors=2 * share, refused=1, pauses=1,
                 error_kinds={"APIConnectionError": share, "RateLimited": share, "PoolTimeout": 1})
    for i in range(3) for instance, share in (("web-1:1", 1), ("web-2:2", 2))
])
setup_test_environment()
client = Client()
client.force_login(User.objects.create_superuser("pg", "pg@example.com", "pw-pg-123"))
pages = {
    f"{metric}/{per}": client.get("/admin/pools/poolsnapshot/",
                                  {"metric": metric, "per": per}).status_code
    for metric in METRICS for per in ("pool", "instance")
}
kinds = chart_data(PoolSnapshot.objects.all(), error_kinds=True)
per_instance = chart_data(PoolSnapshot.objects.all(), per_instance=True, error_kinds=True)
first = kinds.pools["main"][0]
print(json.dumps({
    "vendor": connection.vendor,
    "pages": pages,
    "kinds": list(kinds.error_kinds),
    "by_kind": {kind: list(figures) for kind, figures in first.errors_by_kind.items()},
    "bucket": [first.in_use_peak, first.overflow_peak, first.requests, first.requests_per_min,
               first.pauses, first.pauses_per_min],
    "groups": sorted(per_instance.pools),
    "web_2": per_instance.pools["main @ web-2:2"][0].errors_by_kind["RateLimited"],
}))
"""


@needs_postgres()
def test_every_metric_on_postgres():
    with throwaway_database() as url:
        env = child_env(url, POOL_SNAPSHOT_INTERVAL="0")
        manage(env, "migrate", "--verbosity", "0")
        output = manage(env, "shell", "--no-imports", "-c", ON_POSTGRES).stdout
    result = json.loads(output.strip().splitlines()[-1])
    assert result["vendor"] == "postgresql"
    assert set(result["pages"].values()) == {200}
    assert result["kinds"] == ["APIConnectionError", "RateLimited", "PoolTimeout"]
    # The first 30-second bucket: web-1 and web-2 summed; 30 s of rows each, so a minute's
    # rate is twice the count.
    assert result["by_kind"] == {
        "APIConnectionError": [3, 6.0],
        "RateLimited": [3, 6.0],
        "PoolTimeout": [2, 4.0],
    }
    assert result["bucket"] == [12.0, 3.0, 30, 60.0, 2, 4.0]
    assert result["groups"] == ["main @ web-1:1", "main @ web-2:2"]
    assert result["web_2"] == [2, 4.0]
