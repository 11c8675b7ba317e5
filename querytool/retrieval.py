"""Running a retrieval: one study (or some of its series) pulled from a source.

A retrieval is claimed with the jobs engine's claim and lease (`dispatch.jobs.lease`):
one conditional UPDATE gives it to exactly one worker, a `LeaseKeeper` renews the
lease while it runs, and a retrieval whose worker died (its lease ran out) is taken
over by whoever looks next (`tasks.watch_retrieval`). What it fetched goes to the
download folder, or into the spool and on to a store target as dispatch jobs.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.template.defaultfilters import pluralize
from django.utils import timezone

from config.safetext import db_text
from dispatch.jobs import lease
from dispatch.jobs.models import DispatchError, JobOrigin
from dispatch.jobs.services import create_jobs
from targets.paths import clean_part, inside, private_dir
from targets.query import Cancelled, RetrieveRequest, SourceError
from targets.redaction import crash_site, scrub

from .models import RetrievalJob, RetrievalState

log = logging.getLogger("courier.querytool")

# Progress is written to the database at most this often (seconds).
PROGRESS_INTERVAL = 0.5


def abandoned(now) -> Q:
    """Running retrievals whose worker stopped renewing its lease (it died)."""
    return Q(state=RetrievalState.RUNNING) & (
        Q(lease_expires_at__isnull=True) | lease.ran_out(now)
    )


def claim(job_id: int, worker: str) -> RetrievalJob | None:
    """Take a queued retrieval, or one whose worker died, for `worker`; None if not."""
    now = timezone.now()
    claimable = Q(state=RetrievalState.QUEUED) | abandoned(now)
    taken = lease.take(
        RetrievalJob.objects.filter(pk=job_id).filter(claimable),
        worker,
        now,
        state=RetrievalState.RUNNING,
        started_at=now,
        attempts=F("attempts") + 1,
    )
    return RetrievalJob.objects.get(pk=job_id) if taken else None


def keeper_for(job_id: int, worker: str) -> lease.LeaseKeeper:
    return lease.LeaseKeeper(RetrievalJob, job_id, worker, [RetrievalState.RUNNING])


def _output_folder(job: RetrievalJob) -> Path:
    if job.download:
        # The label is the patient's name, the accession, ...: data.
        name = clean_part(f"{job.pk:06d}_{job.label or job.study_uid}")[:120]
        return inside(settings.COURIER_DOWNLOAD_DIR, name)
    # Inside the spool, so the dispatch engine deletes it once the jobs are done.
    return Path(settings.COURIER_SPOOL_DIR) / "retrieved" / f"{job.pk:06d}"


class _LeaseLost(Exception):
    """The retrieval is no longer this worker's (taken over, or the database did
    not answer for most of a lease): stop, write nothing."""


class _Progress:
    """Writes progress to the job row (throttled), stops the retrieval when it was
    cancelled or is no longer this worker's."""

    def __init__(self, job_id: int, keeper: lease.LeaseKeeper):
        self.job_id = job_id
        self.keeper = keeper
        self.last = 0.0

    def __call__(self, done: int, total: int | None, failed: int) -> None:
        if not self.keeper.valid:
            raise _LeaseLost()
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL and (
            total is None or done + failed < total
        ):
            return
        self.last = now
        fields = {"done": done, "failed": failed}
        if total is not None:
            fields["total"] = total
        RetrievalJob.objects.filter(pk=self.job_id).update(**fields)
        if RetrievalJob.objects.filter(pk=self.job_id, cancel_requested=True).exists():
            raise Cancelled()


def run(job: RetrievalJob, worker: str, keeper: lease.LeaseKeeper) -> RetrievalJob:
    """Run a claimed retrieval to its end; return it as it ended."""
    state, message = RetrievalState.DONE, ""
    result = None
    dest = None if job.move_aet else _output_folder(job)
    folders: list[Path] = []
    try:
        if job.source is None or not job.source.enabled:
            raise SourceError("The source target was deleted or disabled.")
        if not job.download and not job.move_aet and job.destination is None:
            raise SourceError("The destination target was deleted.")
        if dest is not None and job.download:
            dest.mkdir(parents=True, exist_ok=True)
        elif dest is not None:
            private_dir(dest)  # the spool: Courier's alone
        request = RetrieveRequest(job.study_uid, list(job.series_uids), job.move_aet)
        result = job.source.query_source().retrieve(
            request, dest, _Progress(job.pk, keeper)
        )
        if result.failed:
            state = RetrievalState.PARTIAL
            message = (
                result.message
                or f"{result.failed} instance{pluralize(result.failed)} failed."
            )
        elif result.completed == 0:
            state = RetrievalState.FAILED
            message = result.message or "The source sent no instances."
        if job.destination is not None and result.series_folders:
            folders = result.series_folders
        elif job.download and dest is not None:
            message = (message + " " if message else "") + f"Saved in {dest}."
    except _LeaseLost:
        # Its lease runs out: the watch queued at the claim takes it over.
        log.warning("retrieval lease lost job=%s worker=%s", job.pk, worker)
        job.refresh_from_db()
        return job
    except Cancelled:
        state, message = RetrievalState.CANCELLED, "Cancelled."
    except SourceError as exc:
        state, message = RetrievalState.FAILED, exc.message
    except Exception as exc:  # the page must show something, never a stuck "running"
        # Type and place only: the exception's text may carry a secret.
        log.error(
            "retrieval crashed job=%s error=%s at=%s",
            job.pk,
            type(exc).__name__,
            crash_site(exc),
        )
        state, message = (
            RetrievalState.FAILED,
            f"Internal error: {type(exc).__name__}: {exc}",
        )
    fields = {"state": state, "finished_at": timezone.now()}
    if result is not None:
        fields.update(done=result.completed + result.warnings, failed=result.failed)
        if state in (RetrievalState.DONE, RetrievalState.PARTIAL) and job.total is None:
            fields["total"] = result.completed + result.warnings + result.failed
    if dest is not None:
        fields["output_path"] = str(dest)
    mine = RetrievalJob.objects.filter(
        pk=job.pk, lease_owner=worker, state=RetrievalState.RUNNING
    )
    # The send jobs and the end of the retrieval in one transaction: a worker that
    # dies in between leaves neither, and the retrieval is taken over whole.
    with transaction.atomic():
        if folders and state != RetrievalState.CANCELLED:
            try:
                fields["dispatch_jobs"], note = _dispatch(job, folders)
                message = f"{message} {note}" if message else note
            except SourceError as exc:
                state = fields["state"] = RetrievalState.FAILED
                message = exc.message
        message = scrub(message, job.source, job.destination)
        fields["message"] = db_text(message.strip())
        ours = mine.update(lease_owner="", lease_expires_at=None, **fields)
        if not ours:
            transaction.set_rollback(True)  # taken over: its new worker decides
    job.refresh_from_db()
    if not ours:
        return job
    if (
        state in (RetrievalState.CANCELLED, RetrievalState.FAILED)
        and dest is not None
        and not job.download
        and dest.exists()
    ):
        shutil.rmtree(dest, ignore_errors=True)
    log.info(
        "retrieval finished job=%s state=%s done=%s failed=%s",
        job.pk,
        job.state,
        job.done,
        job.failed,
    )
    return job


def _dispatch(job: RetrievalJob, folders: list[Path]) -> tuple[list[int], str]:
    """Queue dispatch jobs sending each retrieved series folder to the destination."""
    ids = []
    try:
        for folder in folders:
            for created in create_jobs(
                folder, [job.destination], owned_spool=True, source=JobOrigin.QUERY
            ):
                ids.append(created.pk)
    except DispatchError as exc:
        raise SourceError(
            f"Retrieved, but the send to {job.destination_name} could "
            f"not be queued: {exc}"
        ) from exc
    n = len(ids)
    return ids, f"Queued {n} send job{pluralize(n)} to {job.destination_name}."
