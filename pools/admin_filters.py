"""Admin lists whose filters never answer 500: a lookup that cannot work is a clear 400.

Django's admin applies any field lookup in the query string (`?pool__regex=(`). Unknown fields
and values that do not convert it already handles (a list redirects to its unfiltered `?e=1`,
the pool chart answers 400), but some lookups only fail when the database runs them: a
regular expression that does not compile (SQLite and PostgreSQL), a NUL character
(PostgreSQL), a year past 9999 (`__iso_year`, `__year__gt`), an integer too big for SQLite in
`__in`. Those reached the browser as 500s.

`SafeFiltersMixin` refuses regular-expression lookups and NUL characters up front (nobody
needs them; staff have the search box and exact filters), and turns whatever else the
database cannot evaluate for a filtered list into the same 400. An error on a list without
filters is not the filter's fault and still raises.

`RecentFilter` offers a range that moves with the clock (the last hour, day, week ...).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator
from typing import Any

from django.contrib.admin import SimpleListFilter
from django.contrib.admin.exceptions import DisallowedModelAdminLookup
from django.contrib.admin.options import (
    IS_FACETS_VAR,
    IS_POPUP_VAR,
    TO_FIELD_VAR,
    IncorrectLookupParameters,
)
from django.contrib.admin.views.main import ALL_VAR, ERROR_FLAG, ORDER_VAR, PAGE_VAR
from django.db import DatabaseError, connections, router, transaction
from django.db.models import QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.utils import timezone

from pools.engine.intervals import parse_duration

logger = logging.getLogger(__name__)

REFUSED_LOOKUPS = frozenset({"regex", "iregex"})
# Query-string parameters of the list itself (page, ordering, ...), never applied as filters.
LIST_PARAMS = frozenset(
    {ALL_VAR, ORDER_VAR, PAGE_VAR, ERROR_FLAG, IS_FACETS_VAR, IS_POPUP_VAR, TO_FIELD_VAR}
)
# What evaluating a bad filter raises: the database's error, or Python's while the query is
# compiled (a date out of range) or its parameters bound (an integer too big for SQLite).
EVALUATION_ERRORS = (DatabaseError, ValueError, OverflowError)


class UnusableFilter(Exception):
    """A filter from the query string that the database could not evaluate."""


def filters_in(request: HttpRequest, ignored: Collection[str] = ()) -> list[str]:
    """The query-string parameters that filter the list (search included); `ignored` names
    a list's own other parameters (a chart's choices)."""
    return [key for key in request.GET if key not in LIST_PARAMS and key not in ignored]


def bad_filter_response(request: HttpRequest, problem: Exception) -> HttpResponse:
    """A plain-text 400 that names the problem and the way back."""
    return HttpResponseBadRequest(
        f"This admin filter cannot be used: {problem}.\n"
        "Lookups by regular expression (__regex, __iregex) and NUL characters are refused, "
        "and so is a filter the database cannot evaluate (a date or number out of range).\n"
        f"Remove it from the address: {request.path}\n",
        content_type="text/plain; charset=utf-8",
    )


@contextlib.contextmanager
def evaluating_filters(
    request: HttpRequest, model: type, ignored: Collection[str] = ()
) -> Iterator[None]:
    """Runs the queries of a filtered admin list; an error they raise becomes UnusableFilter.

    Inside a transaction the queries run in a savepoint, so a PostgreSQL error does not
    poison the rest of it; outside one nothing is opened (a SQLite BEGIN IMMEDIATE would
    take the write lock for a read).
    """
    alias = router.db_for_read(model)
    atomic = transaction.atomic(using=alias) if connections[alias].in_atomic_block else None
    try:
        with atomic or contextlib.nullcontext():
            yield
    except EVALUATION_ERRORS as exc:
        filters = filters_in(request, ignored)
        if not filters:
            raise
        logger.warning(
            "admin list of %s: the filter %s could not be evaluated: %s: %s",
            model._meta.label,
            ", ".join(filters),
            type(exc).__name__,
            exc,
        )
        raise UnusableFilter(f"the database could not evaluate {', '.join(filters)}") from exc


class RecentFilter(SimpleListFilter):
    """Rows of the last hour, day, week ...: a range that moves with the clock. Any duration
    such as `?within=90m` works too; fixed ranges are the date drill-down, or
    `<field>__gte=` and `__lt=` in the address."""

    title = "period"
    parameter_name = "within"
    field_name = "taken_at"
    periods = (
        ("1h", "Last hour"),
        ("6h", "Last 6 hours"),
        ("24h", "Last 24 hours"),
        ("7d", "Last 7 days"),
        ("30d", "Last 30 days"),
    )

    def lookups(self, request: HttpRequest, model_admin: Any) -> tuple[tuple[str, str], ...]:
        return self.periods

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        try:
            age = parse_duration(str(value))
        except ValueError as exc:
            raise IncorrectLookupParameters(f"{self.parameter_name}: {exc}") from None
        return queryset.filter(**{f"{self.field_name}__gte": timezone.now() - age})


class SafeFiltersMixin:
    """For a ModelAdmin: a bad filter in the query string is a 400 with a reason, never 500."""

    # The list's own query-string parameters that are not filters (a chart's choices).
    list_params: frozenset[str] = frozenset()

    def lookup_allowed(self, lookup: str, value: Any, request: HttpRequest) -> bool:
        if lookup.rsplit(LOOKUP_SEP, 1)[-1] in REFUSED_LOOKUPS:
            return False  # e.g. "Filtering by pool__regex not allowed"
        if "\x00" in str(value):
            return False
        return super().lookup_allowed(lookup, value, request)  # type: ignore[misc]

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        # The ChangeList counts its rows as it is built: a bad filter fails here.
        with evaluating_filters(request, self.model, self.list_params):  # type: ignore[attr-defined]
            return super().get_changelist_instance(request)  # type: ignore[misc]

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        try:
            return super().changelist_view(request, extra_context)  # type: ignore[misc]
        except (DisallowedModelAdminLookup, UnusableFilter) as exc:
            return bad_filter_response(request, exc)
