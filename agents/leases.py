"""Which process works on a design: a lease in the designs table, renewed while it runs.

A process works on a QUEUED or RUNNING design only while `lease_owner` names it and
`lease_expires_at` is in the future. Every write that moves a design on is conditional on
that, so no process marks or takes a design whose lease is alive: a live server is never
"interrupted" by another one starting, and a process that lost its lease (it stalled past
the lease time, or the user cancelled the design) only stops. The lease lives in the
database the designs live in, so this works alike on SQLite and PostgreSQL, with or without
Redis. Expiry is compared with each process's clock: instances need clocks in step (NTP)
to well within the lease time.

This module holds the database side (take, renew, release, what is free) and the process's
drain flag; agents.tasks runs the renewing and sweeping.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from agents.models import AgentRun, Design
from pools.engine.typed_settings import parse, setting, setting_keys

Status = Design.Status
ACTIVE = tuple(Design.ACTIVE_STATUSES)
_instance: tuple[int, str] | None = None
_draining = threading.Event()


@dataclass(frozen=True)
class LeaseSettings:
    """The durability settings (carlos/settings.py documents each); each field's key is its
    Django setting, a value out of bounds becomes the nearest bound."""

    lease_seconds: float = setting(30.0, key="DESIGN_LEASE_SECONDS", low=1.0, clamp=True)
    sweep_seconds: float = setting(10.0, key="DESIGN_SWEEP_SECONDS", low=0.1, clamp=True)
    max_takeovers: int = setting(3, key="DESIGN_MAX_TAKEOVERS", low=0, clamp=True)
    drain_seconds: float = setting(30.0, key="DRAIN_SECONDS", low=0.0, clamp=True)
    questions_timeout: float = setting(24 * 3600.0, key="QUESTIONS_TIMEOUT", low=0.0, clamp=True)

    @classmethod
    def current(cls) -> LeaseSettings:
        """From the settings; one left out or None keeps the default above."""
        return parse(cls, {key: getattr(settings, key, None) for key in setting_keys(cls)})


def this_instance() -> str:
    """This process's name in `lease_owner`: host, pid and a random part, new after a fork."""
    global _instance
    pid = os.getpid()
    if _instance is None or _instance[0] != pid:
        _instance = (pid, f"{socket.gethostname()[:80]}:{pid}:{secrets.token_hex(4)}")
    return _instance[1]


def expiry(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) + timedelta(seconds=LeaseSettings.current().lease_seconds)


def held_by(owner: str, now: datetime | None = None) -> dict[str, object]:
    """The fields that give a design's lease to `owner` for one lease time."""
    return {"lease_owner": owner, "lease_expires_at": expiry(now)}


RELEASED: dict[str, object] = {"lease_owner": "", "lease_expires_at": None}


def free(now: datetime | None = None) -> Q:
    """Designs no live process holds: never leased, released, or expired."""
    return Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now or timezone.now())


def mine_or_free(owner: str, now: datetime | None = None) -> Q:
    return Q(lease_owner=owner) | free(now)


def owned(owner: str) -> Q:
    """The designs `owner` holds and may still move on (not cancelled, not finished)."""
    return Q(lease_owner=owner, status__in=ACTIVE)


async def renew(owner: str, design_ids: set[int]) -> set[int]:
    """Extend `owner`'s leases of `design_ids` by one lease time, in one UPDATE; returns the
    ids it must stop working on: another process holds them now, or they were cancelled.

    (A design with no holder is not lost: its owner's claim, or a finished design's last
    write, released or has not yet taken it.)
    """
    if not design_ids:
        return set()
    await Design.objects.filter(owned(owner), pk__in=design_ids).aupdate(lease_expires_at=expiry())
    lost = (
        Design.objects.filter(pk__in=design_ids)
        .exclude(lease_owner=owner)
        .filter(~Q(lease_owner="") | Q(status=Status.CANCELLED))
    )
    return {pk async for pk in lost.values_list("pk", flat=True)}


async def release(owner: str, design_id: int) -> int:
    """Give up a design that stays QUEUED (never started here): anyone may take it."""
    return await Design.objects.filter(pk=design_id, lease_owner=owner).aupdate(**RELEASED)


async def orphans(limit: int, now: datetime | None = None) -> list[Design]:
    """Unfinished designs no live process holds, oldest first: what a sweeper takes over."""
    if limit <= 0:
        return []
    query = Design.objects.filter(free(now), status__in=ACTIVE).order_by("created_at", "id")
    return [design async for design in query.only("pk", "lease_owner", "takeovers")[:limit]]


async def take(candidate: Design, owner: str) -> bool:
    """Take `candidate`'s lease if it is still as read (compare and set); True if taken.

    A design whose holder died (its lease expired with an owner named) counts one more
    takeover; one released on purpose (a drain) does not.
    """
    now = timezone.now()
    died = bool(candidate.lease_owner)
    taken = (
        await Design.objects.filter(
            free(now), pk=candidate.pk, status__in=ACTIVE, lease_owner=candidate.lease_owner
        ).aupdate(
            **held_by(owner, now),
            **({"takeovers": F("takeovers") + 1} if died else {}),
        )
        == 1
    )
    if taken and died:
        candidate.takeovers += 1
        # What the dead process was running stopped with it (its text as last saved).
        await AgentRun.objects.filter(
            design_id=candidate.pk, status=AgentRun.Status.RUNNING
        ).aupdate(
            status=AgentRun.Status.STOPPED,
            error="stopped: the server running this design stopped; it resumed elsewhere",
            finished_at=now,
        )
    return taken


async def overdue_questions(timeout: float, limit: int) -> list[int]:
    """Designs that waited longer than `timeout` for answers that did not come."""
    if limit <= 0:
        return []
    since = timezone.now() - timedelta(seconds=timeout)
    query = Design.objects.filter(status=Status.AWAITING_ANSWERS, created_at__lt=since)
    return [pk async for pk in query.order_by("created_at").values_list("pk", flat=True)[:limit]]


async def skip_questions(design_id: int, owner: str) -> bool:
    """Go on without answers: the questions stay, marked skipped; QUEUED under `owner`."""
    design = await Design.objects.filter(pk=design_id).afirst()
    if design is None or design.status != Status.AWAITING_ANSWERS:
        return False
    skipped = [{"question": item["question"], "answer": None} for item in design.clarifications]
    return bool(
        await Design.objects.filter(pk=design_id, status=Status.AWAITING_ANSWERS).aupdate(
            clarifications=skipped, status=Status.QUEUED, **held_by(owner)
        )
    )


def place_in_queue(design: Design) -> int | None:
    """A QUEUED design's place in the line (1 = next to start), or None if not queued.

    The line is every queued design, oldest first: each process starts its queued designs
    in the order they came, and the sweepers take the orphaned ones oldest first.
    """
    if design.status != Status.QUEUED:
        return None
    ahead = Design.objects.filter(status=Status.QUEUED).filter(
        Q(created_at__lt=design.created_at) | Q(created_at=design.created_at, pk__lt=design.pk)
    )
    return ahead.count() + 1


async def queue_place(design: Design) -> int | None:
    """`place_in_queue` from async code (no query unless the design is queued)."""
    if design.status != Status.QUEUED:
        return None
    return await sync_to_async(place_in_queue)(design)


# -- the process's drain ---------------------------------------------------------------------


def draining() -> bool:
    """True once the process began to stop: it takes no new design and starts no new agent."""
    return _draining.is_set()


def begin_draining() -> None:
    _draining.set()


def end_draining() -> None:
    """For a process that serves again after a drain (tests run several servers' lives)."""
    _draining.clear()
