"""The dispatch page, its actions, `dispatch_status` and `/health/`."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from dispatch.jobs import services
from dispatch.jobs.models import Job, State
from targets.models import FolderTarget, Target
from tests.dicomgen import make_series

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def target(tmp_path):
    (tmp_path / "out").mkdir()
    return FolderTarget.objects.create(
        name="archive-folder", path=str(tmp_path / "out")
    )


@pytest.fixture
def failed_job(tmp_path, target):
    series = make_series(tmp_path / "in", 2)
    (job,) = services.create_jobs(series.folder, [target], enqueue_now=False)
    Job.objects.filter(pk=job.pk).update(
        state=State.FAILED,
        last_error="association rejected: check the target AET",
        finished_at=timezone.now(),
    )
    return job


def test_the_dispatch_page_shows_numbers_progress_and_the_last_error(
    admin_client, failed_job
):
    Job.objects.create(target=failed_job.target, folder="/x", source="queue")
    response = admin_client.get(reverse("admin:dispatch_job_changelist"))
    body = response.content.decode()
    assert response.status_code == 200
    assert "1</strong> queued" in body
    assert "failed in the last 24 h" in body
    assert "0 / 2" in body
    assert "association rejected: check the target AET" in body


def test_the_dispatch_page_filters_by_state_and_target(admin_client, failed_job):
    url = reverse("admin:dispatch_job_changelist")
    assert admin_client.get(url, {"state": "failed"}).status_code == 200
    response = admin_client.get(url, {"target__id__exact": failed_job.target_id})
    assert response.status_code == 200
    assert "archive-folder" in response.content.decode()


def test_a_jobs_page_lists_attempts_and_instances_not_sent(admin_client, failed_job):
    url = reverse("admin:dispatch_job_change", args=[failed_job.pk])
    body = admin_client.get(url).content.decode()
    # Collapsed: a summary line with counts, the files inside a closed <details>.
    assert '<details id="job-files"><summary>2 files not sent (2 pending)' in body


def test_a_jobs_page_shows_every_field_read_only(admin_client, failed_job):
    url = reverse("admin:dispatch_job_change", args=[failed_job.pk])
    response = admin_client.get(url)
    form = response.context["adminform"]
    shown = [f for _, opts in form.fieldsets for f in opts["fields"]]
    assert "sent_size" in shown and "lease_expires_at" in shown
    assert form.form.fields == {}  # nothing on the page can be edited
    assert set(shown) <= set(form.readonly_fields)


def test_retry_now_sends_a_failed_job(admin_client, failed_job, immediate_huey):
    admin_client.post(
        reverse("admin:dispatch_job_changelist"),
        {"action": "retry_now_action", "_selected_action": [failed_job.pk]},
    )
    failed_job.refresh_from_db()
    assert failed_job.state == State.DONE


def test_cancel_and_pause_actions(admin_client, failed_job):
    url = reverse("admin:dispatch_job_changelist")
    Job.objects.filter(pk=failed_job.pk).update(state=State.RETRY_WAIT)
    admin_client.post(
        url, {"action": "cancel_action", "_selected_action": [failed_job.pk]}
    )
    assert Job.objects.get(pk=failed_job.pk).state == State.CANCELLED
    admin_client.post(
        url, {"action": "pause_targets", "_selected_action": [failed_job.pk]}
    )
    assert Target.objects.get(pk=failed_job.target_id).paused
    admin_client.post(
        url, {"action": "resume_targets", "_selected_action": [failed_job.pk]}
    )
    assert not Target.objects.get(pk=failed_job.target_id).paused


def test_dispatch_status_prints_the_summary(failed_job):
    out = StringIO()
    call_command("dispatch_status", stdout=out)
    assert "failed_24h=1" in out.getvalue()
    out = StringIO()
    call_command("dispatch_status", "--json", stdout=out)
    assert json.loads(out.getvalue())["failed_24h"] == 1


def test_health_answers_200_with_the_age_of_the_oldest_job(client, target, monkeypatch):
    now = timezone.now()
    old = Job.objects.create(target=target, folder="/x", source="queue")
    Job.objects.create(target=target, folder="/y", source="queue")
    Job.objects.filter(pk=old.pk).update(created_at=now - timedelta(seconds=90.5))
    monkeypatch.setattr(timezone, "now", lambda: now)
    response = client.get("/health/")
    assert response.status_code == 200
    data = response.json()
    assert data["database"] == "ok" and data["queue"] == "ok" and data["ok"]
    assert data["oldest_queued_age_s"] == 90.5
    assert (data["queued"], data["sending"]) == (2, 0)


def test_health_answers_503_when_the_queue_is_unreachable(client, monkeypatch):
    from huey.contrib.djhuey import HUEY

    def broken():
        raise ConnectionError("redis down")

    monkeypatch.setattr(HUEY, "pending_count", broken)
    response = client.get("/health/")
    assert response.status_code == 503
    assert response.json()["queue"].startswith("error")


def test_static_files_are_served_by_the_app_for_gunicorn(client):
    response = client.get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert b"body" in b"".join(response.streaming_content)
