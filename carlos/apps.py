"""The project as a Django app, so the server's own commands (`serve`) live with the server."""

from django.apps import AppConfig


class CarlosConfig(AppConfig):
    name = "carlos"
    verbose_name = "Carlos server"
