"""Every page at a phone's width and a desktop's, in headless Chromium: no sideways page
scroll, no serious or critical axe-core violation, one h1, a working skip link, a header that
fits, and tables whose words are never broken letter by letter.

The pages come from Django's live test server (pytest-django's `live_server`) over the real
templates and static files; the data is made with the ORM. One browser serves the module,
each test gets a context of its own at the width it checks, and a failed test leaves a
screenshot in /tmp. The design page's own accessibility is checked with the live page tests;
here it is only its width and its tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client, RequestFactory
from django.utils import timezone
from django.views.defaults import server_error

from agents.models import Design
from tests.agents.pages import add_run, finished_design, make_design, make_user
from tests.helpers.browser import (
    axe_violations,
    chromium_browser,
    horizontal_overflow,
    screenshot_on_failure,
    split_words,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

VIEWPORTS = {"phone": (390, 844), "desktop": (1280, 900)}
SCREENSHOTS = Path("/tmp/carlos-pages")
# A request as users type them: long words, a URL, and enough text to fill a row.
LONG_REQUEST = (
    "Multi-region e-commerce platform with internationalisation for "
    "https://shop.example.com/catalogue/electronics and nightly reconciliation of payments"
)
QUESTIONS = [
    "How many daily active users do you expect at peak?",
    "Which availability target (SLA) do you need?",
]
COST_REPORT_SERVICES = [
    ("Azure Kubernetes Service (AKS)", "Standard tier, 3 x Standard_D4s_v5", 3, "compute", 530),
    ("Azure SQL Database", "General Purpose, 2 vCores, zone-redundant", 1, "data", 380),
    ("Azure Monitor and Application Insights", "Log Analytics, 50 GB/month", 1, "operations", 140),
    ("Microsoft Defender for Cloud and Azure Policy", "Defender CSPM", 1, "security", 120),
]


def _cost_assessment() -> dict[str, Any]:
    services = [
        {"service": name, "sku": sku, "quantity": qty, "category": kind, "monthly_usd": usd}
        for name, sku, qty, kind, usd in COST_REPORT_SERVICES
    ]
    monthly = sum(item["monthly_usd"] for item in services)
    return {
        "monthly_usd": monthly,
        "annual_usd": monthly * 12,
        "services": services,
        "cost_drivers": ["Azure Kubernetes Service (AKS) ($530/month)"],
        "optimizations": ["Reserved instances", "Autoscale nodes", "Tier the logs"],
        "confidence": "medium",
    }


COST_REPORT = {
    "carlos": _cost_assessment(),
    "ronei": _cost_assessment(),
    "summary": "Ronei's design costs the same.",
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium_browser() as shared:
        yield shared


@pytest.fixture(params=sorted(VIEWPORTS))
def viewport(request: pytest.FixtureRequest) -> tuple[int, int]:
    return VIEWPORTS[request.param]


@pytest.fixture
def page(browser: Any, viewport: tuple[int, int], request: pytest.FixtureRequest) -> Iterator[Any]:
    """A page of its own context (no cookies) at the test's width."""
    width, height = viewport
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(15_000)
    name = re.sub(r"[^\w.-]+", "-", request.node.name)
    try:
        with screenshot_on_failure(page, SCREENSHOTS / f"{name}.png", request):
            yield page
    finally:
        context.close()


def _log_in(page: Any, live_server: Any, user: Any) -> None:
    """The user's session cookie, as a login through the form would leave it."""
    client = Client()
    client.force_login(user)
    cookie = {"name": "sessionid", "value": client.cookies["sessionid"].value}
    page.context.add_cookies([{**cookie, "url": live_server.url}])


def _header_rows(page: Any) -> tuple[int, list[str]]:
    """How many rows the header's parts take, and which parts wrap inside themselves."""
    return page.evaluate(
        """() => {
          const parts = [...document.querySelectorAll(
            '.site-header .brand, .site-header .site-nav, .site-header .site-user')];
          // A part starts a new row when it begins below the bottom of the row before.
          const boxes = parts.map(p => p.getBoundingClientRect()).sort((a, b) => a.top - b.top);
          let rows = 0, bottom = -Infinity;
          for (const box of boxes) {
            if (box.top >= bottom - 1) rows += 1;
            bottom = Math.max(bottom, box.bottom);
          }
          const wrapped = [...document.querySelectorAll(
              '.site-header .brand, .site-header .site-nav a, .site-header .site-user > *')]
            .filter(el => {
              const style = getComputedStyle(el);
              const line = parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.5;
              return el.getBoundingClientRect().height > line * 1.5;
            })
            .map(el => el.textContent.trim());
          return [rows, wrapped];
        }"""
    )


def assert_page_is_sound(page: Any, *, logged_in: bool = True) -> None:
    """What every page owes a phone, a desktop, a keyboard and a screen reader."""
    overflow = horizontal_overflow(page)
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px"
    assert axe_violations(page) == []
    assert page.locator("h1").count() == 1
    if logged_in:
        rows, wrapped = _header_rows(page)
        assert rows <= 2 and wrapped == [], f"header: {rows} rows, wrapped inside: {wrapped}"
    # The skip link is the first stop of the keyboard, and it lands on the main content.
    # Tab from the top of the document, wherever the page put the focus (autofocus).
    page.evaluate("document.body.tabIndex = -1; document.body.focus()")
    page.evaluate("document.body.removeAttribute('tabindex')")
    page.keyboard.press("Tab")
    first = page.evaluate("[document.activeElement.textContent, document.activeElement.hash]")
    assert first == ["Skip to content", "#content"]
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "content"


# --- pages anyone sees ----------------------------------------------------------------------


def test_login_page(page: Any, live_server: Any) -> None:
    response = page.goto(f"{live_server.url}/accounts/login/")
    assert response.status == 200
    assert_page_is_sound(page, logged_in=False)


def test_refused_login_keeps_its_error_readable(page: Any, live_server: Any) -> None:
    make_user("bob")
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", "bob")
    page.fill("#id_password", "not-the-password")
    page.click("main button[type=submit]")
    page.wait_for_load_state()
    assert page.locator('[role="alert"]').count() == 1
    assert_page_is_sound(page, logged_in=False)


def test_expired_form_page(page: Any, live_server: Any) -> None:
    """The CSRF failure page (403_csrf.html): the token cookie went away before the POST."""
    page.goto(f"{live_server.url}/accounts/login/")
    page.context.clear_cookies()
    page.fill("#id_username", "bob")
    page.fill("#id_password", "whatever")
    with page.expect_navigation() as navigation:
        page.click("main button[type=submit]")
    assert navigation.value.status == 403
    assert "This form has expired" in page.inner_text("h1")
    assert_page_is_sound(page, logged_in=False)


def test_server_error_page(page: Any, live_server: Any) -> None:
    """500.html as Django's handler renders it, served from the site so its styles load."""
    body = server_error(RequestFactory().get("/")).content
    page.route(
        f"{live_server.url}/broken/",
        lambda route: route.fulfill(status=500, body=body, content_type="text/html"),
    )
    assert page.goto(f"{live_server.url}/broken/").status == 500
    assert_page_is_sound(page, logged_in=False)


# --- pages of a logged-in user --------------------------------------------------------------


def test_new_design_form(page: Any, live_server: Any) -> None:
    _log_in(page, live_server, make_user("alice"))
    assert page.goto(f"{live_server.url}/").status == 200
    assert_page_is_sound(page)


def test_new_design_form_with_errors(page: Any, live_server: Any) -> None:
    """An empty request comes back with its error tied to the field for screen readers."""
    _log_in(page, live_server, make_user("alice"))
    page.goto(f"{live_server.url}/")
    with page.expect_navigation() as navigation:
        page.click("#design-form button[type=submit]")
    assert navigation.value.status == 400
    field = page.locator("#id_request_text")
    assert field.get_attribute("aria-invalid") == "true"
    described = field.get_attribute("aria-describedby").split()
    missing = [name for name in described if page.locator(f"#{name}").count() != 1]
    assert missing == [], f"aria-describedby names no element: {missing}"
    texts = [page.inner_text(f"#{name}") for name in described]
    assert any("cannot be empty" in text for text in texts), texts
    assert_page_is_sound(page)


def test_not_found_page(page: Any, live_server: Any) -> None:
    _log_in(page, live_server, make_user("alice"))
    assert page.goto(f"{live_server.url}/designs/999999/").status == 404
    assert_page_is_sound(page)


def _history_of(owner: Any) -> list[Design]:
    """More designs than a page holds, in every state the history shows."""
    now = timezone.now()
    designs = [make_design(owner, f"An online shop number {index}") for index in range(24)]
    designs.append(make_design(owner, LONG_REQUEST, status=Design.Status.FAILED))
    designs.append(
        make_design(
            owner,
            "A booking system for 300 dentists",
            status=Design.Status.RUNNING,
            started_at=now - timedelta(minutes=2),
        )
    )
    designs.append(finished_design(owner))
    Design.objects.filter(pk=designs[-1].pk).update(
        started_at=now - timedelta(minutes=4, seconds=10), finished_at=now
    )
    return designs


def test_history_page(page: Any, live_server: Any) -> None:
    alice = make_user("alice")
    _history_of(alice)
    _log_in(page, live_server, alice)
    assert page.goto(f"{live_server.url}/designs/").status == 200
    assert page.locator("#design-history tbody tr").count() == 20
    assert_page_is_sound(page)
    assert split_words(page, "#design-history") == []
    box = page.locator(".table-scroll:has(#design-history)")
    scrolled = box.evaluate("box => box.scrollWidth - box.clientWidth")
    if page.viewport_size["width"] >= 1280:
        assert scrolled <= 0, f"at a desktop's width the table still scrolls by {scrolled} px"
    else:
        assert scrolled > 0  # the phone scrolls the table in its box, not the page
    assert box.get_attribute("tabindex") == "0"
    page.click("text=Older")
    page.wait_for_url("**/designs/?page=2")
    assert page.locator("#design-history tbody tr").count() == 7
    assert_page_is_sound(page)


def test_history_filtered_with_the_owner_column(page: Any, live_server: Any) -> None:
    staff = make_user("sam", staff=True)
    # A superuser sees every design, with its owner. (An update, not save(): no post_save
    # receiver may call async_to_sync in this thread while playwright's loop is registered.)
    type(staff).objects.filter(pk=staff.pk).update(is_superuser=True)
    _history_of(make_user("alice"))
    _log_in(page, live_server, staff)
    page.goto(f"{live_server.url}/designs/")
    page.fill("#history-search", "shop number")
    page.select_option("#history-status", "queued")
    page.click("#history-filter button[type=submit]")
    page.wait_for_url("**/designs/?*")
    assert page.locator("#design-history tbody tr").count() == 20
    assert page.locator("#design-history thead th", has_text="Owner").count() == 1
    assert_page_is_sound(page)


def test_questions_page(page: Any, live_server: Any) -> None:
    alice = make_user("alice")
    clarifications = [{"question": question, "answer": None} for question in QUESTIONS]
    design = make_design(
        alice, status=Design.Status.AWAITING_ANSWERS, clarifications=clarifications
    )
    _log_in(page, live_server, alice)
    assert page.goto(f"{live_server.url}/designs/{design.pk}/").status == 200
    for index, question in enumerate(QUESTIONS):
        assert page.get_by_label(question).get_attribute("id") == f"id_answer_{index}"
    assert_page_is_sound(page)


def test_conflict_page(page: Any, live_server: Any) -> None:
    """Answers sent after the design started elsewhere: the 409 page says so."""
    alice = make_user("alice")
    clarifications = [{"question": question, "answer": None} for question in QUESTIONS]
    design = make_design(
        alice, status=Design.Status.AWAITING_ANSWERS, clarifications=clarifications
    )
    _log_in(page, live_server, alice)
    page.goto(f"{live_server.url}/designs/{design.pk}/")
    Design.objects.filter(pk=design.pk).update(status=Design.Status.RUNNING)
    with page.expect_navigation() as navigation:
        page.click("text=Start the design")
    assert navigation.value.status == 409
    assert "not waiting for answers" in page.inner_text('[role="alert"]')
    assert_page_is_sound(page)


# --- the design page's width and tables -----------------------------------------------------


def test_design_page_tables_keep_their_words(page: Any, live_server: Any) -> None:
    """The Cost and Timeline tables at the test's width: words whole, no sideways page."""
    alice = make_user("alice")
    design = finished_design(alice)
    add_run(design, "cost", "{}", output_json=COST_REPORT)
    _log_in(page, live_server, alice)
    assert page.goto(f"{live_server.url}/designs/{design.pk}/").status == 200
    for tab, tables in (("cost", "#panel-cost table"), ("timeline", "#panel-timeline table")):
        page.click(f"#tab-{tab}")
        assert page.locator(tables).first.is_visible()
        assert split_words(page, tables) == [], tab
        overflow = horizontal_overflow(page)
        assert overflow <= 0, f"{tab}: the page scrolls sideways by {overflow} px"
