"""huey tasks for routing received series.

Completion is detected in two places, on purpose. The receiver process closes its
own series the moment they have been quiet for `COURIER_SERIES_QUIET_SECONDS` (its
bookkeeping thread looks every second) and queues `route_series_task` at once: huey's
periodic tasks tick once a minute, too coarse for a quiet period of seconds. The
periodic `routing_sweep_task` below is the safety net (`routing.sweep()`): it completes
series whose receiver stopped or died (after the quiet period plus a grace period, so
it never races a live receiver), routes complete series whose message was lost (a
worker killed between receive and route), and applies the retention. Every step is
idempotent. `routing_startup_task` is queued by the worker's start-up hook in
`tasks.py`.
"""

from __future__ import annotations

from huey import crontab
from huey.contrib.djhuey import db_periodic_task, db_task

from . import routing


@db_task()
def route_series_task(pk: int) -> None:
    routing.route_series(pk)


@db_periodic_task(crontab(minute="*"))
def routing_sweep_task() -> None:
    routing.sweep()


@db_task()
def routing_startup_task() -> None:
    routing.route_pending()
