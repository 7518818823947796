"""The new-design form refuses a design while the pools are not ready, as /health's readiness
decides it (warming up, the endpoint unreachable, closed), saying why on the form with a 503
and Retry-After; nothing is created, and the text stays in the form. Pools still warming
(or that nothing warms) get a moment to warm first.

Reproduces (issue 15): with no simulator running, /health answered 503 yet the form accepted
the design, which then failed with a bare `APIConnectionError: Connection error.`
"""

from __future__ import annotations

from typing import Any

import pytest
from django.utils.html import escape

from agents import capacity
from agents.models import Design
from carlos import serving
from pools.engine.registry import PoolRegistry
from tests.agents.pages import logged_in, valid_form
from tests.conftest import probe, registry_config
from tests.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

TEXT = "A booking site\nfor 40 yoga studios"


def assert_refused(response: Any, notice: str) -> int:
    """503, Retry-After, the notice in words, the text still in the form; the seconds."""
    assert response.status_code == 503
    html = response.content.decode()
    seconds = int(response["Retry-After"])
    assert f"{escape(notice)}; please try again in {seconds} second" in html
    assert f">\n{escape(TEXT)}</textarea>" in html
    return seconds


@pytest.fixture
async def unreachable(install_registry) -> PoolRegistry:
    """Pools whose endpoint is a port where nothing listens, as under `runserver` before it
    brought the simulator."""
    registry = install_registry(PoolRegistry(registry_config(f"http://127.0.0.1:{free_port()}/v1")))
    yield registry
    await serving.shut_down(registry)


async def test_an_unreachable_endpoint_refuses_the_form_with_the_reason(
    async_client: Any, unreachable: PoolRegistry
) -> None:
    await serving.warm_up(unreachable)  # the server's start: the endpoint is unreachable
    assert (await probe("/health")).status_code == 503  # what the form must agree with
    await logged_in(async_client)
    response = await async_client.post("/", valid_form(request_text=TEXT))
    assert assert_refused(response, capacity.UNREACHABLE) == capacity.BUSY_RETRY_AFTER_S
    assert "For staff" not in response.content.decode()  # the operator's detail: staff only
    assert not await Design.objects.aexists()


async def test_pools_nobody_warmed_are_warmed_then_refused_if_unreachable(
    async_client: Any, unreachable: PoolRegistry
) -> None:
    """Staff also read the operator's reason."""
    user = await logged_in(async_client, "operator")
    user.is_staff = True
    await user.asave()
    response = await async_client.post("/", valid_form(request_text=TEXT))
    assert_refused(response, capacity.UNREACHABLE)
    assert "the LLM endpoint could not be reached at warm-up" in response.content.decode()


async def test_pools_nobody_warmed_are_warmed_and_take_the_design(
    async_client: Any, carlos_registry
) -> None:
    assert (await probe("/health")).status_code == 503  # not initialized
    await logged_in(async_client)
    response = await async_client.post("/", valid_form(request_text=TEXT))
    assert response.status_code == 302
    assert carlos_registry.initialized and (await probe("/health")).status_code == 200
    assert await Design.objects.acount() == 1


async def test_closed_pools_refuse_the_form(async_client: Any, carlos_registry) -> None:
    await serving.warm_up(carlos_registry)
    await serving.shut_down(carlos_registry)  # what a stopping server ends with
    await logged_in(async_client)
    response = await async_client.post("/", valid_form(request_text=TEXT))
    assert response.status_code == 503
    assert not await Design.objects.aexists()


async def test_warm_pools_take_the_design(async_client: Any, carlos_registry) -> None:
    await serving.warm_up(carlos_registry)
    await logged_in(async_client)
    assert (await probe("/health")).status_code == 200
    response = await async_client.post("/", valid_form(request_text=TEXT))
    assert response.status_code == 302
    assert await Design.objects.acount() == 1
