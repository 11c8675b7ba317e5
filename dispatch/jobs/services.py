"""Job services: create jobs, and what an operator does with them.

Plain functions called by the admin, the management commands, routing and the query
tool. The job row is the source of truth; creating, retrying or resuming queues a
message for a worker (`tasks`), which runs the job through the `engine`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from config.safetext import db_text
from targets import services as target_services
from targets.kinds.base import SendContext
from targets.models import Target
from targets.series import OtherFile, Series, scan_folder
from targets.validators import split_globs

from . import files, growing
from .engine import send_refusal
from .models import (
    FINISHED_STATES,
    SUCCESS_STATES,
    DispatchError,
    InstanceState,
    Job,
    JobOrigin,
    State,
)


# Messages to the workers (`tasks`), imported with the first one: creating a job for
# a direct send queues none, and huey's import (with redis-py) would be most of a
# one-file `send_series`'s start-up.
def enqueue(job: Job | int, *, eta=None) -> None:
    """Ask a worker to look at the job (`tasks.enqueue`)."""
    from .tasks import enqueue as send

    send(job, eta=eta)


def kick_target(target_id: int) -> int:
    """Queue the target's jobs that may run now (`tasks.kick_target`)."""
    from .tasks import kick_target as kick

    return kick(target_id)


def create_jobs(
    folder: str | Path,
    targets: Iterable[Target],
    *,
    context: SendContext | None = None,
    owned_spool: bool = True,
    source: str = JobOrigin.ROUTE,
    series: Series | None = None,
    enqueue_now: bool = True,
    growing: bool = False,
) -> list[Job]:
    """Create one queued job per target for the series in `folder` and queue them.

    `owned_spool` means Courier owns the folder: it is deleted once every job for it
    is done (and kept for `COURIER_FAILED_RETENTION_DAYS` if one failed). Pass the
    already scanned `series` to avoid reading the folder again. Raise `DispatchError`
    for a missing folder or a query-only target; a disabled or paused target gets a
    job that waits. `growing`: the series is still arriving; the jobs take its
    next instances as they land and end only once routing closes them (`growing`).
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise DispatchError(f"folder {folder} does not exist")
    targets = [t.as_kind() for t in targets]
    for target in targets:
        refusal = send_refusal(target)
        if refusal:
            raise DispatchError(refusal)
    context = context or SendContext()
    scanned = series if series is not None else scan_folder(folder)
    first = scanned.instances[0].tags if scanned.instances else {}
    jobs = []
    with transaction.atomic():
        for target in targets:
            own = scanned.excluding(split_globs(target.exclude))
            others, left_out = other_files_for(target, scanned)
            job = Job.objects.create(
                target=target,
                folder=str(folder),
                owned_spool=owned_spool,
                source=source,
                # Values from the files: no NUL reaches the database (PostgreSQL
                # refuses the whole row).
                study_uid=db_text(first.get("StudyInstanceUID"), 64),
                series_uid=db_text(first.get("SeriesInstanceUID"), 64),
                series_description=db_text(first.get("SeriesDescription"), 200),
                calling_aet=db_text(context.calling_aet),
                called_aet=db_text(context.called_aet),
                series_open=growing,
                # A corrupt DICOM file is an instance of the series that failed:
                # the job cannot be done without it.
                total=len(own.instances) + len(own.corrupt),
                failed=len(own.corrupt),
                other_files=len(others),
                skipped=len(left_out),
            )
            # The headers read by the scan go with the rows: an attempt does not
            # read the folder again (`files.pending`).
            files.insert_rows(job, own.instances, others, own.corrupt)
            jobs.append(job)
        if enqueue_now:
            for job in jobs:
                enqueue(job)
    return jobs


def wake_jobs(job_ids: list[int]) -> None:
    """New instances landed in a still-arriving series: queue its open jobs that
    wait for them (the worker adds them, `growing`)."""
    for pk in growing.wake(job_ids):
        enqueue(pk)


def close_jobs(job_ids: list[int], folder: str | Path) -> None:
    """The series is complete: its open jobs take the last instances and end
    (`growing.close`)."""
    for pk in growing.close(job_ids, folder):
        enqueue(pk)


def other_files_for(
    target: Target, series: Series
) -> tuple[list[OtherFile], list[tuple[Path, str]]]:
    """The series' other files `target` delivers, and the files it leaves out (why).

    Folder, SFTP, rsync and S3 deliver every other file but those the exclusion
    filter names; the DICOM kinds send DICOM only. Unreadable files are left out
    everywhere. Corrupt DICOM files are not in either list: they are instances that
    fail, for every kind (`create_jobs`).
    """
    target = target.as_kind()
    kept = (
        series.excluding(split_globs(target.exclude)).others
        if target.delivers_other_files
        else []
    )
    kept_paths = {o.path for o in kept}
    why = (
        "excluded by the target's exclusion filter"
        if target.delivers_other_files
        else f"{target.get_kind_display()} targets send DICOM instances only"
    )
    left = [
        (o.path, f"{why} ({o.reason})")
        for o in series.others
        if o.path not in kept_paths
    ]
    return kept, left + list(series.skipped)


# -- operator actions ------------------------------------------------------------------


RETRYABLE_STATES = (State.FAILED, State.CANCELLED, State.RETRY_WAIT)


def retry_refusal(job: Job, now=None) -> str:
    """Why `job` cannot be retried now, in words; "" if it can."""
    if job.state in SUCCESS_STATES:
        return f"job {job.pk} is already done: nothing to retry"
    if job.state in (State.QUEUED, State.SENDING):
        return f"job {job.pk} is {job.get_state_display().lower()} already"
    if job.state == State.PAUSED:
        return f"job {job.pk} waits for its target: {job.last_error or 'resume it'}"
    if job.state == State.FOLLOWING:
        return f"job {job.pk} is waiting for its series' next instances"
    if (
        job.lease_owner
        and job.lease_expires_at
        and job.lease_expires_at > (now or timezone.now())
    ):
        return f"job {job.pk} is still stopping its last attempt; retry in a moment"
    return ""


def retry_now(jobs: Iterable[Job]) -> int:
    """Queue failed, waiting or cancelled jobs again, failed instances included.

    Attempt numbers go on counting; after a failed or cancelled job the target's
    retry budget starts afresh (the operator decided to try again). Done, queued
    and sending jobs are left alone: see `retry_refusal`. Return how many were
    queued.
    """
    count = 0
    now = timezone.now()
    for job in jobs:
        if retry_refusal(job, now):
            continue
        with transaction.atomic():
            job.instances.filter(state=InstanceState.FAILED).update(
                state=InstanceState.PENDING, message=""
            )
            fresh_budget = job.state in (State.FAILED, State.CANCELLED)
            updated = (
                Job.objects.filter(pk=job.pk, state__in=RETRYABLE_STATES)
                .exclude(lease_expires_at__gt=now, lease_owner__gt="")
                .update(
                    state=State.QUEUED,
                    not_before=now,
                    finished_at=None,
                    failed=0,
                    last_error="",
                    attempt_base=F("attempt_count")
                    if fresh_budget
                    else F("attempt_base"),
                    updated_at=now,
                )
            )
            if not updated:
                continue
            kick_target(job.target_id)
        count += 1
    return count


def cancel(jobs: Iterable[Job]) -> int:
    """Cancel jobs that are not finished; a sending one stops at its next instance."""
    now = timezone.now()
    ids = [j.pk for j in jobs]
    return (
        Job.objects.filter(pk__in=ids)
        .exclude(state__in=FINISHED_STATES)
        .update(
            state=State.CANCELLED,
            finished_at=now,
            updated_at=now,
            last_error="cancelled by an operator",
        )
    )


def resume_targets(targets: Iterable[Target]) -> int:
    """Resume dispatch to the targets and queue their paused jobs at once."""
    ids = [t.pk for t in targets]
    n = target_services.resume_targets(targets)
    now = timezone.now()
    for target in Target.objects.filter(pk__in=ids, enabled=True):
        target.jobs.filter(state=State.PAUSED).update(
            state=State.QUEUED, last_error="", updated_at=now
        )
        kick_target(target.pk)
    return n
