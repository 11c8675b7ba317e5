"""Storage Commitment for a job: ask the target to commit what it got, record its answer.

Run by the engine after the files of an attempt are sent, for targets whose kind can
commit and whose "Request storage commitment" is on. Every delivered instance not yet
committed (this attempt's and earlier ones') is named in one request with a fresh
Transaction UID; the target's report comes back on the request's association or to
Courier's receiver, which records it by that UID (`commitment.record_report`), and the
worker looks for it there while it waits. Each instance is then committed, or goes
back to pending with the target's reason, to be sent and asked for again by the next
attempt: the attempt fails in words, and the job retries like after any other error.
A job is done only when every instance is committed.

The worker keeps the job while it waits: its lease keeper goes on renewing the lease,
the job holds one of the target's connections (not its whole share), and a cancel or
a lost lease ends the wait within a second.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db.models import Q
from django.template.defaultfilters import pluralize

from config.safetext import db_text
from targets.dicomnet import load_pydicom
from targets.dicomnet.commit_scu import failure_text
from targets.dicomnet.commitment import Reference, Report
from targets.kinds.base import SendContext, TargetError
from targets.models import Target
from targets.series import scan_folder

from . import lease
from .commitment import record_report
from .models import (
    Commitment,
    InstanceState,
    Job,
    JobInstance,
    State,
    StorageCommitment,
)

DELIVERED = (InstanceState.SENT, InstanceState.WARNING, InstanceState.PRESENT)
# Instances named in the message of a failed commitment.
LISTED = 5


class Stopped(Exception):
    """The job was cancelled or its lease lost while waiting for the report."""


def wanted(target: Target) -> bool:
    return bool(target.can_commit and target.request_commitment)


def commit(
    job: Job,
    target: Target,
    worker: str,
    keeper: lease.LeaseKeeper,
    context: SendContext,
) -> None:
    """Ask the target to commit the job's delivered, uncommitted instances.

    Return when every one of them is committed; raise `TargetError` (the attempt
    fails and is retried) when the target cannot be asked, sends no report in
    time, or does not commit some; raise `Stopped` when the job is no longer this
    worker's.
    """
    rows = list(
        job.instances.filter(dicom=True, state__in=DELIVERED)
        .exclude(commitment=Commitment.COMMITTED)
        .values_list("pk", "path", "sop_instance_uid")
    )
    if not rows:
        _count(job)
        return
    classes = {
        str(inst.path): inst.sop_class_uid
        for inst in scan_folder(job.folder)
        .only({path for _, path, _ in rows})
        .instances
    }
    gone = [pk for pk, path, _ in rows if path not in classes]
    if gone:
        JobInstance.objects.filter(pk__in=gone).update(
            state=InstanceState.FAILED,
            commitment=Commitment.FAILED,
            message="the file left the folder before the target committed it: "
            "it cannot be named in a storage commitment request",
        )
        rows = [row for row in rows if row[0] not in gone]
        if not rows:
            _count(job)
            return
    references = [Reference(classes[path], uid) for _, path, uid in rows]
    load_pydicom()  # the package first, worker threads race here (load_pydicom)
    from pydicom.uid import generate_uid  # here: the send path imports no pydicom

    transaction_uid = generate_uid(prefix=None)
    # The report is taken from the target's AE title only (`record_report`).
    StorageCommitment.objects.create(
        transaction_uid=transaction_uid, reported_by=db_text(target.called_aet, 16)
    )
    JobInstance.objects.filter(pk__in=[pk for pk, _, _ in rows]).update(
        commitment=Commitment.WAITING
    )
    # One association while waiting: the rest of the job's share is free for others.
    Job.objects.filter(pk=job.pk, lease_owner=worker, state=State.SENDING).update(
        connections=1, committed=_committed(job)
    )
    came_to_receiver = []

    mine = Job.objects.filter(pk=job.pk, lease_owner=worker, state=State.SENDING)

    def poll() -> Report | None:
        # Cancel is seen here within a tick, not at the keeper's next renewal.
        if not keeper.valid or not mine.exists():
            raise Stopped("job cancelled or taken over")
        row = (
            StorageCommitment.objects.filter(transaction_uid=transaction_uid)
            .exclude(outcome=StorageCommitment.Outcome.WAITING)
            .values("committed", "failed")
            .first()
        )
        if row is None:
            return None
        came_to_receiver.append(True)
        return Report(
            transaction_uid,
            [Reference(c, i) for c, i in row["committed"]],
            [Reference(c, i, r) for c, i, r in row["failed"]],
        )

    report = target.handler.request_commitment(
        transaction_uid,
        references,
        wait=float(settings.COURIER_COMMITMENT_WAIT),
        poll=poll,
        context=context,
    )
    if not came_to_receiver:
        record_report(
            transaction_uid,
            [(r.sop_class, r.sop_instance) for r in report.committed],
            [(r.sop_class, r.sop_instance, r.failure or 0) for r in report.failed],
            reported_by=target.called_aet,
            reported_from=f"{target.host}:{target.port} (same association)",
        )
    _apply(job, target, rows, report)


def _apply(
    job: Job, target: Target, rows: list[tuple[int, str, str]], report: Report
) -> None:
    failed = {r.sop_instance: r.failure for r in report.failed}
    committed = {r.sop_instance for r in report.committed} - set(failed)
    ok = [pk for pk, _, uid in rows if uid in committed]
    JobInstance.objects.filter(pk__in=ok).update(commitment=Commitment.COMMITTED)
    not_ok = []
    for pk, path, uid in rows:
        if uid in committed:
            continue
        reason = (
            failure_text(failed[uid])
            if uid in failed
            else "not named in the target's report"
        )
        not_ok.append((Path(path).name, uid, reason))
        # Pending again: the next attempt sends it and asks once more.
        JobInstance.objects.filter(pk=pk).update(
            state=InstanceState.PENDING,
            commitment=Commitment.FAILED,
            message=db_text(
                f"not committed by {target.called_aet}: {reason}; sent again on "
                "the next attempt",
                2000,
            ),
        )
    _count(job)
    if not_ok:
        listing = "; ".join(f"{name}: {reason}" for name, _, reason in not_ok[:LISTED])
        if len(not_ok) > LISTED:
            listing += "; …"
        raise TargetError(
            f"{len(not_ok)} of {len(rows)} instance{pluralize(len(rows))} not "
            f"committed by {target.called_aet} ({listing}); sent again on the next "
            "attempt"
        )


def _committed(job: Job) -> int:
    return job.instances.filter(Q(dicom=True), commitment=Commitment.COMMITTED).count()


def _count(job: Job) -> None:
    job.committed = _committed(job)
    Job.objects.filter(pk=job.pk).update(committed=job.committed)
