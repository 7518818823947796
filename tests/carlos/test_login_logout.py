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
