"""The one headless Chromium the browser tests drive: Debian's, through playwright.

No browser is downloaded: a machine without /usr/bin/chromium (or $CHROMIUM) skips these
tests. A test that fails leaves a screenshot of the page as it was, for the report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
MISSING = f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium)"
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=MISSING)


@contextlib.contextmanager
def chromium_page(
    *,
    failure_screenshot: Path,
    request: pytest.FixtureRequest | None = None,
    viewport: tuple[int, int] = (1280, 900),
    timeout_ms: float = 30_000,
) -> Iterator[Any]:
    """A fresh page (playwright's sync `Page`); skips when Chromium is missing.

    A failure inside the block, or (with `request`, for a fixture that yields the page) a
    test that failed meanwhile, saves a full-page screenshot to `failure_screenshot`."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING)
    from playwright.sync_api import sync_playwright

    failed_before = request.session.testsfailed if request is not None else 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            width, height = viewport
            page = browser.new_context(viewport={"width": width, "height": height}).new_page()
            page.set_default_timeout(timeout_ms)
            try:
                yield page
            except BaseException:
                _screenshot(page, failure_screenshot)
                raise
            if request is not None and request.session.testsfailed > failed_before:
                _screenshot(page, failure_screenshot)
        finally:
            browser.close()


def _screenshot(page: Any, path: Path) -> None:
    """Best effort: the page may be gone with the failure; the failure is what matters."""
    with contextlib.suppress(Exception):
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot of the failed page: {path}")
