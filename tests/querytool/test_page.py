"""The query page through Django's test client, against the loaded Orthanc."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.urls import reverse

from querytool import services, views
from querytool.models import AuditEntry, RetrievalJob, RetrievalState
from targets.models import DicomTarget, DicomWebTarget, FolderTarget
from tests.fixtures.query_peers import QR_PASSWORD, QR_USER
from tests.peers import free_port

pytestmark = pytest.mark.django_db

URL = "/query/"


@pytest.fixture
def pacs(query_orthanc) -> DicomTarget:
    return DicomTarget.objects.create(
        name="PACS",
        host="127.0.0.1",
        port=query_orthanc.dicom_port,
        called_aet=query_orthanc.aet,
        direction="query",
        # generous: a slow answer on a loaded machine is not an error here
        dimse_timeout=60,
        acse_timeout=30,
        connect_timeout=10,
    )


@pytest.fixture
def web(query_orthanc) -> DicomWebTarget:
    return DicomWebTarget.objects.create(
        name="Web",
        url=query_orthanc.dicomweb_url,
        auth="basic",
        username=QR_USER,
        password=QR_PASSWORD,
        direction="query",
    )


@pytest.fixture
def folder_target(tmp_path) -> FolderTarget:
    (tmp_path / "out").mkdir()
    return FolderTarget.objects.create(
        name="Out", path=str(tmp_path / "out"), direction="store"
    )


def search(client, source, **criteria):
    return client.get(URL, {"source": source.pk, **criteria})


def test_anonymous_and_non_staff_users_are_refused(client, django_user_model, pacs):
    assert client.get(URL).status_code == 302
    user = django_user_model.objects.create_user("visitor", password="pw")
    client.force_login(user)
    resp = search(client, pacs, patient_id="P001")
    assert resp.status_code == 302 and "/admin/login/" in resp["Location"]
    assert not AuditEntry.objects.exists()


def test_search_by_patient_id_lists_the_studies_and_audits(client, staff, pacs):
    resp = search(client, pacs, patient_id="P001")
    assert resp.status_code == 200
    body = resp.content.decode()
    assert "ACC001" in body and "ACC002" in body and "ACC003" not in body
    assert "1970-01-01" in body and "CT CHEST" in body
    # Names as people read them, in the table and in the retrieval's label.
    assert "DOE, JOHN" in body and "DOE^JOHN" not in body
    entry = AuditEntry.objects.get()
    assert (entry.username, entry.action, entry.source_name) == (
        "nurse",
        "search",
        "PACS",
    )
    assert entry.criteria == {"patient_id": "P001"} and entry.result_count == 2


def test_accession_list_reports_missing_ones_and_shows_the_rest(client, staff, web):
    resp = search(client, web, accessions=" ACC001,NOPE-1\nACC004  NOPE-2 ")
    body = resp.content.decode()
    assert "ACC001" in body and "ACC004" in body
    missing = body.split('id="missing-accessions"')[1].split("</div>")[0]
    assert "<li>NOPE-1</li>" in missing and "<li>NOPE-2</li>" in missing


def test_bad_input_gives_form_errors_not_a_500(client, staff, pacs):
    resp = search(
        client,
        pacs,
        date_from="2024-02-01",
        date_to="2024-01-01",
        study_uid="1.2.x",
        modality="C T",
    )
    assert resp.status_code == 200
    body = resp.content.decode()
    assert "The end date is before the start date." in body
    assert "A UID is digits separated by dots." in body
    assert "A modality is a short code" in body
    assert not AuditEntry.objects.exists()


def test_open_a_study_shows_its_series(client, staff, pacs, query_studies):
    facts = query_studies.by_accession("ACC001")
    resp = search(client, pacs, accessions="ACC001", study=facts.study_uid)
    body = resp.content.decode()
    assert 'id="series-table"' in body
    assert "CT CHEST series 1" in body and "CT CHEST series 2" in body
    assert AuditEntry.objects.filter(action="series", result_count=2).exists()


def test_sorting_and_paging(client, staff, web, monkeypatch):
    monkeypatch.setattr(views, "PAGE_SIZE", 2)
    resp = search(client, web, sort="accession")
    page = resp.context["page"]
    assert [s.accession for s in page.object_list] == ["ACC001", "ACC002"]
    assert page.paginator.num_pages == 3
    resp = search(client, web, sort="-accession", page=2)
    assert [s.accession for s in resp.context["page"].object_list] == [
        "ACC003",
        "ACC002",
    ]


def test_result_limit_shows_a_notice(client, staff, pacs, settings):
    settings.COURIER_QUERY_LIMIT = 2
    body = search(client, pacs).content.decode()
    assert 'id="more-results"' in body and "More results than shown" in body


def test_unreachable_source_is_shown_in_words(client, staff):
    dead = DicomTarget.objects.create(
        name="Dead",
        host="127.0.0.1",
        port=free_port(),
        called_aet="X",
        direction="query",
        connect_timeout=2,
    )
    body = search(client, dead, patient_id="P001").content.decode()
    assert "Source unreachable" in body
    assert AuditEntry.objects.get().ok is False


def test_qido_401_is_shown_in_words_without_the_password(client, staff, query_orthanc):
    bad = DicomWebTarget.objects.create(
        name="BadWeb",
        url=query_orthanc.dicomweb_url,
        auth="basic",
        username=QR_USER,
        password="not-the-password",
        direction="query",
    )
    body = search(client, bad).content.decode()
    assert "401: authentication failed" in body
    assert "not-the-password" not in body


def test_retrieve_a_study_by_c_get_to_a_folder_target(
    client,
    staff,
    pacs,
    folder_target,
    query_studies,
    courier_dirs,
    immediate_huey,
    django_capture_on_commit_callbacks,
):
    facts = query_studies.by_accession("ACC001")
    with django_capture_on_commit_callbacks(execute=True):
        resp = client.post(
            reverse("querytool:retrieve"),
            {
                "source": pacs.pk,
                "study": f"{facts.study_uid}|DOE^JOHN ACC001",
                "destination": folder_target.pk,
                "next": "/query/?x=1",
            },
        )
    assert resp.status_code == 302
    job = RetrievalJob.objects.get()
    assert job.state == RetrievalState.DONE, job.message
    assert (job.done, job.failed, job.total) == (5, 0, 5)
    assert len(job.dispatch_jobs) == 2
    delivered = list(Path(folder_target.path).rglob("*.dcm"))
    assert len(delivered) == 5
    entry = AuditEntry.objects.get(action="retrieve")
    assert facts.study_uid in str(entry.criteria) and "Out" in entry.detail


def test_retrieve_chosen_series_by_wado_to_the_download_folder(
    client,
    staff,
    web,
    query_studies,
    courier_dirs,
    immediate_huey,
    django_capture_on_commit_callbacks,
):
    facts = query_studies.by_accession("ACC001")
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            reverse("querytool:retrieve"),
            {
                "source": web.pk,
                "destination": "download",
                "series": [f"{facts.study_uid}|{facts.series_uids[1]}|DOE^JOHN"],
            },
        )
    job = RetrievalJob.objects.get()
    assert job.state == RetrievalState.DONE, job.message
    assert (job.done, job.total) == (2, 2)
    files = list((courier_dirs / "downloads").rglob("*.dcm"))
    assert len(files) == 2
    assert {f.parent.name for f in files} == {facts.series_uids[1]}


def test_retrieve_by_c_move_to_the_registered_destination(
    client,
    staff,
    pacs,
    query_studies,
    query_storescp,
    courier_dirs,
    immediate_huey,
    django_capture_on_commit_callbacks,
):
    query_storescp.clear()
    facts = query_studies.by_accession("ACC002")
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            reverse("querytool:retrieve"),
            {
                "source": pacs.pk,
                "destination": "move",
                "move_aet": "QRDEST",
                "study": f"{facts.study_uid}|x",
            },
        )
    job = RetrievalJob.objects.get()
    assert job.state == RetrievalState.DONE, job.message
    assert job.done == 2
    assert len(query_storescp.files()) == 2


def test_retrieve_without_a_choice_or_with_bad_move_aet_is_refused(client, staff, pacs):
    resp = client.post(
        reverse("querytool:retrieve"),
        {"source": pacs.pk, "destination": "download"},
        follow=True,
    )
    assert "Choose at least one study or series" in resp.content.decode()
    resp = client.post(
        reverse("querytool:retrieve"),
        {"source": pacs.pk, "destination": "move", "study": "1.2.3|x"},
        follow=True,
    )
    assert "Enter the AE title the source should send to." in resp.content.decode()
    assert not RetrievalJob.objects.exists()


def test_failed_retrieval_is_explained_and_can_be_retried(
    client,
    staff,
    pacs,
    courier_dirs,
    query_studies,
    immediate_huey,
    django_capture_on_commit_callbacks,
):
    facts = query_studies.by_accession("ACC004")
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            reverse("querytool:retrieve"),
            {
                "source": pacs.pk,
                "destination": "move",
                "move_aet": "NOBODY",
                "study": f"{facts.study_uid}|x",
            },
        )
    job = RetrievalJob.objects.get()
    assert job.state == RetrievalState.FAILED
    assert "C-MOVE refused" in job.message
    body = client.get(URL).content.decode()
    assert "C-MOVE refused" in body and "Retry" in body
    job.move_aet = "QRDEST"
    job.save()
    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("querytool:retry", args=[job.pk]))
    job.refresh_from_db()
    assert job.state == RetrievalState.DONE and job.attempts == 2


def test_cancel_a_queued_retrieval_and_poll_progress(client, staff, pacs):
    job = services.start_retrieval(
        pacs, [services.RetrieveItem("1.2.3", [], "x")], staff, download=True
    )[0]
    client.post(reverse("querytool:cancel", args=[job.pk]))
    job.refresh_from_db()
    assert job.state == RetrievalState.CANCELLED
    data = client.get(reverse("querytool:jobs_json"), {"ids": str(job.pk)}).json()
    assert data["jobs"][0]["state"] == "cancelled" and data["jobs"][0]["finished"]


def test_audit_log_is_read_only_in_the_admin(admin_client, pacs):
    services.audit(None, "search", pacs, criteria={"patient_id": "P1"}, result_count=0)
    resp = admin_client.get("/admin/querytool/auditentry/")
    assert resp.status_code == 200 and "PACS" in resp.content.decode()
    assert admin_client.get("/admin/querytool/auditentry/add/").status_code == 403


def test_next_pointing_elsewhere_is_ignored(client, staff, pacs):
    resp = client.post(
        reverse("querytool:retrieve"),
        {"source": pacs.pk, "destination": "download", "next": "//evil.example/"},
    )
    assert resp["Location"] == "/query/"


def test_cancel_of_a_running_job_asks_it_to_stop_or_ends_an_abandoned_one(
    client, staff, pacs
):
    from datetime import timedelta

    from django.utils import timezone

    live, dead = services.start_retrieval(
        pacs,
        [
            services.RetrieveItem("1.2.3", [], "a"),
            services.RetrieveItem("1.2.4", [], "b"),
        ],
        staff,
        download=True,
    )
    now = timezone.now()
    # The live one's worker renews its lease; the dead one's ran out an hour ago.
    RetrievalJob.objects.filter(pk=live.pk).update(
        state="running", lease_owner="w1", lease_expires_at=now + timedelta(seconds=15)
    )
    RetrievalJob.objects.filter(pk=dead.pk).update(
        state="running", lease_owner="w2", lease_expires_at=now - timedelta(hours=1)
    )
    for job in (live, dead):
        client.post(reverse("querytool:cancel", args=[job.pk]))
        job.refresh_from_db()
    assert (live.state, live.cancel_requested) == ("running", True)
    assert dead.state == "cancelled" and "stopped reporting" in dead.message


def test_local_folder_source_shows_its_index_and_rescans_on_demand(
    client, staff, query_studies, courier_dirs, tmp_path
):
    folder = query_studies.copy_to(tmp_path / "archive")
    (folder / "readme.txt").write_text("hello")
    source = DicomWebTarget.objects.create(
        name="Archive", url=f"file://{folder}", direction="query"
    )
    body = search(client, source, study_description="mr*").content.decode()
    assert "ACC002" in body and "ACC004" in body and "ACC001" not in body
    info = body.split('id="index-info"')[1].split("</p>")[0]
    assert f"{query_studies.instances} instances" in info and "1 file not DICOM" in info
    assert "readme.txt" in body
    (folder / "readme.txt").unlink()
    resp = client.post(reverse("querytool:reindex"), {"source": source.pk}, follow=True)
    assert "1 removed" in resp.content.decode()
    assert AuditEntry.objects.filter(action="index").exists()
