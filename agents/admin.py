"""Read-only admin for designs and the agent runs that produced them.

Staff look here to see what a design went through: which agent ran on which pool, how long
it waited for a slot, whether it needed a temporary connection, what failed. The records
are written by the pipeline only; editing them here would falsify that history (deleting a
design that has ended, with its runs, is allowed with the delete permission). A filter
in the address that cannot work answers 400, never 500 (`pools.admin_filters`).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from agents.models import AgentRun, Design, DesignRetry
from pools.admin_filters import SafeFiltersMixin


class ReadOnlyMixin:
    """View permission only: no add, change or delete from the admin."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# A run's columns, shared by the design's inline and the runs' list: which agent ran where
# and how it waited, then its token usage and start (the list shows its duration between).
_RUN_FACTS = (
    "agent",
    "round",
    "attempt",
    "pool",
    "model",
    "status",
    "overflow",
    "wait_ms",
    "ttft_ms",
)
_RUN_USAGE = ("tokens_in", "tokens_out", "tokens_estimated", "started_at")


class AgentRunInline(ReadOnlyMixin, admin.TabularInline):
    model = AgentRun
    fields = (*_RUN_FACTS, *_RUN_USAGE, "finished_at", "error")
    readonly_fields = fields
    extra = 0
    show_change_link = True
    ordering = ("attempt", "id")


class DesignRetryInline(ReadOnlyMixin, admin.TabularInline):
    """Who retried the design and when: each retry counted against their hourly allowance."""

    model = DesignRetry
    fields = ("requested_by", "requested_at")
    readonly_fields = fields
    extra = 0
    ordering = ("requested_at", "id")


@admin.register(Design)
class DesignAdmin(SafeFiltersMixin, ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "title",
        "owner",
        "status",
        "verdict",
        "recommendation",
        "revisions",
        "attempts",
        "created_at",
        "finished_at",
        "trace_id",
    )
    list_display_links = ("id", "title")
    # Filters through the runs: e.g. designs where an agent ran on a temporary connection.
    list_filter = (
        "status",
        "verdict",
        "recommendation",
        "runs__agent",
        "runs__pool",
        "runs__overflow",
    )
    # A trace id pasted from the tracing system finds its design.
    search_fields = ("request_text", "trace_parent")
    date_hierarchy = "created_at"
    list_select_related = ("owner",)
    inlines = (AgentRunInline, DesignRetryInline)
    readonly_fields = ("trace_id",)

    @admin.display(description="trace id")
    def trace_id(self, design: Design) -> str:
        """The design's OpenTelemetry trace id (blank while telemetry is off)."""
        return design.trace_id

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """With `agents.delete_design`, a design that has ended may be deleted, with its runs
        and retries; one still in progress is cancelled from its page first (a bulk delete
        that includes one deletes nothing)."""
        if obj is not None and obj.status not in Design.TERMINAL_STATUSES:
            return False
        return request.user.has_perm("agents.delete_design")

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        """A design's runs and retries go with it: they need no delete permission of their
        own (they are read-only, and never deleted alone)."""
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        own_parts = {str(AgentRun._meta.verbose_name), str(DesignRetry._meta.verbose_name)}
        return deleted, counts, perms_needed - own_parts, protected


@admin.register(AgentRun)
class AgentRunAdmin(SafeFiltersMixin, ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("id", "design", *_RUN_FACTS, "duration", *_RUN_USAGE)
    list_filter = ("status", "agent", "pool", "overflow")
    search_fields = ("error", "design__request_text")
    date_hierarchy = "started_at"
    list_select_related = ("design",)

    @admin.display(description="duration ms")
    def duration(self, run: AgentRun) -> str:
        duration = run.duration_ms
        return "" if duration is None else f"{duration:.0f}"
