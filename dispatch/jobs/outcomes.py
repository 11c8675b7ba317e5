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

from django.db import transaction
from django.db.models import Count, F, Q, Sum
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
    """The outcomes of one attempt, written in batches rather than one by one.

    Each flush is one transaction: the instances' rows (one bulk UPDATE per 500),
    the attempt's counters, and the job's counters (so the pages show progress
    while a job sends). A worker that dies loses at most one interval of outcomes:
    those instances are sent again by the next attempt.
    """

    BATCH = 500

    def __init__(
        self,
        job: Job,
        target: Target,
        attempt: Attempt,
        worker: str,
        ids: dict[str, int],
    ):
        self.job, self.target, self.attempt, self.worker = job, target, attempt, worker
        self.ids = ids
        self.rows: list[JobInstance] = []
        self.delta = dict.fromkeys(_COUNTERS, 0)

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.BATCH

    def add(self, outcome: Outcome) -> None:
        pk = self.ids.get(str(outcome.path))
        if pk is None:
            return  # not a file of this job: nothing to record
        state = _INSTANCE_STATE.get(outcome.status, InstanceState.FAILED)
        message = scrub(outcome.message, self.target) if outcome.message else ""
        self.rows.append(
            JobInstance(
                pk=pk,
                state=state,
                # Text from the peer: no NUL reaches the database (PostgreSQL
                # refuses the whole batch).
                message=db_text(message, 2000),
                bytes=outcome.bytes,
                updated_at=timezone.now(),
            )
        )
        if not outcome.sop_instance_uid:
            return  # an other file: the counters are of instances
        delta = self.delta
        if outcome.status in (SENT, WARNING):
            delta["sent"] += 1
            delta["bytes_sent"] += outcome.bytes
        if outcome.status == WARNING:
            delta["warnings"] += 1
        elif outcome.status == PRESENT:
            delta["present"] += 1
        elif outcome.status not in (SENT, WARNING, PRESENT):
            delta["failed"] += 1

    def flush(self) -> bool:
        """Write what was recorded; False if the job is no longer this worker's."""
        job, delta = self.job, self.delta
        owned = Job.objects.filter(
            pk=job.pk, lease_owner=self.worker, state=State.SENDING
        )
        if not self.rows:
            return owned.exists()
        with transaction.atomic():
            JobInstance.objects.bulk_update(
                self.rows, ["state", "message", "bytes", "updated_at"], self.BATCH
            )
            for name, value in delta.items():
                setattr(self.attempt, name, getattr(self.attempt, name) + value)
            self.attempt.save(update_fields=list(_COUNTERS))
            still_ours = owned.update(
                updated_at=timezone.now(),
                **{name: F(name) + value for name, value in delta.items() if value},
            )
        self.rows = []
        self.delta = dict.fromkeys(_COUNTERS, 0)
        return bool(still_ours)


_COUNTERS = ("sent", "present", "warnings", "failed", "bytes_sent")


def refresh_counts(job: Job) -> dict:
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


def _failed_listing(job: Job, limit: int = 5) -> str:
    failed = list(
        job.instances.filter(state=InstanceState.FAILED).values_list("path", "message")[
            : limit + 1
        ]
    )
    lines = [f"{Path(p).name}: {m}" for p, m in failed[:limit]]
    if len(failed) > limit:
        lines.append("…")
    return "; ".join(lines)


def finish(
    job: Job,
    target: Target,
    attempt: Attempt,
    worker: str,
    error: TargetError | None,
    aborted: bool,
    retry: bool,
    started: float,
) -> Job:
    """End an attempt: record it, set the job's state from its files or `error`.

    A transient error with `retry` and attempts left sets retry-wait with the next
    attempt's time in `not_before` (the caller queues it). Only a job still held
    by `worker` is changed; one cancelled or taken over meanwhile is left as it is.
    """
    now = timezone.now()
    if aborted:
        job.refresh_from_db()
        attempt.ended_at = now
        attempt.outcome = "cancelled" if job.state == State.CANCELLED else "taken over"
        attempt.error = "stopped: " + attempt.outcome
        attempt.save()
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
        _log_attempt(job, target, attempt, started)
        return job

    counts = refresh_counts(job)
    if error is None and counts["pending"]:
        # Instances the handler said nothing about did not get through.
        job.instances.filter(state=InstanceState.PENDING).update(
            state=InstanceState.FAILED,
            message="the target's handler reported no outcome for this file",
        )
        counts = refresh_counts(job)
    retry_at = None
    # Attempts since the job was queued or last retried by an operator.
    tries = job.attempt_count - job.attempt_base
    if error is not None:
        if error.permanent:
            state, message = State.FAILED, error.message
        elif retry and tries < target.retry_max_attempts:
            delay = backoff_delay(target, tries)
            retry_at = now + timedelta(seconds=delay)
            state = State.RETRY_WAIT
            # The time to the next retry is shown from `not_before` when rendered.
            message = f"{error.message} (attempt {job.attempt_count})"
        else:
            state = State.FAILED
            message = (
                error.message
                if not retry
                else f"gave up after {tries} attempt{pluralize(tries)}: {error.message}"
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
        message = " and ".join(parts) + " failed: " + _failed_listing(job)
        attempt.outcome = "failed"
        attempt.error = db_text(message)
    else:
        state = State.DONE_WITH_WARNINGS if counts["warnings"] else State.DONE
        message = ""
        if counts["warnings"]:
            warned = job.instances.filter(state=InstanceState.WARNING).values_list(
                "path", "message"
            )[:5]
            message = (
                f"{counts['warnings']} instance{pluralize(counts['warnings'])} "
                "stored with a warning: "
            ) + ("; ".join(f"{Path(p).name}: {m}" for p, m in warned))
        attempt.outcome = state

    attempt.ended_at = now
    attempt.save()
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
    owned = Job.objects.filter(pk=job.pk, lease_owner=worker, state=State.SENDING)
    updated = owned.update(**fields)
    if not updated:
        # Cancelled or taken over meanwhile: leave the row as it is.
        job.refresh_from_db()
        _log_attempt(job, target, attempt, started)
        return job
    for name, value in fields.items():
        setattr(job, name, value)
    _log_attempt(job, target, attempt, started)
    if state in SUCCESS_STATES and job.owned_spool:
        cleanup_spool(job.folder)
    return job


def _log_attempt(job: Job, target: Target, attempt: Attempt, started: float) -> None:
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
            duration=f"{time.monotonic() - started:.2f}",
            worker=attempt.worker,
            error=attempt.error,
        ),
    )
