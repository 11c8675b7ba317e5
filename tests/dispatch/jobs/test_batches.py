"""Batches of one-file jobs: a worker thread takes up to `batch.BATCH_JOBS` of a
target's queued one-file jobs at once and sends them one after the other
(`batch.claim`, `tasks.run_batch`). What they must keep: the target's
connection limit, the leases, the retries, the progress the pages show, and a
bounded number of statements (counted, not timed: bench/cmd_queue.py times it)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from dispatch.jobs import batch, engine, services, tasks
from dispatch.jobs.models import Job, State
from targets.models import DicomTarget, FolderTarget
from tests.dicomgen import make_series
from tests.peers import free_port

from .test_services import delivered, folder_target

pytestmark = pytest.mark.django_db(transaction=True)

# The batch's claim (the target's row, BEGIN, the pick with the connections in
# use, the UPDATE ... RETURNING, COMMIT), the pending rows of all its jobs, and
# one transaction (BEGIN, COMMIT) for the ends: 8 whatever the batch's size;
# then per job its files' rows, its attempt and its own row: 3. (The single
# claim's path costs 9 per job: test_queue_cost.py.)
BATCH_FIXED = 8
PER_JOB = 3


def _jobs(tmp_path, target, n: int, files: int = 1) -> list[Job]:
    jobs = []
    for i in range(n):
        series = make_series(tmp_path / f"in{i}", files)
        jobs += services.create_jobs(
            series.folder, [target], owned_spool=False, enqueue_now=False
        )
    return jobs


def _sending_connections(target) -> int:
    live = Job.objects.filter(
        target=target, state=State.SENDING, lease_expires_at__gt=timezone.now()
    )
    return live.aggregate(n=Sum("connections"))["n"] or 0


def test_a_batch_is_sent_in_few_statements_and_every_job_is_recorded(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(engine, "PROGRESS_INTERVAL", 3600.0)  # one write at the end
    target = folder_target(tmp_path / "out")
    jobs = _jobs(tmp_path, target, 6)
    with CaptureQueriesContext(connection) as ctx:
        ended = tasks.run_batch(target.pk)
    statements = [q["sql"] for q in ctx.captured_queries]
    assert [j.pk for j in ended] == [j.pk for j in jobs]
    assert len(statements) <= BATCH_FIXED + PER_JOB * 6, "\n".join(statements)
    assert sum(s.startswith("INSERT") for s in statements) == 6  # the attempts
    for job in Job.objects.filter(pk__in=[j.pk for j in jobs]):
        # As the job admin shows it: done, counted, the lease let go, one attempt.
        assert job.state == State.DONE and (job.total, job.sent) == (1, 1)
        assert (job.lease_owner, job.lease_expires_at) == ("", None)
        assert job.finished_at is not None
        (attempt,) = job.attempts.all()
        assert (attempt.number, attempt.outcome, attempt.sent) == (1, "done", 1)
        assert attempt.bytes_sent == job.bytes_sent > 0
    assert len(delivered(tmp_path / "out")) == 6
    assert tasks.run_batch(target.pk) is None  # nothing left


def test_a_batch_holds_one_connection_and_none_when_the_target_is_full(tmp_path):
    target = folder_target(tmp_path / "out", max_connections=2)
    small = _jobs(tmp_path, target, 5)
    (big,) = _jobs(tmp_path / "big", target, 1, files=3)
    # The series of three files holds both connections.
    assert engine.claim(big.pk, "worker-a", True).job.connections == 2
    assert batch.claim(target.pk, "worker-b") == []
    assert not Job.objects.filter(lease_owner="worker-b").exists()

    # One connection free: a batch takes every small job (never the big one) and
    # holds one connection in all, the one of the job it sends last.
    Job.objects.filter(pk=big.pk).update(connections=1)
    claims = batch.claim(target.pk, "worker-b")
    assert [c.job.pk for c in claims] == [j.pk for j in small]
    held = dict(
        Job.objects.filter(lease_owner="worker-b").values_list("pk", "connections")
    )
    assert held == {j.pk: (1 if j is small[-1] else 0) for j in small}
    assert _sending_connections(target) == 2 == engine.job_limit(target)
    # Full again: neither another batch nor a single job gets in.
    assert batch.claim(target.pk, "worker-c") == []

    # Given back (the rest of a batch after a transient error): queued again, as
    # before the claim, for any worker.
    assert batch.release([c.job.pk for c in claims], "worker-b") == 5
    for job in Job.objects.filter(pk__in=[j.pk for j in small]):
        assert (job.state, job.lease_owner, job.lease_expires_at) == (
            State.QUEUED,
            "",
            None,
        )
        assert job.attempt_count == 0
    assert len(batch.claim(target.pk, "worker-c", most=3)) == 3


def test_a_batch_is_never_taken_for_a_paused_target_and_a_permanent_error_fails_each(
    tmp_path,
):
    target = folder_target(tmp_path / "out")
    jobs = _jobs(tmp_path, target, 3)
    FolderTarget.objects.filter(pk=target.pk).update(paused=True)
    assert tasks.run_batch(target.pk) is None
    assert set(Job.objects.values_list("state", flat=True)) == {State.QUEUED}

    # The target's folder cannot be made (a file stands where it should be): a
    # permanent error, so each job fails at once with the reason and its own
    # attempt, as it would alone; the batch goes on.
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    FolderTarget.objects.filter(pk=target.pk).update(paused=False, path=str(blocked))
    ended = tasks.run_batch(target.pk)
    assert [j.pk for j in ended] == [j.pk for j in jobs]
    for job in Job.objects.filter(pk__in=[j.pk for j in jobs]):
        assert job.state == State.FAILED and "is not a folder" in job.last_error
        (attempt,) = job.attempts.all()
        assert attempt.outcome == "failed" and "is not a folder" in attempt.error


def test_a_transient_error_stops_the_batch_and_gives_the_rest_back(tmp_path):
    """A DICOM peer that is not there: the first job's refused connection sets it
    to retry; the batch stops (one connection tried, not one per job) and the
    other jobs are queued again untouched, for the sweep."""
    target = DicomTarget.objects.create(
        name="nobody", host="127.0.0.1", port=free_port(), called_aet="NOBODY"
    )
    jobs = _jobs(tmp_path, target, 3)
    ended = tasks.run_batch(target.pk)
    assert [j.pk for j in ended] == [jobs[0].pk]
    assert ended[0].state == State.RETRY_WAIT
    assert "connection refused" in ended[0].last_error
    for job in Job.objects.filter(pk__in=[j.pk for j in jobs[1:]]):
        assert (job.state, job.attempt_count, job.lease_owner) == (
            State.QUEUED,
            0,
            "",
        )
        assert job.lease_expires_at is None and not job.attempts.exists()
