"""Logging out says so: "You have been logged out." on the page it lands on, announced as a
status (Django's messages, shown inside <main>), once.

Reproduces (issue 15): the logout redirected to the login page without a word.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

pytestmark = pytest.mark.django_db

NOTICE = "You have been logged out."


def test_logging_out_says_so_once_on_the_login_page(client: Client) -> None:
    user = get_user_model().objects.create_user("ada", password="a-long-test-password")
    client.force_login(user)
    response = client.post("/accounts/logout/", follow=True)
    assert response.redirect_chain == [("/accounts/login/", 302)]
    html = response.content.decode()
    status = html.index('role="status"')
    assert html.index("<main") < status < html.index(NOTICE) < html.index("</main>")
    assert html.count(NOTICE) == 1
    assert NOTICE not in client.get("/accounts/login/").content.decode()  # said once


def test_no_notice_without_a_logout(client: Client) -> None:
    assert NOTICE not in client.get("/accounts/login/").content.decode()


@pytest.mark.django_db(transaction=True)
async def test_the_login_page_opens_for_someone_already_logged_in(async_client) -> None:
    """Found profiling the pages (issue 16): under an ASGI server the login page rendered
    `user` from the session on the event loop: a logged-in user who opened it got a 500
    (SynchronousOnlyOperation), as did the page after a logout left a session behind."""
    user = await get_user_model().objects.acreate_user("ada", password="a-long-test-password")
    await async_client.aforce_login(user)
    response = await async_client.get("/accounts/login/")
    assert response.status_code == 200
    assert "ada" in response.content.decode()  # the header shows who is logged in
    response = await async_client.post("/accounts/logout/", follow=True)
    assert response.status_code == 200 and NOTICE in response.content.decode()
