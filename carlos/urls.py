"""URL routes for Carlos."""

from django.contrib import admin
from django.urls import include, path

from carlos import login

urlpatterns = [
    # Both login pages are throttled and never hash inside the page gate (carlos/login.py);
    # these routes come before the admin's own login.
    path("admin/login/", login.admin_login, name="admin-login"),
    path("accounts/login/", login.login, name="login"),
    path("admin/", admin.site.urls),
    path("", include("pools.urls")),
    path("", include("agents.urls")),
]
