"""The admin: pool history with its server-drawn chart, designs and agent runs, staff only."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from agents.models import AgentRun, Design
from pools.admin import MAX_POINTS, chart_data
from pools.models import PoolSnapshot

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
LIST = "/admin/pools/poolsnapshot/"
CHART = "/admin/pools/poolsnapshot/chart.svg"


def snap(pool: str, at: datetime, in_use: int, size: int = 10, **fields) -> PoolSnapshot:
    values = {
        "taken_at": at,
        "instance": "web-1:100",
        "pool": pool,
        "size": size,
        "in_use": in_use,
        "available": max(0, size - in_use),
        "overflow_in_use": max(0, in_use - size),
        "waiting": 0,
    }
    values.update(fields)
    return PoolSnapshot(**values)


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


def polyline(svg: str, pool: str, series: str) -> str:
    panel = re.search(rf'<g class="pool-panel" data-pool="{pool}".*?</g>', svg, re.S)
    assert panel, f"no panel for {pool}"
    line = re.search(rf'<polyline data-series="{series}"[^>]* points="([^"]*)"', panel[0])
    assert line, f"no {series} line for {pool}"
    return line[1]


# -- the chart ----------------------------------------------------------------------------------
def test_chart_svg_for_known_snapshots(staff, known_snapshots):
    response = staff.get(CHART)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("image/svg+xml")
    svg = response.content.decode()
    assert svg.startswith('<?xml version="1.0" encoding="utf-8"?>\n<svg xmlns=')
    # x: 44 (start, 12:00:00) .. 748 (end, 12:00:20); main's y axis tops at 20 (12 in use).
    # y(v) = 12 + 142 - v / 20 * 142
    assert 'data-pool="main" data-y-max="20"' in svg
    assert polyline(svg, "main", "in_use") == "44.0,139.8 396.0,125.6 748.0,68.8"
    assert polyline(svg, "main", "available") == "44.0,97.2 396.0,111.4 748.0,154.0"
    assert polyline(svg, "main", "overflow") == "44.0,154.0 396.0,154.0 748.0,139.8"
    assert polyline(svg, "main", "waiting") == "44.0,154.0 396.0,154.0 748.0,132.7"
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
