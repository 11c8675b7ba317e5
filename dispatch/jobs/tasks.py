"""The queue: every message to the workers, and what a worker does with one.

A message only says "look at job N" (now, or at a time): the job row decides. The
huey tasks here are thin and take primary keys; the functions beside them send the
messages (`enqueue`, `watch`, `kick_target`, `sweep`) and run what one brings
(`run_job`: claim, watch the lease, one attempt by the `engine`, the next attempt
queued after a transient error). Messages and tasks live in one module because huey
defines both with one decorator: whatever sends a message imports this module, and
this module imports only what lies below it (engine, spool, models).

Any number of workers (threads, processes, machines) may get a message for the same
job at once: exactly one claims it. A message lost (a queue flushed, a machine
restarted) loses nothing: the sweep, each minute and when a worker starts, queues
every job that is due again.
"""

from __future__ import annotations

import threading
import time

from django.db import transaction
from django.utils import timezone
from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from targets.models import Target

from . import batch, engine, growing, lease, running
from .commitment import purge_commitments
from .models import Job, State
from .spool import expire_spool


@db_task()
def run_job_task(job_id: int) -> None:
    run_jobs_from(job_id)


@db_task()
def watch_lease_task(job_id: int) -> None:
    watch_lease(job_id)


@db_periodic_task(crontab(minute="*"))
def sweep_task() -> None:
    sweep()


@db_task()
def startup_sweep_task() -> None:
    sweep(at_startup=True)


_started = threading.Lock()
_swept = False


@HUEY.on_startup()
def recover_on_startup() -> None:
    """Look for interrupted jobs as soon as a worker process starts.

    Jobs a killed worker left sending. The hook runs in every worker thread; once
    per process is enough.
    """
    global _swept
    with _started:
        if _swept:
            return
        _swept = True
    startup_sweep_task()


# -- sending messages ------------------------------------------------------------------


def enqueue(job: Job | int, *, eta=None) -> None:
    """Ask a worker to look at the job (after the current transaction commits)."""
    job_id = job if isinstance(job, int) else job.pk

    def send_message() -> None:
        if eta is None:
            run_job_task(job_id)
        else:
            run_job_task.schedule((job_id,), eta=eta)

    transaction.on_commit(send_message)


def watch(job_id: int, expires) -> None:
    """Look at a sending job again just after its lease would run out."""
    eta = lease.look_again_at(expires)
    transaction.on_commit(lambda: watch_lease_task.schedule((job_id,), eta=eta))


def kick_target(target_id: int, target: Target | None = None) -> int:
    """Queue the oldest jobs of a target that may run now, one per free slot."""
    ids = running.due_jobs(target_id, target)
    for job_id in ids:
        enqueue(job_id)
    return len(ids)


# -- what a worker does with a message ---------------------------------------------------


def run_job(
    job_id: int,
    *,
    worker: str | None = None,
    progress: engine.ProgressHook | None = None,
    respect_limit: bool = True,
    retry: bool = True,
    held: bool = False,
    keeper: lease.LeaseKeeper | None = None,
) -> Job | None:
    """Claim the job and make one attempt; return the job, or None if not claimed.

    Reads the target fresh from the database and sends the job's pending files
    (`engine.attempt`). A job left waiting to retry is queued for its time. The
    lease is renewed by a `LeaseKeeper` (the caller's, if it passes one) and
    watched: should this worker die, another resumes the job when it runs out (for
    a one-file job that died before its first renewal, the sweep does).
    """
    job = running.attempt_job(
        job_id,
        watch=watch,
        worker=worker or lease.worker_id(),
        progress=progress,
        respect_limit=respect_limit,
        retry=retry,
        held=held,
        keeper=keeper,
    )
    if job is None:
        return None
    if job.state == State.RETRY_WAIT:
        enqueue(job, eta=job.not_before)
    elif job.state == State.FOLLOWING and growing.wake_if_due(job.pk):
        enqueue(job)
    return job


def run_batch(target_id: int, *, worker: str | None = None) -> list[Job] | None:
    """Claim a batch of the target's queued one-file jobs and send them one after
    the other (`batch.claim`); return them as they ended, or None if none
    was claimed.

    One lease keeper for the batch; the batch is watched (one message) only if
    still sending at the lease's first renewal, as a one-file job is.
    """
    worker = worker or lease.worker_id()
    claims = batch.claim(target_id, worker)
    if not claims:
        return None
    ids = [c.job.pk for c in claims]
    keeper = lease.LeaseKeeper(Job, ids, worker, [State.SENDING]).start()
    # Should this worker die, the job taken over goes on with the others
    # (`run_jobs_from`), whose leases ended with it.
    keeper.then(lambda expires: watch(ids[-1], expires))
    try:
        jobs = batch.send(claims, worker, keeper)
    finally:
        keeper.stop()
    for job in jobs:
        if job.state == State.RETRY_WAIT:
            enqueue(job, eta=job.not_before)
        elif job.state == State.FOLLOWING and growing.wake_if_due(job.pk):
            enqueue(job)
    return jobs


def run_jobs_from(job_id: int, *, budget_seconds: float = 20.0) -> int:
    """Run the job, then go on with the next jobs of its target for a while.

    A worker thread that just freed a slot of a target takes that target's next
    jobs itself instead of waiting for the queue to hand them out (a polled queue
    such as SqliteHuey adds up to its polling delay per job): one-file jobs in
    batches (`run_batch`), others one at a time. The time budget keeps one target
    from holding a worker thread for long. Return how many jobs ran.
    """
    deadline = time.monotonic() + budget_seconds
    job = run_job(job_id)
    ran = 0
    while job is not None:
        ran += 1
        if job.state == State.RETRY_WAIT:
            break  # the target is likely down: its other jobs wait for the sweep
        if time.monotonic() >= deadline:
            # Hand the target's next jobs to the queue (and so to any worker).
            kick_target(job.target_id)
            break
        target_id = job.target_id
        batch = run_batch(target_id)
        if batch:
            ran += len(batch) - 1
            job = batch[-1]
            continue
        next_id = engine.next_claimable(target_id)
        if next_id is None:
            break
        job = run_job(next_id)
        if job is None:
            # Another worker took it, or the target is full or paused now.
            kick_target(target_id)
    return ran


def watch_lease(job_id: int) -> None:
    """Resume a sending job whose worker stopped renewing its lease (`watch`)."""
    lease.check_on(
        Job,
        job_id,
        State.SENDING,
        look_again=lambda expires: watch(job_id, expires),
        take_over=lambda: run_jobs_from(job_id),
    )


def sweep(now=None, *, at_startup: bool = False) -> int:
    """Requeue what fell through the cracks; return how many jobs were queued.

    Due retry-wait jobs, jobs whose worker died (lease expired), paused jobs whose
    target is active again, and queued jobs whose message was lost (a queue flushed
    or a machine restarted). Safe to run anywhere, any number of times.
    """
    now = now or timezone.now()
    active_targets = Target.objects.filter(enabled=True, paused=False)
    Job.objects.filter(state=State.PAUSED, target__in=active_targets).update(
        state=State.QUEUED, last_error="", updated_at=now
    )
    target_ids = set(
        Job.objects.filter(engine.claimable_q(now)).values_list("target_id", flat=True)
    )
    queued = sum(kick_target(tid) for tid in target_ids)
    # Jobs of arriving series whose wake-up message was lost.
    for job_id in growing.due_following():
        enqueue(job_id)
        queued += 1
    if at_startup:
        # A worker that starts may be replacing one that was killed: look at the
        # jobs it held right after their leases end, not at the next sweep.
        for job_id, expires in Job.objects.filter(
            state=State.SENDING, lease_expires_at__gte=now
        ).values_list("id", "lease_expires_at"):
            watch(job_id, expires)
    expire_spool(now)
    purge_commitments(now)
    return queued
