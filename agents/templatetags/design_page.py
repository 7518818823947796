"""Filters of the design page's fragments (progress bar, timeline)."""

from __future__ import annotations

from django import template

from agents.progress import duration_text

register = template.Library()


@register.filter
def duration(milliseconds: float | None) -> str:
    """Milliseconds as people read a duration: 40 ms, 2.4 s, 12 s, 1:05 min."""
    return duration_text(milliseconds)


@register.filter
def percent(value: float) -> str:
    """A CSS percentage, never localised (a decimal comma would break the style)."""
    return f"{value:.2f}%"
