"""The query tool's queue: huey tasks taking a primary key, and the messages to them.

As with dispatch jobs, a message only says "look at retrieval N"; the row decides.
A retrieval's lease is watched from the moment it is claimed: should its worker
die, the watch finds the lease run out and takes the retrieval over.
"""

from __future__ import annotations

from django.db import transaction
from huey.contrib.djhuey import db_task

from dispatch.jobs import lease

from . import retrieval
from .models import RetrievalJob, RetrievalState


@db_task()
def retrieve_task(job_id: int) -> None:
    run_retrieval(job_id)


@db_task()
def watch_retrieval_task(job_id: int) -> None:
    watch_retrieval(job_id)


def enqueue(job_id: int) -> None:
    """Ask a worker to run the retrieval (after the current transaction commits)."""
    transaction.on_commit(lambda: retrieve_task(job_id))


def watch(job_id: int, expires) -> None:
    """Look at a running retrieval again just after its lease would run out."""
    eta = lease.look_again_at(expires)
    transaction.on_commit(lambda: watch_retrieval_task.schedule((job_id,), eta=eta))


def run_retrieval(job_id: int) -> RetrievalJob:
    """Claim the retrieval and run it to its end (or take over one whose worker
    died); return it. Not claimed (cancelled, or another worker has it): as it is."""
    worker = lease.worker_id()
    job = retrieval.claim(job_id, worker)
    if job is None:
        return RetrievalJob.objects.get(pk=job_id)
    watch(job_id, job.lease_expires_at)
    keeper = retrieval.keeper_for(job_id, worker).start()
    try:
        return retrieval.run(job, worker, keeper)
    finally:
        keeper.stop()


def watch_retrieval(job_id: int) -> None:
    """Take over a running retrieval whose worker stopped renewing its lease."""
    lease.check_on(
        RetrievalJob,
        job_id,
        RetrievalState.RUNNING,
        look_again=lambda expires: watch(job_id, expires),
        take_over=lambda: run_retrieval(job_id),
    )
