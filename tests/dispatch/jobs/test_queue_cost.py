"""What a job costs the database: statements counted around a worker's run, not
timed (the queue's speed is measured by bench/cmd_queue.py)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from dispatch.jobs import engine, outcomes, services, tasks
from dispatch.jobs.models import InstanceState, State
from targets.models import DicomTarget
from tests.dicomgen import make_series
from tests.peers import StoreSCP

from .test_services import delivered, folder_target

pytestmark = pytest.mark.django_db(transaction=True)

# The claim (the job's and its target's rows read, one conditional UPDATE), the
# pending rows, and the end in one transaction (BEGIN, the files' rows, the
# attempt, the job, COMMIT): 9. The 2026-11 baseline was 12, and one more UPDATE
# per instance before that.
ONE_JOB = 9
# One progress write while a job sends: its transaction (BEGIN, the rows, the
# attempt, the job's counters, COMMIT); the first inserts the attempt's row inside
# a savepoint (two more).
ONE_FLUSH = 5


def _run(job_id: int) -> list[str]:
    with CaptureQueriesContext(connection) as ctx:
        tasks.run_job(job_id)
    return [q["sql"] for q in ctx.captured_queries]


def test_a_one_instance_job_runs_in_a_bounded_number_of_statements(tmp_path):
    target = folder_target(tmp_path / "out")
    jobs = []
    for i in range(5):
        series = make_series(tmp_path / f"in{i}", 1)
        jobs += services.create_jobs(
            series.folder, [target], owned_spool=False, enqueue_now=False
        )
    for job in jobs:
        statements = _run(job.pk)
        job.refresh_from_db()
        assert job.state == State.DONE and job.sent == 1
        assert len(statements) <= ONE_JOB, "\n".join(statements)
        # The folder was read when the job was made: the worker reads no file
        # header again, and writes the attempt's row once, at the job's end.
        assert sum("dispatch_attempt" in s for s in statements) == 1
    assert len(delivered(tmp_path / "out")) == 5


def test_progress_is_written_per_batch_of_instances_never_per_instance(
    tmp_path, monkeypatch
):
    """50 instances, batches of 20 and no timed flush: 3 writes of the files' rows,
    each one statement (no CASE WHEN per row), and every row recorded."""
    monkeypatch.setattr(engine, "PROGRESS_INTERVAL", 3600.0)
    monkeypatch.setattr(outcomes.OutcomeWriter, "BATCH", 20)
    series = make_series(tmp_path / "in", 50)
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(
        series.folder, [target], owned_spool=False, enqueue_now=False
    )
    statements = _run(job.pk)
    job.refresh_from_db()
    assert job.state == State.DONE and (job.sent, job.total) == (50, 50)
    rows = [s for s in statements if s.startswith('UPDATE "dispatch_jobinstance"')]
    assert len(rows) == 3
    assert not any("CASE WHEN" in s for s in rows)
    assert len(statements) <= ONE_JOB + 2 * ONE_FLUSH + 2, "\n".join(statements)
    assert set(job.instances.values_list("state", flat=True)) == {InstanceState.SENT}
    attempt = job.attempts.get()
    assert (attempt.sent, attempt.bytes_sent) == (50, series.total_bytes)
    assert len(delivered(tmp_path / "out")) == 50


def test_a_job_cancelled_while_it_sends_keeps_what_was_confirmed_and_says_so(
    tmp_path, monkeypatch
):
    """A PACS that takes a second per instance; the job is cancelled once the first
    is confirmed. The attempt is closed as cancelled with its counters, what the
    PACS confirmed is kept, and the rest stays pending for a retry."""
    monkeypatch.setattr(engine, "PROGRESS_INTERVAL", 0.0)
    series = make_series(tmp_path / "in", 4)
    with StoreSCP(tmp_path / "pacs", extra_args=["--sleep-after", "1"]) as peer:
        target = DicomTarget.objects.create(
            name="slow", host="127.0.0.1", port=peer.port, called_aet=peer.aet
        )
        (job,) = services.create_jobs(
            series.folder, [target], owned_spool=False, enqueue_now=False
        )

        def cancel_after_the_first(outcome) -> None:
            services.cancel([job])

        tasks.run_job(job.pk, progress=cancel_after_the_first)
        received = len(peer.files())
    job.refresh_from_db()
    attempt = job.attempts.get()
    assert job.state == State.CANCELLED
    assert (attempt.outcome, attempt.error) == ("cancelled", "stopped: cancelled")
    assert attempt.ended_at is not None
    sent = job.instances.filter(state=InstanceState.SENT).count()
    assert 0 < sent < 4 and sent <= received
    assert attempt.sent == job.sent == sent
    assert job.instances.filter(state=InstanceState.PENDING).count() == 4 - sent
