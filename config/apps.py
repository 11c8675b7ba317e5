"""The end of a process's start-up: the app registry is ready."""

from __future__ import annotations

import gc

from django.apps import AppConfig


class StartupConfig(AppConfig):
    """Last in INSTALLED_APPS: its `ready()` runs once every app's has.

    `manage.py` starts with the cyclic garbage collector off: start-up makes some
    100,000 objects (modules, classes, models) that live as long as the process,
    and the collector walked them again and again while they were made (121
    young, 11 middle and one full collection, 50-110 ms of a one-file
    `send_series`). Here they are set aside for good (`gc.freeze()`: no later
    collection walks them either, in a worker or the receiver) and collection
    resumes for what the command makes. A process started otherwise (gunicorn's
    WSGI application, pytest) had it on all along; the freeze helps it the same.
    """

    name = "config"
    verbose_name = "Courier"

    def ready(self) -> None:
        gc.freeze()
        gc.enable()
