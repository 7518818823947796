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
def chromium_browser() -> Iterator[Any]:
    """Debian's Chromium (playwright's sync `Browser`), e.g. for a module's tests to share:
    a new context per test is much cheaper than a new browser. Skips when it is missing.

    Playwright's sync API leaves its own event loop registered as running in this thread, and
    Django would then refuse the test's ORM calls (SynchronousOnlyOperation) as if they came
    from async code. That loop never runs Django code, so while the browser is open Django is
    told so with its documented switch, DJANGO_ALLOW_ASYNC_UNSAFE."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING)
    from playwright.sync_api import sync_playwright

    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def screenshot_on_failure(
    page: Any, path: Path, request: pytest.FixtureRequest | None = None
) -> Iterator[Any]:
    """Yields `page`; a failure inside the block, or (with `request`, for a fixture that yields
    the page) a test that failed meanwhile, saves a full-page screenshot to `path`."""
    failed_before = request.session.testsfailed if request is not None else 0
    try:
        yield page
    except BaseException:
        _screenshot(page, path)
        raise
    if request is not None and request.session.testsfailed > failed_before:
        _screenshot(page, path)


@contextlib.contextmanager
def chromium_page(
    *,
    failure_screenshot: Path,
    request: pytest.FixtureRequest | None = None,
    viewport: tuple[int, int] = (1280, 900),
    timeout_ms: float = 30_000,
) -> Iterator[Any]:
    """A fresh page (playwright's sync `Page`) in a browser of its own; skips when Chromium is
    missing. Screenshots on failure as `screenshot_on_failure` says."""
    with chromium_browser() as browser:
        width, height = viewport
        page = browser.new_context(viewport={"width": width, "height": height}).new_page()
        page.set_default_timeout(timeout_ms)
        with screenshot_on_failure(page, failure_screenshot, request):
            yield page


#: axe-core impacts a page must not have: "minor" and "moderate" are reported but not failed.
BLOCKING_IMPACTS = frozenset({"serious", "critical"})


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now.

    axe-core comes from the pinned `axe-playwright-python` package (its bundled axe.min.js),
    injected into the page: no CDN. Each violation keeps what a failing assert should say:
    `id`, `impact`, `help` and `targets` (the CSS selectors of the offending nodes)."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [
        {
            "id": violation["id"],
            "impact": violation["impact"],
            "help": violation["help"],
            "targets": [node["target"] for node in violation["nodes"]],
        }
        for violation in results.response["violations"]
        if violation["impact"] in BLOCKING_IMPACTS
    ]


def horizontal_overflow(page: Any) -> int:
    """How many CSS pixels the page scrolls sideways (0 or less: it does not)."""
    overflow: int = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    return overflow


# Each run of word characters between natural break points (spaces, hyphens, slashes) that the
# layout split over two lines or more: letter-by-letter breaking (`overflow-wrap: anywhere`).
_SPLIT_WORDS_JS = """(selector) => {
  const split = [];
  for (const root of document.querySelectorAll(selector)) {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const match of node.data.matchAll(/[^\\s\\-\\/]+/g)) {
        const range = document.createRange();
        range.setStart(node, match.index);
        range.setEnd(node, match.index + match[0].length);
        const lines = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => r.top));
        if (lines.size > 1) split.push(match[0]);
      }
    }
  }
  return split;
}"""


def split_words(page: Any, selector: str) -> list[str]:
    """The words inside the elements matching `selector` that are broken over two lines or
    more (only visible text counts); empty when every word keeps to one line."""
    words: list[str] = page.evaluate(_SPLIT_WORDS_JS, selector)
    return words


def _screenshot(page: Any, path: Path) -> None:
    """Best effort: the page may be gone with the failure; the failure is what matters."""
    with contextlib.suppress(Exception):
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot of the failed page: {path}")
