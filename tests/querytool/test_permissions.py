"""The query page needs real permissions, not staff status; refusals are audited.

Permissions: search (querytool.search_sources), retrieve (querytool.retrieve_studies)
and export to any target (querytool.export_to_any_target), or a target's own
"groups that may export here".
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.urls import reverse

from querytool.models import AuditAction, AuditEntry, RetrievalJob, RetrievalState
from targets.models import DicomTarget, FolderTarget

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

URL = "/query/"


def perms(*codenames: str) -> list[Permission]:
    return list(
        Permission.objects.filter(
            content_type__app_label="querytool", codename__in=codenames
        )
    )


@pytest.fixture
def make_user(django_user_model):
    def make(name: str, *codenames: str, groups=()):
        user = django_user_model.objects.create_user(name, password="pw", is_staff=True)
        user.user_permissions.add(*perms(*codenames))
        user.groups.add(*groups)
        client = Client()
        client.force_login(user)
        return user, client

    return make


@pytest.fixture
def pacs(query_orthanc) -> DicomTarget:
    return DicomTarget.objects.create(
        name="PACS",
        host="127.0.0.1",
        port=query_orthanc.dicom_port,
        called_aet=query_orthanc.aet,
        direction="query",
        dimse_timeout=60,
    )


@pytest.fixture
def targets(tmp_path):
    made = []
    for name in ("Research", "Teaching"):
        (tmp_path / name).mkdir()
        made.append(
            FolderTarget.objects.create(
                name=name, path=str(tmp_path / name), direction="store"
            )
        )
    return made


def refusals() -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(action=AuditAction.REFUSED))


def retrieve_post(client, source, destination):
    return client.post(
        reverse("querytool:retrieve"),
        {"source": source.pk, "study": "1.2.3|x", "destination": destination},
    )


def test_a_staff_user_without_permissions_is_refused_everywhere_and_audited(
    make_user, pacs, targets
):
    user, client = make_user("clerk")
    job = RetrievalJob.objects.create(
        source=pacs, source_name="PACS", study_uid="1.2.3", download=True
    )

    answers = [
        client.get(URL),
        client.get(f"{URL}?source={pacs.pk}&patient_id=P001"),
        retrieve_post(client, pacs, "download"),
        client.post(reverse("querytool:reindex"), {"source": pacs.pk}),
        client.get(reverse("querytool:jobs_json")),
        client.post(reverse("querytool:cancel", args=[job.pk])),
        client.post(reverse("querytool:retry", args=[job.pk])),
    ]

    assert [r.status_code for r in answers] == [403] * 7
    entries = refusals()
    assert len(entries) == 7
    assert {e.user_id for e in entries} == {user.pk}
    assert all(not e.ok and e.detail.startswith("refused:") for e in entries)
    assert not AuditEntry.objects.exclude(action=AuditAction.REFUSED).exists()
    assert RetrievalJob.objects.get().state == RetrievalState.QUEUED


def test_search_alone_shows_results_but_no_retrieve_and_refuses_a_crafted_post(
    make_user, pacs, targets
):
    _, client = make_user("reader", "search_sources")

    page = client.get(f"{URL}?source={pacs.pk}&patient_id=P001")
    refused = retrieve_post(client, pacs, "download")

    assert page.status_code == 200
    html = page.content.decode()
    assert "DOE, JOHN" in html
    assert 'id="no-retrieve"' in html and 'id="retrieve-button"' not in html
    assert refused.status_code == 403
    [entry] = refusals()
    assert entry.detail == "refused: retrieve studies"
    assert not RetrievalJob.objects.exists()


def test_exports_go_only_to_targets_granted_to_the_users_group(
    make_user, pacs, targets
):
    research, teaching = targets
    radiology = Group.objects.create(name="Radiology")
    research.export_groups.add(radiology)
    _, client = make_user(
        "radiologist", "search_sources", "retrieve_studies", groups=[radiology]
    )

    page = client.get(f"{URL}?source={pacs.pk}&patient_id=P001").content.decode()
    allowed = retrieve_post(client, pacs, research.pk)
    download = retrieve_post(client, pacs, "download")
    refused = retrieve_post(client, pacs, teaching.pk)

    assert f'value="{research.pk}"' in page and f'value="{teaching.pk}"' not in page
    assert (allowed.status_code, download.status_code) == (302, 302)
    assert refused.status_code == 403
    assert [j.destination_label for j in RetrievalJob.objects.order_by("pk")] == [
        "Research",
        "download folder",
    ]
    [entry] = refusals()
    assert entry.detail == "refused: export to Teaching" and entry.source == pacs


def test_export_to_any_target_allows_every_store_target(make_user, pacs, targets):
    _, client = make_user(
        "lead", "search_sources", "retrieve_studies", "export_to_any_target"
    )
    for target in targets:
        assert retrieve_post(client, pacs, target.pk).status_code == 302
    assert RetrievalJob.objects.count() == 2 and not refusals()


def test_retrying_someone_elses_job_to_a_target_you_may_not_use_is_refused(
    make_user, pacs, targets
):
    research, teaching = targets
    _, client = make_user("other", "search_sources", "retrieve_studies")
    job = RetrievalJob.objects.create(
        source=pacs,
        source_name="PACS",
        study_uid="1.2.3",
        destination=teaching,
        destination_name="Teaching",
        state=RetrievalState.FAILED,
    )

    response = client.post(reverse("querytool:retry", args=[job.pk]))

    assert response.status_code == 403
    job.refresh_from_db()
    assert job.state == RetrievalState.FAILED
    assert refusals()[0].detail == "refused: export to Teaching"


def test_the_permissions_and_grants_are_in_the_admin(admin_client, targets):
    group = Group.objects.create(name="Radiology")
    group_page = admin_client.get(
        reverse("admin:auth_group_change", args=[group.pk])
    ).content.decode()
    target_page = admin_client.get(
        reverse("admin:targets_target_change", args=[targets[0].pk])
    ).content.decode()

    for label in (
        "Can search query sources and open studies",
        "Can retrieve studies",
        "Can export retrieved studies to any target",
    ):
        assert label in group_page
    assert "groups that may export here" in target_page.lower()
    assert 'name="export_groups"' in target_page
    refused = admin_client.get("/admin/querytool/auditentry/?action__exact=refused")
    assert refused.status_code == 200


def test_the_admin_header_links_to_the_query_page_only_for_searchers(make_user):
    _, plain = make_user("plain")
    _, searcher = make_user("searcher", "search_sources")
    index = reverse("admin:index")
    assert f'href="{URL}"' not in plain.get(index).content.decode()
    assert f'href="{URL}"' in searcher.get(index).content.decode()
