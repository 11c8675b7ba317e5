"""Sending a received series to a target chosen by hand on its admin page."""

from __future__ import annotations

import pytest
from django.urls import reverse

from dispatch.jobs.models import Job, State
from dispatch.routing import services as routing
from dispatch.routing.models import ReceivedSeries
from targets.models import FolderTarget
from tests.dicomgen import make_series

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_unrouted_series_is_sent_by_hand_to_a_chosen_target(
    admin_client, spool, tmp_path, immediate_huey
):
    out = tmp_path / "out"
    out.mkdir()
    archive = FolderTarget.objects.create(name="archive", path=str(out))
    FolderTarget.objects.create(name="query-only", path=str(out), direction="query")
    folder = spool / "incoming" / "s1"
    series = make_series(folder, 3, kind="mr")
    row = ReceivedSeries.objects.create(
        series_uid=series.series_uid,
        folder=str(folder),
        calling_aet="MR_1",
        called_aet="COURIER",
        instance_count=3,
        tags=routing.tags_summary(series.files[0]),
        state="complete",
    )
    routing.route_series(row.pk)
    row.refresh_from_db()
    assert row.state == "unrouted"
    page_url = reverse("admin:routing_receivedseries_change", args=[row.pk])
    page = admin_client.get(page_url).content.decode()
    assert 'id="send-by-hand"' in page
    assert f'<option value="{archive.pk}">archive (Folder)</option>' in page
    assert "query-only" not in page

    send_url = reverse("admin:routing_receivedseries_send", args=[row.pk])
    response = admin_client.post(send_url, {"target": archive.pk}, follow=True)
    body = response.content.decode()
    job = Job.objects.get()
    assert "Sending to archive: <a href=" in body and f"job {job.pk}</a>" in body
    assert job.state == State.DONE and job.source == "admin"
    assert (job.calling_aet, job.called_aet) == ("MR_1", "COURIER")
    assert len([p for p in out.rglob("*.dcm")]) == 3
    row.refresh_from_db()
    assert row.state == "routed" and row.note == "sent by hand to archive by admin"
    assert list(row.jobs.all()) == [job]

    # Sent already: a second send to the same target is refused in words.
    response = admin_client.post(send_url, {"target": archive.pk}, follow=True)
    assert Job.objects.count() == 1
    body = response.content.decode()
    assert "Not sent to archive:" in body
