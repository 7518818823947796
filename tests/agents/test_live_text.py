"""A page that joins while an agent is writing gets the text so far, then the live tokens,
with nothing doubled or lost: through the real pipeline, simulator, consumer and channel
layer, with the in-memory layer and with Redis (`agents.pipeline.live`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from channels.layers import get_channel_layer

from agents.events import DESIGN_EVENT, design_group
from agents.models import AgentRun, Design
from agents.pipeline import create_design, live, run_design
from agents.pipeline.live import ask_for_text
from agents.simulated import carlos_responder
from tests.agents.sockets import open_socket
from tests.helpers.services import REDIS_URL, forget_keys, needs_redis, run_prefix

pytestmark = pytest.mark.django_db(transaction=True)

REQUEST = "An online bookstore for 20k daily users with search and a loyalty programme"
# Slow enough that Carlos is still writing when the page joins, fast enough for a quick test.
TOKENS_PER_SECOND = 600.0
# How much of Carlos's answer has streamed before the page joins.
JOIN_AFTER_CHARACTERS = 300


class PageText:
    """What the design page's script does with `text` and `tokens` events of one run: hold the
    tokens until the text so far arrives (when it joined mid-answer), then add only what
    lies beyond what it has. Also counts what it had to throw away as already shown."""

    def __init__(self, run_id: int, *, joined_late: bool) -> None:
        self.run_id = run_id
        self.text = ""
        self.synced = not joined_late
        self.held: list[dict[str, Any]] = []
        self.received_so_far = False

    def add(self, event: dict[str, Any]) -> None:
        if event.get("run_id") != self.run_id:
            return
        if event["kind"] == "text":
            self.received_so_far = True
            if len(event["text"]) > len(self.text):
                self.text = event["text"]
            self.synced = True
            held, self.held = self.held, []
            for tokens in held:
                self.add(tokens)
        elif event["kind"] == "tokens":
            if not self.synced:
                self.held.append(event)
                return
            assert event["offset"] <= len(self.text), "a gap: tokens were lost on the way"
            self.text += event["text"][len(self.text) - event["offset"] :]


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis())])
def channel_layer_kind(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """The process's channel layer: the in-memory one of the settings, or Redis under a key
    prefix of this run's own (deleted afterwards)."""
    if request.param == "memory":
        yield "memory"
        return
    prefix = run_prefix("test-live-text")
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{prefix}:channels"},
        }
    }
    try:
        yield "redis"
    finally:
        forget_keys(REDIS_URL, prefix)


async def carlos_events_until(channel: str, condition: Any) -> list[dict[str, Any]]:
    """The design group's events (read from `channel`) until `condition(events)` holds."""
    layer = get_channel_layer()
    events: list[dict[str, Any]] = []
    while not condition(events):
        message = await asyncio.wait_for(layer.receive(channel), 20)
        assert message["type"] == DESIGN_EVENT
        events.append(message["event"])
    return events


def carlos_streamed(events: list[dict[str, Any]]) -> int:
    return sum(len(e["text"]) for e in events if e["kind"] == "tokens" and e["agent"] == "carlos")


async def test_a_page_joining_mid_answer_gets_the_text_so_far_then_the_rest(
    channel_layer_kind: str, simulator_factory: Any, make_registry: Any, install_registry: Any,
    owner: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    simulator = await simulator_factory(
        responder=carlos_responder, ttft_ms=5.0, tokens_per_second=TOKENS_PER_SECOND
    )
    install_registry(make_registry(simulator))
    design = await create_design(owner, REQUEST)
    layer = get_channel_layer()
    watcher = await layer.new_channel()
    await layer.group_add(design_group(design.pk), watcher)
    running = asyncio.create_task(run_design(design.pk))
    try:
        await carlos_events_until(
            watcher, lambda events: carlos_streamed(events) >= JOIN_AFTER_CHARACTERS
        )
        # The page joins now: Carlos has written a part of his answer. With Redis, as a
        # socket in another process would: its request goes out through a layer of its own.
        if channel_layer_kind == "redis":
            monkeypatch.setattr(live, "_text_layers", {})
        communicator = await open_socket(design.pk, owner)
        assert (await communicator.connect())[0]
        snapshot = await communicator.receive_json_from(timeout=5)
        assert snapshot["kind"] == "snapshot"
        [carlos] = [run for run in snapshot["runs"] if run["agent"] == "carlos"]
        assert carlos["status"] == "running"
        page = PageText(carlos["run_id"], joined_late=True)
        while True:
            event = await communicator.receive_json_from(timeout=20)
            page.add(event)
            if event["kind"] == "agent_finished" and event["run_id"] == carlos["run_id"]:
                break
        await communicator.disconnect()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await layer.group_discard(design_group(design.pk), watcher)
    run = await AgentRun.objects.aget(pk=carlos["run_id"])
    assert run.status == AgentRun.Status.SUCCEEDED
    assert page.received_so_far, "the page was never sent the text so far"
    assert page.text == run.output_text  # all of it, once: nothing lost, nothing doubled
    assert len(run.output_text) > JOIN_AFTER_CHARACTERS


async def test_tokens_carry_their_offsets_and_the_text_so_far_is_answered_only_while_writing(
    channel_layer_kind: str, simulator_factory: Any, make_registry: Any, install_registry: Any,
    owner: Any,
) -> None:  # fmt: skip
    """Offsets are contiguous for a page that saw the start; a request for the text of a run
    that is not writing (finished, or of another design) gets no answer."""
    simulator = await simulator_factory(responder=carlos_responder, ttft_ms=5.0)
    install_registry(make_registry(simulator))
    design = await create_design(owner, REQUEST)
    layer = get_channel_layer()
    watcher = await layer.new_channel()
    await layer.group_add(design_group(design.pk), watcher)
    await run_design(design.pk)
    events = []
    while True:
        message = await asyncio.wait_for(layer.receive(watcher), 5)
        events.append(message["event"])
        if events[-1]["kind"] == "design_status" and events[-1]["terminal"]:
            break
    await layer.group_discard(design_group(design.pk), watcher)
    assert (await Design.objects.aget(pk=design.pk)).status == Design.Status.SUCCEEDED
    async for run in AgentRun.objects.filter(design=design):
        tokens = [e for e in events if e["kind"] == "tokens" and e["run_id"] == run.pk]
        offsets = [e["offset"] for e in tokens]
        lengths = [len(e["text"]) for e in tokens]
        assert offsets == [sum(lengths[:index]) for index in range(len(tokens))], run.agent
        assert "".join(e["text"] for e in tokens) == run.output_text
    # Nobody answers for a design that is not running here any more.
    reply_to = await layer.new_channel()
    runs = AgentRun.objects.filter(design=design).values_list("pk", flat=True)
    await ask_for_text(design.pk, [pk async for pk in runs], reply_to)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(reply_to), 0.3)


async def test_a_socket_of_a_design_running_nowhere_still_gets_its_snapshot(owner: Any) -> None:
    """Asking for the text of a run nobody writes (its process died) costs the page nothing:
    the snapshot comes, and then silence, not an error."""
    design = await Design.objects.acreate(
        owner=owner, request_text="A data lake", status=Design.Status.RUNNING, attempts=1
    )
    await AgentRun.objects.acreate(
        design=design, agent="carlos", attempt=1, status="running", pool="main", model="gpt-4o"
    )
    communicator = await open_socket(design.pk, owner)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"
    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect()
