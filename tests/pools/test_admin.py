"""The admin: pool history with its server-drawn chart, designs and agent runs, staff only."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from agents.models import AgentRun, Design
from pools.admin import MAX_POINTS, chart_data
from pools.engine.adaptive import Outcome
from pools.models import PoolSnapshot
from pools.sampler import SnapshotSampler
from tests.helpers.snapshots import snap

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
LIST = "/admin/pools/poolsnapshot/"
CHART = "/admin/pools/poolsnapshot/chart.svg"


@pytest.fixture
def known_snapshots(db) -> None:
    PoolSnapshot.objects.bulk_create(
        [
            snap("main", T0, 2),
            snap("main", T0 + timedelta(seconds=10), 4),
            snap("main", T0 + timedelta(seconds=20), 12, waiting=3, instance="web-2:7"),
            snap("mini", T0 + timedelta(seconds=10), 1, size=5),
        ]
    )


@pytest.fixture
def staff(db) -> Client:
    user = User.objects.create_superuser("boss", "boss@example.com", "pw-boss-123")
    client = Client()
    client.force_login(user)
    return client


def panel_of(svg: str, pool: str, kind: str = "slots") -> str:
    panel = re.search(
        rf'<g class="pool-panel" data-pool="{pool}" data-y-max="\d+" data-panel="{kind}".*?</g>',
        svg,
        re.S,
    )
    assert panel, f"no {kind} panel for {pool}"
    return panel[0]


def polyline(svg: str, pool: str, series: str, kind: str = "slots") -> str:
    lines = polylines(svg, pool, series, kind)
    assert lines, f"no {series} line for {pool}"
    return lines[0]


def polylines(svg: str, pool: str, series: str, kind: str = "slots") -> list[str]:
    """Every segment of a series (a line breaks where its figure is missing)."""
    panel = panel_of(svg, pool, kind)
    return re.findall(rf'<polyline data-series="{series}"[^>]* points="([^"]*)"', panel)


# -- the chart ----------------------------------------------------------------------------------
def test_chart_svg_for_known_snapshots(staff, known_snapshots):
    response = staff.get(CHART)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("image/svg+xml")
    svg = response.content.decode()
    assert svg.startswith('<?xml version="1.0" encoding="utf-8"?>\n<svg xmlns=')
    # x: 44 (start, 12:00:00) .. 748 (end, 12:00:20); main's y axis tops at 20 (12 in use).
    # y(v) = 12 + 142 - v / 20 * 142
    assert 'data-pool="main" data-y-max="20" data-panel="slots"' in svg
    # Rows without peaks (from before they were kept) draw their moment.
    assert polyline(svg, "main", "in_use") == "44.0,139.8 396.0,125.6 748.0,68.8"
    assert polyline(svg, "main", "waiting") == "44.0,154.0 396.0,154.0 748.0,132.7"
    assert polyline(svg, "main", "size") == "44.0,83.0 396.0,83.0 748.0,83.0"
    # No limit, no deployment queue, no intervals in these rows: those lines are left out.
    for series in ("limit", "deployment_waiting"):
        assert polylines(svg, "main", series) == []
    assert polylines(svg, "main", "requests", "calls") == []
    assert polylines(svg, "main", "latency_p95", "times") == []
    # mini: one snapshot in the middle of the range, y axis to 5; a lone point gets a dot.
    assert polyline(svg, "mini", "in_use") == "396.0,125.6"
    assert '<circle data-series="in_use" cx="396.0" cy="125.6"' in svg
    assert "2026-01-01 12:00:00" in svg and "2026-01-01 12:00:20" in svg
    assert "<script" not in svg


def test_chart_follows_the_list_filters(staff, known_snapshots):
    svg = staff.get(CHART, {"pool": "main"}).content.decode()
    assert 'data-pool="main"' in svg and 'data-pool="mini"' not in svg
    svg = staff.get(CHART, {"instance": "web-2:7"}).content.decode()
    # One snapshot left: main alone, drawn at the centre as a dot.
    assert polyline(svg, "main", "in_use") == "396.0,68.8"
    svg = staff.get(CHART, {"taken_at__year": "2025"}).content.decode()
    assert "No snapshots in this range." in svg
    assert staff.get(CHART, {"no_such_field": "1"}).status_code == 400


def test_list_page_shows_the_chart_above_the_rows(staff, known_snapshots):
    response = staff.get(LIST, {"pool": "main"})
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="pool-history-chart"' in html
    assert html.index('class="pool-chart"') < html.index('id="result_list"')
    assert polyline(html, "main", "in_use") == "44.0,139.8 396.0,125.6 748.0,68.8"
    assert 'data-pool="mini"' not in html
    assert "web-2:7" in html  # the instance filter lists the instances


@pytest.fixture
def limited_snapshots(db) -> None:
    """main over 20 s: its deployment's limit cut from 100 to 70 to 7 by 429s, its queues and
    calls between the rows."""
    # One column per row, 10 s apart; None: not recorded.
    columns = {
        "in_use": (2, 4, 1),
        "in_use_peak": (6, 9, 5),
        "waiting_peak": (3, None, None),
        "concurrency_limit": (100, 70, 7),
        "limit_reason": ("start", "429", "429"),
        "deployment_waiting": (0, 2, None),
        "deployment_waiting_peak": (0, 4, 1),
        "paused_s": (None, None, 2.5),
        "interval_s": (None, 10, 10),  # the instance's first row: left out of the rates
        "requests": (5, 20, 10),
        "errors": (0, 1, 0),
        "rate_limited": (None, 3, 1),
        "wait_p95_ms": (None, 12, None),
        "latency_p95_ms": (None, 800, 1500),
        "ttft_p95_ms": (None, 300, None),
    }
    rows = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    PoolSnapshot.objects.bulk_create(
        [snap("main", T0 + timedelta(seconds=10 * i), **row) for i, row in enumerate(rows)]
    )


def test_chart_shows_the_limit_the_queues_and_the_calls(staff, limited_snapshots):
    svg = staff.get(CHART).content.decode()
    # Slots: y to 10 (size 10, 9 in use at the peak). y(v) = 12 + 142 - v / 10 * 142.
    assert 'data-pool="main" data-y-max="10" data-panel="slots"' in svg
    assert polyline(svg, "main", "in_use") == "44.0,68.8 396.0,26.2 748.0,83.0"  # the peaks
    assert polyline(svg, "main", "waiting") == "44.0,111.4 396.0,154.0 748.0,154.0"
    assert polyline(svg, "main", "deployment_waiting") == "44.0,154.0 396.0,97.2 748.0,139.8"
    # The limit is the deployment's: above the pool's scale it runs along the top edge.
    assert polyline(svg, "main", "limit") == "44.0,12.0 396.0,12.0 748.0,54.6"
    assert "limit 7 (429)" in svg and "9 in use at peak" not in svg  # the last row's figures
    assert "size 10, last: 5 in use at peak, 0 waiting, limit 7 (429)" in svg

    # Calls per minute, from the rows' intervals (the first row has none): 20 and 10 requests
    # in 10 s. y to 200 on a plot of 80 from y=12, x from 44 to 368.
    assert 'data-pool="main" data-y-max="200" data-panel="calls"' in svg
    assert polyline(svg, "main", "requests", "calls") == "206.0,44.0 368.0,68.0"
    assert polyline(svg, "main", "rate_limited", "calls") == "206.0,84.8 368.0,89.6"
    assert polylines(svg, "main", "errors", "calls") == ["206.0,89.6 368.0,92.0"]
    # p95 times in ms: y to 2000; the lone wait and first-token figures are dots.
    assert 'data-pool="main" data-y-max="2000" data-panel="times"' in svg
    assert polyline(svg, "main", "latency_p95", "times") == "206.0,60.0 368.0,32.0"
    times = panel_of(svg, "main", "times")
    assert '<circle data-series="wait_p95" cx="206.0" cy="91.5"' in times
    assert '<circle data-series="ttft_p95" cx="206.0" cy="80.0"' in times


def test_list_shows_the_limit_and_why(staff, limited_snapshots):
    html = staff.get(LIST).content.decode()
    for header in ("Concurrency limit", "Limit reason", "Deployment waiting peak", "Rate limited"):
        assert header in html
    row = re.search(r'<tr>.*?<td class="field-limit_reason">(.*?)</td>', html, re.S)
    assert row and row[1] == "429"  # the newest row first
    assert '<td class="field-concurrency_limit">7</td>' in html
    assert '<td class="field-concurrency_limit">100</td>' in html
    assert '<td class="field-rate_limited">3</td>' in html
    assert '<td class="field-in_use_peak">9</td>' in html


@pytest.mark.django_db(transaction=True)
async def test_a_limit_the_registry_learned_shows_in_the_admin(make_registry, simulator):
    registry = make_registry(simulator)
    await registry.initialize()
    # The deployment of main and ronei answers an attempt with a 429: its limit comes down.
    limiter = registry.limiters["gpt-4o"]
    ceiling = limiter.limit
    limiter.release(await limiter.acquire(time.monotonic(), 5), Outcome.DROP)
    assert limiter.limit < ceiling
    rows = await SnapshotSampler(registry, interval_s=60, instance="web-9:1").snapshot_once()
    assert {row.pool: row.concurrency_limit for row in rows} == {
        "main": limiter.limit,
        "ronei": limiter.limit,
        "mini": registry.limiters["gpt-4o-mini"].limit,
    }

    def pages() -> tuple[str, str]:
        client = Client()
        client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-ops-123"))
        return (
            client.get(LIST, {"pool": "main"}).content.decode(),
            client.get(CHART, {"pool": "main"}).content.decode(),
        )

    html, svg = await sync_to_async(pages)()
    assert f'<td class="field-concurrency_limit">{limiter.limit}</td>' in html
    assert '<td class="field-limit_reason">429</td>' in html
    assert f"limit {limiter.limit} (429)" in svg
    assert len(polyline(svg, "main", "limit").split()) == 1  # one row: one point, a dot
    assert '<circle data-series="limit"' in svg


@pytest.mark.django_db
def test_chart_aggregates_in_buckets_capped_per_pool():
    # 1,000 snapshots a second apart alternating 0 / 2 in use: 5-second buckets average
    # them, so at most MAX_POINTS points, each near the middle value.
    PoolSnapshot.objects.bulk_create(
        [snap("main", T0 + timedelta(seconds=i), 2 * (i % 2)) for i in range(1000)]
    )
    data = chart_data(PoolSnapshot.objects.all())
    assert data.bucket_seconds == 5
    buckets = data.pools["main"]
    assert len(buckets) == MAX_POINTS
    assert [b.rows for b in buckets] == [5] * MAX_POINTS
    assert buckets[0].in_use == pytest.approx(0.8)  # seconds 0..4: 0 2 0 2 0
    assert buckets[1].in_use == pytest.approx(1.2)  # seconds 5..9: 2 0 2 0 2
    assert buckets[1].at == T0 + timedelta(seconds=5)


# -- permissions ---------------------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize("url", [LIST, CHART, "/admin/agents/design/", "/admin/agents/agentrun/"])
def test_anonymous_is_sent_to_the_login_page(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=")


@pytest.mark.django_db
@pytest.mark.parametrize("url", [LIST, CHART, "/admin/agents/design/"])
def test_a_user_who_is_not_staff_is_refused(client, url):
    client.force_login(User.objects.create_user("alice", password="pw-alice-123"))
    response = client.get(url)
    assert response.status_code == 302  # the admin treats non-staff as not logged in
    assert response["Location"].startswith("/admin/login/")
    page = client.get(response["Location"])
    assert "You are authenticated as alice, but are not authorized" in page.content.decode()


@pytest.mark.django_db
def test_staff_needs_the_view_permission(client, known_snapshots):
    clerk = User.objects.create_user("clerk", password="pw-clerk-123", is_staff=True)
    client.force_login(clerk)
    assert client.get(LIST).status_code == 403
    assert client.get(CHART).status_code == 403
    clerk.user_permissions.add(Permission.objects.get(codename="view_poolsnapshot"))
    clerk = User.objects.get(pk=clerk.pk)  # drop the cached permissions
    client.force_login(clerk)
    assert client.get(LIST).status_code == 200
    assert client.get(CHART).status_code == 200


def test_snapshots_are_read_only(staff, known_snapshots):
    row = PoolSnapshot.objects.first()
    assert staff.get(f"{LIST}add/").status_code == 403
    assert staff.get(f"{LIST}{row.pk}/delete/").status_code == 403
    detail = staff.get(f"{LIST}{row.pk}/change/")
    assert detail.status_code == 200
    assert 'type="submit" value="Save"' not in detail.content.decode()
    assert staff.post(f"{LIST}{row.pk}/change/", {"in_use": 0}).status_code == 403


# -- designs and agent runs ------------------------------------------------------------------
@pytest.fixture
def design(db) -> Design:
    owner = User.objects.create_user("owner", password="pw-owner-123")
    design = Design.objects.create(
        owner=owner,
        request_text="A web shop for 10k users\nwith a database",
        status=Design.Status.SUCCEEDED,
        verdict="APPROVED",
        recommendation="CARLOS",
        attempts=1,
    )
    now = timezone.now()
    for agent, pool, overflow in (
        ("requirements", "mini", False),
        ("carlos", "main", False),
        ("ronei", "ronei", True),
    ):
        AgentRun.objects.create(
            design=design,
            agent=agent,
            pool=pool,
            model="gpt-4o",
            status=AgentRun.Status.SUCCEEDED,
            started_at=now,
            finished_at=now + timedelta(seconds=2),
            wait_ms=1.5,
            ttft_ms=120.0,
            overflow=overflow,
            tokens_in=100,
            tokens_out=50,
        )
    return design


def test_design_admin_lists_filters_and_shows_runs_inline(staff, design):
    response = staff.get("/admin/agents/design/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "A web shop for 10k users" in html
    for parameter in ("status__exact=succeeded", "runs__pool=ronei", "runs__overflow__exact=1"):
        assert parameter in html  # the filters are offered
    assert (
        "A web shop"
        in staff.get("/admin/agents/design/", {"runs__overflow__exact": "1"}).content.decode()
    )
    assert (
        "A web shop"
        not in staff.get("/admin/agents/design/", {"status__exact": "failed"}).content.decode()
    )

    detail = staff.get(f"/admin/agents/design/{design.pk}/change/").content.decode()
    assert "Agent runs" in detail
    assert detail.count("/admin/agents/agentrun/") >= 3  # each inline run links to itself
    assert 'type="submit" value="Save"' not in detail
    assert staff.get("/admin/agents/design/add/").status_code == 403


def test_agent_run_admin_filters(staff, design):
    html = staff.get("/admin/agents/agentrun/").content.decode()
    for parameter in ("status__exact=", "agent__exact=ronei", "pool=mini", "overflow__exact=1"):
        assert parameter in html
    overflowed = staff.get("/admin/agents/agentrun/", {"overflow__exact": "1"})
    assert overflowed.status_code == 200
    assert "1 agent run" in overflowed.content.decode()
    main_only = staff.get("/admin/agents/agentrun/", {"pool": "main"}).content.decode()
    assert "1 agent run" in main_only and ">2000<" in main_only  # duration ms column
    assert staff.get("/admin/agents/agentrun/add/").status_code == 403


# -- filters from the query string never answer 500 ------------------------------------------
# Each of these answered 500 (with SQLite, PostgreSQL or both): a regular expression that does
# not compile, a NUL character, a year or an integer out of range. The rest are the bad input
# Django already refused; they must stay refused.
SNAPSHOT_FILTERS = [
    "pool__regex=(",
    "instance__iregex=[",
    "pool__regex=(?P<",
    "pool=%00",
    "pool__contains=a%00b",
    "instance__in=%00",
    "size__in=99999999999999999999,1",
    "taken_at__iso_year=99999",
    "taken_at__year__gt=99999",
    "no_such_field=1",
    "taken_at__gte=not-a-date",
    "taken_at__year=99999",
    "taken_at__day=40&taken_at__month=2&taken_at__year=2026",
    "id__in=a,b",
    "p=abc",
    "o=zz",
]
DESIGN_FILTERS = [
    "runs__pool__regex=(",
    "runs__agent__iregex=[",
    "request_text__regex=(",
    "created_at__year__gt=99999",
    "runs__pool=%00",
    "owner__password__startswith=a",
    "created_at__gte=x",
]
RUN_FILTERS = ["pool__regex=(", "error__iregex=[", "started_at__iso_year=99999", "agent=%00"]
FILTER_CASES = (
    [(LIST, query) for query in SNAPSHOT_FILTERS]
    + [(CHART, query) for query in SNAPSHOT_FILTERS]
    + [("/admin/agents/design/", query) for query in DESIGN_FILTERS]
    + [("/admin/agents/agentrun/", query) for query in RUN_FILTERS]
)


@pytest.fixture
def superuser_browser(db) -> Client:
    """A superuser whose requests answer as a server would (a crash is a 500, not raised)."""
    client = Client(raise_request_exception=False)
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw-root-123"))
    return client


@pytest.mark.parametrize(("url", "query"), FILTER_CASES)
def test_a_bad_filter_is_a_clear_400_or_ignored_never_a_500(
    superuser_browser, known_snapshots, design, url, query
):
    response = superuser_browser.get(f"{url}?{query}")
    assert response.status_code in (200, 302, 400), response.status_code
    if response.status_code == 302:  # Django's own: the list without the filter, at ?e=1
        assert response["Location"] == f"{url}?e=1"
        assert superuser_browser.get(response["Location"]).status_code == 200
    elif response.status_code == 400:
        assert "filter" in response.content.decode().lower()


@pytest.mark.parametrize("url", [LIST, CHART, "/admin/agents/agentrun/"])
def test_a_regular_expression_filter_is_refused_in_words(superuser_browser, known_snapshots, url):
    response = superuser_browser.get(url, {"pool__regex": "("})
    assert response.status_code == 400
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    text = response.content.decode()
    assert "pool__regex" in text and "regular expression" in text
    assert f"Remove it from the address: {url}" in text


def test_a_filter_the_database_cannot_evaluate_is_a_400(superuser_browser, known_snapshots):
    response = superuser_browser.get(LIST, {"taken_at__iso_year": "99999"})
    assert response.status_code == 400
    assert "taken_at__iso_year" in response.content.decode()
    # The same lists with good filters still answer.
    assert superuser_browser.get(LIST, {"pool": "main"}).status_code == 200
    assert superuser_browser.get(CHART, {"pool__startswith": "mi"}).status_code == 200
