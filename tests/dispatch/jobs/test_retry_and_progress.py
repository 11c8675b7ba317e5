"""Retrying failed and cancelled jobs, and progress written in batches.

Against dcmtk's storescp: first stopped (its port held, so connections are refused,
as with a peer that is down), then started. Progress moving on the pages while a
job sends, and Cancel then Retry of a sending job, are walked in a browser in
tests/dispatch/test_browser.py.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.template.defaultfilters import filesizeformat
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from dispatch.jobs import services, tasks
from dispatch.jobs.models import InstanceState, Job, State
from targets.models import DicomTarget
from tests.dicomgen import make_series
from tests.peers import StoreSCP, held_port

pytestmark = pytest.mark.django_db(transaction=True)


def scp_target(peer: StoreSCP, **fields) -> DicomTarget:
    return DicomTarget.objects.create(
        name=fields.pop("name", "scp"),
        host="127.0.0.1",
        port=peer.port,
        called_aet=peer.aet,
        **fields,
    )


@pytest.mark.parametrize("how", ["failed", "cancelled"])
def test_a_retried_job_counts_its_attempts_on_and_ends_done(
    how, tmp_path, immediate_huey
):
    peer = StoreSCP(tmp_path / "scp")
    held = held_port()
    peer.port = held.getsockname()[1]
    attempts = 1 if how == "failed" else 5
    target = scp_target(peer, retry_max_attempts=attempts, retry_base_delay=60)
    series = make_series(tmp_path / "in", 3)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    if how == "failed":
        assert job.state == State.FAILED
        assert job.last_error.startswith("gave up after 1 attempt: connection refused")
    else:
        assert job.state == State.RETRY_WAIT
        assert services.cancel([job]) == 1
        job.refresh_from_db()
    held.close()
    with peer:
        assert services.retry_now([job]) == 1
        job.refresh_from_db()
        assert job.state == State.DONE, job.last_error
        assert [(a.number, a.outcome) for a in job.attempts.all()] == [
            (1, "failed" if how == "failed" else "error"),
            (2, "done"),
        ]
        assert (job.attempt_count, job.sent, job.failed, job.last_error) == (
            2,
            3,
            0,
            "",
        )
        assert len(peer.files()) == 3

        # A done job is not sent again by Retry: it says why instead.
        assert services.retry_now([job]) == 0
        assert (
            services.retry_refusal(job)
            == f"job {job.pk} is already done: nothing to retry"
        )
        assert job.attempts.count() == 2 and len(peer.files()) == 3


def test_the_retry_budget_starts_afresh_but_attempt_numbers_do_not(
    tmp_path, immediate_huey
):
    peer = StoreSCP(tmp_path / "scp")
    held = held_port()
    peer.port = held.getsockname()[1]
    target = scp_target(peer, retry_max_attempts=1)
    series = make_series(tmp_path / "in", 1)
    try:
        (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
        for _ in range(2):
            services.retry_now([Job.objects.get(pk=job.pk)])
    finally:
        held.close()
    job.refresh_from_db()
    # Each retry was one more attempt (budget 1) that failed in its own right.
    assert job.state == State.FAILED and job.attempt_count == 3
    assert list(job.attempts.values_list("number", flat=True)) == [1, 2, 3]
    assert job.last_error.startswith("gave up after 1 attempt:")


def test_the_next_retry_time_is_computed_when_shown(
    tmp_path, admin_client, monkeypatch
):
    peer = StoreSCP(tmp_path / "scp")
    target = scp_target(peer)
    series = make_series(tmp_path / "in", 1)
    (job,) = services.create_jobs(
        series.folder, [target], owned_spool=False, enqueue_now=False
    )
    # The clock stands still from here: the page shows exactly 90 s, however
    # long a loaded machine takes to render it.
    now = timezone.now()
    monkeypatch.setattr(timezone, "now", lambda: now)
    Job.objects.filter(pk=job.pk).update(
        state=State.RETRY_WAIT,
        last_error="connection refused (attempt 1)",
        not_before=now + timedelta(seconds=90),
    )
    job.refresh_from_db()
    assert job.status_text(now) == "connection refused (attempt 1); next retry in 90 s"
    assert job.next_retry_text(now + timedelta(seconds=60)) == "next retry in 30 s"
    assert job.next_retry_text(now + timedelta(seconds=95)) == "retrying now"
    page = admin_client.get(reverse("admin:dispatch_job_changelist")).content.decode()
    assert "connection refused (attempt 1); next retry in 90 s" in page


def test_outcomes_and_progress_are_written_in_batches_not_per_instance(
    tmp_path, storescp
):
    """40 instances: a handful of UPDATEs on the instance table, not 40."""
    target = scp_target(storescp, name="fast-scp")
    series = make_series(tmp_path / "in", 40)
    (job,) = services.create_jobs(
        series.folder, [target], owned_spool=False, enqueue_now=False
    )
    with CaptureQueriesContext(connection) as queries:
        tasks.run_job(job.pk)
    job.refresh_from_db()
    assert job.state == State.DONE and job.sent == 40
    assert job.instances.filter(state=InstanceState.SENT).count() == 40
    instance_updates = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith('UPDATE "dispatch_jobinstance"')
    ]
    assert 1 <= len(instance_updates) <= 5, len(instance_updates)


def test_job_pages_show_seconds_sizes_and_plurals(tmp_path, admin_client, storescp):
    target = scp_target(storescp, name="fast-scp")
    series = make_series(tmp_path / "in", 2)
    (job,) = services.create_jobs(
        series.folder, [target], owned_spool=False, enqueue_now=False
    )
    tasks.run_job(job.pk)
    listing = admin_client.get(reverse("admin:dispatch_job_changelist"))
    body = listing.content.decode()
    assert re.search(
        r"<td class=\"field-created_at[^>]*>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d<", body
    )
    page = admin_client.get(reverse("admin:dispatch_job_change", args=[job.pk]))
    body = page.content.decode()
    job.refresh_from_db()
    size = filesizeformat(job.bytes_sent)
    assert re.fullmatch(r"\d+\.\d\xa0KB", size)
    assert body.count(size) >= 2, size  # the job's and its attempt's
    response = admin_client.post(
        reverse("admin:dispatch_job_changelist"),
        {"action": "retry_now_action", "_selected_action": [job.pk]},
        follow=True,
    )
    body = response.content.decode()
    assert f"Not retried: job {job.pk} is already done: nothing to retry." in body
    Job.objects.filter(pk=job.pk).update(state=State.FAILED)
    response = admin_client.post(
        reverse("admin:dispatch_job_retry", args=[job.pk]), follow=True
    )
    assert "1 job queued again." in response.content.decode()
