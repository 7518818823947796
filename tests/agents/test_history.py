"""The history page: status filter, search, pages that keep both, per-row download and
duration, bad query values answered with a notice (never a 500), and a fixed number of queries.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents.history import DESIGNS_PER_PAGE, human_duration
from agents.models import Design
from tests.agents.pages import finished_design, make_design, make_user

pytestmark = pytest.mark.django_db

ROW = re.compile(r'<tr data-design-id="(\d+)">')


def _ids(html: str) -> list[int]:
    return [int(found) for found in ROW.findall(html)]


def _page(client: Client, query: str = "") -> str:
    response = client.get(f"/designs/{query}")
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def _staff_client() -> Client:
    staff = make_user("sam", staff=True)
    staff.is_superuser = True
    staff.save()
    client = Client()
    client.force_login(staff)
    return client


# --- filter and search ----------------------------------------------------------------------


def test_status_filter_shows_only_that_status(client: Client, alice: Any) -> None:
    failed = make_design(alice, "a failed shop", status=Design.Status.FAILED)
    make_design(alice, "a queued shop")
    succeeded = make_design(alice, "a finished shop", status=Design.Status.SUCCEEDED)
    assert _ids(_page(client, "?status=failed")) == [failed.pk]
    assert _ids(_page(client, "?status=succeeded")) == [succeeded.pk]
    html = _page(client, "?status=failed")
    assert '<option value="failed" selected>' in html  # the form shows what is applied


def test_search_matches_every_word_of_the_request_case_insensitively(
    client: Client, alice: Any
) -> None:
    shop = make_design(alice, "An online Shop for Europe\nWith PAYMENTS and search")
    make_design(alice, "A wiki for 200 staff")
    make_design(alice, "A shop without the other word")
    assert _ids(_page(client, "?q=shop+payments")) == [shop.pk]  # a later line counts too
    assert _ids(_page(client, "?q=%20%20online%20%20shop%20")) == [shop.pk]
    assert _ids(_page(client, "?q=europe")) == [shop.pk]  # the title (first line)
    html = _page(client, "?q=nothing-like-this")
    assert _ids(html) == [] and "No designs match “nothing-like-this”" in html
    assert 'href="/designs/">Show every design</a>' in html


def test_search_and_filter_together_and_the_search_is_escaped(client: Client, alice: Any) -> None:
    wanted = make_design(alice, "shop <b>bold</b>", status=Design.Status.FAILED)
    make_design(alice, "shop <b>bold</b>")
    html = _page(client, "?status=failed&q=%3Cb%3E")
    assert _ids(html) == [wanted.pk]
    assert 'value="&lt;b&gt;"' in html and "<b>bold" not in html


def test_search_covers_every_owner_for_staff_with_the_owner_column(alice: Any) -> None:
    make_design(alice, "alice's shop")
    dave = make_design(make_user("dave"), "dave's shop")
    html = _page(_staff_client(), "?q=dave")
    assert _ids(html) == [dave.pk]
    assert "<th>Owner</th>" in html and "<td>dave</td>" in html


def test_a_user_never_finds_another_users_design(client: Client, alice: Any) -> None:
    make_design(make_user("dave"), "dave's secret shop")
    assert _ids(_page(client, "?q=secret")) == []


# --- pages ----------------------------------------------------------------------------------


def test_pages_keep_the_filter_and_the_search(client: Client, alice: Any) -> None:
    matching = [make_design(alice, f"shop {index}") for index in range(DESIGNS_PER_PAGE + 3)]
    make_design(alice, "shop that failed", status=Design.Status.FAILED)
    first = _page(client, "?status=queued&q=shop")
    assert len(_ids(first)) == DESIGNS_PER_PAGE
    assert "Page 1 of 2 · 23 designs found" in first
    assert 'href="?status=queued&amp;q=shop&amp;page=2" rel="next"' in first
    second = _page(client, "?status=queued&q=shop&page=2")
    assert _ids(second) == [design.pk for design in reversed(matching[:3])]
    assert 'href="?status=queued&amp;q=shop" rel="prev"' in second


# --- what each row shows --------------------------------------------------------------------


def test_each_row_links_its_package_download(client: Client, alice: Any) -> None:
    design = finished_design(alice)
    html = _page(client)
    link = f'href="/designs/{design.pk}/download/" download>'
    assert link in html
    assert f"Download design #{design.pk} as </span>.zip</a>" in html
    download = client.get(f"/designs/{design.pk}/download/")
    assert download.status_code == 200 and download["Content-Type"] == "application/zip"


def test_duration_of_finished_running_and_waiting_designs(client: Client, alice: Any) -> None:
    now = timezone.now()
    make_design(
        alice,
        "finished",
        status=Design.Status.SUCCEEDED,
        started_at=now - timedelta(minutes=4, seconds=10),
        finished_at=now,
    )
    make_design(
        alice,
        "running",
        status=Design.Status.RUNNING,
        started_at=now - timedelta(hours=1, minutes=2, seconds=30),
    )
    make_design(alice, "queued")
    cells = re.findall(r'<td class="num duration">(.*?)</td>', _page(client))
    queued, running, finished = cells  # newest first
    assert finished == '<time class="nowrap" datetime="PT250S">4 min 10 s</time>'
    assert re.fullmatch(
        r'<time class="nowrap" datetime="PT375\dS">1 h 02 min</time> '
        r'<span class="muted small">so far</span>',
        running,
    ), running
    assert queued == '<span class="muted">—</span>'


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59.4, "59 s"), (60, "1 min"), (250, "4 min 10 s"), (3600, "1 h 00 min")],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(timedelta(seconds=seconds)) == text


# --- bad query values -----------------------------------------------------------------------


def test_unknown_status_shows_every_status_with_a_notice(client: Client, alice: Any) -> None:
    design = make_design(alice, "a shop")
    html = _page(client, "?status=%3Cscript%3Ebogus")
    assert _ids(html) == [design.pk]
    assert "There is no status &quot;&lt;script&gt;bogus&quot;; showing every status." in html
    assert "<script>bogus" not in html


@pytest.mark.parametrize(
    ("page", "notice", "shown"),
    [
        ("abc", "&quot;abc&quot; is not a page number; showing the first page.", 1),
        ("0", "Pages start at 1; showing the first page.", 1),
        ("-3", "Pages start at 1; showing the first page.", 1),
        ("99", "There is no page 99; showing the last page.", 2),
        ("1e9", "&quot;1e9&quot; is not a page number; showing the first page.", 1),
    ],
)
def test_bad_page_numbers_fall_back_with_a_notice(
    client: Client, alice: Any, page: str, notice: str, shown: int
) -> None:
    for index in range(DESIGNS_PER_PAGE + 1):
        make_design(alice, f"shop {index}")
    html = _page(client, f"?page={page}")
    assert notice in html
    assert f"Page {shown} of 2" in html


def test_no_design_at_all_says_so_without_a_notice(client: Client, alice: Any) -> None:
    html = _page(client, "?page=7")
    assert "No designs yet." in html and "notice" not in html


def test_an_overlong_search_is_cut_with_a_notice(client: Client, alice: Any) -> None:
    html = _page(client, "?q=" + "x" * 500)
    assert "The search was shortened to its first 200 characters." in html
    assert 'value="' + "x" * 200 + '"' in html


# --- queries --------------------------------------------------------------------------------


def _design_queries(client: Client) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        _page(client, "?q=shop")
    return [query["sql"] for query in captured.captured_queries if "agents_design" in query["sql"]]


def test_a_page_costs_two_design_queries_however_many_rows() -> None:
    """The count and the rows with their owners: no query per row (N+1), for staff too."""
    client = _staff_client()
    owner = make_user("ada")
    for index in range(3):
        make_design(owner, f"shop {index}", status=Design.Status.SUCCEEDED)
    few = _design_queries(client)
    for index in range(DESIGNS_PER_PAGE):
        make_design(make_user(f"user{index}"), f"shop {index}", status=Design.Status.RUNNING)
    many = _design_queries(client)
    assert len(few) == len(many) == 2, many
    count, rows = many
    assert "COUNT(" in count.upper()
    assert "auth_user" in rows and "LIMIT" in rows.upper()
    assert "options" not in rows and "clarifications" not in rows  # only what a row shows
