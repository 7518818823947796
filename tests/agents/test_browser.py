"""A real user's path in headless Chromium against the real server (`manage.py serve`).

Daphne, the offline simulator, the pools, the pipeline, the WebSocket and the page script
all run as in production; only the simulator is made fast. Nothing is mocked.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.browser import CHROMIUM, MISSING, chromium_page
from tests.servers import site_with_one_user

pytestmark = pytest.mark.browser

USERNAME = "browser-user"
PASSWORD = f"pw-{uuid.uuid4().hex}"
SERVER_START_DEADLINE_S = 90.0
DESIGN_DEADLINE_MS = 120_000
SCREENSHOT = Path("/tmp/carlos-browser-design.png")
SIMULATOR_ARGS = (
    "--ttft-ms 5 --tokens-per-second 3000 --responder agents.simulated.carlos_responder"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`manage.py serve` on free ports with a throwaway SQLite database and one user."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING)
    log = tmp_path_factory.mktemp("server") / "serve.log"
    options = ("--simulator-args", SIMULATOR_ARGS)
    with site_with_one_user(
        "browser", log, USERNAME, PASSWORD, *options, limit=SERVER_START_DEADLINE_S
    ) as site:
        yield site.server.base


@pytest.fixture
def page(server: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    with chromium_page(
        failure_screenshot=Path("/tmp/carlos-browser-failed.png"), request=request
    ) as page:
        yield page


def test_user_designs_and_watches_it_live(server: str, page: Any) -> None:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    frames: list[dict[str, Any]] = []
    page.on(
        "websocket",
        lambda ws: ws.on("framereceived", lambda payload: frames.append(json.loads(payload))),
    )

    # Log in through the real login form.
    page.goto(f"{server}/")
    assert "/accounts/login/" in page.url
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url(f"{server}/")

    # Request a design with non-default options.
    page.fill(
        "#id_request_text",
        "An online bookshop for 50,000 daily users in Europe with payments and search.",
    )
    assert "/ 4,000." in page.text_content("#char-count")
    page.select_option("#id_cloud", "aws")
    page.select_option("#id_reliability", "high")
    page.click("#design-form button[type=submit]")
    page.wait_for_url(f"{server}/designs/*/")

    finished = page.locator('#design-status[data-status="succeeded"]')
    finished.wait_for(timeout=DESIGN_DEADLINE_MS)
    assert finished.inner_text() == "Succeeded"  # the label in the fragment the server sent

    # Whatever started after the page connected streamed live: started, tokens, finished.
    # (The simulator is fast, so the first agents may be done before the page loads; those
    # arrive in the snapshot instead.)
    agents = [
        "requirements", "carlos", "ronei", "security", "cost", "reliability", "auditor",
        "recommender", "terraform",
    ]  # fmt: skip
    assert frames[0]["kind"] == "snapshot"
    live = {(f["agent"], f["round"]) for f in frames if f["kind"] == "agent_started"}
    assert live, "no agent started after the page connected"
    for agent, round_number in live:
        kinds = [
            f["kind"] for f in frames if f.get("agent") == agent and f.get("round") == round_number
        ]
        assert kinds[0] == "agent_started" and kinds[-1] == "agent_finished", (agent, kinds)
        assert "tokens" in kinds[1:-1], (agent, kinds)
    seen = {run["agent"] for run in frames[0]["runs"]} | {agent for agent, _ in live}
    assert seen == set(agents)

    # Every tab is filled with rendered (not raw) output.
    for agent in agents:
        page.click(f"#tab-{agent}")
        panel = page.locator(f"#panel-{agent}")
        assert panel.is_visible()
        body = panel.locator(".panel-body")
        body.wait_for(state="visible")
        assert panel.get_attribute("data-state") == "succeeded", agent
        assert len(body.inner_text().strip()) > 40, agent
        assert panel.locator(".placeholder").count() == 0, agent
    page.click("#tab-security")
    assert page.locator("#panel-security .score").count() == 2
    assert page.locator("#panel-security details.source pre").count() == 1
    page.click("#tab-cost")
    assert page.locator("#panel-cost table.data").count() >= 3
    page.click("#tab-terraform")
    for name in ("main.tf", "variables.tf", "outputs.tf", "versions.tf"):
        assert page.locator("#panel-terraform .file-head h3", has_text=name).count() == 1
    page.click("#tab-timeline")
    assert page.locator("#timeline tbody tr").count() >= len(agents)
    assert page.locator("#timeline tbody .badge.running").count() == 0
    # The rows were swapped in as the server rendered them: one per run it reported.
    rows = [f for f in frames if f["kind"] in ("agent_started", "agent_finished")]
    assert rows and all(f["row_html"].startswith(f'<tr data-key="{f["run_id"]}">') for f in rows)

    # Mermaid (served from static, strict mode) drew Carlos's diagram.
    page.click("#tab-carlos")
    page.locator("#panel-carlos .diagram svg").first.wait_for()
    assert page.locator("#panel-carlos .diagram svg").count() >= 1

    assert page.locator("#design-verdict .badge").count() == 1
    assert page.locator("#design-recommendation .badge").count() == 1
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    for tab in ("security", "cost", "terraform", "timeline"):
        page.click(f"#tab-{tab}")
        page.screenshot(path=f"/tmp/carlos-browser-{tab}.png", full_page=True)

    # A reload shows the finished design from the server alone.
    page.reload()
    page.click("#tab-ronei")
    assert len(page.locator("#panel-ronei .rendered").inner_text()) > 40

    # History lists it.
    page.goto(f"{server}/designs/")
    assert page.locator("#design-history tbody tr").count() == 1
    assert page.locator("#design-history .badge.succeeded").count() == 1

    assert problems == []
