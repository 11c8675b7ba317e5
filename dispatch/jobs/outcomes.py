"""The outcomes of an attempt, recorded as they come and summed up at its end.

`OutcomeWriter` writes what the handler reports in batches (one transaction a
second: the files' rows, the attempt's and the job's counters, so the pages show
progress while a job sends); `finish` sets the job's state from its files (done,
done with warnings, failed) or from the error (retry-wait with backoff, failed), and
lets go of the lease.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta
from pathlib import Path

from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Q, Sum
from django.template.defaultfilters import pluralize
from django.utils import timezone

from config.safetext import db_text, log_fields
from targets.kinds.base import FAILED, PRESENT, SENT, WARNING, Outcome, TargetError
from targets.models import Target
from targets.redaction import scrub

from .models import (
    FINISHED_STATES,
    SUCCESS_STATES,
    Attempt,
    InstanceState,
    Job,
    JobInstance,
    State,
)
from .spool import cleanup_spool

log = logging.getLogger("courier.dispatch")

_INSTANCE_STATE = {
    SENT: InstanceState.SENT,
    WARNING: InstanceState.WARNING,
    PRESENT: InstanceState.PRESENT,
    FAILED: InstanceState.FAILED,
}


def backoff_delay(target: Target, attempt: int) -> float:
    """Seconds before retry number `attempt` (1 = first retry): doubling, jittered."""
    base = float(target.retry_base_delay)
    cap = float(target.retry_max_delay)
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    # Jitter spreads the retries of many jobs that failed together (a peer restart)
    # so they do not all hit the peer in the same second.
    return max(1.0, min(cap, delay * random.uniform(0.8, 1.2)))


class OutcomeWriter:
    """The outcomes of one attempt, counted here and written in batches.

    Every `flush` (the engine calls it each `PROGRESS_INTERVAL` while a job sends)
    is one transaction: the files' rows in one UPDATE, the attempt's row (inserted
    by the first flush) and the job's counters, so the pages show progress while a
    job sends. `finish` writes the rest with the job's end in one more. A worker that
    dies loses at most one interval of outcomes: those files are sent again by the
    next attempt. The counts are kept here, so an attempt that started with every
    file pending needs no count of the rows at its end.
    """

    BATCH = 500

    def __init__(
        self,
        job: Job,
        target: Target,
        attempt: Attempt,
        worker: str,
        ids: dict[str, int],
        *,
        others: set[int] | frozenset[int] = frozenset(),
        fresh: bool = False,
    ):
        self.job, self.target, self.attempt, self.worker = job, target, attempt, worker
        self.ids, self.others, self.fresh = ids, others, fresh
        # (row id, state, message, bytes) not written yet.
        self.rows: list[tuple[int, str, str, int]] = []
        self.recorded: set[int] = set()
        self.delta = dict.fromkeys(_COUNTERS, 0)
        self.totals = dict.fromkeys((*_COUNTERS, "other_sent", "other_failed"), 0)
        # The first few failed and warned files, for the job's message.
        self.failures: list[tuple[str, str]] = []
        self.warned: list[tuple[str, str]] = []

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.BATCH

    def add(self, outcome: Outcome) -> None:
        pk = self.ids.get(str(outcome.path))
        if pk is None or pk in self.recorded:
            return  # not a file of this job (or told twice): nothing to record
        state = _INSTANCE_STATE.get(outcome.status, InstanceState.FAILED)
        message = scrub(outcome.message, self.target) if outcome.message else ""
        # Text from the peer: no NUL reaches the database (PostgreSQL refuses the
        # whole batch).
        self._record(
            pk, str(outcome.path), state, db_text(message, 2000), outcome.bytes
        )

    def fail(self, pk: int, path: str, message: str) -> None:
        """Record a file that failed without an outcome from the handler."""
        if pk not in self.recorded:
            self._record(pk, path, InstanceState.FAILED, message, 0)

    def fail_unreported(
        self, why: str = "the target's handler reported no outcome for this file"
    ) -> None:
        """Fail the files the handler said nothing about: they did not get through."""
        for path, pk in self.ids.items():
            if pk not in self.recorded:
                self.fail(pk, path, why)

    def _record(self, pk: int, path: str, state: str, message: str, size: int) -> None:
        self.recorded.add(pk)
        self.rows.append((pk, state, message, size))
        delivered = state in (InstanceState.SENT, InstanceState.WARNING)
        totals, delta = self.totals, self.delta
        if delivered:
            totals["bytes_sent"] += size
            delta["bytes_sent"] += size
        if pk in self.others:
            if delivered or state == InstanceState.PRESENT:
                totals["other_sent"] += 1
            elif state == InstanceState.FAILED:
                totals["other_failed"] += 1
                self._note(self.failures, path, message, 6)
            return
        if delivered:
            delta["sent"] += 1
            totals["sent"] += 1
        if state == InstanceState.WARNING:
            delta["warnings"] += 1
            totals["warnings"] += 1
            self._note(self.warned, path, message, 5)
        elif state == InstanceState.PRESENT:
            delta["present"] += 1
            totals["present"] += 1
        elif state == InstanceState.FAILED:
            delta["failed"] += 1
            totals["failed"] += 1
            self._note(self.failures, path, message, 6)

    @staticmethod
    def _note(notes: list, path: str, message: str, limit: int) -> None:
        if len(notes) < limit:
            notes.append((path, message))

    def flush(self) -> bool:
        """Write what was recorded; False if the job is no longer this worker's.

        Plain SQL: it runs every `PROGRESS_INTERVAL` on the thread beside the
        handler's, and the ORM's query building held the GIL the sender needs.
        """
        owned = {"id": self.job.pk, "worker": self.worker}
        if not self.rows:
            with connection.cursor() as cursor:
                cursor.execute(_OWNED, owned)
                return cursor.fetchone() is not None
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        delta = self.delta
        with transaction.atomic():
            self.write_rows()
            self.save_attempt(careful=True, progress=True)
            with connection.cursor() as cursor:
                cursor.execute(_PROGRESS, {**owned, **delta, "now": now})
                still_ours = cursor.rowcount
        self.delta = dict.fromkeys(_COUNTERS, 0)
        return bool(still_ours)

    def write_rows(self) -> None:
        """The recorded files' rows: one UPDATE per `BATCH` files."""
        while self.rows:
            batch, self.rows = self.rows[: self.BATCH], self.rows[self.BATCH :]
            write_instance_rows(batch)

    def save_attempt(self, *, careful: bool = False, progress: bool = False) -> None:
        """The attempt's row with its counters: inserted once, then updated.

        `careful`: the job may have been taken over meanwhile, and the worker that
        took it may have recorded this attempt as interrupted already: then that
        row is updated. `progress`: only the counters changed since the last save.
        """
        attempt = self.attempt
        for name in _COUNTERS:
            setattr(attempt, name, self.totals[name])
        if attempt.pk is not None:
            if progress:
                with connection.cursor() as cursor:
                    cursor.execute(_ATTEMPT_COUNTS, {**self.totals, "id": attempt.pk})
            else:
                attempt.save()
            return
        if not careful:
            attempt.save(force_insert=True)
            return
        try:
            with transaction.atomic():
                attempt.save(force_insert=True)
        except IntegrityError:
            attempt.pk = (
                Attempt.objects.filter(job_id=attempt.job_id, number=attempt.number)
                .values_list("pk", flat=True)
                .first()
            )
            attempt.save(force_update=True)

    def counts(self) -> dict | None:
        """The job's counts from this attempt alone, if it started with every file
        pending (else None: count the rows)."""
        if not self.fresh:
            return None
        job, totals = self.job, self.totals
        return {
            "total": job.total,
            "other_files": job.other_files,
            "pending": 0,
            **{k: totals[k] for k in (*_COUNTERS, "other_sent", "other_failed")},
        }


def write_instance_rows(rows: list[tuple[int, str, str, int]]) -> None:
    """Set state, message and bytes of many `JobInstance` rows in one statement.

    An UPDATE from a VALUES list (SQLite and PostgreSQL alike): one statement
    whatever the number of rows, and no ORM expression per row (`bulk_update`'s
    CASE WHEN per field and row cost more CPU than the statements it saved).
    """
    if not rows:
        return
    table = JobInstance._meta.db_table
    values = ", ".join(["(%s, %s, %s, %s)"] * len(rows))
    sql = (
        f'UPDATE "{table}" SET state = v.column2, message = v.column3, '
        f"bytes = v.column4, updated_at = %s FROM (VALUES {values}) AS v "
        f'WHERE "{table}".id = v.column1'
    )
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    params: list = [now]
    for row in rows:
        params.extend(row)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


_COUNTERS = ("sent", "present", "warnings", "failed", "bytes_sent")
_OWNED = (
    "SELECT 1 FROM dispatch_job WHERE id = %(id)s AND lease_owner = %(worker)s "
    "AND state = 'sending'"
)
_PROGRESS = (
    "UPDATE dispatch_job SET updated_at = %(now)s, sent = sent + %(sent)s, "
    "present = present + %(present)s, warnings = warnings + %(warnings)s, "
    "failed = failed + %(failed)s, bytes_sent = bytes_sent + %(bytes_sent)s "
    "WHERE id = %(id)s AND lease_owner = %(worker)s AND state = 'sending'"
)
_ATTEMPT_COUNTS = (
    "UPDATE dispatch_attempt SET sent = %(sent)s, present = %(present)s, "
    "warnings = %(warnings)s, failed = %(failed)s, bytes_sent = %(bytes_sent)s "
    "WHERE id = %(id)s"
)


def refresh_counts(job: Job) -> dict:
    """The job's counts from its files' rows (an attempt that resumed a job)."""

    def n(*states: str, dicom: bool = True) -> Count:
        return Count("id", filter=Q(state__in=states, dicom=dicom))

    delivered = (InstanceState.SENT, InstanceState.WARNING, InstanceState.PRESENT)
    counts = job.instances.aggregate(
        total=Count("id", filter=Q(dicom=True)),
        sent=n(InstanceState.SENT, InstanceState.WARNING),
        warnings=n(InstanceState.WARNING),
        present=n(InstanceState.PRESENT),
        failed=n(InstanceState.FAILED),
        pending=Count("id", filter=Q(state=InstanceState.PENDING)),
        other_files=Count("id", filter=Q(dicom=False)),
        other_sent=n(*delivered, dicom=False),
        other_failed=n(InstanceState.FAILED, dicom=False),
        bytes_sent=Sum(
            "bytes", filter=Q(state__in=[InstanceState.SENT, InstanceState.WARNING])
        ),
    )
    counts["bytes_sent"] = counts["bytes_sent"] or 0
    return counts


def _listing(files: list[tuple[str, str]], limit: int = 5) -> str:
    lines = [f"{Path(p).name}: {m}" for p, m in files[:limit]]
    if len(files) > limit:
        lines.append("…")
    return "; ".join(lines)


def _files_in(job: Job, state: str, limit: int) -> list[tuple[str, str]]:
    rows = job.instances.filter(state=state).values_list("path", "message")
    return list(rows[:limit])


def finish(
    job: Job,
    target: Target,
    writer: OutcomeWriter,
    worker: str,
    error: TargetError | None,
    aborted: bool,
    retry: bool,
    started: float,
) -> Job:
    """End an attempt: record it, set the job's state from its files or `error`.

    The files' outcomes not written yet, the attempt and the job's end are one
    transaction. A transient error with `retry` and attempts left sets retry-wait
    with the next attempt's time in `not_before` (the caller queues it). Only a job
    still held by `worker` is changed; one cancelled or taken over meanwhile is left
    as it is.
    """
    now = timezone.now()
    attempt = writer.attempt
    if aborted:
        return _stopped(job, target, writer, worker, started, now)
    # Attempts since the job was queued or last retried by an operator.
    tries = job.attempt_count - job.attempt_base
    again = retry and tries < target.retry_max_attempts
    if error is None:
        # Files the handler said nothing about did not get through.
        writer.fail_unreported()
    elif error.permanent or not again:
        # The job ends here: no file is left untried without its reason.
        writer.fail_unreported(db_text(f"not sent: {error.message}", 2000))
    # (In a batch's transaction, no savepoint: an error ends the whole batch.)
    with transaction.atomic(savepoint=False):
        writer.write_rows()
        counts = writer.counts() or refresh_counts(job)
        fresh = writer.fresh
        retry_at = None
        if error is not None:
            if error.permanent:
                state, message = State.FAILED, error.message
            elif again:
                delay = backoff_delay(target, tries)
                retry_at = now + timedelta(seconds=delay)
                state = State.RETRY_WAIT
                # The time to the next retry is shown from `not_before` when
                # rendered.
                message = f"{error.message} (attempt {job.attempt_count})"
            else:
                state = State.FAILED
                message = (
                    error.message
                    if not retry
                    else f"gave up after {tries} attempt{pluralize(tries)}: "
                    f"{error.message}"
                )
            attempt.outcome = "failed" if state == State.FAILED else "error"
            attempt.error = db_text(error.message)
        elif counts["failed"] or counts["other_failed"]:
            state = State.FAILED
            parts = []
            if counts["failed"]:
                parts.append(
                    f"{counts['failed']} of {counts['total']} instance"
                    f"{pluralize(counts['total'])}"
                )
            if counts["other_failed"]:
                parts.append(
                    f"{counts['other_failed']} of {counts['other_files']} other file"
                    f"{pluralize(counts['other_files'])}"
                )
            failed = (
                writer.failures if fresh else _files_in(job, InstanceState.FAILED, 6)
            )
            message = " and ".join(parts) + " failed: " + _listing(failed)
            attempt.outcome = "failed"
            attempt.error = db_text(message)
        else:
            state = State.DONE_WITH_WARNINGS if counts["warnings"] else State.DONE
            message = ""
            if counts["warnings"]:
                warned = (
                    writer.warned if fresh else _files_in(job, InstanceState.WARNING, 5)
                )
                message = (
                    f"{counts['warnings']} instance{pluralize(counts['warnings'])} "
                    "stored with a warning: "
                ) + ("; ".join(f"{Path(p).name}: {m}" for p, m in warned))
            attempt.outcome = state

        following = job.series_open and error is None
        if following:
            # The series is still arriving: what was there is sent (failures
            # named); the job waits for the next instances instead of ending
            # (`growing`), and a yield is no failed try of the retry budget.
            state, attempt.outcome = State.FOLLOWING, "following"
        attempt.ended_at = now
        writer.save_attempt()
        fields = {
            "state": state,
            # A peer's words (an Error Comment, a file name): fit for any database.
            "last_error": db_text(message),
            "lease_owner": "",
            "lease_expires_at": None,
            "updated_at": now,
            "total": counts["total"],
            "sent": counts["sent"],
            "warnings": counts["warnings"],
            "present": counts["present"],
            "failed": counts["failed"],
            "other_files": counts["other_files"],
            "other_sent": counts["other_sent"],
            "bytes_sent": counts["bytes_sent"],
        }
        if state in FINISHED_STATES:
            fields["finished_at"] = now
        if retry_at:
            fields["not_before"] = retry_at
        if following:
            fields["attempt_base"] = job.attempt_count
        owned = Job.objects.filter(pk=job.pk, lease_owner=worker, state=State.SENDING)
        updated = owned.update(**fields)
    if not updated:
        # Cancelled or taken over meanwhile: leave the row as it is.
        job.refresh_from_db()
        _log_attempt(job, target, attempt, time.monotonic() - started)
        return job
    for name, value in fields.items():
        setattr(job, name, value)
    # After the commit (a batch's ends are written in one transaction): no log
    # line and no spool folder deleted for an end that is not written.
    duration = time.monotonic() - started
    transaction.on_commit(lambda: _log_attempt(job, target, attempt, duration))
    if state in SUCCESS_STATES and job.owned_spool:
        transaction.on_commit(lambda: cleanup_spool(job.folder))
    return job


def _stopped(
    job: Job,
    target: Target,
    writer: OutcomeWriter,
    worker: str,
    started: float,
    now,
) -> Job:
    """End an attempt that stopped because the job was cancelled or taken over."""
    # What the target confirmed is kept, however the send ended.
    writer.flush()
    job.refresh_from_db()
    attempt = writer.attempt
    attempt.ended_at = now
    attempt.outcome = "cancelled" if job.state == State.CANCELLED else "taken over"
    attempt.error = "stopped: " + attempt.outcome
    writer.save_attempt(careful=True)
    if job.lease_owner == worker and job.state != State.SENDING:
        # Cancelled: let go of the job (it may be retried) with true counters.
        counts = refresh_counts(job)
        Job.objects.filter(pk=job.pk, lease_owner=worker).exclude(
            state=State.SENDING
        ).update(
            lease_owner="",
            lease_expires_at=None,
            **{k: counts[k] for k in ("total",) + _COUNTERS},
        )
        job.refresh_from_db()
    _log_attempt(job, target, attempt, time.monotonic() - started)
    return job


def _log_attempt(job: Job, target: Target, attempt: Attempt, seconds: float) -> None:
    log.info(
        "dispatch attempt %s",
        log_fields(
            job=job.pk,
            attempt=attempt.number,
            target=target.name,
            kind=target.kind,
            series=job.series_label,
            outcome=attempt.outcome,
            state=job.state,
            sent=attempt.sent,
            present=attempt.present,
            warnings=attempt.warnings,
            failed=attempt.failed,
            bytes=attempt.bytes_sent,
            duration=f"{seconds:.2f}",
            worker=attempt.worker,
            error=attempt.error,
        ),
    )
