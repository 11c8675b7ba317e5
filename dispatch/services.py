"""Dispatch services: create jobs, run them, retry them, report on them.

Plain functions called by the huey tasks, the management commands, the admin and the
receiver. The job row is the source of truth; a huey message only says "look at job
N". Any number of workers (threads, processes, machines) may run `run_job` for the same
job at once: exactly one claims it, through one conditional UPDATE, and holds a lease
it renews while sending. A worker that dies leaves an expired lease, and whichever
worker looks next resumes the job, sending only the instances not yet confirmed.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import queue
import random
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Count, F, Min, Q, Sum
from django.template.defaultfilters import pluralize
from django.utils import timezone

from config.safetext import db_text, log_fields
from targets.kinds.base import (
    FAILED,
    PRESENT,
    SENT,
    WARNING,
    Outcome,
    SendContext,
    TargetError,
)
from targets.models import Target
from targets.paths import private_dir
from targets.series import OtherFile, Series, scan_folder
from targets.services import redact, secret_values
from targets.validators import split_globs

from .models import (
    FINISHED_STATES,
    SUCCESS_STATES,
    Attempt,
    InstanceState,
    Job,
    JobInstance,
    Source,
    State,
)

log = logging.getLogger("courier.dispatch")

# Seconds between progress writes while a job sends (instances, attempt and job).
PROGRESS_INTERVAL = 1.0

ProgressHook = Callable[[Outcome], None]

_INSTANCE_STATE = {
    SENT: InstanceState.SENT,
    WARNING: InstanceState.WARNING,
    PRESENT: InstanceState.PRESENT,
    FAILED: InstanceState.FAILED,
}


class DispatchError(Exception):
    """A send cannot even be queued (unknown folder, query-only target, ...)."""


class _SendAborted(Exception):
    """Raised into the handler's thread when the job was cancelled or its lease lost."""


# -- small helpers -----------------------------------------------------------------


def worker_id() -> str:
    """Name this worker thread in attempts, leases and logs."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


def _kv(**fields) -> str:
    """Format key=value pairs a log collector can parse (values from peers and
    files escaped: no field or line can be forged)."""
    return log_fields(**fields)


def job_limit(target: Target) -> int:
    """Connections to `target` at once, across every job and worker process."""
    return max(1, target.max_associations or 1)


def _slots_in_use(
    target_id: int, now, exclude: int | None = None, *, holds: bool = True
) -> int:
    """Connections held by the target's running jobs (live leases only).

    With `holds`, a direct send (`send_series`) waiting for a connection counts as
    holding one, so that queued jobs do not take it first.
    """
    live = Job.objects.filter(target_id=target_id, lease_expires_at__gt=now)
    if exclude is not None:
        live = live.exclude(pk=exclude)
    used = live.filter(state=State.SENDING).aggregate(n=Sum("associations"))["n"] or 0
    if holds:
        used += live.filter(state=State.QUEUED).count()
    return used


def backoff_delay(target: Target, attempt: int) -> float:
    """Seconds before retry number `attempt` (1 = first retry): doubling, jittered."""
    base = float(target.retry_base_delay)
    cap = float(target.retry_max_delay)
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    # Jitter spreads the retries of many jobs that failed together (a peer restart)
    # so they do not all hit the peer in the same second.
    return max(1.0, min(cap, delay * random.uniform(0.8, 1.2)))


def _lease() -> timedelta:
    return timedelta(seconds=float(settings.COURIER_JOB_LEASE))


def _renew_every() -> float:
    """Seconds between renewals of a lease: five chances before it runs out."""
    return max(0.2, float(settings.COURIER_JOB_LEASE) / 5)


class _LeaseKeeper:
    """Renew a job's lease from a thread of its own while the job is held.

    Its own thread, so that nothing the worker does (reading a large folder, a slow
    instance) delays a renewal. `valid` turns false when the job was taken from
    this worker (cancelled, taken over) or when no renewal has succeeded for most of
    a lease: a worker that cannot reach the database stops sending before another
    may claim the job, so two workers never send one job.
    """

    def __init__(self, job_id: int, worker: str):
        self.job_id = job_id
        self.worker = worker
        self.lease = _lease().total_seconds()
        self.every = _renew_every()
        self.renewed_at = time.monotonic()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-job-{job_id}", daemon=True
        )

    def start(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def valid(self) -> bool:
        # A renewal that started before this point may have extended the lease;
        # one that did not succeed for (lease - one interval) may not have.
        overdue = time.monotonic() - self.renewed_at > self.lease - self.every
        return not self.lost.is_set() and not overdue

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.every):
                started = time.monotonic()
                try:
                    renewed = Job.objects.filter(
                        pk=self.job_id,
                        lease_owner=self.worker,
                        state__in=[State.QUEUED, State.SENDING],
                    ).update(lease_expires_at=timezone.now() + _lease())
                except Exception as exc:  # the database is away: try again
                    log.warning(
                        "dispatch lease renewal failed %s",
                        _kv(job=self.job_id, error=type(exc).__name__),
                    )
                    continue
                if not renewed:
                    self.lost.set()
                    return
                self.renewed_at = started
        finally:
            # This thread's own database connection.
            connections.close_all()


def watch_lease(job_id: int) -> None:
    """Resume a sending job whose worker stopped renewing its lease.

    Queued when a job is claimed, for when its lease would run out; while the
    worker renews, it looks again at the new end. So a killed worker's job is taken
    over by any live worker seconds after its lease ends, not at the next sweep.
    """
    row = Job.objects.filter(pk=job_id).values_list("state", "lease_expires_at").first()
    if row is None or row[0] != State.SENDING:
        return
    expires = row[1]
    if expires is not None and expires >= timezone.now():
        _watch(job_id, expires)
        return
    run_jobs_from(job_id)


def _watch(job_id: int, expires) -> None:
    from . import tasks

    eta = expires + timedelta(seconds=min(1.0, _renew_every()))
    transaction.on_commit(lambda: tasks.watch_lease_task.schedule((job_id,), eta=eta))


def _send_refusal(target: Target) -> str:
    if not target.can_store:
        return (
            f"target {target.name} is query-only (direction "
            f"{target.get_direction_display()}): Courier does not send to it"
        )
    return ""


def _wait_reason(target: Target) -> str:
    if not target.enabled:
        return f"target {target.name} is disabled; the job waits until it is enabled"
    if target.paused:
        return f"target {target.name} is paused; the job waits until it is resumed"
    return ""


def scrub(message: str, target: Target) -> str:
    """Blank out the target's secrets should a message ever carry one.

    Also their URL-quoted form: a library error may quote the URL it was given.
    """
    secrets = secret_values(target)
    quoted = [quote(s, safe="") for s in secrets]
    return redact(message, secrets + [q for q in quoted if q not in secrets])


def crash_site(exc: BaseException) -> str:
    """Where an exception was raised (innermost frames first), for the log.

    Logged instead of the traceback, whose text (an argument, a URL) could hold a
    secret.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    return " < ".join(f"{f.filename}:{f.lineno}" for f in reversed(frames[-5:]))


def _scan(folder: str | Path, target: Target) -> Series:
    series = scan_folder(folder)
    return series.excluding(split_globs(target.exclude))


def other_files_for(
    target: Target, series: Series
) -> tuple[list[OtherFile], list[tuple[Path, str]]]:
    """The series' other files `target` delivers, and the files it leaves out (why).

    Folder, SFTP, rsync and S3 deliver every other file but those the exclusion
    filter names; the DICOM kinds send DICOM only. Unreadable files are left out
    everywhere.
    """
    target = target.as_kind()
    kept = (
        series.excluding(split_globs(target.exclude)).others
        if target.delivers_other_files
        else []
    )
    kept_paths = {o.path for o in kept}
    why = (
        "excluded by the target's exclusion filter"
        if target.delivers_other_files
        else f"{target.get_kind_display()} targets send DICOM instances only"
    )
    left = [
        (o.path, f"{why} ({o.reason})")
        for o in series.others
        if o.path not in kept_paths
    ]
    # Corrupt DICOM files are refused everywhere, in any form.
    return kept, left + list(series.skipped) + list(series.corrupt)


# -- creating jobs -----------------------------------------------------------------


def create_jobs(
    folder: str | Path,
    targets: Iterable[Target],
    *,
    context: SendContext | None = None,
    owned_spool: bool = True,
    source: str = Source.ROUTE,
    series: Series | None = None,
    enqueue_now: bool = True,
) -> list[Job]:
    """Create one queued job per target for the series in `folder` and queue them.

    `owned_spool` means Courier owns the folder: it is deleted once every job for it
    is done (and kept for `COURIER_FAILED_RETENTION_DAYS` if one failed). Pass the
    already scanned `series` to avoid reading the folder again. Raise `DispatchError`
    for a missing folder or a query-only target; a disabled or paused target gets a
    job that waits.
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise DispatchError(f"folder {folder} does not exist")
    targets = [t.as_kind() for t in targets]
    for target in targets:
        refusal = _send_refusal(target)
        if refusal:
            raise DispatchError(refusal)
    context = context or SendContext()
    scanned = series if series is not None else scan_folder(folder)
    first = scanned.instances[0].tags if scanned.instances else {}
    jobs = []
    with transaction.atomic():
        for target in targets:
            own = scanned.excluding(split_globs(target.exclude))
            others, left_out = other_files_for(target, scanned)
            job = Job.objects.create(
                target=target,
                folder=str(folder),
                owned_spool=owned_spool,
                source=source,
                # Values from the files: no NUL reaches the database (PostgreSQL
                # refuses the whole row).
                study_uid=db_text(first.get("StudyInstanceUID"), 64),
                series_uid=db_text(first.get("SeriesInstanceUID"), 64),
                series_description=db_text(first.get("SeriesDescription"), 200),
                calling_aet=db_text(context.calling_aet),
                called_aet=db_text(context.called_aet),
                total=len(own.instances),
                other_files=len(others),
                skipped=len(left_out),
            )
            JobInstance.objects.bulk_create(
                [
                    JobInstance(
                        job=job,
                        path=str(i.path),
                        sop_instance_uid=db_text(i.sop_instance_uid, 64),
                    )
                    for i in own.instances
                ]
                + [JobInstance(job=job, path=str(o.path), dicom=False) for o in others]
            )
            jobs.append(job)
        if enqueue_now:
            for job in jobs:
                enqueue(job)
    return jobs


def enqueue(job: Job | int, *, eta=None) -> None:
    """Ask a worker to look at the job (after the current transaction commits)."""
    from . import tasks

    job_id = job if isinstance(job, int) else job.pk

    def send_message() -> None:
        if eta is None:
            tasks.run_job_task(job_id)
        else:
            tasks.run_job_task.schedule((job_id,), eta=eta)

    transaction.on_commit(send_message)


def kick_target(target_id: int, target: Target | None = None) -> int:
    """Queue the oldest jobs of a target that may run now, one per free slot."""
    now = timezone.now()
    if target is None:
        target = Target.objects.filter(pk=target_id).first()
    if target is None or _wait_reason(target):
        return 0
    free = job_limit(target) - _slots_in_use(target_id, now)
    if free <= 0:
        return 0
    due = Job.objects.filter(target_id=target_id).filter(_claimable_q(now))
    ids = list(due.order_by("not_before", "id").values_list("id", flat=True)[:free])
    for job_id in ids:
        enqueue(job_id)
    return len(ids)


def _claimable_q(now) -> Q:
    """Jobs any worker may claim now: due, not held by a direct send, or whose
    worker's lease ran out."""
    unheld = Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now)
    return (
        Q(state__in=[State.QUEUED, State.RETRY_WAIT], not_before__lte=now) & unheld
    ) | Q(state=State.SENDING, lease_expires_at__lt=now)


# -- running a job -----------------------------------------------------------------


@dataclass
class _Claim:
    job: Job
    target: Target
    interrupted: list[Attempt] = field(default_factory=list)


def _claim(
    job_id: int, worker: str, respect_limit: bool, *, held: bool = False
) -> _Claim | None:
    """Take the job for `worker` if it may run now; None if not (or taken).

    `held`: the job is queued and held by `worker` itself (a direct send waiting
    for a connection); other holds do not count against it.
    """
    now = timezone.now()
    claimable = Q(state=State.QUEUED, lease_owner=worker) if held else _claimable_q(now)
    # Most messages for a busy target or a taken job end here, without a write
    # transaction (on SQLite that would wait for the one database-wide write lock).
    if respect_limit:
        seen = (
            Job.objects.filter(pk=job_id)
            .filter(claimable)
            .values_list("target_id", "target__max_associations")
            .first()
        )
        if seen is None:
            return None
        used = _slots_in_use(seen[0], now, exclude=job_id, holds=not held)
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
        refusal = _send_refusal(target)
        if refusal:
            Job.objects.filter(pk=job_id).exclude(state__in=FINISHED_STATES).update(
                state=State.FAILED, last_error=refusal, finished_at=now
            )
            return None
        waiting = _wait_reason(target)
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
        free = job_limit(target) - _slots_in_use(
            target.pk, now, exclude=job_id, holds=not held
        )
        if respect_limit and free <= 0:
            return None
        left = max(1, job.total - job.sent - job.present - job.failed)
        slots = max(1, min(free, left) if respect_limit else job_limit(target))
        claimed = (
            Job.objects.filter(pk=job_id)
            .filter(claimable)
            .update(
                state=State.SENDING,
                lease_owner=worker,
                lease_expires_at=now + _lease(),
                associations=slots,
                attempt_count=F("attempt_count") + 1,
                updated_at=now,
            )
        )
        if not claimed:
            return None
        was_sending = job.state == State.SENDING
        job.state, job.lease_owner = State.SENDING, worker
        job.lease_expires_at, job.associations = now + _lease(), slots
        job.attempt_count += 1
        if not was_sending:
            return _Claim(job=job, target=target)
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
        return _Claim(job=job, target=target, interrupted=interrupted)


def run_job(
    job_id: int,
    *,
    worker: str | None = None,
    progress: ProgressHook | None = None,
    respect_limit: bool = True,
    retry: bool = True,
    held: bool = False,
    keeper: _LeaseKeeper | None = None,
) -> Job | None:
    """Claim the job and make one attempt; return the job, or None if not claimed.

    Reads the target fresh from the database, sends the job's pending instances,
    records the attempt and each instance's outcome, then sets the job's state:
    done / done-with-warnings / failed, or retry-wait (transient error, `retry`
    true and attempts left), scheduling the next attempt with backoff. The lease is
    renewed by a `_LeaseKeeper` (the caller's, if it passes one) while this runs.
    """
    worker = worker or worker_id()
    claim = _claim(job_id, worker, respect_limit, held=held)
    if claim is None:
        return None
    job, target = claim.job, claim.target
    own_keeper = keeper is None
    if keeper is None:
        keeper = _LeaseKeeper(job.pk, worker).start()
    _watch(job.pk, job.lease_expires_at)
    try:
        return _attempt(job, target, worker, keeper, progress, retry)
    finally:
        if own_keeper:
            keeper.stop()


def _attempt(
    job: Job,
    target: Target,
    worker: str,
    keeper: _LeaseKeeper,
    progress: ProgressHook | None,
    retry: bool,
) -> Job:
    # The handler opens at most the connections this job was given.
    handler_target = copy.copy(target)
    handler_target.max_associations = job.associations
    attempt = Attempt.objects.create(job=job, number=job.attempt_count, worker=worker)
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
                recorder = _Recorder(job, target, attempt, worker, ids)
                aborted = _send(job, handler_target, series, recorder, keeper, progress)
    except TargetError as exc:
        error = exc
        error.message = scrub(exc.message, target)
    except _SendAborted:
        aborted = True
    except Exception as exc:  # a bug or an unexpected library error: retry it
        # Type and place only: the exception's text may carry a secret.
        log.error(
            "dispatch unexpected error %s",
            _kv(job=job.pk, error=type(exc).__name__, at=crash_site(exc)),
        )
        error = TargetError(
            scrub(f"unexpected error: {type(exc).__name__}: {exc}", target)
        )
    return _finish(job, target, attempt, worker, error, aborted, retry, started)


def run_jobs_from(job_id: int, *, budget_seconds: float = 20.0) -> int:
    """Run the job, then go on with the next jobs of its target for a while.

    A worker thread that just freed a slot of a target takes that target's next job
    itself instead of waiting for the queue to hand it out (a polled queue such as
    SqliteHuey adds up to its polling delay per job). The time budget keeps one
    target from holding a worker thread for long. Return how many jobs ran.
    """
    deadline = time.monotonic() + budget_seconds
    job = run_job(job_id)
    ran = 0
    while job is not None:
        ran += 1
        if job.state == State.RETRY_WAIT:
            break  # the target is likely down: its other jobs wait for the sweep
        if time.monotonic() >= deadline:
            # Hand the target's next jobs to the queue (and so to any worker).
            kick_target(job.target_id)
            break
        target_id = job.target_id
        next_id = (
            Job.objects.filter(target_id=target_id)
            .filter(_claimable_q(timezone.now()))
            .order_by("not_before", "id")
            .values_list("id", flat=True)
            .first()
        )
        if next_id is None:
            break
        job = run_job(next_id)
        if job is None:
            # Another worker took it, or the target is full or paused now.
            kick_target(target_id)
    return ran


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
            message=f"the file changed after the job was made: it now holds SOP "
            f"Instance UID {now}, not {pending[path]}",
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
    recorder: _Recorder,
    keeper: _LeaseKeeper,
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
            raise _SendAborted("job cancelled or taken over")
        outcomes.put(outcome)

    def sender() -> None:
        try:
            target.handler.send(series, progress=report, context=context)
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
            recorder.add(outcome)
            if progress:
                progress(outcome)
        now = time.monotonic()
        if now >= next_flush or recorder.full:
            if not recorder.flush() and not stop.is_set():
                stop.set()  # cancelled or taken over: stop at the next instance
            next_flush = now + PROGRESS_INTERVAL
        if not keeper.valid:
            # Cancelled, taken over, or the lease could not be renewed: stop at
            # the next instance.
            stop.set()
    thread.join()
    # What the target confirmed is kept, however the send ended.
    recorder.flush()
    if failure:
        exc = failure[0]
        if isinstance(exc, _SendAborted) or stop.is_set():
            return True
        raise exc
    return stop.is_set()


class _Recorder:
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
                message=message[:2000],
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


def _refresh_counts(job: Job) -> dict:
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


def _finish(
    job: Job,
    target: Target,
    attempt: Attempt,
    worker: str,
    error: TargetError | None,
    aborted: bool,
    retry: bool,
    started: float,
) -> Job:
    now = timezone.now()
    if aborted:
        job.refresh_from_db()
        attempt.ended_at = now
        attempt.outcome = "cancelled" if job.state == State.CANCELLED else "taken over"
        attempt.error = "stopped: " + attempt.outcome
        attempt.save()
        if job.lease_owner == worker and job.state != State.SENDING:
            # Cancelled: let go of the job (it may be retried) with true counters.
            counts = _refresh_counts(job)
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

    counts = _refresh_counts(job)
    if error is None and counts["pending"]:
        # Instances the handler said nothing about did not get through.
        job.instances.filter(state=InstanceState.PENDING).update(
            state=InstanceState.FAILED,
            message="the target's handler reported no outcome for this file",
        )
        counts = _refresh_counts(job)
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
        attempt.error = error.message
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
        attempt.error = message
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
        "last_error": message,
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
    if retry_at:
        enqueue(job, eta=retry_at)
    if state in SUCCESS_STATES and job.owned_spool:
        cleanup_spool(job.folder)
    return job


def _log_attempt(job: Job, target: Target, attempt: Attempt, started: float) -> None:
    log.info(
        "dispatch attempt %s",
        _kv(
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


# -- spool -------------------------------------------------------------------------


def _inside_spool(folder: Path) -> bool:
    spool = Path(settings.COURIER_SPOOL_DIR).resolve()
    return folder.resolve().is_relative_to(spool) and folder.resolve() != spool


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        # Another file system (EXDEV), or protected_hardlinks for a file Courier's
        # user does not own (EPERM): copy the bytes instead.
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)


def take_into_spool(folder: str | Path) -> Path:
    """Put the files under `folder` into a new spool folder Courier owns; return it.

    Hard links where the spool is on the same file system (no bytes copied; a file
    later deleted, moved or replaced by the caller stays as it was here), copies
    elsewhere. Every file and folder is fsynced and the folder renamed into place
    only when whole, so the caller may delete or reuse its folder once this
    returns. Raise `DispatchError` (nothing left behind) if it cannot be done.
    """
    folder = Path(folder).resolve()
    queued = Path(settings.COURIER_SPOOL_DIR) / "queued"
    name = f"{timezone.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:12]}"
    tmp = queued / f".{name}.part"
    made: list[Path] = []
    try:
        private_dir(queued)  # the spool: Courier's alone
        tmp.mkdir(mode=0o700)
        folders = [tmp]
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            here = tmp / Path(dirpath).relative_to(folder)
            if here != tmp:
                here.mkdir()
                folders.append(here)
            for file_name in sorted(filenames):
                src = Path(dirpath) / file_name
                if not src.is_file():
                    continue  # sockets, pipes, dangling links: not files to send
                _link_or_copy(src, here / file_name)
                made.append(here / file_name)
        # Concurrent fsyncs share the file system's journal commits.
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(_fsync, made))
        for path in reversed(folders):
            _fsync(path)
        final = queued / name
        os.rename(tmp, final)
        _fsync(queued)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({exc.filename})" if exc.filename else ""
        raise DispatchError(
            f"cannot copy {folder} into the spool {queued}: "
            f"{exc.strerror or exc}{where}"
        ) from None
    return final


def cleanup_spool(folder: str) -> bool:
    """Delete a spool folder once every job for it is done; True if deleted."""
    jobs = Job.objects.filter(folder=folder, owned_spool=True)
    if jobs.exclude(state__in=SUCCESS_STATES).exists():
        return False
    path = Path(folder)
    if not path.exists() or not _inside_spool(path):
        # Never delete outside the spool, whatever a row says.
        return False
    shutil.rmtree(path, ignore_errors=True)
    log.info("dispatch spool deleted %s", _kv(folder=folder))
    return True


def expire_spool(now=None) -> int:
    """Delete spool folders of failed or cancelled jobs older than the retention."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=float(settings.COURIER_FAILED_RETENTION_DAYS))
    folders = (
        Job.objects.filter(owned_spool=True, state__in=FINISHED_STATES)
        .values("folder")
        .annotate(last=Min("finished_at"))
        .filter(last__lt=cutoff)
        .values_list("folder", flat=True)
    )
    deleted = 0
    for folder in folders:
        path = Path(folder)
        if not path.exists() or not _inside_spool(path):
            continue
        jobs = Job.objects.filter(folder=folder)
        if jobs.exclude(state__in=FINISHED_STATES).exists():
            continue
        if jobs.filter(finished_at__gte=cutoff).exists():
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("dispatch spool expired %s", _kv(folder=folder))
        deleted += 1
    return deleted


# -- sweeping, operator actions ----------------------------------------------------


def sweep(now=None, *, at_startup: bool = False) -> int:
    """Requeue what fell through the cracks; return how many jobs were queued.

    Due retry-wait jobs, jobs whose worker died (lease expired), paused jobs whose
    target is active again, and queued jobs whose message was lost (a queue flushed
    or a machine restarted). Safe to run anywhere, any number of times.
    """
    now = now or timezone.now()
    active_targets = Target.objects.filter(enabled=True, paused=False)
    Job.objects.filter(state=State.PAUSED, target__in=active_targets).update(
        state=State.QUEUED, last_error="", updated_at=now
    )
    target_ids = set(
        Job.objects.filter(_claimable_q(now)).values_list("target_id", flat=True)
    )
    queued = sum(kick_target(tid) for tid in target_ids)
    if at_startup:
        # A worker that starts may be replacing one that was killed: look at the
        # jobs it held right after their leases end, not at the next sweep.
        for job_id, expires in Job.objects.filter(
            state=State.SENDING, lease_expires_at__gte=now
        ).values_list("id", "lease_expires_at"):
            _watch(job_id, expires)
    expire_spool(now)
    return queued


RETRYABLE_STATES = (State.FAILED, State.CANCELLED, State.RETRY_WAIT)


def retry_refusal(job: Job, now=None) -> str:
    """Why `job` cannot be retried now, in words; "" if it can."""
    if job.state in SUCCESS_STATES:
        return f"job {job.pk} is already done: nothing to retry"
    if job.state in (State.QUEUED, State.SENDING):
        return f"job {job.pk} is {job.get_state_display().lower()} already"
    if job.state == State.PAUSED:
        return f"job {job.pk} waits for its target: {job.last_error or 'resume it'}"
    if (
        job.lease_owner
        and job.lease_expires_at
        and job.lease_expires_at > (now or timezone.now())
    ):
        return f"job {job.pk} is still stopping its last attempt; retry in a moment"
    return ""


def retry_now(jobs: Iterable[Job]) -> int:
    """Queue failed, waiting or cancelled jobs again, failed instances included.

    Attempt numbers go on counting; after a failed or cancelled job the target's
    retry budget starts afresh (the operator decided to try again). Done, queued
    and sending jobs are left alone: see `retry_refusal`. Return how many were
    queued.
    """
    count = 0
    now = timezone.now()
    for job in jobs:
        if retry_refusal(job, now):
            continue
        with transaction.atomic():
            job.instances.filter(state=InstanceState.FAILED).update(
                state=InstanceState.PENDING, message=""
            )
            fresh_budget = job.state in (State.FAILED, State.CANCELLED)
            updated = (
                Job.objects.filter(pk=job.pk, state__in=RETRYABLE_STATES)
                .exclude(lease_expires_at__gt=now, lease_owner__gt="")
                .update(
                    state=State.QUEUED,
                    not_before=now,
                    finished_at=None,
                    failed=0,
                    last_error="",
                    attempt_base=F("attempt_count")
                    if fresh_budget
                    else F("attempt_base"),
                    updated_at=now,
                )
            )
            if not updated:
                continue
            kick_target(job.target_id)
        count += 1
    return count


def cancel(jobs: Iterable[Job]) -> int:
    """Cancel jobs that are not finished; a sending one stops at its next instance."""
    now = timezone.now()
    ids = [j.pk for j in jobs]
    return (
        Job.objects.filter(pk__in=ids)
        .exclude(state__in=FINISHED_STATES)
        .update(
            state=State.CANCELLED,
            finished_at=now,
            updated_at=now,
            last_error="cancelled by an operator",
        )
    )


def pause_targets(targets: Iterable[Target]) -> int:
    ids = [t.pk for t in targets]
    return Target.objects.filter(pk__in=ids).update(paused=True)


def resume_targets(targets: Iterable[Target]) -> int:
    ids = [t.pk for t in targets]
    n = Target.objects.filter(pk__in=ids).update(paused=False)
    now = timezone.now()
    for target in Target.objects.filter(pk__in=ids, enabled=True):
        target.jobs.filter(state=State.PAUSED).update(
            state=State.QUEUED, last_error="", updated_at=now
        )
        kick_target(target.pk)
    return n


# -- the synchronous send (send_series) ----------------------------------------------


@dataclass
class SendReport:
    job: Job
    # Files of the folder the target does not get, with why (other files a DICOM
    # kind leaves out, excluded ones, unreadable ones).
    left_out: list[tuple[Path, str]]
    seconds: float


WaitHook = Callable[[int, int], None]


def send_series(
    target: Target,
    folder: str | Path,
    *,
    context: SendContext | None = None,
    progress: ProgressHook | None = None,
    on_start: Callable[[Job], None] | None = None,
    on_wait: WaitHook | None = None,
) -> SendReport:
    """Send the series under `folder` to `target` now, recording a job.

    The job and its attempt are the record shown in the admin. No automatic retry:
    the caller sees what happened. The send takes its connections from the target's
    limit like a worker's job: while all are in use it waits (`on_wait(in_use,
    limit)` is told once), holding its place ahead of queued jobs. Raise
    `DispatchError` for an empty folder or a target that cannot be sent to
    (query-only, disabled, paused).
    """
    target = target.as_kind()
    folder = Path(folder)
    if not folder.is_dir():
        raise DispatchError(f"{folder} is not a folder")
    waiting = _wait_reason(target)
    if waiting:
        raise DispatchError(waiting.split(";")[0] + "; enable or resume it first")
    series = scan_folder(folder)
    if not series.instances:
        raise DispatchError(f"no DICOM files in {folder}" + _refused_note(series))
    _others, left_out = other_files_for(target, series)
    start = time.monotonic()
    (job,) = create_jobs(
        folder,
        [target],
        context=context,
        owned_spool=False,
        source=Source.SEND_SERIES,
        series=series,
        enqueue_now=False,
    )
    worker = worker_id()
    # Hold the job (queued, leased to this process) so that no worker takes it.
    Job.objects.filter(pk=job.pk).update(
        lease_owner=worker, lease_expires_at=timezone.now() + _lease()
    )
    keeper = _LeaseKeeper(job.pk, worker).start()
    if on_start:
        on_start(job)
    told = False
    try:
        while True:
            result = run_job(
                job.pk,
                worker=worker,
                progress=progress,
                retry=False,
                held=True,
                keeper=keeper,
            )
            if result is not None:
                break
            job.refresh_from_db()
            if job.state != State.QUEUED or job.lease_owner != worker:
                break  # cancelled, paused or disabled meanwhile
            if on_wait and not told:
                on_wait(
                    _slots_in_use(target.pk, timezone.now(), job.pk, holds=False),
                    job_limit(Target.objects.get(pk=target.pk)),
                )
                told = True
            time.sleep(0.25)
    except KeyboardInterrupt:
        # Interrupted before the send began: nobody expects it to go later.
        Job.objects.filter(pk=job.pk, state=State.QUEUED).update(
            state=State.CANCELLED,
            finished_at=timezone.now(),
            last_error="send_series was interrupted before the send began",
        )
        raise
    finally:
        keeper.stop()
    kick_target(target.pk)
    job.refresh_from_db()
    return SendReport(job=job, left_out=left_out, seconds=time.monotonic() - start)


def _refused_note(series: Series) -> str:
    parts = []
    if series.corrupt:
        names = ", ".join(p.name for p, _ in series.corrupt[:3])
        parts.append(f"{len(series.corrupt)} corrupt DICOM files refused: {names}")
    others = len(series.others) + len(series.skipped)
    if others:
        parts.append(f"{others} other files")
    return f" ({'; '.join(parts)})" if parts else ""


def queue_series(
    target: Target, folder: str | Path, *, context: SendContext | None = None
) -> SendReport:
    """Queue the folder for `target` as a job for the workers (send_series --queue).

    The files are taken into the spool first (`take_into_spool`): the job owns
    them, and the caller's folder is free the moment this returns.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DispatchError(f"{folder} is not a folder")
    start = time.monotonic()
    series = scan_folder(folder)
    if not series.instances:
        raise DispatchError(f"no DICOM files in {folder}" + _refused_note(series))
    _others, left_out = other_files_for(target, series)
    owned = take_into_spool(folder)
    try:
        (job,) = create_jobs(
            owned,
            [target],
            context=context,
            owned_spool=True,
            source=Source.QUEUE,
            series=series.rebased(owned),
        )
    except BaseException:
        shutil.rmtree(owned, ignore_errors=True)
        raise
    return SendReport(job=job, left_out=left_out, seconds=time.monotonic() - start)


# -- status ------------------------------------------------------------------------


def files_done(job: Job) -> int:
    """Files of the job whose fate is known (sent, present, failed), as it runs."""
    return job.instances.exclude(state=InstanceState.PENDING).count()


def waiting_note(job: Job) -> str:
    """What a job that is not sending waits for, in words ("" if it is not waiting)."""
    if job.state == State.QUEUED:
        return "queued: waiting for a worker (manage.py run_huey)"
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
