"""The state of the site at a glance: receivers, the queue, targets that need a look.

One place for the admin's status panel and `/health/`, so both tell the same story.
It sits above the three dispatch apps and reads all of them; none of them imports it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import connection
from django.db.models import Count, Max
from django.utils import timezone

from dispatch.jobs.status import (
    counted,
    status_summary,
    stuck_jobs,
    targets_needing_attention,
)
from dispatch.receiving.status import receivers
from dispatch.routing.models import ReceivedSeries
from targets.models import Target


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
            problems.append(f"{counted(stuck, 'job')} sending past the lease")
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
