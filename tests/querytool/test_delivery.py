"""A retrieval to a store target is done only when its send jobs are.

Source: a local folder; destination: dcmtk's storescp, down at first (its port held,
so connections are refused), started later.
"""

from __future__ import annotations

import pytest
from django.urls import reverse

from dispatch.jobs import tasks as dispatch
from dispatch.jobs.models import Job, State
from querytool import services
from querytool import tasks as querytool_tasks
from querytool.models import RetrievalState
from targets.models import DicomTarget, DicomWebTarget
from tests.peers import StoreSCP, held_port

pytestmark = pytest.mark.django_db(transaction=True)


def row(client, job_id: int) -> dict:
    data = client.get(reverse("querytool:jobs_json"), {"ids": job_id}).json()
    (job,) = data["jobs"]
    return job


def test_a_retrieval_waits_for_its_send_jobs_and_shows_why_they_failed(
    client, staff, tmp_path, settings, query_studies
):
    settings.COURIER_SPOOL_DIR = tmp_path / "spool"
    folder = query_studies.copy_to(tmp_path / "archive")
    source = DicomWebTarget.objects.create(
        name="Archive", url=folder.as_uri(), direction="query"
    )
    peer = StoreSCP(tmp_path / "scp")
    held = held_port()  # down: connections are refused
    peer.port = held.getsockname()[1]
    pacs = DicomTarget.objects.create(
        name="PACS",
        host="127.0.0.1",
        port=peer.port,
        called_aet=peer.aet,
        retry_max_attempts=1,
    )
    facts = query_studies.by_accession("ACC001")
    (job,) = services.start_retrieval(
        source,
        [services.RetrieveItem(facts.study_uid, [], "DOE")],
        staff,
        destination=pacs,
    )
    job = querytool_tasks.run_retrieval(job.pk)
    assert job.state == RetrievalState.DONE and len(job.dispatch_jobs) == 2

    # The instances are in Courier, the send jobs are queued: not done yet.
    shown = row(client, job.pk)
    assert shown["state_label"] == "Sending to PACS" and not shown["finished"]
    assert "Sending to PACS: 0 of 5 instances delivered" in shown["message"]

    for send_id in job.dispatch_jobs:
        dispatch.run_job(send_id)
    shown = row(client, job.pk)
    assert shown["state_label"] == "Delivery failed" and shown["finished"]
    assert (
        f"2 of 2 series could not be sent to PACS: gave up after 1 attempt: "
        f"connection refused by 127.0.0.1:{peer.port}" in shown["message"]
    )
    page = client.get(reverse("querytool:query")).content.decode()
    assert "Delivery failed" in page and "connection refused by" in page
    assert f"{reverse('querytool:retry', args=[job.pk])}" in page

    # The PACS is back: Retry on the retrieval retries its failed send jobs.
    held.close()
    with peer:
        client.post(reverse("querytool:retry", args=[job.pk]))
        assert (
            Job.objects.filter(pk__in=job.dispatch_jobs, state=State.QUEUED).count()
            == 2
        )
        for send_id in job.dispatch_jobs:
            dispatch.run_job(send_id)
        assert len(peer.files()) == 5
    shown = row(client, job.pk)
    assert shown["state_label"] == "Done" and shown["finished"]
    assert shown["message"].endswith("Delivered to PACS.")
    attempts = Job.objects.get(pk=job.dispatch_jobs[0]).attempts
    assert list(attempts.values_list("number", flat=True)) == [1, 2]


def test_the_chosen_destination_stays_chosen_after_a_retrieval(
    client, staff, tmp_path, query_studies, immediate_huey, monkeypatch
):
    monkeypatch.setattr(querytool_tasks, "retrieve_task", lambda job_id: None)
    folder = query_studies.copy_to(tmp_path / "archive")
    source = DicomWebTarget.objects.create(
        name="Archive", url=folder.as_uri(), direction="query"
    )
    targets = [
        DicomTarget.objects.create(
            name=f"PACS-{i:04d}", host="127.0.0.1", port=104, called_aet="X"
        )
        for i in range(3)
    ]
    facts = query_studies.by_accession("ACC001")
    response = client.post(
        reverse("querytool:retrieve"),
        {
            "source": source.pk,
            "destination": targets[1].pk,
            "study": f"{facts.study_uid}|DOE, JOHN",
            "next": f"/query/?source={source.pk}&patient_id=P001",
        },
        follow=True,
    )
    body = response.content.decode()
    assert "Queued 1 retrieval." in body
    assert f'<option value="{targets[1].pk}" selected>' in body
    destination = body.split('id="id_destination">', 1)[1].split("</select>", 1)[0]
    assert destination.count(" selected>") == 1
