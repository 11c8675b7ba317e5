"""Query tool services: search, open a study, retrieve in the background, audit.

Plain functions called by the page and `manage.py index_folder`. A target answers
for itself (`target.query_source()`, the contract in `targets.query`); this module
adds the audit log and the retrieval jobs (run by `retrieval`, queued through
`tasks`, on the dispatch engine's claim and lease). It knows no kinds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from dispatch.jobs.models import ACTIVE_STATES, SUCCESS_STATES, Job, State
from dispatch.jobs.services import retry_now
from targets.models import Direction, Target
from targets.query import (
    Criteria,
    FoundSeries,
    SourceError,
    StudySearch,
)
from targets.redaction import crash_site, scrub

from . import tasks
from .models import AuditAction, AuditEntry, Delivery, RetrievalJob, RetrievalState
from .retrieval import abandoned

if TYPE_CHECKING:
    from targets.kinds.dicomweb.index import ScanReport

log = logging.getLogger("courier.querytool")


# -- permissions ---------------------------------------------------------------------
# Model permissions (querytool.models.RetrievalJob.Meta), granted to groups in the
# admin; superusers have them all. Staff status alone opens nothing here.
SEARCH_PERMISSION = "querytool.search_sources"
RETRIEVE_PERMISSION = "querytool.retrieve_studies"
EXPORT_ANY_PERMISSION = "querytool.export_to_any_target"


def may_search(user) -> bool:
    return user.has_perm(SEARCH_PERMISSION)


def may_retrieve(user) -> bool:
    return user.has_perm(RETRIEVE_PERMISSION)


def export_destinations(user) -> list[Target]:
    """The enabled store targets `user` may send retrieved studies to."""
    if not may_retrieve(user):
        return []
    targets = store_destinations()
    if user.has_perm(EXPORT_ANY_PERMISSION):
        return targets
    granted = set(
        Target.objects.filter(export_groups__user=user).values_list("pk", flat=True)
    )
    return [t for t in targets if t.pk in granted]


def may_export(user, target: Target) -> bool:
    return any(t.pk == target.pk for t in export_destinations(user))


def refuse(user, what: str, source: Target | None = None) -> PermissionDenied:
    """Record a refusal in the audit log; return the exception to raise."""
    audit(user, AuditAction.REFUSED, source, ok=False, detail=f"refused: {what}")
    log.warning("query tool refused user=%s what=%s", getattr(user, "pk", None), what)
    return PermissionDenied(f"You have no permission to {what}.")


def require_search(user, source: Target | None = None) -> None:
    if not may_search(user):
        raise refuse(user, "search the query sources", source)


def require_retrieve(user, source: Target | None = None) -> None:
    if not may_retrieve(user):
        raise refuse(user, "retrieve studies", source)


def query_sources():
    """Enabled targets that can be searched (direction query or both)."""
    return [
        t
        for t in Target.objects.filter(
            enabled=True, direction__in=[Direction.QUERY, Direction.BOTH]
        )
        if t.is_query_source
    ]


def store_destinations():
    """Enabled targets a retrieved series can be sent to."""
    return list(
        Target.objects.filter(
            enabled=True, direction__in=[Direction.STORE, Direction.BOTH]
        )
    )


@contextmanager
def _in_words(source: Target, what: str) -> Iterator[None]:
    """Any failure of a source is a `SourceError` the page shows, never a 500.

    The sources name the failures they know; this catches the rest (a library's
    unexpected exception) with its type and message, secrets blanked out.
    """
    try:
        yield
    except SourceError:
        raise
    except Exception as exc:
        log.error(
            "query source error source=%s error=%s at=%s",
            source.pk,
            type(exc).__name__,
            crash_site(exc),
        )
        raise SourceError(
            scrub(
                f"The {what} on {source.name} failed: {type(exc).__name__}: {exc}",
                source,
            )
        ) from exc


def audit(user, action: str, source: Target | None, **fields) -> AuditEntry:
    return AuditEntry.objects.create(
        user=user if getattr(user, "pk", None) else None,
        username=getattr(user, "username", "") or "",
        action=action,
        source=source,
        source_name=source.name if source else "",
        **fields,
    )


def search(
    source: Target, criteria: Criteria, user, limit: int | None = None
) -> StudySearch:
    """Search one source; audit it (also when it fails). Raise `SourceError`."""
    require_search(user, source)
    limit = limit or settings.COURIER_QUERY_LIMIT
    try:
        with _in_words(source, "search"):
            found = source.query_source().find_studies(criteria, limit)
    except SourceError as exc:
        exc.message = scrub(exc.message, source)
        audit(
            user,
            AuditAction.SEARCH,
            source,
            criteria=criteria.as_dict(),
            ok=False,
            detail=exc.message,
        )
        raise
    detail = ""
    if found.missing_accessions:
        detail = "missing accessions: " + ", ".join(found.missing_accessions)
    audit(
        user,
        AuditAction.SEARCH,
        source,
        criteria=criteria.as_dict(),
        result_count=len(found.studies),
        detail=detail,
    )
    return found


def list_series(source: Target, study_uid: str, user) -> list[FoundSeries]:
    require_search(user, source)
    try:
        with _in_words(source, "listing the series"):
            series = source.query_source().find_series(study_uid)
    except SourceError as exc:
        exc.message = scrub(exc.message, source)
        audit(
            user,
            AuditAction.SERIES,
            source,
            criteria={"study_uid": study_uid},
            ok=False,
            detail=exc.message,
        )
        raise
    audit(
        user,
        AuditAction.SERIES,
        source,
        criteria={"study_uid": study_uid},
        result_count=len(series),
    )
    return series


def keeps_index(source: Target) -> bool:
    """Whether Courier keeps an index of the source (a local folder)."""
    return source.can_query and source.query_source().indexed


def reindex(source: Target, user=None, progress=None) -> ScanReport:
    """Rescan a local-folder source's index now."""
    if not keeps_index(source):
        raise SourceError(f"{source.name} is not a local folder.")
    with _in_words(source, "rescan"):
        report = source.query_source().rescan(progress)
    audit(
        user,
        AuditAction.INDEX,
        source,
        result_count=report.seen,
        detail=f"{report.added} added, {report.updated} changed, {report.removed} "
        f"removed, {len(report.problems)} not DICOM or unreadable",
    )
    return report


# -- retrieval jobs -----------------------------------------------------------------


@dataclass
class RetrieveItem:
    study_uid: str
    series_uids: list[str]
    label: str = ""


def start_retrieval(
    source: Target,
    items: list[RetrieveItem],
    user,
    *,
    destination: Target | None = None,
    download: bool = False,
    move_aet: str = "",
) -> list[RetrievalJob]:
    """Create one retrieval job per item and queue them; audit the request.

    Exactly one destination: a store target, the download folder, or (DICOM
    sources) a C-MOVE destination AE title.
    """
    require_retrieve(user, source)
    if destination is not None and not may_export(user, destination):
        raise refuse(user, f"export to {destination.name}", source)
    chosen = sum(bool(x) for x in (destination, download, move_aet))
    if chosen != 1:
        raise SourceError(
            "Choose one destination: a target, the download folder, "
            "or a C-MOVE destination."
        )
    if move_aet and not source.as_kind().can_move:
        raise SourceError("C-MOVE needs a DICOM source.")
    if destination is not None and not (destination.enabled and destination.can_store):
        raise SourceError(f"{destination.name} is not an enabled store target.")
    if not items:
        raise SourceError("Choose at least one study or series to retrieve.")
    jobs = []
    with transaction.atomic():
        for item in items:
            jobs.append(
                RetrievalJob.objects.create(
                    source=source,
                    source_name=source.name,
                    created_by=user if getattr(user, "pk", None) else None,
                    study_uid=item.study_uid,
                    series_uids=item.series_uids,
                    label=item.label[:300],
                    destination=destination,
                    destination_name=destination.name if destination else "",
                    download=download,
                    move_aet=move_aet,
                )
            )
        audit(
            user,
            AuditAction.RETRIEVE,
            source,
            criteria={
                "studies": [
                    {"study_uid": i.study_uid, "series_uids": i.series_uids}
                    for i in items
                ]
            },
            result_count=len(items),
            detail="; ".join(f"#{j.pk} {j.label or j.study_uid}" for j in jobs)
            + f" → {jobs[0].destination_label}",
        )
        for job in jobs:
            tasks.enqueue(job.pk)
    return jobs


def cancel_retrieval(job: RetrievalJob, user) -> None:
    """Cancel a queued job at once; ask a running one to stop (it aborts soon)."""
    require_retrieve(user, job.source)
    updated = RetrievalJob.objects.filter(
        pk=job.pk, state=RetrievalState.QUEUED
    ).update(
        state=RetrievalState.CANCELLED,
        finished_at=timezone.now(),
        message="Cancelled before it started.",
    )
    if not updated:
        # A worker that died leaves its job "running" with a lease that ran out.
        updated = (
            RetrievalJob.objects.filter(pk=job.pk)
            .filter(abandoned(timezone.now()))
            .update(
                state=RetrievalState.CANCELLED,
                finished_at=timezone.now(),
                message="Cancelled: the worker running it stopped reporting progress.",
                lease_owner="",
                lease_expires_at=None,
            )
        )
    if not updated:
        RetrievalJob.objects.filter(pk=job.pk, state=RetrievalState.RUNNING).update(
            cancel_requested=True
        )
    audit(user, AuditAction.CANCEL, job.source, detail=f"#{job.pk} {job.label}")


def attach_deliveries(jobs) -> list[RetrievalJob]:
    """Set `delivery` on each retrieval that queued send jobs (one query for all)."""
    jobs = list(jobs)
    ids = {pk for job in jobs for pk in job.dispatch_jobs or []}
    sends = {j.pk: j for j in Job.objects.filter(pk__in=ids)} if ids else {}
    now = timezone.now()
    for job in jobs:
        mine = [sends[pk] for pk in job.dispatch_jobs or [] if pk in sends]
        if not mine:
            continue
        delivery = Delivery(jobs=len(mine))
        for send in mine:
            delivery.instances += send.total
            delivery.delivered += send.done_count
            if send.state in ACTIVE_STATES:
                delivery.active += 1
                delivery.waiting = delivery.waiting or send.status_text(now)
            elif send.state in SUCCESS_STATES:
                delivery.done += 1
            else:
                delivery.failures.append(
                    send.last_error or send.get_state_display().lower()
                )
        job.delivery = delivery
    return jobs


def retry_retrieval(job: RetrievalJob, user) -> bool:
    """Queue a failed, partial or cancelled job again (files already there stay).

    A retrieval whose instances arrived but whose send jobs failed retries those
    send jobs: the series are still in the spool.
    """
    require_retrieve(user, job.source)
    if job.destination is not None and not may_export(user, job.destination):
        raise refuse(user, f"export to {job.destination.name}", job.source)
    (job,) = attach_deliveries([job])
    if job.shown_state == RetrievalState.FAILED and job.state in (
        RetrievalState.DONE,
        RetrievalState.PARTIAL,
    ):
        failed = Job.objects.filter(
            pk__in=job.dispatch_jobs, state__in=[State.FAILED, State.CANCELLED]
        )
        if retry_now(failed):
            audit(
                user,
                AuditAction.RETRY,
                job.source,
                detail=f"#{job.pk} {job.label}: send to {job.destination_label}",
            )
            return True
        return False
    updated = RetrievalJob.objects.filter(
        pk=job.pk,
        state__in=[
            RetrievalState.FAILED,
            RetrievalState.PARTIAL,
            RetrievalState.CANCELLED,
        ],
    ).update(
        state=RetrievalState.QUEUED,
        done=0,
        failed=0,
        total=None,
        message="",
        cancel_requested=False,
        started_at=None,
        finished_at=None,
    )
    if updated:
        audit(user, AuditAction.RETRY, job.source, detail=f"#{job.pk} {job.label}")
        with transaction.atomic():
            tasks.enqueue(job.pk)
    return bool(updated)
