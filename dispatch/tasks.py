"""huey tasks: thin wrappers taking primary keys; the work is in `services`."""

from __future__ import annotations

import logging
import threading

from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from . import routing_tasks, services

log = logging.getLogger("courier.dispatch")


@db_task()
def run_job_task(job_id: int) -> None:
    services.run_jobs_from(job_id)


@db_task()
def watch_lease_task(job_id: int) -> None:
    services.watch_lease(job_id)


@db_periodic_task(crontab(minute="*"))
def sweep_task() -> None:
    services.sweep()


@db_task()
def startup_sweep_task() -> None:
    services.sweep(at_startup=True)


_started = threading.Lock()
_swept = False


@HUEY.on_startup()
def recover_on_startup() -> None:
    """Look for interrupted work as soon as a worker process starts.

    Jobs a killed worker left sending, and received series it left complete but
    unrouted. The hook runs in every worker thread; once per process is enough.
    """
    global _swept
    with _started:
        if _swept:
            return
        _swept = True
    startup_sweep_task()
    routing_tasks.routing_startup_task()
