"""Operator endpoints of the pools app (`/health` is answered before Django: pools.endpoints)."""

from django.urls import path

from pools import views

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
]
