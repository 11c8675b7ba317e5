"""Sending from scripts: `send_series` now, or `--queue` for the workers.

A direct send is a job like any other (the record shown in the admin) that the
calling process claims and runs itself, holding its place among the target's
connections; a queued one first takes the folder into the spool, so the script's
folder is free the moment it returns.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from django.utils import timezone

from targets.kinds.base import SendContext
from targets.models import Target
from targets.series import Series, scan_folder
from targets.validators import split_globs

from . import engine, lease, running
from .models import DispatchError, Job, JobOrigin, State
from .services import create_jobs, enqueue, other_files_for
from .spool import take_into_spool


@dataclass
class SendReport:
    job: Job
    # Files of the folder the target does not get, with why (other files a DICOM
    # kind leaves out, excluded ones, unreadable ones).
    left_out: list[tuple[Path, str]]
    seconds: float
    # Corrupt DICOM files, with why: instances of the job that failed unsent.
    refused: list[tuple[Path, str]] = field(default_factory=list)


WaitHook = Callable[[int, int], None]


def _watch(job_id: int, expires: datetime) -> None:
    """A worker's look at the job when its lease would run out (`tasks.watch`).

    Sent from the lease's first renewal (`watch_late`), and the queue imported
    then: a send done sooner (one file, or 500 small ones in about a second) never
    loads huey and redis-py (~70 ms of CPU); should its process die first, the
    sweep resumes the job once the lease has run out.
    """
    from .tasks import watch

    watch(job_id, expires)


def send_series(
    target: Target,
    folder: str | Path,
    *,
    context: SendContext | None = None,
    progress: engine.ProgressHook | None = None,
    on_start: Callable[[Job], None] | None = None,
    on_wait: WaitHook | None = None,
) -> SendReport:
    """Send the series under `folder` to `target` now, recording a job.

    The job and its attempt are the record shown in the admin. No automatic retry:
    the caller sees what happened. The send takes its connections from the target's
    limit like a worker's job: while all are in use it waits (`on_wait(in_use,
    limit)` is told once), holding its place ahead of queued jobs. Raise
    `DispatchError` for an empty folder or a target that cannot be sent to
    (query-only, disabled, paused).
    """
    target = target.as_kind()
    folder = Path(folder)
    if not folder.is_dir():
        raise DispatchError(f"{folder} is not a folder")
    waiting = engine.wait_reason(target)
    if waiting:
        raise DispatchError(waiting.split(";")[0] + "; enable or resume it first")
    series, left_out, refused = _read(target, folder)
    start = time.monotonic()
    (job,) = create_jobs(
        folder,
        [target],
        context=context,
        owned_spool=False,
        source=JobOrigin.SEND_SERIES,
        series=series,
        enqueue_now=False,
    )
    worker = lease.worker_id()
    # Hold the job (queued, leased to this process) so that no worker takes it.
    lease.take(Job.objects.filter(pk=job.pk), worker, timezone.now())
    keeper = engine.keeper_for(job.pk, worker).start()
    if on_start:
        on_start(job)
    told = False
    try:
        while True:
            result = running.attempt_job(
                job.pk,
                watch=_watch,
                worker=worker,
                progress=progress,
                retry=False,
                held=True,
                keeper=keeper,
                watch_late=True,
            )
            if result is not None:
                break
            job.refresh_from_db()
            if job.state != State.QUEUED or job.lease_owner != worker:
                break  # cancelled, paused or disabled meanwhile
            if on_wait and not told:
                on_wait(
                    engine.slots_in_use(target.pk, timezone.now(), job.pk, holds=False),
                    engine.job_limit(Target.objects.get(pk=target.pk)),
                )
                told = True
            time.sleep(0.25)
    except KeyboardInterrupt:
        # Interrupted before the send began: nobody expects it to go later.
        Job.objects.filter(pk=job.pk, state=State.QUEUED).update(
            state=State.CANCELLED,
            finished_at=timezone.now(),
            last_error="send_series was interrupted before the send began",
        )
        raise
    finally:
        keeper.stop()
    # The slot it held is free: the target's next queued jobs may go now.
    for job_id in running.due_jobs(target.pk):
        enqueue(job_id)
    job.refresh_from_db()
    return SendReport(
        job=job, left_out=left_out, seconds=time.monotonic() - start, refused=refused
    )


Named = list[tuple[Path, str]]


def _read(target: Target, folder: Path) -> tuple[Series, Named, Named]:
    """The series under `folder`, the files `target` will not get (and why), and
    the corrupt DICOM files (and why) that fail the job unsent.

    A folder without a DICOM file to send is refused in words.
    """
    series = scan_folder(folder)
    if not series.instances:
        raise DispatchError(f"no DICOM files in {folder}" + _refused_note(series))
    refused = series.excluding(split_globs(target.exclude)).corrupt
    return series, other_files_for(target, series)[1], refused


def _refused_note(series: Series) -> str:
    parts = []
    if series.corrupt:
        names = ", ".join(p.name for p, _ in series.corrupt[:3])
        parts.append(f"{len(series.corrupt)} corrupt DICOM files refused: {names}")
    others = len(series.others) + len(series.skipped)
    if others:
        parts.append(f"{others} other files")
    return f" ({'; '.join(parts)})" if parts else ""


def queue_series(
    target: Target, folder: str | Path, *, context: SendContext | None = None
) -> SendReport:
    """Queue the folder for `target` as a job for the workers (send_series --queue).

    The files are taken into the spool first (`take_into_spool`): the job owns
    them, and the caller's folder is free the moment this returns.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DispatchError(f"{folder} is not a folder")
    start = time.monotonic()
    series, left_out, refused = _read(target, folder)
    owned = take_into_spool(folder)
    try:
        (job,) = create_jobs(
            owned,
            [target],
            context=context,
            owned_spool=True,
            source=JobOrigin.QUEUE,
            series=series.rebased(owned),
        )
    except BaseException:
        shutil.rmtree(owned, ignore_errors=True)
        raise
    return SendReport(
        job=job, left_out=left_out, seconds=time.monotonic() - start, refused=refused
    )
