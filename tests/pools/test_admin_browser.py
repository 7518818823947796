"""A staff user logs in to the real admin in headless Chromium and sees the pool chart.

`manage.py serve` runs in a child process with its own SQLite database and simulator port;
the staff user and an hour of snapshots are created beforehand with `manage.py shell -c`
under the same environment. Nothing is mocked, and no browser is downloaded: Debian's
chromium is driven through playwright.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.helpers.browser import chromium_page, needs_chromium
from tests.servers import child_env, manage, serving

pytestmark = pytest.mark.browser

USERNAME = "pool-staff"
PASSWORD = f"pw-{uuid.uuid4().hex}"
SCREENSHOT = Path("/tmp/carlos-admin-pool-chart.png")
INDEX_SCREENSHOT = Path("/tmp/carlos-admin-index-pools.png")
PEAKS_SCREENSHOT = Path("/tmp/carlos-admin-pool-peaks.png")
FAILED_SCREENSHOT = Path("/tmp/carlos-admin-pool-chart-failed.png")

# An hour of history for two pools, one row a minute: main fills up and overflows at the
# end while 429s cut its deployment's limit from 100 to 7, mini stays idle. The staff user
# is created in the same shell.
SETUP = f"""
from datetime import timedelta
from django.contrib.auth.models import User
from django.utils import timezone
from pools.models import PoolSnapshot

User.objects.create_superuser({USERNAME!r}, "staff@example.com", {PASSWORD!r})
start = timezone.now() - timedelta(hours=1)
rows = []
for minute in range(60):
    in_use = min(14, minute // 4)
    rows.append(PoolSnapshot(
        taken_at=start + timedelta(minutes=minute), instance="browser:1", pool="main",
        size=10, in_use=in_use, available=max(0, 10 - in_use),
        overflow_in_use=max(0, in_use - 10), waiting=max(0, minute - 55), requests=minute,
        interval_s=60, concurrency_limit=100 if minute < 50 else 7,
        limit_reason="start" if minute < 50 else "429", rate_limited=int(minute >= 50),
        deployment_waiting_peak=max(0, minute - 52), latency_p95_ms=800 + minute,
    ))
    rows.append(PoolSnapshot(
        taken_at=start + timedelta(minutes=minute), instance="browser:1", pool="mini",
        size=10, in_use=1, available=9, overflow_in_use=0, waiting=0,
    ))
PoolSnapshot.objects.bulk_create(rows)
"""


@pytest.fixture
def served_admin(tmp_path):
    database = Path(f"/tmp/carlos-admin-browser-{uuid.uuid4().hex}.sqlite3")
    # Only the rows made here, so the chart is known.
    env = child_env(f"sqlite:///{database}", POOL_SNAPSHOT_INTERVAL="0")
    try:
        manage(env, "migrate", "--verbosity", "0")
        manage(env, "shell", "-c", SETUP)
        with serving(env, tmp_path / "serve.log", "--migrate") as server:
            yield server.base
    finally:
        database.unlink(missing_ok=True)


@needs_chromium
def test_staff_logs_in_and_sees_the_pool_chart(served_admin):
    base = served_admin
    with chromium_page(failure_screenshot=FAILED_SCREENSHOT, viewport=(1280, 1000)) as page:
        page.goto(f"{base}/admin/pools/poolsnapshot/")
        assert "/admin/login/" in page.url  # anonymous: sent to log in first
        page.fill("#id_username", USERNAME)
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_url("**/admin/pools/poolsnapshot/")

        chart = page.locator("#pool-history-chart svg.pool-chart")
        chart.wait_for()
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert page.locator("#pool-history-chart h2").inner_text() == "Pools over time"
        panels = chart.locator('g.pool-panel[data-panel="slots"]')
        assert panels.count() == 2
        assert chart.locator("g.pool-panel").count() == 6  # slots, calls, times per pool
        assert panels.nth(0).get_attribute("data-pool") == "main"
        assert panels.nth(0).get_attribute("data-y-max") == "20"  # 14 in use at the peak
        # The browser lays the lines out: each has a real drawn length.
        for series in ("in_use", "waiting", "deployment_waiting", "limit", "size"):
            line = panels.nth(0).locator(f'polyline[data-series="{series}"]')
            assert len(line.get_attribute("points").split()) == 60
            assert line.evaluate("element => element.getTotalLength()") > 100
        assert "limit 7 (429)" in panels.nth(0).inner_html()
        for kind, series in (("calls", "requests"), ("times", "latency_p95")):
            panel = chart.locator(f'g.pool-panel[data-pool="main"][data-panel="{kind}"]')
            line = panel.locator(f'polyline[data-series="{series}"]')
            assert line.evaluate("element => element.getTotalLength()") > 100
        # It scales to the column it is in, keeping its proportions (760 x 684).
        box = chart.bounding_box()
        assert box is not None and box["width"] >= 300
        assert box["height"] == pytest.approx(box["width"] * 684 / 760, abs=2)
        assert "120 pool snapshots" in page.inner_text("#changelist")
        # The list shows each row's limit and why it last changed.
        assert page.locator("td.field-concurrency_limit").first.inner_text() == "7"
        assert page.locator("td.field-limit_reason").first.inner_text() == "429"

        # The pool filter redraws the chart for that pool only.
        page.click("#changelist-filter >> text=mini")
        page.wait_for_url("**pool=mini**")
        panels = page.locator('#pool-history-chart g.pool-panel[data-panel="slots"]')
        assert panels.count() == 1
        assert panels.nth(0).get_attribute("data-pool") == "mini"

        # The metric chooser keeps the filter; the figures open as a table.
        page.click('#pool-history-chart nav >> text="Peaks"')
        page.wait_for_url("**metric=peaks**")
        assert "pool=mini" in page.url
        panels = page.locator('#pool-history-chart g.pool-panel[data-panel="peaks"]')
        assert panels.count() == 1
        page.click("#pool-history-chart details summary")
        table = page.locator('#pool-history-chart table.pool-figures[data-pool="mini"]')
        assert table.is_visible()
        assert table.locator('td[data-series="in_use"]').first.inner_text() == "1"
        page.screenshot(path=str(PEAKS_SCREENSHOT), full_page=True)

        # The admin index shows every pool's last hour.
        page.goto(f"{base}/admin/")
        module = page.locator("#pool-history-last-hour")
        module.wait_for()
        assert module.locator("h2").inner_text() == "Pools, last hour"
        last_hour = module.locator("svg.pool-chart g.pool-panel")
        assert last_hour.count() == 2
        line = last_hour.nth(0).locator('polyline[data-series="in_use"]')
        assert line.evaluate("element => element.getTotalLength()") > 100
        assert "main: " in module.locator("ul.pool-totals").inner_text()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(INDEX_SCREENSHOT), full_page=True)
