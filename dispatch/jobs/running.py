"""Running a job in this process: claim it, watch its lease, make one attempt.

What `tasks.run_job` (a worker) and `direct.send_series` (a script's process) share,
without the queue: the messages a run may send (a watch on the lease) go through
the `watch` its caller passes. A direct send of one file sends none, so the command
never imports huey (nor redis-py with it): its start-up is paid once per series.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from django.utils import timezone

from targets.models import Target

from . import engine, growing, lease
from .models import Job

Watch = Callable[[int, datetime], None]


def attempt_job(
    job_id: int,
    *,
    watch: Watch,
    worker: str,
    progress: engine.ProgressHook | None = None,
    respect_limit: bool = True,
    retry: bool = True,
    held: bool = False,
    keeper: lease.LeaseKeeper | None = None,
    watch_late: bool = False,
) -> Job | None:
    """Claim the job and make one attempt (`engine.attempt`); return the job as it
    ended, or None if not claimed.

    The lease is renewed by a `LeaseKeeper` (the caller's, if it passes one) and
    watched (`watch(job_id, expires)` queues a look for when it would run out):
    should this process die, a worker resumes the job then (for a one-file job that
    died before its first renewal, the sweep does). `watch_late`: any job is
    watched from its first renewal, as a one-file job is (a direct send: its
    message would cost the command huey's import, while most sends end sooner).
    """
    claimed = engine.claim(job_id, worker, respect_limit, held=held)
    if claimed is None:
        return None
    own_keeper = keeper is None
    if keeper is None:
        keeper = engine.keeper_for(job_id, worker).start()
    # A watch for when the lease would end, should this worker die. A job of
    # several files gets it at once (a crash costs one lease, whenever it comes). A
    # one-file job, most of a busy queue and done well within a lease, gets it only
    # if still sending at the lease's first renewal: one dying sooner is left to the
    # sweep (each minute, and when a worker starts).
    if claimed.job.total > 1 and not watch_late:
        watch(job_id, timezone.now() + lease.lease_length())
    else:
        keeper.then(lambda expires: watch(job_id, expires))
    try:
        if claimed.job.series_open:
            # The series still arrives: the files landed since join the job
            # here, on the worker, not on the receiver's threads (`growing`).
            growing.add_files([job_id], claimed.job.folder)
        return engine.attempt(claimed, worker, keeper, progress, retry)
    finally:
        if own_keeper:
            keeper.stop()


def due_jobs(target_id: int, target: Target | None = None) -> list[int]:
    """The oldest jobs of a target that may run now, one per free slot (what
    `tasks.kick_target` queues)."""
    now = timezone.now()
    if target is None:
        target = Target.objects.filter(pk=target_id).first()
    if target is None or engine.wait_reason(target):
        return []
    free = engine.job_limit(target) - engine.slots_in_use(target_id, now)
    if free <= 0:
        return []
    due = Job.objects.filter(target_id=target_id).filter(engine.claimable_q(now))
    return list(due.order_by("not_before", "id").values_list("id", flat=True)[:free])
