"""The design WebSocket through the real ASGI stack: origin check, session auth, routing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from agents import consumers
from agents.consumers import MAX_CLIENT_MESSAGE_BYTES
from agents.models import AgentRun, Design
from carlos.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

User = get_user_model()


@sync_to_async
def session_cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def make_user(username: str, *, staff: bool = False) -> Any:
    return await User.objects.acreate_user(
        username, password="a-long-test-password", is_staff=staff
    )


async def open_socket(
    design_id: int, user: Any | None = None, origin: str = "http://localhost"
) -> WebsocketCommunicator:
    headers = [(b"origin", origin.encode()), (b"host", b"localhost")]
    if user is not None:
        cookie = await session_cookie(user)
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    communicator = WebsocketCommunicator(application, f"/ws/designs/{design_id}/", headers=headers)
    return communicator


async def closed_with(communicator: WebsocketCommunicator) -> int | None:
    """The close code the server sent (after accepting), or None if it sent something else."""
    output = await communicator.receive_output(timeout=5)
    return output.get("code") if output["type"] == "websocket.close" else None


async def make_design(owner: Any, **fields: Any) -> Design:
    return await Design.objects.acreate(owner=owner, request_text="A data lake", **fields)


async def test_anonymous_socket_is_closed_4403() -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk)
    connected, _ = await communicator.connect()
    assert connected
    assert await closed_with(communicator) == 4403
    await communicator.disconnect()


async def test_other_users_socket_is_closed_4404_like_a_missing_design() -> None:
    design = await make_design(await make_user("olivia"))
    stranger = await make_user("mallory")
    for design_id in (design.pk, 987654):
        communicator = await open_socket(design_id, stranger)
        connected, _ = await communicator.connect()
        assert connected
        assert await closed_with(communicator) == 4404
        await communicator.disconnect()


async def test_foreign_origin_is_refused_before_the_handshake() -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk, owner, origin="https://evil.example")
    connected, _ = await communicator.connect()
    assert not connected
    await communicator.disconnect()


async def test_snapshot_on_connect_has_the_design_and_current_runs() -> None:
    owner = await make_user("olivia")
    design = await make_design(
        owner, status=Design.Status.RUNNING, attempts=2, revisions=0, verdict=""
    )
    now = timezone.now()
    await AgentRun.objects.acreate(  # an earlier attempt: not part of the snapshot
        design=design, agent="requirements", attempt=1, status="failed", pool="mini", model="m"
    )
    finished = await AgentRun.objects.acreate(
        design=design,
        agent="requirements",
        attempt=2,
        status="succeeded",
        pool="mini",
        model="gpt-4o-mini",
        started_at=now - timedelta(seconds=2),
        finished_at=now,
        ttft_ms=80.0,
        wait_ms=0.5,
        tokens_in=100,
        tokens_out=400,
        output_text="## Requirements",
    )
    running = await AgentRun.objects.acreate(
        design=design, agent="carlos", attempt=2, status="running", pool="main", model="gpt-4o"
    )
    communicator = await open_socket(design.pk, owner)
    connected, _ = await communicator.connect()
    assert connected
    snapshot = await communicator.receive_json_from(timeout=5)
    assert snapshot["kind"] == "snapshot"
    assert snapshot["design"]["id"] == design.pk
    assert snapshot["design"]["status"] == "running"
    assert [(run["id"], run["agent"], run["status"]) for run in snapshot["runs"]] == [
        (finished.pk, "requirements", "succeeded"),
        (running.pk, "carlos", "running"),
    ]
    first = snapshot["runs"][0]
    assert first["duration_ms"] == pytest.approx(2000, abs=1)
    assert (first["ttft_ms"], first["wait_ms"], first["tokens_out"]) == (80.0, 0.5, 400)
    await communicator.disconnect()


async def test_staff_may_watch_any_design() -> None:
    design = await make_design(await make_user("olivia"))
    communicator = await open_socket(design.pk, await make_user("sam", staff=True))
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"
    await communicator.disconnect()


async def test_group_events_are_forwarded_as_published() -> None:
    owner = await make_user("olivia")
    design = await make_design(owner, status=Design.Status.RUNNING, attempts=1)
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    await communicator.receive_json_from(timeout=5)  # snapshot
    layer = get_channel_layer()
    tokens = {"kind": "tokens", "agent": "carlos", "round": 0, "text": "## 1. Overview\n"}
    await layer.group_send(f"design-{design.pk}", {"type": "design.event", "event": tokens})
    assert await communicator.receive_json_from(timeout=5) == tokens

    run = await AgentRun.objects.acreate(
        design=design, agent="carlos", attempt=1, status="succeeded", pool="main", model="gpt-4o"
    )
    finished = {
        "kind": "agent_finished",
        "run_id": run.pk,  # the pipeline names the run it finished
        "agent": "carlos",
        "round": 0,
        "status": "succeeded",
        "duration_ms": 2500.0,
        "ttft_ms": 110.0,
        "wait_ms": 0.2,
        "pool": "main",
        "overflow": False,
        "tokens_in": 500,
        "tokens_out": 1500,
        "error": "",
    }
    await layer.group_send(f"design-{design.pk}", {"type": "design.event", "event": finished})
    assert await communicator.receive_json_from(timeout=5) == finished

    # Another design's events do not leak into this socket.
    other = {"kind": "tokens", "agent": "ronei", "round": 0, "text": "secret"}
    await layer.group_send(f"design-{design.pk + 1}", {"type": "design.event", "event": other})
    assert await communicator.receive_nothing(timeout=0.2)
    await communicator.disconnect()


async def test_ping_and_unknown_messages() -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    await communicator.receive_json_from(timeout=5)
    await communicator.send_json_to({"kind": "ping"})
    assert await communicator.receive_json_from(timeout=5) == {"kind": "pong"}
    await communicator.send_to(text_data="not json")
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "error"
    await communicator.send_json_to({"kind": "snapshot"})
    assert (await communicator.receive_json_from(timeout=5))["kind"] == "snapshot"
    await communicator.disconnect()


@pytest.mark.parametrize("frame", ["text", "bytes"])
async def test_oversized_client_message_closes_the_socket(frame: str) -> None:
    owner = await make_user("olivia")
    design = await make_design(owner)
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    await communicator.receive_json_from(timeout=5)
    payload = "x" * (MAX_CLIENT_MESSAGE_BYTES + 1)
    if frame == "text":
        await communicator.send_to(text_data=payload)
    else:
        await communicator.send_to(bytes_data=payload.encode())
    assert await closed_with(communicator) == 1009
    await communicator.disconnect()


async def test_a_quiet_socket_resyncs_so_a_lost_final_status_still_arrives(monkeypatch) -> None:
    monkeypatch.setattr(consumers, "RESYNC_AFTER_S", 0.2)
    owner = await make_user("lena")
    design = await make_design(owner, status=Design.Status.RUNNING, attempts=1)
    communicator = await open_socket(design.pk, owner)
    await communicator.connect()
    assert (await communicator.receive_json_from(timeout=5))["design"]["status"] == "running"

    # The design finishes, but its design_status event never reaches this socket.
    await Design.objects.filter(pk=design.pk).aupdate(status=Design.Status.SUCCEEDED)
    resynced = await communicator.receive_json_from(timeout=5)
    assert resynced["kind"] == "snapshot" and resynced["design"]["status"] == "succeeded"
    assert await communicator.receive_nothing(timeout=0.5)  # finished: no more resyncs
    await communicator.disconnect()
