"""Jobs of a series still arriving: they grow as its instances land.

A rule that forwards as instances arrive (`routing.Rule.stream`) makes its jobs
when the series' first instance is stored, with `Job.series_open` set. The
receiver's bookkeeping (once a second) only queues such a job again when its
series got new instances and the job was waiting (`State.FOLLOWING`, `wake`); the
worker that claims it adds the new files of the series folder as pending rows
(`add_files`, headers read there, not on the receiver's threads) and sends what is
pending. Only durable instances are read: the receiver renames a file into the
series folder after making it durable, and `.*.part` files never count. An
attempt at an open job then yields: `outcomes.finish` leaves it following instead
of done, and the worker thread is free again (`wake_if_due` queues it at once if
files landed meanwhile). Routing closes the jobs when the series is complete
(`close`): the last instances are added, `series_open` cleared, and the next
attempt ends the job as any other.

Every step is a conditional UPDATE on the job's row, and each side writes its
change before it looks at the other's (the receiver: the file, then the job's
state; the worker: the state, then the folder), so a wake-up is never lost; at
worst a job is queued once more than needed.

These functions only touch the database and the folder; the callers send the
queue messages for the ids they return (`services`, `tasks`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

from django.db import transaction
from django.db.models import Count, F, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from targets.series import scan_paths
from targets.validators import split_globs

from . import files
from .models import InstanceState, Job, JobInstance, State


def spool_instances(folder: Path) -> set[str]:
    """The instances in a receiver's series folder (durable ones only: a file is
    renamed into the folder after it was made durable; `.*.part` never counts)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return set()
    return {str(folder / n) for n in names if n.endswith(".dcm") and n[0] != "."}


def _excluded(job: Job, paths: Iterable[str]) -> set[str]:
    globs = split_globs(job.target.as_kind().exclude)
    if not globs:
        return set()
    return {p for p in paths if any(fnmatch(Path(p).name, g) for g in globs)}


def unadded(job: Job) -> set[str]:
    """Instances in the job's series folder that it has no row for (nor excludes)."""
    files = spool_instances(Path(job.folder))
    if not files:
        return set()
    have = set(job.instances.values_list("path", flat=True))
    new = files - have
    return new - _excluded(job, new) if new else new


def add_files(job_ids: Iterable[int], folder: str | Path) -> list[int]:
    """Add the instances of `folder` the open jobs do not have yet as pending rows
    (an unreadable or damaged one as failed, with the reason).

    Return the ids of jobs that were waiting for them and are queued again.
    """
    job_ids = list(job_ids)
    folder = Path(folder).resolve()
    have = set(
        JobInstance.objects.filter(job_id__in=job_ids).values_list("path", flat=True)
    )
    new = sorted(spool_instances(folder) - have)
    if not new:
        return []
    scanned = scan_paths(folder, [Path(p) for p in new])
    grown = []
    with transaction.atomic():
        jobs = Job.objects.filter(pk__in=job_ids, series_open=True).select_related(
            "target"
        )
        for job in jobs:
            own = scanned.excluding(split_globs(job.target.as_kind().exclude))
            # A restarted receiver starts from the rows: none twice.
            have = set(
                job.instances.filter(path__in=new).values_list("path", flat=True)
            )
            instances = [i for i in own.instances if str(i.path) not in have]
            corrupt = [
                (p, why)
                for p, why in (*own.corrupt, *own.skipped)
                if str(p) not in have
            ]
            if not instances and not corrupt:
                continue
            files.insert_rows(job, instances, [], corrupt)
            _recount(job.pk)
            grown.append(job.pk)
    return wake(grown)


def _recount(job_id: int) -> None:
    """The job's instance total from its rows (a worker's end of attempt may have
    written a total from before the rows it did not see)."""
    dicom = (
        JobInstance.objects.filter(job_id=OuterRef("pk"), dicom=True)
        .values("job_id")
        .annotate(n=Count("id"))
        .values("n")
    )
    failed = (
        JobInstance.objects.filter(
            job_id=OuterRef("pk"), dicom=True, state=InstanceState.FAILED
        )
        .values("job_id")
        .annotate(n=Count("id"))
        .values("n")
    )
    Job.objects.filter(pk=job_id).update(
        total=Coalesce(Subquery(dicom), 0),
        failed=Coalesce(Subquery(failed), 0),
        updated_at=timezone.now(),
    )


def wake(job_ids: Iterable[int]) -> list[int]:
    """Queue the jobs among `job_ids` that wait for their series; return those."""
    now = timezone.now()
    return [
        pk
        for pk in job_ids
        if Job.objects.filter(pk=pk, state=State.FOLLOWING).update(
            state=State.QUEUED, not_before=now, updated_at=now
        )
    ]


def _due(job: Job) -> bool:
    """A waiting job has something to do: its series closed, rows pending, or
    files landed that it has no row for yet."""
    return (
        not job.series_open
        or job.instances.filter(state=InstanceState.PENDING).exists()
        or bool(unadded(job))
    )


def wake_if_due(job_id: int) -> bool:
    """A job that just yielded: queue it again at once if instances landed while
    it sent, or its series was closed meanwhile. True if queued."""
    job = Job.objects.filter(pk=job_id, state=State.FOLLOWING).first()
    return job is not None and _due(job) and bool(wake([job_id]))


def due_following() -> list[int]:
    """Waiting jobs that should not wait (a lost message): the sweep queues them."""
    waiting = Job.objects.filter(state=State.FOLLOWING).select_related("target")
    return wake([job.pk for job in waiting if _due(job)])


def close(job_ids: Iterable[int], folder: str | Path) -> list[int]:
    """The series is complete: add its last instances, close the jobs, and queue
    those waiting (their next attempt ends them). Return the ids queued.

    Instances added to a job that had failed meanwhile are failed with the
    reason (retrying the job sends them): nothing is left pending unnamed.
    """
    job_ids = list(job_ids)
    with transaction.atomic():
        woken = add_files(job_ids, folder)
        Job.objects.filter(pk__in=job_ids).update(series_open=False)
        for job in Job.objects.filter(pk__in=job_ids, state=State.FAILED):
            failed = job.instances.filter(state=InstanceState.PENDING).update(
                state=InstanceState.FAILED,
                message="not sent: the job had failed before this instance "
                "arrived; retry the job to send it",
            )
            if failed:
                Job.objects.filter(pk=job.pk).update(failed=F("failed") + failed)
        return sorted(set(woken) | set(wake(job_ids)))
