"""huey tasks for routing received series.

Completion is detected in two places, on purpose. The receiver process closes its
own series the moment they have been quiet for `COURIER_SERIES_QUIET_SECONDS` (its
bookkeeping thread looks every second) and queues `route_series_task` at once: huey's
periodic tasks tick once a minute, too coarse for a quiet period of seconds. The
periodic `routing_sweep_task` below is the safety net: it completes series whose
receiver stopped or died (after the quiet period plus a grace period, so it never
races a live receiver), routes complete series whose message was lost (a worker killed
between receive and route), and applies the retention. Every step is idempotent.
"""

from __future__ import annotations

import threading

from django.conf import settings
from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from . import routing


@db_task()
def route_series_task(pk: int) -> None:
    routing.route_series(pk)


def _grace() -> float:
    return max(30.0, float(settings.COURIER_SERIES_QUIET_SECONDS))


def sweep_received() -> None:
    routing.complete_quiet_series(grace=_grace())
    routing.route_pending()
    routing.purge_expired()


@db_periodic_task(crontab(minute="*"))
def routing_sweep_task() -> None:
    sweep_received()


@db_task()
def routing_startup_task() -> None:
    routing.route_pending()


_started = threading.Lock()
_swept = False


@HUEY.on_startup()
def route_on_startup() -> None:
    """Route what a killed worker left complete but unrouted, as a worker starts."""
    global _swept
    with _started:
        if _swept:
            return
        _swept = True
    routing_startup_task()
