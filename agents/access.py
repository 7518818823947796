"""Who may see a design and who may act on it: Django's model permissions, never the staff flag.

- Viewing a design (its page, its run fragments, its live feed, both zips, and everyone's
  designs in the history) needs ownership or `agents.view_design`. Downloading is viewing:
  a zip holds nothing the page does not show. `agents.change_design` implies viewing, as in
  Django's admin.
- Acting on a design (answering its questions, retrying it, cancelling it) needs ownership
  or `agents.change_design`; deleting one needs ownership or `agents.delete_design`.
- Staff status alone gives nothing here; it only lets a user into the admin, where the same
  permissions apply. Superusers hold every permission.

Grant them in the admin (Users or Groups), e.g. a "Support" group with "Can view design".

Each check is a plain function: a page calls them inside its one database round (a single
hop to a thread, see agents.views), and `may_see` is the one the live feed awaits.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import user_passes_test
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from agents.models import Design

VIEW_DESIGN = "agents.view_design"
CHANGE_DESIGN = "agents.change_design"
DELETE_DESIGN = "agents.delete_design"

User = AbstractBaseUser | AnonymousUser


async def _is_signed_in(user: User) -> bool:
    return user.is_authenticated


# Django's `login_required`, its test a coroutine: Django runs a plain function's test in a
# thread, one more hop to a thread and back per page for reading an attribute.
login_required = user_passes_test(_is_signed_in)


def may_view_every_design(user: User) -> bool:
    """Whether `user` sees designs they do not own (view, or change which implies it)."""
    if not user.is_authenticated:
        return False
    return user.has_perm(VIEW_DESIGN) or user.has_perm(CHANGE_DESIGN)


def may_view(user: User, design: Design) -> bool:
    """Whether `user` may see `design`: an owner without a permission query."""
    if not user.is_authenticated:
        return False
    return design.owner_id == user.pk or may_view_every_design(user)


def may_act_on(user: User, design: Design) -> bool:
    """Whether `user` may answer, retry (or otherwise act on) `design`."""
    if not user.is_authenticated:
        return False
    return design.owner_id == user.pk or user.has_perm(CHANGE_DESIGN)


def may_delete(user: User, design: Design) -> bool:
    """Whether `user` may delete `design` (with its runs) from its page."""
    if not user.is_authenticated:
        return False
    return design.owner_id == user.pk or user.has_perm(DELETE_DESIGN)


def visible_designs(user: User) -> QuerySet[Design]:
    """The designs `user` may see: their own, or every design with the view permission."""
    if not user.is_authenticated:
        return Design.objects.none()
    if may_view_every_design(user):
        return Design.objects.all()
    return Design.objects.filter(owner_id=user.pk)


@sync_to_async
def may_see(user: User, design_id: int) -> bool:
    """Whether the design exists and `user` may see it (one hop to a thread)."""
    return visible_designs(user).filter(pk=design_id).exists()
