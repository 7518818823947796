"""Operator endpoints of the pools app."""

from django.urls import path

from pools import views

urlpatterns = [
    path("health", views.health, name="health"),
    path("health/live", views.liveness, name="liveness"),
    path("metrics", views.metrics, name="metrics"),
]
