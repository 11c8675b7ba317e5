"""Jobs of a series still arriving: they grow as its instances land.

A rule that forwards as instances arrive (`routing.Rule.stream`) makes its jobs
when the series' first instance is stored, with `Job.series_open` set. The
receiver's bookkeeping (once a second, after its journal checkpoint: every file in
the series folder is durable) adds the instances that landed since as pending rows
(`add_files`) and queues a job that had sent everything and was waiting
(`State.FOLLOWING`). An attempt at an open job sends what is pending and then
yields: `outcomes.finish` leaves it following instead of done, and the worker
thread is free again (`wake_if_due` queues it at once if rows came meanwhile).
Routing closes the jobs when the series is complete (`close`): the last instances
are added, `series_open` cleared, and the next attempt ends the job as any other.

Every step is a conditional UPDATE on the job's row, so the receiver and a worker
racing each other queue a job at most once more than needed, never lose a wake-up:
each writes its change first and looks at the other's after.

These functions only touch the database; the callers send the queue messages for
the ids they return (`services.grow_jobs`, `services.close_jobs`, `tasks`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from django.db import transaction
from django.db.models import Count, F, OuterRef, Q, Subquery
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


def add_files(
    job_ids: Iterable[int], folder: str | Path, known: set[str] | None = None
) -> tuple[set[str], list[int]]:
    """Add the instances of `folder` the open jobs do not have yet as pending rows.

    `known`: the paths already added (kept by the caller between calls, so a tick
    reads only the new files); None reads them from the rows. Return the paths now
    known and the ids of jobs that were waiting for them and are queued again.
    """
    job_ids = list(job_ids)
    folder = Path(folder).resolve()
    if known is None:
        known = set(
            JobInstance.objects.filter(job_id__in=job_ids).values_list(
                "path", flat=True
            )
        )
    new = sorted(spool_instances(folder) - known)
    if not new:
        return known, []
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
            corrupt = [(p, why) for p, why in own.corrupt if str(p) not in have]
            rows = files.rows_for(job, instances, [], corrupt)
            if not rows and not own.skipped:
                continue
            JobInstance.objects.bulk_create(rows)
            _recount(job.pk, skipped=len(own.skipped))
            grown.append(job.pk)
    return known | set(new), wake(grown)


def _recount(job_id: int, skipped: int = 0) -> None:
    """The job's instance total from its rows (a worker's end of attempt may have
    written a total from before the rows it did not see)."""
    dicom = (
        JobInstance.objects.filter(job_id=OuterRef("pk"), dicom=True)
        .values("job_id")
        .annotate(n=Count("id"))
        .values("n")
    )
    Job.objects.filter(pk=job_id).update(
        total=Coalesce(Subquery(dicom), 0),
        skipped=F("skipped") + skipped,
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


def wake_if_due(job_id: int) -> bool:
    """A job that just yielded: queue it again at once if instances were added
    while it sent, or its series was closed meanwhile. True if queued."""
    pending = JobInstance.objects.filter(job_id=job_id, state=InstanceState.PENDING)
    due = Job.objects.filter(pk=job_id, state=State.FOLLOWING).filter(
        Q(series_open=False) | Q(pk__in=pending.values("job_id"))
    )
    now = timezone.now()
    return bool(due.update(state=State.QUEUED, not_before=now, updated_at=now))


def due_following() -> list[int]:
    """Waiting jobs that should not wait (a lost message): the sweep queues them."""
    pending = JobInstance.objects.filter(state=InstanceState.PENDING)
    ids = Job.objects.filter(state=State.FOLLOWING).filter(
        Q(series_open=False) | Q(pk__in=pending.values("job_id"))
    )
    return wake(list(ids.values_list("pk", flat=True)))


def close(job_ids: Iterable[int], folder: str | Path) -> list[int]:
    """The series is complete: add its last instances, close the jobs, and queue
    those waiting (their next attempt ends them). Return the ids queued.

    Instances added to a job that had failed meanwhile are failed with the
    reason (retrying the job sends them): nothing is left pending unnamed.
    """
    job_ids = list(job_ids)
    with transaction.atomic():
        _, woken = add_files(job_ids, folder)
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
