"""The live design page in headless Chromium, at 390 px (a phone) and 1280 px, against the real
server (`manage.py serve`) and its offline simulator, slowed while the architects write.

One design is watched by both pages at once: the selected tab follows the agent at work
until the user picks one, a page reloaded while an agent writes shows the text so far and
then the rest (compared with what the agent wrote: a prefix first, all of it in the end,
nothing twice), the progress bar reaches 100 %, nothing scrolls sideways, and axe-core finds
no serious or critical violation, there and on the clarifying-questions page. Failures leave
screenshots in /tmp.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.browser import (
    CHROMIUM,
    MISSING,
    axe_violations,
    chromium_page,
    horizontal_overflow,
)
from tests.servers import site_with_one_user

pytestmark = pytest.mark.browser

USERNAME = "live-page-user"
PASSWORD = f"pw-{uuid.uuid4().hex}"
SERVER_START_DEADLINE_S = 90.0
DESIGN_DEADLINE_MS = 120_000
PHONE, DESKTOP = (390, 844), (1280, 900)
FAST = "--ttft-ms 5 --tokens-per-second 3000 --responder agents.simulated.carlos_responder"
# While the architects write (about 1,100 tokens each): several seconds of an answer under way.
SLOW_TOKENS_PER_SECOND = 120
REQUEST = "An online bookshop for 50,000 daily users in Europe with payments and search."


class Site:
    """The served site, its database (read to compare with what the agents wrote) and its
    simulator's control endpoint (to slow it down and speed it up)."""

    def __init__(self, base: str, database: Path, simulator_port: str) -> None:
        self.base = base
        self.database = database
        self.simulator = f"http://127.0.0.1:{simulator_port}/_simulator/faults"

    def pace(self, tokens_per_second: float) -> None:
        """The simulator's streaming pace for answers that start from now on."""
        response = httpx.post(self.simulator, json={"tokens_per_second": tokens_per_second})
        response.raise_for_status()

    def output_text(self, design_id: int, agent: str) -> str:
        with sqlite3.connect(self.database) as db:
            row = db.execute(
                "SELECT output_text FROM agents_agentrun WHERE design_id = ? AND agent = ? "
                "AND status = 'succeeded' ORDER BY id DESC LIMIT 1",
                (design_id, agent),
            ).fetchone()
        assert row is not None, f"{agent} of design {design_id} has no finished run"
        return str(row[0])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """`manage.py serve` on free ports with a throwaway SQLite database and one user."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING)
    log = tmp_path_factory.mktemp("server") / "serve.log"
    options = ("--simulator-args", FAST)
    with site_with_one_user(
        "live-page", log, USERNAME, PASSWORD, *options, limit=SERVER_START_DEADLINE_S
    ) as served:
        yield Site(served.server.base, served.database, served.env["LLM_SIMULATOR_PORT"])


@pytest.fixture
def pages(site: Site, request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """A logged-in desktop page and a phone page with the same login, in one browser."""
    with chromium_page(
        failure_screenshot=Path("/tmp/carlos-live-page-desktop-failed.png"),
        request=request,
        viewport=DESKTOP,
    ) as desktop:
        desktop.goto(f"{site.base}/accounts/login/")
        desktop.fill("#id_username", USERNAME)
        desktop.fill("#id_password", PASSWORD)
        desktop.click("main button[type=submit]")
        desktop.wait_for_url(f"{site.base}/")
        width, height = PHONE
        phone = desktop.context.browser.new_context(
            viewport={"width": width, "height": height},
            storage_state=desktop.context.storage_state(),
        ).new_page()
        phone.set_default_timeout(30_000)
        try:
            yield desktop, phone
        except BaseException:
            phone.screenshot(path="/tmp/carlos-live-page-phone-failed.png", full_page=True)
            raise
        if request.session.testsfailed:
            phone.screenshot(path="/tmp/carlos-live-page-phone-failed.png", full_page=True)


def submit(page: Any, site: Site, *, ask_questions: bool = False) -> int:
    """Request a design on the form; its id, once the page shows it."""
    page.goto(f"{site.base}/")
    page.fill("#id_request_text", REQUEST)
    if ask_questions:
        page.check("#id_ask_questions")
    page.click("#design-form button[type=submit]")
    page.wait_for_url(f"{site.base}/designs/*/")
    return int(page.url.rstrip("/").split("/")[-1])


def selected_tab(page: Any) -> str:
    return str(page.get_attribute('[role="tab"][aria-selected="true"]', "id")).removeprefix("tab-")


def assert_fits_and_is_accessible(page: Any, where: str) -> None:
    assert horizontal_overflow(page) <= 0, f"{where}: the page scrolls sideways"
    assert axe_violations(page) == [], where


def test_the_live_page_follows_the_work_rejoins_mid_answer_and_completes(
    site: Site, pages: tuple[Any, Any]
) -> None:
    desktop, phone = pages
    problems: list[str] = []
    for page in pages:
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    site.pace(SLOW_TOKENS_PER_SECOND)
    try:
        design_id = submit(desktop, site)
        phone.goto(desktop.url)
        # Both pages follow the work: an architect's tab is selected as soon as one writes.
        architects = '#tab-carlos[aria-selected="true"], #tab-ronei[aria-selected="true"]'
        for page in pages:
            page.locator(architects).wait_for()
    finally:
        site.pace(3000)  # the agents after the architects answer fast again
    writer = selected_tab(phone)
    panel = f"#panel-{writer}"
    assert phone.get_attribute(panel, "data-state") == "running"

    # The phone reloads while the architect writes: it shows the text so far, then the rest.
    phone.reload()
    phone.wait_for_function(
        """(panel) => {
            const shown = document.querySelector(panel);
            return shown.dataset.state !== "running"
                || shown.querySelector(".stream").textContent.length > 0;
        }""",
        arg=panel,
    )
    so_far = phone.text_content(f"{panel} .stream") or ""
    assert phone.get_attribute(panel, "data-state") == "running", (
        "the architect finished before the reloaded page joined: slow the simulator further"
    )
    assert selected_tab(phone) == writer  # a reloaded page follows the work too
    assert_fits_and_is_accessible(phone, "phone, mid-answer")

    # The desktop user picks a tab: from now on the page stays where the user put it.
    desktop.click("#tab-timeline")
    for page in pages:
        page.locator('#design-status[data-status="succeeded"]').wait_for(timeout=DESIGN_DEADLINE_MS)
    assert selected_tab(desktop) == "timeline"
    assert selected_tab(phone) == "terraform"  # the last agent that started

    final = site.output_text(design_id, writer)
    assert so_far and final.startswith(so_far), "the reloaded page showed other text"
    assert len(so_far) < len(final)
    for page in pages:  # the live text as it stood when the agent finished: all of it, once
        assert page.text_content(f"{panel} .stream") == final

    for page, where in ((phone, "phone"), (desktop, "desktop")):
        progress = page.locator("#design-progress")
        assert progress.get_attribute("value") == progress.get_attribute("max") == "6"
        assert page.evaluate("document.querySelector('#design-progress').position") == 1
        assert "All 6 stages done" in page.inner_text("#design-progress-box")
        page.locator("#announcer", has_text="Design succeeded").wait_for()
        page.click("#tab-timeline")
        assert page.locator("#timeline-chart li.tl-run").count() == 9
        assert "Total:" in page.inner_text("#timeline-chart")
        assert_fits_and_is_accessible(page, f"{where}, timeline")
        page.screenshot(path=f"/tmp/carlos-live-page-{where}-timeline.png", full_page=True)
        page.click(f"#tab-{writer}")
        page.locator(f"{panel} .diagram svg").first.wait_for()
        label = page.get_attribute(f"{panel} .diagram", "aria-label") or ""
        assert label.startswith("Flowchart of Users"), label
        assert page.locator("h1").count() == 1
        assert_fits_and_is_accessible(page, f"{where}, {writer}'s answer")
        page.screenshot(path=f"/tmp/carlos-live-page-{where}.png", full_page=True)
    assert problems == []


def test_the_clarifying_questions_page_fits_and_is_accessible(
    site: Site, pages: tuple[Any, Any]
) -> None:
    desktop, phone = pages
    submit(desktop, site, ask_questions=True)
    phone.goto(desktop.url)
    for page, where in ((phone, "phone"), (desktop, "desktop")):
        page.locator("#clarifications form").wait_for()
        assert page.locator("h1").count() == 1
        assert_fits_and_is_accessible(page, f"{where}, clarifying questions")
