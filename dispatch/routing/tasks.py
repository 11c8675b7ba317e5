"""huey tasks for routing received series, and the one door receiving comes in by.

Completion is detected in two places, on purpose. The receiver process closes its
own series the moment they have been quiet for `COURIER_SERIES_QUIET_SECONDS` (its
bookkeeping thread looks every second) and hands each to `route_received`, which
completes it and queues `route_series_task` at once: huey's periodic tasks tick once
a minute, too coarse for a quiet period of seconds. The periodic
`routing_sweep_task` below is the safety net (`services.sweep()`): it completes
series whose receiver stopped or died (after the quiet period plus a grace period,
so it never races a live receiver), routes complete series whose message was lost
(a worker killed between receive and route), and applies the retention. Every step
is idempotent. A worker that starts routes the leftovers at once.
"""

from __future__ import annotations

import threading

from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from dispatch.jobs.services import wake_jobs

from . import services, streaming


def route_received(pk: int) -> None:
    """Take a series its receiver closed: complete it now, route it on a worker.

    The one function receiving hands series to routing with. A series that cannot
    be completed is marked failed (re-routable); one the sweep completed meanwhile
    is left to it.
    """
    if services.contained(services.complete_series, pk, "complete"):
        route_series_task(pk)


def forward_received(pk: int, job_ids: list[int] | None = None) -> list[int]:
    """Take a series still arriving, once a second while instances land: the
    first time (`job_ids` None), judge the rules that forward as instances arrive
    (`streaming.start_streaming`); then queue their jobs that wait for the new
    instances (`dispatch.jobs.services.wake_jobs`). Return the jobs' ids (empty:
    nothing forwards this series), to pass back next time.
    """
    if job_ids is None:
        return streaming.start_streaming(pk)
    if job_ids:
        wake_jobs(job_ids)
    return job_ids


@db_task()
def route_series_task(pk: int) -> None:
    services.route_series(pk)


@db_periodic_task(crontab(minute="*"))
def routing_sweep_task() -> None:
    services.sweep()


@db_task()
def routing_startup_task() -> None:
    services.route_pending()


_started = threading.Lock()
_routed = False


@HUEY.on_startup()
def route_on_startup() -> None:
    """Route the complete series a killed worker left, as soon as a worker starts.

    The hook runs in every worker thread; once per process is enough.
    """
    global _routed
    with _started:
        if _routed:
            return
        _routed = True
    routing_startup_task()
