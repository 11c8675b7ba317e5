"""The jobs engine: one attempt at a job, from its claim to its end.

`claim` takes a job for a worker if it may run now (the target enabled, not paused,
a connection free under its limit) with one conditional UPDATE and a lease
(`lease.py`); `attempt` sends the job's pending files through the target's handler
in a thread of its own while this thread records what the handler reports
(`outcomes.OutcomeWriter`) and watches the lease, then `outcomes.finish` sets the
job's state. The engine sends no queue messages: its caller (`tasks.run_job`)
watches the lease and schedules the retry.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.db import connections, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from config.safetext import db_text, log_fields
from targets.kinds.base import Outcome, SendContext, TargetError
from targets.models import Target
from targets.redaction import crash_site, scrub
from targets.series import Series, scan_folder
from targets.validators import split_globs

from . import committing, lease
from .models import FINISHED_STATES, Attempt, InstanceState, Job, JobInstance, State
from .outcomes import OutcomeWriter, finish

log = logging.getLogger("courier.dispatch")

# Seconds between progress writes while a job sends (instances, attempt and job).
PROGRESS_INTERVAL = 1.0

ProgressHook = Callable[[Outcome], None]


class SendAborted(Exception):
    """Raised into the handler's thread when the job was cancelled or its lease lost."""


# -- may the job run now ------------------------------------------------------------


def job_limit(target: Target) -> int:
    """Connections to `target` at once, across every job and worker process."""
    return max(1, target.max_connections or 1)


def slots_in_use(
    target_id: int, now, exclude: int | None = None, *, holds: bool = True
) -> int:
    """Connections held by the target's running jobs (live leases only).

    With `holds`, a direct send (`send_series`) waiting for a connection counts as
    holding one, so that queued jobs do not take it first.
    """
    live = Job.objects.filter(target_id=target_id, lease_expires_at__gt=now)
    if exclude is not None:
        live = live.exclude(pk=exclude)
    used = live.filter(state=State.SENDING).aggregate(n=Sum("connections"))["n"] or 0
    if holds:
        used += live.filter(state=State.QUEUED).count()
    return used


def send_refusal(target: Target) -> str:
    if not target.can_store:
        return (
            f"target {target.name} is query-only (direction "
            f"{target.get_direction_display()}): Courier does not send to it"
        )
    return ""


def wait_reason(target: Target) -> str:
    if not target.enabled:
        return f"target {target.name} is disabled; the job waits until it is enabled"
    if target.paused:
        return f"target {target.name} is paused; the job waits until it is resumed"
    return ""


def claimable_q(now) -> Q:
    """Jobs any worker may claim now: due, not held by a direct send, or whose
    worker's lease ran out."""
    unheld = Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now)
    return (
        Q(state__in=[State.QUEUED, State.RETRY_WAIT], not_before__lte=now) & unheld
    ) | Q(state=State.SENDING, lease_expires_at__lt=now)


def keeper_for(job_id: int, worker: str) -> lease.LeaseKeeper:
    """A lease keeper for a job held by `worker` (queued by a direct send, or sending)."""
    return lease.LeaseKeeper(Job, job_id, worker, [State.QUEUED, State.SENDING])


# -- claiming a job -------------------------------------------------------------------


@dataclass
class Claim:
    job: Job
    target: Target
    interrupted: list[Attempt] = field(default_factory=list)


def claim(
    job_id: int, worker: str, respect_limit: bool, *, held: bool = False
) -> Claim | None:
    """Take the job for `worker` if it may run now; None if not (or taken).

    `held`: the job is queued and held by `worker` itself (a direct send waiting
    for a connection); other holds do not count against it.
    """
    now = timezone.now()
    claimable = Q(state=State.QUEUED, lease_owner=worker) if held else claimable_q(now)
    # Most messages for a busy target or a taken job end here, without a write
    # transaction (on SQLite that would wait for the one database-wide write lock).
    if respect_limit:
        seen = (
            Job.objects.filter(pk=job_id)
            .filter(claimable)
            .values_list("target_id", "target__max_connections")
            .first()
        )
        if seen is None:
            return None
        used = slots_in_use(seen[0], now, exclude=job_id, holds=not held)
        if used >= max(1, seen[1] or 1):
            return None
    with transaction.atomic():
        # Lock the target row so that counting its running jobs and claiming one is
        # one step for every worker process (PostgreSQL; SQLite's write transaction
        # already serialises this).
        job = (
            Job.objects.select_related("target")
            .select_for_update(of=("target",))
            .filter(pk=job_id)
            .first()
        )
        if job is None or job.state in FINISHED_STATES:
            return None
        target = job.target.as_kind()
        refusal = send_refusal(target)
        if refusal:
            Job.objects.filter(pk=job_id).exclude(state__in=FINISHED_STATES).update(
                state=State.FAILED, last_error=refusal, finished_at=now
            )
            return None
        waiting = wait_reason(target)
        if waiting:
            # A direct send's hold ends here too: the job waits like any other.
            Job.objects.filter(
                pk=job_id, state__in=[State.QUEUED, State.RETRY_WAIT]
            ).update(
                state=State.PAUSED,
                last_error=waiting,
                lease_owner="",
                lease_expires_at=None,
            )
            return None
        # A job takes as many of the target's free connections as it has
        # instances left: one big series uses them all, small ones share them.
        free = job_limit(target) - slots_in_use(
            target.pk, now, exclude=job_id, holds=not held
        )
        if respect_limit and free <= 0:
            return None
        left = max(1, job.total - job.sent - job.present - job.failed)
        slots = max(1, min(free, left) if respect_limit else job_limit(target))
        claimed = lease.take(
            Job.objects.filter(pk=job_id).filter(claimable),
            worker,
            now,
            state=State.SENDING,
            connections=slots,
            attempt_count=F("attempt_count") + 1,
            updated_at=now,
        )
        if not claimed:
            return None
        was_sending = job.state == State.SENDING
        job.state, job.lease_owner = State.SENDING, worker
        job.lease_expires_at, job.connections = now + lease.lease_length(), slots
        job.attempt_count += 1
        if not was_sending:
            return Claim(job=job, target=target)
        # Attempts left open by a worker that died (its lease expired).
        interrupted = list(job.attempts.filter(ended_at__isnull=True))
        for attempt in interrupted:
            attempt.ended_at = now
            attempt.outcome = "interrupted"
            attempt.error = (
                f"worker {attempt.worker} stopped answering (lease expired); "
                "the job was resumed"
            )
            attempt.save(update_fields=["ended_at", "outcome", "error"])
        return Claim(job=job, target=target, interrupted=interrupted)


# -- one attempt ------------------------------------------------------------------------


def attempt(
    claimed: Claim,
    worker: str,
    keeper: lease.LeaseKeeper,
    progress: ProgressHook | None = None,
    retry: bool = True,
) -> Job:
    """Make one attempt at a claimed job; return the job as it ended.

    Reads the job's pending files, sends them, records the attempt and each file's
    outcome, then sets the job's state: done / done-with-warnings / failed, or
    retry-wait (transient error, `retry` true and attempts left) with the time of
    the next attempt in `not_before`. Stops at the next instance once `keeper`'s
    lease is no longer valid (cancelled, taken over, the database away).
    """
    job, target = claimed.job, claimed.target
    record = Attempt.objects.create(job=job, number=job.attempt_count, worker=worker)
    started = time.monotonic()
    error: TargetError | None = None
    aborted = False
    try:
        folder = Path(job.folder)
        if not folder.is_dir():
            raise TargetError(f"folder {folder} no longer exists", permanent=True)
        pending = {
            path: (pk, uid)
            for path, pk, uid in job.instances.filter(
                state=InstanceState.PENDING
            ).values_list("path", "id", "sop_instance_uid")
        }
        if pending:
            series = _scan(folder, target).only(set(pending))
            changed = _mark_changed(
                job, series, {path: uid for path, (_, uid) in pending.items()}
            )
            if changed:
                series = series.only(set(pending) - changed)
            found = series.instances + series.others
            missing = set(pending) - changed - {str(i.path) for i in found}
            if missing:
                _mark_missing(job, missing)
            if found:
                ids = {path: pk for path, (pk, _) in pending.items()}
                writer = OutcomeWriter(job, target, record, worker, ids)
                aborted = _send(job, target, series, writer, keeper, progress)
        if not aborted and committing.wanted(target):
            # What this and earlier attempts delivered, committed or not.
            context = SendContext(job.calling_aet, job.called_aet)
            committing.commit(job, target, worker, keeper, context)
    except committing.Stopped:
        aborted = True
    except TargetError as exc:
        error = exc
        error.message = scrub(exc.message, target)
    except SendAborted:
        aborted = True
    except Exception as exc:  # a bug or an unexpected library error: retry it
        # Type and place only: the exception's text may carry a secret.
        log.error(
            "dispatch unexpected error %s",
            log_fields(job=job.pk, error=type(exc).__name__, at=crash_site(exc)),
        )
        error = TargetError(
            scrub(f"unexpected error: {type(exc).__name__}: {exc}", target)
        )
    return finish(job, target, record, worker, error, aborted, retry, started)


def _mark_changed(job: Job, series: Series, pending: dict[str, str]) -> set[str]:
    """Fail the files that now hold another instance than when the job was made.

    A file rewritten in place (a hard-linked spool copy shares its bytes with the
    caller's file) must not be sent as the instance the job recorded.
    """
    changed = {}
    for inst in series.instances:
        was = pending.get(str(inst.path))
        if was and was != inst.sop_instance_uid:
            changed[str(inst.path)] = inst.sop_instance_uid
    for path, now in changed.items():
        JobInstance.objects.filter(job=job, path=path).update(
            state=InstanceState.FAILED,
            message=db_text(
                f"the file changed after the job was made: it now holds SOP "
                f"Instance UID {now}, not {pending[path]}"
            ),
        )
    return set(changed)


def _mark_missing(job: Job, paths: set[str]) -> None:
    JobInstance.objects.filter(job=job, path__in=paths).update(
        state=InstanceState.FAILED,
        message="file is gone from the folder, is no longer DICOM or is corrupt",
    )


def _send(
    job: Job,
    target: Target,
    series: Series,
    writer: OutcomeWriter,
    keeper: lease.LeaseKeeper,
    progress: ProgressHook | None,
) -> bool:
    """Run the handler in a thread; record outcomes here, stop if the lease is lost.

    All database work stays in this (the worker's) thread, whichever thread the
    handler reports from. Outcomes and progress are written in batches every
    `PROGRESS_INTERVAL`, and at the end. Return True if the send was aborted
    (cancel, lease lost).
    """
    outcomes: queue.Queue[Outcome | None] = queue.Queue()
    stop = threading.Event()
    failure: list[BaseException] = []
    context = SendContext(calling_aet=job.calling_aet, called_aet=job.called_aet)

    def report(outcome: Outcome) -> None:
        if stop.is_set():
            raise SendAborted("job cancelled or taken over")
        outcomes.put(outcome)

    def sender() -> None:
        try:
            # The handler opens at most the connections this job was given.
            target.handler.send(
                series,
                progress=report,
                context=context,
                connections=job.connections,
            )
        except BaseException as exc:  # handed to the worker thread below
            failure.append(exc)
        finally:
            # Should a handler have touched the database, its connection belongs
            # to this thread: close it rather than leak one per job.
            connections.close_all()
            outcomes.put(None)

    if not keeper.valid:
        return True
    thread = threading.Thread(target=sender, name=f"send-job-{job.pk}", daemon=True)
    thread.start()
    next_flush = time.monotonic() + PROGRESS_INTERVAL
    while True:
        try:
            outcome = outcomes.get(timeout=min(0.5, PROGRESS_INTERVAL))
        except queue.Empty:
            outcome = False
        if outcome is None:
            break
        if outcome:
            writer.add(outcome)
            if progress:
                progress(outcome)
        now = time.monotonic()
        if now >= next_flush or writer.full:
            if not writer.flush() and not stop.is_set():
                stop.set()  # cancelled or taken over: stop at the next instance
            next_flush = now + PROGRESS_INTERVAL
        if not keeper.valid:
            # Cancelled, taken over, or the lease could not be renewed: stop at
            # the next instance.
            stop.set()
    thread.join()
    # What the target confirmed is kept, however the send ended.
    writer.flush()
    if failure:
        exc = failure[0]
        if isinstance(exc, SendAborted) or stop.is_set():
            return True
        raise exc
    return stop.is_set()


def _scan(folder: str | Path, target: Target) -> Series:
    series = scan_folder(folder)
    return series.excluding(split_globs(target.exclude))
