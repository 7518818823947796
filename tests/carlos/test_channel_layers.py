"""The single-process channel layer: the parent's semantics, without a scan per send."""

from __future__ import annotations

import asyncio

import pytest
from channels.layers import get_channel_layer

from carlos import channel_layers
from carlos.channel_layers import LocalChannelLayer


async def test_settings_use_it_and_groups_deliver_to_every_member():
    layer = get_channel_layer()
    assert isinstance(layer, LocalChannelLayer) and layer.capacity == 1000
    first, second = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("design-1", first)
    await layer.group_add("design-1", second)
    await layer.group_add("design-2", second)
    await layer.group_send("design-1", {"type": "design.event", "n": 1})
    assert (await layer.receive(first))["n"] == 1
    assert (await layer.receive(second))["n"] == 1
    await layer.group_discard("design-1", second)
    await layer.group_send("design-1", {"type": "design.event", "n": 2})
    assert (await layer.receive(first))["n"] == 2
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.05):
            await layer.receive(second)
    await layer.flush()


async def test_a_full_member_misses_a_message_and_the_others_do_not():
    layer = LocalChannelLayer(capacity=1)
    full, other = await layer.new_channel(), await layer.new_channel()
    for channel in (full, other):
        await layer.group_add("g", channel)
    await layer.send(full, {"type": "x", "n": 0})
    await layer.group_send("g", {"type": "x", "n": 1})
    assert (await layer.receive(full))["n"] == 0
    assert (await layer.receive(other))["n"] == 1


async def test_expired_messages_are_still_dropped_but_scanned_once_a_second(monkeypatch):
    layer = LocalChannelLayer(expiry=0)
    channel = await layer.new_channel()
    await layer.group_add("g", channel)
    scans = 0
    parent_clean = channel_layers.InMemoryChannelLayer._clean_expired

    def counting_clean(self):
        nonlocal scans
        scans += 1
        parent_clean(self)

    monkeypatch.setattr(channel_layers.InMemoryChannelLayer, "_clean_expired", counting_clean)
    layer._cleaned_at = 0.0
    await layer.group_send("g", {"type": "x"})
    for _ in range(50):
        await layer.group_send("g", {"type": "x"})
    assert scans == 1  # not once per send
    layer._cleaned_at = 0.0  # a second later
    await layer.group_send("g", {"type": "x"})
    assert scans == 2
    # Messages past their expiry were dropped by that scan, and the channel left its group.
    assert channel not in layer.groups.get("g", {})


async def test_sends_from_another_threads_loop_arrive_in_order_on_the_receiving_loop():
    """What the LLM loop does: a design publishes from its own thread, sockets receive here."""
    layer = LocalChannelLayer(capacity=1000)
    channel = await layer.new_channel()
    await layer.group_add("design-1", channel)
    here = asyncio.get_running_loop()
    wake_ups = 0
    parent_drain = layer._drain

    def counting_drain() -> None:
        nonlocal wake_ups
        wake_ups += 1
        assert asyncio.get_running_loop() is here  # delivered on the receiving loop
        parent_drain()

    layer._drain = counting_drain

    async def publish() -> None:
        for n in range(200):
            await layer.group_send("design-1", {"type": "design.event", "n": n})
        await layer.send(channel, {"type": "design.event", "n": 200})

    await asyncio.to_thread(asyncio.run, publish())
    received = [(await layer.receive(channel))["n"] for _ in range(201)]
    assert received == list(range(201))
    assert 1 <= wake_ups < 201  # batched: one wake-up per batch, not one per message


async def test_after_the_receiving_loop_closed_a_send_is_delivered_directly():
    layer = LocalChannelLayer()

    async def join() -> str:
        channel = await layer.new_channel()
        await layer.group_add("g", channel)
        return channel

    channel = await asyncio.to_thread(asyncio.run, join())  # that loop is closed after
    await layer.group_send("g", {"type": "x", "n": 1})
    assert (await layer.receive(channel))["n"] == 1
