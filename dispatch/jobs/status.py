"""What the jobs are doing, in numbers and words: for the pages, scripts and health."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Count, Min, Q
from django.utils import timezone

from targets.models import Target

from .models import (
    ACTIVE_STATES,
    FINISHED_STATES,
    SUCCESS_STATES,
    InstanceState,
    Job,
    State,
)

# A job sending past its lease is picked up by the next sweep (each minute) or a
# starting worker; past this much longer nobody is doing it.
STUCK_GRACE = timedelta(minutes=2)


def files_done(job: Job) -> int:
    """Files of the job whose fate is known (sent, present, failed), as it runs."""
    return job.instances.exclude(state=InstanceState.PENDING).count()


def waiting_note(job: Job) -> str:
    """What a job that is not sending waits for, in words ("" if it is not waiting)."""
    if job.state == State.QUEUED:
        return "queued: waiting for a worker (manage.py run_huey)"
    if job.state == State.FOLLOWING:
        return (
            f"{job.done_count} of {job.total} sent so far; waiting for the "
            "series' next instances (it is still arriving)"
        )
    if job.state in (State.RETRY_WAIT, State.PAUSED):
        return f"{job.get_state_display().lower()}: {job.last_error}"
    return ""


def job_report(job: Job) -> dict:
    """A job's state, counts, attempts and last error, for scripts (`job_status`)."""
    attempts = list(
        job.attempts.values(
            "number", "worker", "outcome", "started_at", "ended_at", "error"
        )
    )
    for attempt in attempts:
        for key in ("started_at", "ended_at"):
            attempt[key] = attempt[key].isoformat() if attempt[key] else None
    return {
        "id": job.pk,
        "state": job.state,
        "finished": job.state in FINISHED_STATES,
        "target": job.target.name,
        "folder": job.folder,
        "series_uid": job.series_uid,
        "source": job.source,
        "instances": job.total,
        "sent": job.sent,
        "present": job.present,
        "warnings": job.warnings,
        "failed": job.failed,
        "done": files_done(job),
        "other_files": job.other_files,
        "other_sent": job.other_sent,
        "left_out": job.skipped,
        "bytes_sent": job.bytes_sent,
        "attempt_count": job.attempt_count,
        "attempts": attempts,
        "last_error": job.last_error,
        "waiting": waiting_note(job),
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def status_summary(now=None) -> dict:
    """Counts for the dispatch page, `dispatch_status` and monitoring."""
    now = now or timezone.now()
    day_ago = now - timedelta(hours=24)
    by_state = dict(Job.objects.values_list("state").annotate(n=Count("id")).order_by())
    oldest = Job.objects.filter(state__in=[State.QUEUED, State.RETRY_WAIT]).aggregate(
        t=Min("created_at")
    )["t"]
    return {
        "queued": by_state.get(State.QUEUED, 0),
        "sending": by_state.get(State.SENDING, 0),
        "retry_wait": by_state.get(State.RETRY_WAIT, 0),
        "paused": by_state.get(State.PAUSED, 0),
        "following": by_state.get(State.FOLLOWING, 0),
        "failed_24h": Job.objects.filter(
            state=State.FAILED, finished_at__gte=day_ago
        ).count(),
        "done_24h": Job.objects.filter(
            state__in=SUCCESS_STATES, finished_at__gte=day_ago
        ).count(),
        "oldest_queued_age_s": round((now - oldest).total_seconds(), 1)
        if oldest
        else None,
    }


# -- the site at a glance ---------------------------------------------------------------


@dataclass
class TargetAttention:
    """A target worth a look: paused, disabled with waiting jobs, or failing."""

    target: Target
    reasons: list[str] = field(default_factory=list)


def stuck_jobs(now: datetime | None = None):
    """Jobs still marked sending well after their worker's lease ran out."""
    now = now or timezone.now()
    return Job.objects.filter(
        state=State.SENDING, lease_expires_at__lt=now - STUCK_GRACE
    )


def targets_needing_attention(
    now: datetime | None = None, limit: int = 20
) -> tuple[list[TargetAttention], int]:
    """Targets that are paused, disabled with waiting jobs, failing jobs in the last
    24 h, or whose last Test failed; at most `limit` of them, and how many in all."""
    now = now or timezone.now()
    day_ago = now - timedelta(hours=24)
    waiting = Count("jobs", filter=Q(jobs__state__in=ACTIVE_STATES))
    failed = Count(
        "jobs", filter=Q(jobs__state=State.FAILED, jobs__finished_at__gte=day_ago)
    )
    retrying = Count("jobs", filter=Q(jobs__state=State.RETRY_WAIT))
    flagged = Q(paused=True) | Q(last_test_ok=False)
    candidates = (
        Target.objects.annotate(waiting=waiting, failed=failed, retrying=retrying)
        .filter(
            flagged
            | Q(failed__gt=0)
            | Q(retrying__gt=0)
            | Q(enabled=False, waiting__gt=0)
        )
        .order_by("-failed", "-retrying", "name")
    )
    total = candidates.count()
    found = []
    for target in candidates[:limit]:
        reasons = []
        if not target.enabled and target.waiting:
            reasons.append(f"disabled with {counted(target.waiting, 'waiting job')}")
        if target.paused:
            reasons.append(
                f"paused ({counted(target.waiting, 'job')} waiting)"
                if target.waiting
                else "paused"
            )
        if target.failed:
            reasons.append(f"{counted(target.failed, 'job')} failed in 24 h")
        if target.retrying:
            reasons.append(f"{counted(target.retrying, 'job')} waiting to retry")
        if target.last_test_ok is False:
            reasons.append("last Test failed")
        found.append(TargetAttention(target, reasons))
    return found, total


def counted(count: int, noun: str) -> str:
    """ "1 job", "3 jobs"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
