"""Batches of small jobs: a worker thread takes many of a target's queued one-file
jobs at once and sends them one after the other.

A busy queue of one-instance series (a modality's single images, a router fanning
out) spent most of its time on per-job bookkeeping. `claim` takes up to
`BATCH_JOBS` such jobs in one transaction, holding one of the target's connections
for all of them; `send` makes one attempt at each (`engine.send`) and writes their
ends together (`engine.Sent.finish`, one transaction every
`engine.PROGRESS_INTERVAL`); `release` gives back what was not attempted. Each job
keeps its own claim, lease, attempt and log line: a worker that dies leaves the jobs
not yet written down to be resumed like any other.
"""

from __future__ import annotations

import time

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from targets.models import Target

from . import committing, engine, files, lease
from .engine import Claim, Sent
from .models import Job, State

# Jobs of one file at most, queued and due, that one worker thread takes at once and
# sends one after the other (`claim`).
BATCH_JOBS = 32

_SMALL = (
    "j.target_id = %(target)s AND j.state = 'queued' AND j.not_before <= %(now)s "
    "AND (j.lease_expires_at IS NULL OR j.lease_expires_at < %(now)s) "
    "AND j.total + j.other_files <= 1 "
    # An open job (its series still arriving) grows when claimed alone (`tasks`).
    "AND NOT j.series_open"
)
_PICK = (
    "SELECT j.id, {used} FROM dispatch_job j WHERE " + _SMALL + " "
    "ORDER BY j.not_before, j.id LIMIT %(n)s"
)
# The claim's columns (engine.RETURNED) and what a batch's sends read besides.
_BATCH = {
    "id",
    "target_id",
    "folder",
    "owned_spool",
    "series_uid",
    "calling_aet",
    "called_aet",
    # A series still arriving: its job's end is "following" (`growing`).
    "series_open",
    *engine.RETURNED,
}
_TAKE = (
    "UPDATE dispatch_job SET state = 'sending', lease_owner = %(worker)s, "
    "lease_expires_at = %(expires)s, updated_at = %(now)s, "
    "attempt_count = attempt_count + 1, "
    "connections = CASE WHEN id = %(holder)s THEN 1 ELSE 0 END "
    "WHERE id IN ({ids}) AND state = 'queued' "
    "AND (lease_expires_at IS NULL OR lease_expires_at < %(now)s) "
    "RETURNING {fields}"
)


def claim(target_id: int, worker: str, most: int = BATCH_JOBS) -> list[Claim]:
    """Take up to `most` of the target's queued one-file jobs for `worker`.

    They are sent one after the other on one connection, so the batch holds one
    of the target's connections, whatever its size: the job sent last holds it
    (`connections` 1, the others 0) until the batch's end is written. Nothing is
    taken if the target has no connection free, is disabled or paused. The jobs
    are in id order, each claimed with a lease as `claim` does.
    """
    target = next(iter(Target.objects.raw(engine._TARGET, [target_id])), None)
    if target is None:
        return []
    target = target.as_kind()
    if (
        engine.send_refusal(target)
        or engine.wait_reason(target)
        or committing.wanted(target)
    ):
        return []  # the single claim says why, or waits for the commitment
    now = timezone.now()
    adapt = connection.ops.adapt_datetimefield_value
    expires = now + lease.lease_length()
    params = {
        "target": target_id,
        "id": 0,
        "now": adapt(now),
        "expires": adapt(expires),
        "worker": worker,
        "n": most,
    }
    # The columns in the model's order (what `Model.from_db` expects).
    names = [f.attname for f in Job._meta.concrete_fields if f.attname in _BATCH]
    # The connections in use, counted as the single claim counts them.
    used = engine._USED.format(states="('sending', 'queued')")
    pick = _PICK.format(used=used)
    # Counting the target's connections in use and taking the jobs is one step
    # for every worker: on SQLite the transaction holds the write lock from its
    # start (BEGIN IMMEDIATE), on PostgreSQL the target's row is locked.
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor != "sqlite":
            cursor.execute(
                "SELECT id FROM targets_target WHERE id = %s FOR UPDATE", [target_id]
            )
        cursor.execute(pick, params)
        picked = cursor.fetchall()
        if not picked or engine.job_limit(target) - picked[0][1] <= 0:
            return []
        ids = [row[0] for row in picked]
        params["holder"] = max(ids)
        take = _TAKE.format(ids=", ".join(map(str, ids)), fields=", ".join(names))
        cursor.execute(take, params)
        rows = sorted(cursor.fetchall())
        if rows and params["holder"] not in {row[0] for row in rows}:
            # The one meant to hold the connection was cancelled meanwhile.
            cursor.execute(
                "UPDATE dispatch_job SET connections = 1 WHERE id = %s", [rows[-1][0]]
            )
            at = names.index("connections")
            rows[-1] = (*rows[-1][:at], 1, *rows[-1][at + 1 :])
    claims = []
    for row in rows:
        job = Job.from_db(connection.alias, names, row)
        job.state, job.lease_owner, job.lease_expires_at = (
            State.SENDING,
            worker,
            expires,
        )
        job.target = target
        claims.append(Claim(job=job, target=target))
    return claims


def release(job_ids: list[int], worker: str) -> int:
    """Give back claimed jobs that were not attempted (the rest of a batch)."""
    if not job_ids:
        return 0
    return Job.objects.filter(
        pk__in=job_ids, lease_owner=worker, state=State.SENDING
    ).update(
        state=State.QUEUED,
        lease_owner="",
        lease_expires_at=None,
        attempt_count=F("attempt_count") - 1,
        connections=1,
    )


def send(claims: list[Claim], worker: str, keeper: lease.LeaseKeeper) -> list[Job]:
    """One attempt at each job of a batch (`claim`); return the jobs as they
    ended.

    The ends are written together, one transaction every
    `engine.PROGRESS_INTERVAL` and at the batch's end (so a worker that dies loses
    at most that long of confirmations, as with the files of one job). A transient error stops the
    batch (the target is likely down); the jobs not attempted are given back.
    """
    ended: list[Job] = []
    waiting: list[Sent] = []
    next_write = time.monotonic() + engine.PROGRESS_INTERVAL
    done = 0
    try:
        rows = files.pending_rows([c.job.pk for c in claims])
        for claimed in claims:
            if not keeper.valid:
                break  # the leases could not be renewed: stop before they end
            pk = claimed.job.pk
            sent = engine.send(
                claimed, worker, lease.RowLease(keeper, pk), None, rows[pk]
            )
            waiting.append(sent)
            done += 1
            stop = sent.error is not None and not sent.error.permanent
            if stop or done == len(claims) or time.monotonic() >= next_write:
                ended += _finish_all(waiting, worker)
                keeper.release(s.claim.job.pk for s in waiting)
                waiting = []
                next_write = time.monotonic() + engine.PROGRESS_INTERVAL
            if stop:
                break
    finally:
        # (Jobs sent but not written, should writing fail, keep their leases
        # until they run out: they are resumed as a dead worker's would be.)
        release([c.job.pk for c in claims[done:]], worker)
    return ended


def _finish_all(waiting: list[Sent], worker: str) -> list[Job]:
    with transaction.atomic():
        return [sent.finish(worker) for sent in waiting]
