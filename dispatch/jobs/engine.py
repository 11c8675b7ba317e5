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

from django.db import connection, connections, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from config.safetext import log_fields
from targets.kinds.base import Outcome, SendContext, TargetError
from targets.models import Target
from targets.redaction import crash_site, scrub
from targets.series import Series
from targets.validators import split_globs

from . import committing, files, lease
from .models import FINISHED_STATES, Attempt, Job, State
from .outcomes import OutcomeWriter, finish

log = logging.getLogger("courier.dispatch")

# Seconds between progress writes while a job sends (instances, attempt and job);
# also every `OutcomeWriter.BATCH` outcomes. Never one statement per instance.
PROGRESS_INTERVAL = 0.25

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


# The claim itself, for any number of workers on SQLite or PostgreSQL: one UPDATE
# that takes the job only if it may be claimed now (`claimable_q`, or queued and
# held by this worker for a direct send) and only if the target has a connection
# free, counting the connections its other jobs with a live lease hold (and, unless
# held, one for each direct send waiting); it takes as many of the free ones as the
# job has instances left. RETURNING gives the row as claimed.
_USED = (
    "(SELECT COALESCE(SUM(CASE WHEN o.state = 'sending' THEN o.connections "
    "ELSE 1 END), 0) FROM dispatch_job o WHERE o.target_id = %(target)s "
    "AND o.id <> %(id)s AND o.lease_expires_at > %(now)s AND o.state IN {states})"
)
_CLAIM = (
    "UPDATE dispatch_job SET state = 'sending', lease_owner = %(worker)s, "
    "lease_expires_at = %(expires)s, updated_at = %(now)s, "
    "attempt_count = attempt_count + 1, connections = {connections} "
    "WHERE id = %(id)s AND {claimable} {limit}"
    "RETURNING attempt_count, attempt_base, connections, total, sent, present, "
    "warnings, failed, bytes_sent, other_files, other_sent"
)
_CLAIMABLE = (
    "((state IN ('queued', 'retry-wait') AND not_before <= %(now)s "
    "AND (lease_expires_at IS NULL OR lease_expires_at < %(now)s)) "
    "OR (state = 'sending' AND lease_expires_at < %(now)s))"
)
_HELD = "(state = 'queued' AND lease_owner = %(worker)s)"
_PEEK = "SELECT * FROM dispatch_job WHERE id = %(id)s AND {claimable}"
_TARGET = "SELECT * FROM targets_target WHERE id = %s"
_NEXT = (
    f"SELECT id FROM dispatch_job WHERE target_id = %(target)s AND {_CLAIMABLE} "
    "ORDER BY not_before, id LIMIT 1"
)
RETURNED = (
    "attempt_count",
    "attempt_base",
    "connections",
    "total",
    "sent",
    "present",
    "warnings",
    "failed",
    "bytes_sent",
    "other_files",
    "other_sent",
)


def next_claimable(target_id: int) -> int | None:
    """The target's job any worker may claim now, oldest due first (`claimable_q`)."""
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    with connection.cursor() as cursor:
        cursor.execute(_NEXT, {"target": target_id, "now": now})
        row = cursor.fetchone()
    return row[0] if row else None


def _claim_sql(respect_limit: bool, held: bool) -> str:
    used = _USED.format(states="('sending')" if held else "('sending', 'queued')")
    free = f"(%(limit)s - {used})"
    if respect_limit:
        connections = f"CASE WHEN {free} < %(left)s THEN {free} ELSE %(left)s END"
        limit = f"AND {free} > 0 "
    else:
        connections, limit = "%(limit)s", ""
    return _CLAIM.format(
        connections=connections,
        claimable=_HELD if held else _CLAIMABLE,
        limit=limit,
    )


def claim(
    job_id: int, worker: str, respect_limit: bool, *, held: bool = False
) -> Claim | None:
    """Take the job for `worker` if it may run now; None if not (or taken).

    `held`: the job is queued and held by `worker` itself (a direct send waiting
    for a connection); other holds do not count against it.
    """
    now = timezone.now()
    adapt = connection.ops.adapt_datetimefield_value
    # Most messages for a busy target or a taken job end here, with one read and
    # no write (on SQLite a write waits for the one database-wide write lock).
    # Plain SQL: building this query with the ORM (the job and the target's
    # hundred columns) was the largest part of a small job's CPU.
    peek = {"id": job_id, "now": adapt(now), "worker": worker}
    rows = Job.objects.raw(_PEEK.format(claimable=_HELD if held else _CLAIMABLE), peek)
    job = next(iter(rows), None)
    if job is None:
        return None
    target = next(iter(Target.objects.raw(_TARGET, [job.target_id])), None)
    if target is None:
        return None
    job.target = target
    target = target.as_kind()
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
    expires = now + lease.lease_length()
    params = {
        "id": job_id,
        "target": target.pk,
        "worker": worker,
        "now": adapt(now),
        "expires": adapt(expires),
        "limit": job_limit(target),
        # A job takes as many of the target's free connections as it has
        # instances left: one big series uses them all, small ones share them.
        "left": max(1, job.total - job.sent - job.present - job.failed),
    }
    sql = _claim_sql(respect_limit, held)
    if connection.vendor == "sqlite":
        # One statement: SQLite's UPDATE holds the database's write lock from
        # counting to claiming.
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
    else:
        # Counting the target's connections in use and claiming is one step for
        # every worker process: the target's row is locked meanwhile.
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT id FROM targets_target WHERE id = %s FOR UPDATE", [target.pk]
            )
            cursor.execute(sql, params)
            row = cursor.fetchone()
    if row is None:
        return None
    was_sending, previous = (
        job.state == State.SENDING,
        (job.lease_owner, job.attempt_count),
    )
    for name, value in zip(RETURNED, row, strict=True):
        setattr(job, name, value)
    job.state, job.lease_owner, job.lease_expires_at = State.SENDING, worker, expires
    if not was_sending:
        return Claim(job=job, target=target)
    return Claim(job=job, target=target, interrupted=_interrupted(job, *previous, now))


def _interrupted(job: Job, owner: str, number: int, now) -> list[Attempt]:
    """Close the attempts of a worker that died (its lease ran out) as interrupted.

    An attempt's row is written at its first progress write or at its end, so a
    worker that died sooner left none: it is recorded here.
    """
    why = "worker {} stopped answering (lease expired); the job was resumed"
    interrupted = list(job.attempts.filter(ended_at__isnull=True))
    for attempt in interrupted:
        attempt.ended_at = now
        attempt.outcome = "interrupted"
        attempt.error = why.format(attempt.worker)
        attempt.save(update_fields=["ended_at", "outcome", "error"])
    if number and not job.attempts.filter(number=number).exists():
        interrupted.append(
            Attempt.objects.create(
                job=job,
                number=number,
                worker=owner,
                started_at=now,
                ended_at=now,
                outcome="interrupted",
                error=why.format(owner),
            )
        )
    return interrupted


# -- one attempt ------------------------------------------------------------------------


def attempt(
    claimed: Claim,
    worker: str,
    keeper: lease.LeaseKeeper | lease.RowLease,
    progress: ProgressHook | None = None,
    retry: bool = True,
) -> Job:
    """Make one attempt at a claimed job; return the job as it ended.

    Sends the job's pending files (rebuilt from their rows: the folder is not read
    again, `files.pending`), records the attempt and each file's outcome, then sets
    the job's state: done / done-with-warnings / failed, or retry-wait (transient
    error, `retry` true and attempts left) with the time of the next attempt in
    `not_before`. Stops at the next instance once `keeper`'s lease is no longer
    valid (cancelled, taken over, the database away).
    """
    sent = send(claimed, worker, keeper, progress)
    return sent.finish(worker, retry)


@dataclass
class Sent:
    """An attempt whose sending is over, its end not yet written (`finish`)."""

    claim: Claim
    writer: OutcomeWriter
    error: TargetError | None
    aborted: bool
    started: float

    def finish(self, worker: str, retry: bool = True) -> Job:
        return finish(
            self.claim.job,
            self.claim.target,
            self.writer,
            worker,
            self.error,
            self.aborted,
            retry,
            self.started,
        )


def send(
    claimed: Claim,
    worker: str,
    keeper: lease.LeaseKeeper | lease.RowLease,
    progress: ProgressHook | None = None,
    rows: list[tuple] | None = None,
) -> Sent:
    """The sending part of `attempt`: the job's pending files through the handler.

    Writes progress while a job of many files sends; the end is left to
    `Sent.finish`.
    """
    job, target = claimed.job, claimed.target
    record = Attempt(
        job=job, number=job.attempt_count, worker=worker, started_at=timezone.now()
    )
    writer = OutcomeWriter(job, target, record, worker, {})
    started = time.monotonic()
    error: TargetError | None = None
    aborted = False
    try:
        folder = Path(job.folder)
        if not folder.is_dir():
            raise TargetError(f"folder {folder} no longer exists", permanent=True)
        todo = files.pending(job, split_globs(target.exclude), rows)
        writer.ids, writer.others, writer.fresh = todo.ids, todo.others, todo.fresh
        paths = {pk: path for path, pk in todo.ids.items()}
        for pk, why in todo.failed.items():
            writer.fail(pk, paths[pk], why)
        series = todo.series
        if series.instances or series.others:
            aborted = _send(job, target, series, writer, keeper, progress)
        if not aborted and committing.wanted(target):
            # The request names what the rows say was delivered: write them first.
            # The commitment moves rows back to pending: `finish` counts the rows.
            writer.write_rows()
            writer.fresh = False
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
    return Sent(claimed, writer, error, aborted, started)


def _send(
    job: Job,
    target: Target,
    series: Series,
    writer: OutcomeWriter,
    keeper: lease.LeaseKeeper | lease.RowLease,
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
    if len(series.instances) + len(series.others) <= 1:
        # One file: sent on this thread (no thread to start, no progress to write
        # while it goes), its outcome recorded once the handler returns.
        told: list[Outcome] = []
        target.handler.send(
            series, progress=told.append, context=context, connections=1
        )
        for outcome in told:
            writer.add(outcome)
            if progress:
                progress(outcome)
        return False
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
    # What the target confirmed is written by `finish`, however the send ended.
    if failure:
        exc = failure[0]
        if isinstance(exc, SendAborted) or stop.is_set():
            return True
        raise exc
    return stop.is_set()
