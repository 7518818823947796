"""The history page: a status filter, a text search, pages, and each design's duration.

The query string is read once into a `HistoryQuery`: a value the page cannot use (an unknown
status, a page that is not a number or past the end) falls back to something sensible and says
so in a notice, never a 500. A page costs two queries whatever its length: the count and the
rows (owners joined), so the list never grows an N+1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from django.core.paginator import Page, Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from agents.access import User, login_required, may_view_every_design, visible_designs
from agents.models import Design

DESIGNS_PER_PAGE = 20
SEARCH_MAX_CHARS = 200
# What a row needs, and no more: the request text (the title is its first line), no options,
# clarifications, errors or outputs.
ROW_FIELDS = (
    "id",
    "request_text",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "verdict",
    "recommendation",
    "owner__username",
)


@dataclass
class HistoryQuery:
    """What the user asked the history for, made usable, with a notice for each fallback."""

    status: str = ""  # one of Design.Status, or "" for every status
    search: str = ""
    page: int = 1
    notices: list[str] = field(default_factory=list)

    @property
    def filtered(self) -> bool:
        return bool(self.status or self.search)

    def url(self, page: int) -> str:
        """The query string of another page of the same filtered list."""
        params = {"status": self.status, "q": self.search, "page": page if page > 1 else ""}
        return "?" + urlencode({key: value for key, value in params.items() if value})


def read_query(params: QueryDict) -> HistoryQuery:
    """The filter, the search and the page asked for; what cannot be used is dropped, with a
    notice saying what is shown instead."""
    query = HistoryQuery()
    status = params.get("status", "").strip()
    if status in Design.Status.values:
        query.status = status
    elif status:
        query.notices.append(f'There is no status "{status[:40]}"; showing every status.')
    search = " ".join(params.get("q", "").split())
    if len(search) > SEARCH_MAX_CHARS:
        query.notices.append(
            f"The search was shortened to its first {SEARCH_MAX_CHARS} characters."
        )
        search = search[:SEARCH_MAX_CHARS].rstrip()
    query.search = search
    page = params.get("page", "").strip()
    if page:
        try:
            query.page = int(page)
        except ValueError:
            query.notices.append(f'"{page[:20]}" is not a page number; showing the first page.')
        else:
            if query.page < 1:
                query.notices.append("Pages start at 1; showing the first page.")
                query.page = 1
    return query


def matching(designs: QuerySet[Design], query: HistoryQuery) -> QuerySet[Design]:
    """`designs` in the asked status whose request (the title is its first line) contains
    every word of the search, case-insensitively; newest first, with what a row shows."""
    if query.status:
        designs = designs.filter(status=query.status)
    for word in query.search.split():
        designs = designs.filter(request_text__icontains=word)
    return designs.select_related("owner").only(*ROW_FIELDS).order_by("-created_at", "-id")


def page_of(designs: QuerySet[Design], query: HistoryQuery) -> tuple[Page, int]:
    """The asked page (its rows read) and the number of pages; a page past the end shows the
    last one."""
    paginator = Paginator(designs, DESIGNS_PER_PAGE)
    num_pages = paginator.num_pages
    if query.page > num_pages:
        if paginator.count:
            query.notices.append(f"There is no page {query.page}; showing the last page.")
        query.page = num_pages
    page = paginator.page(query.page)
    page.object_list = list(page.object_list)
    return page, num_pages


@dataclass
class History:
    """What the history page shows, read in one database round (one hop to a thread)."""

    page: Page
    num_pages: int
    show_owner: bool


@sync_to_async
def read_history(user: User, query: HistoryQuery) -> History:
    page, num_pages = page_of(matching(visible_designs(user), query), query)
    return History(page, num_pages, show_owner=may_view_every_design(user))


def human_duration(span: timedelta) -> str:
    """A short, readable length of time: "45 s", "3 min 12 s", "2 h 05 min"."""
    seconds = max(0, round(span.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass(frozen=True)
class Duration:
    """How long a design ran: `text` for the page, `seconds` for its machine-readable tag,
    `running` when the design is still going (the text is the time so far)."""

    text: str
    seconds: int
    running: bool


def duration_of(design: Design, now: datetime | None = None) -> Duration | None:
    """Finished minus started, or the time so far for a running design; None for a design
    that never started (queued, waiting for answers, cancelled before its first agent)."""
    if design.started_at is None:
        return None
    if design.finished_at is not None:
        span, running = design.finished_at - design.started_at, False
    elif design.status == Design.Status.RUNNING:
        span, running = (now or timezone.now()) - design.started_at, True
    else:
        return None
    return Duration(human_duration(span), max(0, round(span.total_seconds())), running)


@login_required
@require_GET
async def design_list(request: HttpRequest) -> HttpResponse:
    """The user's designs (everyone's with the view permission), newest first: filtered by
    status, searched, paginated; a query value it cannot use falls back with a notice."""
    user = await request.auser()
    request.user = user  # loaded with the async API: the template reads it without a query
    query = read_query(request.GET)
    history = await read_history(user, query)
    page, num_pages = history.page, history.num_pages
    now = timezone.now()
    rows = [(design, duration_of(design, now)) for design in page.object_list]
    context = {
        "nav": "history",
        "rows": rows,
        "query": query,
        "statuses": Design.Status.choices,
        "page_number": page.number,
        "num_pages": num_pages,
        "previous_url": query.url(page.number - 1) if page.number > 1 else None,
        "next_url": query.url(page.number + 1) if page.number < num_pages else None,
        "total": page.paginator.count,  # counted once already, for the pages
        "show_owner": history.show_owner,
    }
    return render(request, "agents/design_list.html", context)
