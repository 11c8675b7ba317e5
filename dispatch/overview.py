"""The state of the site at a glance: receivers, the queue, targets that need a look.

One place for the admin's status panel and `/health/`, so both tell the same story.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import connection
from django.db.models import Count, Max, Q
from django.utils import timezone

from targets.models import Target

from .models import ACTIVE_STATES, Job, State
from .routing_models import ReceivedSeries, ReceiverStatus
from .services import status_summary

# The receiver writes a heartbeat every 5 s; three missed minutes' worth of beats
# would be too lenient, one missed beat too strict on a loaded machine.
RECEIVER_STALE_SECONDS = 30.0
# A job sending past its lease is picked up by the next sweep (each minute) or a
# starting worker; past this much longer nobody is doing it.
STUCK_GRACE = timedelta(minutes=2)


@dataclass
class ReceiverState:
    name: str
    state: str  # listening | stopped | not responding
    heartbeat_at: datetime
    heartbeat_age_s: float
    started_at: datetime
    stored: int
    refused_count: int
    last_refusal: str
    last_refusal_at: datetime | None

    @property
    def listening(self) -> bool:
        return self.state == "listening"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "heartbeat_age_s": round(self.heartbeat_age_s, 1),
            "stored": self.stored,
            "refused": self.refused_count,
            "last_refusal_at": self.last_refusal_at.isoformat()
            if self.last_refusal_at
            else None,
        }


@dataclass
class TargetAttention:
    """A target worth a look: paused, disabled with waiting jobs, or failing."""

    target: Target
    reasons: list[str] = field(default_factory=list)


def receivers(now: datetime | None = None) -> list[ReceiverState]:
    """Every receiver that ever reported, and whether it is listening now."""
    now = now or timezone.now()
    found = []
    for status in ReceiverStatus.objects.order_by("name"):
        age = max(0.0, (now - status.heartbeat_at).total_seconds())
        info = status.info or {}
        if info.get("stopped"):
            state = "stopped"
        elif age <= RECEIVER_STALE_SECONDS:
            state = "listening"
        else:
            state = "not responding"
        found.append(
            ReceiverState(
                name=status.name,
                state=state,
                heartbeat_at=status.heartbeat_at,
                heartbeat_age_s=age,
                started_at=status.started_at,
                stored=int(info.get("stored") or 0),
                refused_count=status.refused_count,
                last_refusal=status.last_refusal,
                last_refusal_at=status.last_refusal_at,
            )
        )
    return found


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
            reasons.append(f"disabled with {_n(target.waiting, 'waiting job')}")
        if target.paused:
            reasons.append(
                f"paused ({_n(target.waiting, 'job')} waiting)"
                if target.waiting
                else "paused"
            )
        if target.failed:
            reasons.append(f"{_n(target.failed, 'job')} failed in 24 h")
        if target.retrying:
            reasons.append(f"{_n(target.retrying, 'job')} waiting to retry")
        if target.last_test_ok is False:
            reasons.append("last Test failed")
        found.append(TargetAttention(target, reasons))
    return found, total


def site_status(now: datetime | None = None) -> dict:
    """What the admin's home page shows: receivers, queue, targets, stuck jobs."""
    now = now or timezone.now()
    attention, attention_total = targets_needing_attention(now)
    last_received = ReceivedSeries.objects.aggregate(t=Max("last_received_at"))["t"]
    day_ago = now - timedelta(hours=24)
    series_states = dict(
        ReceivedSeries.objects.filter(last_received_at__gte=day_ago)
        .values_list("state")
        .annotate(n=Count("id"))
        .order_by()
    )
    return {
        "now": now,
        "receivers": receivers(now),
        "last_received_at": last_received,
        "series_24h": sum(series_states.values()),
        "unrouted_24h": series_states.get(ReceivedSeries.State.UNROUTED, 0),
        "failed_series_24h": series_states.get(ReceivedSeries.State.FAILED, 0),
        "queue": status_summary(now),
        "stuck_jobs": stuck_jobs(now).count(),
        "attention": attention,
        "attention_total": attention_total,
        "targets": Target.objects.count(),
    }


def health(now: datetime | None = None) -> tuple[str, dict]:
    """The site's health for monitoring: "ok", "degraded" or "down", and the facts.

    Down: the database or the queue does not answer (nothing can be sent). Degraded:
    it works, but a receiver that was listening stopped answering without being
    stopped, or jobs are stuck past their lease (no worker is taking them).
    """
    report: dict = {"database": "ok", "queue": "ok"}
    problems: list[str] = []
    down = False
    try:
        connection.ensure_connection()
        now = now or timezone.now()
        summary = status_summary(now)
        report["oldest_queued_age_s"] = summary["oldest_queued_age_s"]
        report["queued"] = summary["queued"]
        report["sending"] = summary["sending"]
        report["retry_wait"] = summary["retry_wait"]
        report["failed_24h"] = summary["failed_24h"]
        stuck = stuck_jobs(now).count()
        report["stuck_jobs"] = stuck
        if stuck:
            problems.append(f"{_n(stuck, 'job')} sending past the lease")
        found = receivers(now)
        report["receivers"] = [r.as_dict() for r in found]
        for r in found:
            if r.state == "not responding":
                problems.append(
                    f"receiver {r.name} silent for {r.heartbeat_age_s:.0f} s"
                )
    except Exception as exc:
        down = True
        report["database"] = f"error: {type(exc).__name__}"
        problems.append("the database does not answer")
    try:
        from huey.contrib.djhuey import HUEY

        report["queue_pending"] = HUEY.pending_count()
    except Exception as exc:
        down = True
        report["queue"] = f"error: {type(exc).__name__}"
        problems.append("the queue does not answer")
    status = "down" if down else "degraded" if problems else "ok"
    report["status"] = status
    report["ok"] = status == "ok"
    report["problems"] = problems
    return status, report


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
