"""The admin's home page (status panel), `/health/`'s ok / degraded / down, and the
targets overview as dispatch sees it: waiting jobs, the last send, and why a target
with jobs cannot be deleted."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from dispatch.jobs import services
from dispatch.jobs.models import Job, State
from dispatch.receiving.bookkeeping import DatabaseBookkeeper
from dispatch.receiving.models import ReceiverStatus
from dispatch.routing.models import ReceivedSeries
from targets.models import DicomTarget, FolderTarget, Target
from tests.dicomgen import make_series
from tests.fixtures.receive_peers import storescu

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fast_password_hashing"),
]

INDEX = reverse("admin:index")
TARGETS = reverse("admin:targets_target_changelist")


def wait_for(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def archive(tmp_path) -> FolderTarget:
    (tmp_path / "out").mkdir()
    return FolderTarget.objects.create(name="Archive", path=str(tmp_path / "out"))


def make_job(target: Target, state: str, **fields) -> Job:
    now = timezone.now()
    if state in (State.DONE, State.FAILED, State.CANCELLED):
        fields.setdefault("finished_at", now)
    return Job.objects.create(
        target=target, folder=f"/spool/{state}", source="queue", state=state, **fields
    )


# -- the home page ---------------------------------------------------------------------


def test_the_home_page_shows_the_receiver_listening_and_what_it_received(
    admin_client, receiver, tmp_path
):
    rx = receiver(bookkeeper=DatabaseBookkeeper("COURIER@rx"), quiet_seconds=3600)
    series = make_series(tmp_path / "ct", 3)
    done = storescu(rx.port, series.files)
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: ReceivedSeries.objects.filter(instance_count=3).exists(),
        "the received series",
    )

    html = admin_client.get(INDEX).content.decode()

    assert "<title>Status | Courier</title>" in html
    assert '<div class="courier-status" id="courier-status">' in html
    assert '<th class="receiver-name">COURIER@rx</th>' in html
    assert '<span class="state-listening">listening</span>' in html
    received = ReceivedSeries.objects.get().last_received_at
    stamp = timezone.localtime(received).strftime("%Y-%m-%d %H:%M:%S")
    assert f'<td class="n" id="last-received">{stamp}</td>' in html
    # The app list is still there below the panel.
    assert 'class="app-targets module' in html


def test_the_home_page_counts_the_queue_and_names_targets_that_need_a_look(
    admin_client, archive
):
    paused = FolderTarget.objects.create(name="Paused share", path="/p", paused=True)
    pacs = DicomTarget.objects.create(
        name="PACS", host="pacs.example", port=104, called_aet="PACS"
    )
    FolderTarget.objects.create(name="Quiet", path="/q")
    for _ in range(2):
        make_job(archive, State.QUEUED)
    make_job(archive, State.SENDING, lease_expires_at=timezone.now() + timedelta(60))
    make_job(pacs, State.RETRY_WAIT)
    make_job(pacs, State.FAILED)
    make_job(paused, State.PAUSED)
    ReceiverStatus.objects.create(
        name="COURIER@11112",
        refused_count=4,
        last_refusal="disk full: out of resources",
        last_refusal_at=timezone.now(),
    )

    html = admin_client.get(INDEX).content.decode()

    for cell, n in (
        ("queue-queued", 2),
        ("queue-sending", 1),
        ("queue-retry", 1),
        ("queue-paused", 1),
        ("queue-failed", 1),
    ):
        assert f'id="{cell}">{n}</td>' in html, cell
    assert "Refused 4 instances" in html and "disk full: out of resources" in html
    assert "1 job failed in 24 h; 1 job waiting to retry" in html
    assert "paused (1 job waiting)" in html
    assert ">Quiet<" not in html  # nothing wrong with it
    jobs = reverse("admin:dispatch_job_changelist")
    assert f'href="{jobs}?state__exact=retry-wait"' in html
    assert f'href="{TARGETS}?status=paused"' in html
    assert reverse("querytool:query") in html


def test_a_staff_user_without_job_permission_sees_no_panel(client, django_user_model):
    user = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    client.force_login(user)
    html = client.get(INDEX).content.decode()
    assert 'id="courier-status"' not in html and "Courier" in html


# -- /health/ --------------------------------------------------------------------------


def test_health_is_ok_with_a_listening_receiver(client, receiver):
    receiver(bookkeeper=DatabaseBookkeeper("COURIER@ok"))
    data = client.get("/health/").json()
    assert (data["status"], data["ok"], data["problems"]) == ("ok", True, [])
    assert data["receivers"][0]["state"] == "listening"


def test_a_silent_receiver_makes_the_site_degraded_not_down(
    client, admin_client, monkeypatch
):
    # The clock stands still: the age shown is the 300 s set here, not 300 s plus
    # however long a loaded machine takes to get to the page.
    now = timezone.now()
    monkeypatch.setattr(timezone, "now", lambda: now)
    ReceiverStatus.objects.create(
        name="COURIER@11112", heartbeat_at=now - timedelta(minutes=5)
    )

    response = client.get("/health/")

    assert response.status_code == 200
    data = response.json()
    assert (data["status"], data["ok"]) == ("degraded", False)
    assert data["receivers"][0]["state"] == "not responding"
    assert data["problems"] == ["receiver COURIER@11112 silent for 300 s"]
    html = admin_client.get(INDEX).content.decode()
    assert '<span class="state-not-responding">not responding</span>' in html


def test_a_receiver_stopped_on_purpose_is_not_a_problem(client):
    ReceiverStatus.objects.create(name="COURIER@gone")
    DatabaseBookkeeper("COURIER@gone").stopped({"stored": 12})
    ReceiverStatus.objects.filter(name="COURIER@gone").update(
        heartbeat_at=timezone.now() - timedelta(hours=3)
    )
    data = client.get("/health/").json()
    assert data["status"] == "ok"
    assert data["receivers"][0]["state"] == "stopped"


def test_jobs_stuck_past_their_lease_make_the_site_degraded(client, archive):
    make_job(
        archive, State.SENDING, lease_expires_at=timezone.now() - timedelta(minutes=10)
    )
    make_job(
        archive, State.SENDING, lease_expires_at=timezone.now() - timedelta(seconds=5)
    )  # just expired: the next sweep takes it, not stuck yet

    response = client.get("/health/")

    assert response.status_code == 200
    data = response.json()
    assert data["status"] == "degraded" and data["stuck_jobs"] == 1
    assert data["problems"] == ["1 job sending past the lease"]


def test_an_unreachable_queue_means_down_with_503(client, monkeypatch):
    from huey.contrib.djhuey import HUEY

    def broken():
        raise ConnectionError("redis down")

    monkeypatch.setattr(HUEY, "pending_count", broken)
    response = client.get("/health/")
    assert response.status_code == 503
    data = response.json()
    assert (data["status"], data["ok"]) == ("down", False)
    assert "the queue does not answer" in data["problems"]


# -- the targets overview, with jobs ---------------------------------------------------


def test_the_overview_shows_waiting_jobs_and_the_last_send(admin_client, archive):
    idle = FolderTarget.objects.create(name="Idle", path="/i")
    make_job(archive, State.QUEUED)
    make_job(archive, State.RETRY_WAIT)
    make_job(archive, State.DONE, finished_at=timezone.now() - timedelta(hours=2))
    last = make_job(archive, State.FAILED, finished_at=timezone.now())

    response = admin_client.get(TARGETS)
    html = response.content.decode()

    rows = {t.name: t for t in response.context["cl"].result_list}
    assert (rows["Archive"].waiting_jobs, rows["Idle"].waiting_jobs) == (2, 0)
    assert rows["Archive"].last_send_state == State.FAILED
    stamp = timezone.localtime(last.finished_at).strftime("%Y-%m-%d %H:%M:%S")
    assert f">failed</a> {stamp}</span>" in html
    assert "never" in html  # Idle's last send (and last test)
    # The count links to exactly those jobs, through the jobs page's own filters.
    link = html.split('class="waiting-jobs" href="')[1].split('"')[0]
    jobs = admin_client.get(link.replace("&amp;", "&"))
    assert jobs.status_code == 200
    assert {j.state for j in jobs.context["cl"].result_list} == {
        State.QUEUED,
        State.RETRY_WAIT,
    }
    assert idle.pk not in {j.target_id for j in jobs.context["cl"].result_list}


def test_deleting_a_target_with_jobs_explains_what_to_do(admin_client, archive):
    make_job(archive, State.QUEUED)
    make_job(archive, State.DONE)
    url = reverse("admin:targets_target_delete", args=[archive.pk])

    html = admin_client.get(url).content.decode()

    assert "A target with dispatch jobs cannot be deleted" in html
    assert ">1 waiting or sending</a>" in html and ">1 finished</a>" in html
    assert "Pause dispatch to selected targets" in html
    assert "untick <em>enabled</em>" in html
    assert "job 1" not in html.lower()  # not Django's bare list of jobs
    admin_client.post(url, {"post": "yes"})
    assert Target.objects.filter(pk=archive.pk).exists()


def test_deleting_several_targets_with_jobs_explains_it_too(admin_client, archive):
    other = FolderTarget.objects.create(name="Unused", path="/u")
    make_job(archive, State.FAILED)

    response = admin_client.post(
        TARGETS,
        {"action": "delete_selected", "_selected_action": [archive.pk, other.pk]},
    )

    html = response.content.decode()
    assert "A target with dispatch jobs cannot be deleted" in html
    assert "Archive: <a" in html and "Unused:" not in html


def test_a_target_without_jobs_is_deleted_as_usual(admin_client, archive):
    url = reverse("admin:targets_target_delete", args=[archive.pk])
    assert "Are you sure" in admin_client.get(url).content.decode()
    admin_client.post(url, {"post": "yes"})
    assert not Target.objects.exists()


def test_a_job_made_by_the_services_counts_as_waiting(admin_client, archive, tmp_path):
    series = make_series(tmp_path / "in", 1)
    services.create_jobs(series.folder, [archive], enqueue_now=False)
    response = admin_client.get(TARGETS)
    (row,) = response.context["cl"].result_list
    assert row.waiting_jobs == 1 and row.last_send_state is None
