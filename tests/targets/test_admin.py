"""Targets in the admin through Django's test client: overview, add flow per kind,
form validation, the Test button and action, write-only secrets; plus the test
service and the `test_target` command they share."""

from __future__ import annotations

import logging
import re
import socket

import pytest
from django.contrib.auth.models import Permission, User
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from targets.kinds.folder.handler import FolderHandler
from targets.models import (
    PROXIES,
    DicomTarget,
    DicomWebTarget,
    FolderTarget,
    S3Target,
    Target,
)
from targets.services import run_test

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

CHANGELIST = reverse("admin:targets_target_changelist")
ADD = reverse("admin:targets_target_add")

# What the add form posts besides the kind's own settings (the admin's defaults).
COMMON = {
    "direction": "store",
    "enabled": "on",
    "contact_email": "",
    "description": "",
    "max_connections": "1",
    "retry_max_attempts": "10",
    "retry_base_delay": "30",
    "retry_max_delay": "3600",
}

DICOM_FORM = {
    **COMMON,
    "name": "PACS",
    "host": "127.0.0.1",
    "port": "104",
    "called_aet": "PACS",
    "calling_aet": "COURIER",
    "connect_timeout": "10",
    "acse_timeout": "30",
    "dimse_timeout": "30",
    "max_pdu": "131072",
}


def folder_form(path, **overrides) -> dict:
    return {
        **COMMON,
        "name": "Research share",
        "path": str(path),
        "layout": "{StudyInstanceUID}/{SeriesInstanceUID}",
        "exclude": "",
        **overrides,
    }


def change_url(target: Target) -> str:
    return reverse("admin:targets_target_change", args=[target.pk])


def url_of_test(target: Target) -> str:
    return reverse("admin:targets_target_test", args=[target.pk])


def form_errors(response) -> dict[str, list[str]]:
    form = response.context["adminform"].form
    return {k: list(v) for k, v in form.errors.items()}


@pytest.fixture
def folder_target(tmp_path) -> FolderTarget:
    return FolderTarget.objects.create(name="Share", path=str(tmp_path))


@pytest.fixture
def dicom_target() -> DicomTarget:
    return DicomTarget.objects.create(
        name="Archive", host="pacs.example.org", port=11112, called_aet="ARCHIVE"
    )


# -- overview ------------------------------------------------------------------------


def test_the_overview_lists_name_kind_direction_address_and_last_test(
    admin_client, folder_target, dicom_target
):
    run_test(folder_target)

    html = admin_client.get(CHANGELIST).content.decode()

    assert "Share" in html and "Archive" in html
    assert "pacs.example.org:11112 ARCHIVE" in html
    assert folder_target.path in html
    assert 'class="test-ok"' in html
    assert "never" in html  # the DICOM target was never tested
    assert ">Folder<" in html and ">DICOM<" in html


def test_a_failed_last_test_is_shown_as_failed(admin_client, tmp_path):
    target = FolderTarget.objects.create(name="Gone", path=str(tmp_path / "missing"))
    run_test(target)
    html = admin_client.get(CHANGELIST).content.decode()
    assert 'class="test-failed"' in html
    assert "does not exist" in html  # the summary, as the title of the badge


def test_the_overview_searches_addresses_and_filters_by_kind(
    admin_client, folder_target, dicom_target
):
    found = admin_client.get(CHANGELIST, {"q": "pacs.example"})
    assert [t.name for t in found.context["cl"].result_list] == ["Archive"]
    found = admin_client.get(CHANGELIST, {"q": "ARCHIVE"})
    assert [t.name for t in found.context["cl"].result_list] == ["Archive"]
    found = admin_client.get(CHANGELIST, {"q": folder_target.path})
    assert [t.name for t in found.context["cl"].result_list] == ["Share"]
    found = admin_client.get(CHANGELIST, {"kind__exact": "folder"})
    assert [t.name for t in found.context["cl"].result_list] == ["Share"]
    found = admin_client.get(CHANGELIST, {"direction__exact": "query"})
    assert list(found.context["cl"].result_list) == []


# -- add flow ------------------------------------------------------------------------


def test_add_asks_for_the_kind_first(admin_client):
    response = admin_client.get(ADD)
    assert response.status_code == 200
    html = response.content.decode()
    for kind in PROXIES:
        assert f'data-kind="{kind}"' in html
        assert f"?kind={kind}" in html
    assert 'name="host"' not in html


@pytest.mark.parametrize("kind", list(PROXIES))
def test_each_kind_has_its_own_add_form(admin_client, kind):
    response = admin_client.get(ADD, {"kind": kind})
    assert response.status_code == 200
    html = response.content.decode()
    form = response.context["adminform"].form
    assert form._meta.model is PROXIES[kind]
    for field in PROXIES[kind].connection_fields:
        assert f'name="{field}' in html, field
    for legend in ("Connection", "Information", "Dispatch"):
        assert legend in html


def test_an_unknown_kind_shows_the_chooser_again(admin_client):
    response = admin_client.get(ADD, {"kind": "carrier-pigeon"})
    assert response.status_code == 200
    assert "choose its kind" in response.content.decode()


def test_adding_a_dicom_target(admin_client):
    response = admin_client.post(f"{ADD}?kind=dicom", DICOM_FORM)

    assert response.status_code == 302, form_errors(response)
    target = Target.objects.get(name="PACS")
    assert target.kind == "dicom"
    assert (target.host, target.port, target.called_aet) == ("127.0.0.1", 104, "PACS")
    assert response["Location"] == CHANGELIST


def test_adding_a_folder_target(admin_client, tmp_path):
    response = admin_client.post(
        f"{ADD}?kind=folder",
        folder_form(tmp_path, exclude="*.png, *.json", write_complete_marker="on"),
    )

    assert response.status_code == 302, form_errors(response)
    target = Target.objects.get(name="Research share")
    assert target.kind == "folder"
    assert target.exclude == "*.png, *.json"
    assert target.write_complete_marker is True


def test_the_labels_use_mercure_words_for_ae_titles(admin_client):
    html = admin_client.get(ADD, {"kind": "dicom"}).content.decode()
    assert "Target AET" in html and "Source AET" in html


@pytest.mark.parametrize(
    ("kind", "changes", "field", "words"),
    [
        ("dicom", {"called_aet": "BAD\\AET"}, "called_aet", "backslash"),
        ("dicom", {"called_aet": "A" * 17}, "called_aet", "16 characters"),
        ("dicom", {"port": "70000"}, "port", "65535"),
        ("dicom", {"port": "http"}, "port", "whole number"),
        ("dicom", {"host": "bad host!"}, "host", "host name"),
        ("dicom", {"host": ""}, "host", "needs a host"),
        ("folder", {"direction": "query"}, "direction", "only be stored to"),
        ("folder", {"path": "relative/folder"}, "path", "absolute path"),
        ("folder", {"layout": "{StudyInstanceUID/x"}, "layout", "in braces"),
        ("folder", {"layout": "{PatientsName}"}, "layout", "Unknown layout tag"),
        ("folder", {"layout": "../{PatientID}"}, "layout", ". or .."),
        ("folder", {"path": ""}, "path", "needs a folder"),
    ],
)
def test_bad_settings_are_form_errors(
    admin_client, tmp_path, kind, changes, field, words
):
    data = DICOM_FORM if kind == "dicom" else folder_form(tmp_path)
    response = admin_client.post(f"{ADD}?kind={kind}", {**data, **changes})

    assert response.status_code == 200
    errors = form_errors(response)
    assert field in errors, errors
    assert any(words in message for message in errors[field]), errors
    assert not Target.objects.exists()


def test_a_model_error_for_a_field_not_on_the_form_is_still_a_form_error(
    admin_client, tmp_path, monkeypatch
):
    def clean(self):
        raise ValidationError({"bucket": "not for folders"})

    monkeypatch.setattr(FolderTarget, "clean", clean)
    response = admin_client.post(f"{ADD}?kind=folder", folder_form(tmp_path))

    assert response.status_code == 200
    assert "Bucket: not for folders" in form_errors(response)["__all__"]


def test_a_crash_while_validating_is_a_form_error_not_a_server_error(
    admin_client, tmp_path, monkeypatch
):
    def clean(self):
        raise OSError("disk on fire")

    monkeypatch.setattr(FolderTarget, "clean", clean)
    response = admin_client.post(f"{ADD}?kind=folder", folder_form(tmp_path))

    assert response.status_code == 200
    assert "could not be checked (OSError)" in str(form_errors(response)["__all__"])
    assert not Target.objects.exists()


def test_a_name_that_differs_only_in_case_is_a_form_error(admin_client, tmp_path):
    FolderTarget.objects.create(name="Research Share", path=str(tmp_path))

    response = admin_client.post(
        f"{ADD}?kind=folder", folder_form(tmp_path, name="research SHARE")
    )

    assert response.status_code == 200
    assert any("already exists" in m for m in form_errors(response)["name"])
    assert Target.objects.count() == 1


def test_editing_keeps_the_kind_and_validates_with_its_rules(admin_client, tmp_path):
    target = FolderTarget.objects.create(name="Share", path=str(tmp_path))
    url = change_url(target)
    response = admin_client.post(
        url, {**folder_form(tmp_path, name="Share"), "path": "x"}
    )
    assert "path" in form_errors(response)

    response = admin_client.post(url, folder_form(tmp_path / "b", name="Share"))
    assert response.status_code == 302
    target.refresh_from_db()
    assert target.path == str(tmp_path / "b") and target.kind == "folder"


# -- Test button and action --------------------------------------------------------------


def test_the_test_button_is_on_the_change_page(admin_client, folder_target):
    html = admin_client.get(change_url(folder_target)).content.decode()
    # It submits the form itself (the settings as edited), not the saved target.
    assert re.search(r'<input type="submit" value="Test" name="_test"', html)
    assert 'id="target-test-button"' in html
    assert "Not tested yet" in html


def test_the_test_button_runs_the_checks_and_shows_them(admin_client, folder_target):
    response = admin_client.post(url_of_test(folder_target), follow=True)

    assert response.redirect_chain[-1][0] == change_url(folder_target)
    html = response.content.decode()
    assert f"Test of {folder_target.name} passed" in html
    for check in ("folder exists", "is a folder", "writable", "free space"):
        assert f"<td>{check}</td>" in html
    assert re.search(r"<td>[\d.]+ ms</td>", html)
    folder_target.refresh_from_db()
    assert folder_target.last_test_ok is True
    assert folder_target.last_test_at is not None
    assert len(folder_target.last_test_result["checks"]) == 4
    assert folder_target.last_test_result["host"] == socket.gethostname()
    assert f" on {socket.gethostname()}:" in html


def test_a_failing_test_is_reported_as_an_error(admin_client, tmp_path):
    target = FolderTarget.objects.create(name="Gone", path=str(tmp_path / "nope"))
    response = admin_client.post(url_of_test(target), follow=True)
    html = response.content.decode()
    assert "Test of Gone failed: folder exists failed" in html
    assert 'class="check-failed"' in html
    target.refresh_from_db()
    assert target.last_test_ok is False


def test_the_test_button_refuses_get(admin_client, folder_target):
    assert admin_client.get(url_of_test(folder_target)).status_code == 405
    folder_target.refresh_from_db()
    assert folder_target.last_test_at is None


def test_the_test_button_needs_a_csrf_token(admin_user, folder_target):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.post(url_of_test(folder_target)).status_code == 403
    folder_target.refresh_from_db()
    assert folder_target.last_test_at is None

    page = client.get(change_url(folder_target)).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = client.post(url_of_test(folder_target), {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    folder_target.refresh_from_db()
    assert folder_target.last_test_ok is True


@pytest.fixture
def viewer(django_user_model) -> Client:
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_target"))
    client = Client()
    client.force_login(user)
    return client


def test_a_staff_user_without_change_permission_cannot_test(viewer, folder_target):
    assert viewer.get(change_url(folder_target)).status_code == 200
    assert (
        "target-test-button"
        not in viewer.get(change_url(folder_target)).content.decode()
    )
    assert viewer.post(url_of_test(folder_target)).status_code == 403
    response = viewer.post(
        CHANGELIST, {"action": "test_selected", "_selected_action": [folder_target.pk]}
    )
    folder_target.refresh_from_db()
    assert folder_target.last_test_at is None
    assert response.status_code in (200, 302)


def test_anonymous_users_are_sent_to_the_login_page(client, folder_target):
    response = client.post(url_of_test(folder_target))
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_the_bulk_action_tests_every_selected_target(admin_client, tmp_path):
    good = FolderTarget.objects.create(name="Good", path=str(tmp_path))
    bad = FolderTarget.objects.create(name="Bad", path=str(tmp_path / "missing"))
    untouched = FolderTarget.objects.create(name="Other", path=str(tmp_path))

    response = admin_client.post(
        CHANGELIST,
        {"action": "test_selected", "_selected_action": [good.pk, bad.pk]},
        follow=True,
    )

    html = response.content.decode()
    assert "Test of Good passed" in html
    assert "Test of Bad failed" in html
    assert "Tested 2: 1 passed, 1 failed." in html
    good.refresh_from_db(), bad.refresh_from_db(), untouched.refresh_from_db()
    assert (good.last_test_ok, bad.last_test_ok) == (True, False)
    assert untouched.last_test_at is None


# -- secrets ----------------------------------------------------------------------------

SECRET = "s3cr3t-Value-never-shown"
S3_FORM = {
    **COMMON,
    "name": "Bucket",
    "bucket": "images",
    "region": "",
    "prefix": "",
    "endpoint_url": "http://127.0.0.1:9",
    "addressing_style": "path",
    "access_key_id": "courier",
    "storage_class": "",
    "server_side_encryption": "",
    "exclude": "",
}


@pytest.fixture
def s3_target() -> S3Target:
    return S3Target.objects.create(
        name="Bucket",
        bucket="images",
        access_key_id="courier",
        endpoint_url="http://127.0.0.1:9",
        secret_key=SECRET,
    )


def test_a_secret_is_never_rendered_only_whether_it_is_set(admin_client, s3_target):
    for url in (change_url(s3_target), CHANGELIST, f"{CHANGELIST}?q=Bucket"):
        html = admin_client.get(url).content.decode()
        assert SECRET not in html
    html = admin_client.get(change_url(s3_target)).content.decode()
    assert 'class="secret-status">set<' in html
    assert 'name="secret_key_1"' in html  # the "clear" checkbox


def test_a_secret_left_blank_keeps_its_value(admin_client, s3_target):
    response = admin_client.post(
        change_url(s3_target), {**S3_FORM, "region": "eu", "secret_key_0": ""}
    )
    assert response.status_code == 302, form_errors(response)
    s3_target.refresh_from_db()
    assert s3_target.region == "eu"
    assert s3_target.secret_key == SECRET


def current_form_data(client: Client, url: str) -> dict:
    """What the browser would post back unchanged from a change page."""
    form = client.get(url).context["adminform"].form
    data = {}
    for name in form.fields:
        if name in form.secret_fields:
            continue
        value = form[name].value()
        if isinstance(value, bool):
            if value:
                data[name] = "on"
        elif value is not None:
            data[name] = value
    return data


def test_a_view_only_user_sees_whether_a_secret_is_set_not_its_value(viewer, s3_target):
    html = viewer.get(change_url(s3_target)).content.decode()
    assert SECRET not in html
    assert "secret access key" in html.lower()
    assert ">set<" in html


def test_a_target_can_be_deleted_in_the_admin(admin_client, s3_target):
    url = reverse("admin:targets_target_delete", args=[s3_target.pk])
    assert SECRET not in admin_client.get(url).content.decode()
    response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 302
    assert not Target.objects.exists()


def test_a_secret_can_be_replaced(admin_client, s3_target):
    admin_client.post(change_url(s3_target), {**S3_FORM, "secret_key_0": "new-one"})
    s3_target.refresh_from_db()
    assert s3_target.secret_key == "new-one"


def test_a_secret_can_be_cleared(admin_client):
    target = DicomWebTarget.objects.create(
        name="Web", url="http://127.0.0.1:9/dicom-web", auth="none", token=SECRET
    )
    data = current_form_data(admin_client, change_url(target))

    response = admin_client.post(change_url(target), {**data, "token_1": "on"})

    assert response.status_code == 302, form_errors(response)
    target.refresh_from_db()
    assert target.token == ""
    html = admin_client.get(change_url(target)).content.decode()
    assert 'class="secret-status">not set<' in html


def test_clearing_a_secret_the_kind_needs_is_a_form_error(admin_client, s3_target):
    response = admin_client.post(
        change_url(s3_target), {**S3_FORM, "secret_key_1": "on"}
    )
    assert response.status_code == 200
    assert "secret_key" in form_errors(response)
    s3_target.refresh_from_db()
    assert s3_target.secret_key == SECRET


def test_a_secret_typed_into_an_invalid_form_is_not_echoed(admin_client):
    response = admin_client.post(
        f"{ADD}?kind=s3", {**S3_FORM, "bucket": "", "secret_key_0": SECRET}
    )
    assert response.status_code == 200
    assert "bucket" in form_errors(response)
    assert SECRET not in response.content.decode()


def test_a_secret_is_stored_encrypted(admin_client):
    response = admin_client.post(f"{ADD}?kind=s3", {**S3_FORM, "secret_key_0": SECRET})
    assert response.status_code == 302, form_errors(response)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT secret_key FROM targets_target")
        (stored,) = cursor.fetchone()
    assert SECRET not in stored and stored.startswith("fernet:")
    assert Target.objects.get().as_kind().secret_key == SECRET


# -- the test service and command -----------------------------------------------------


def test_an_unexpected_error_in_a_test_becomes_a_failed_check(
    folder_target, monkeypatch, caplog
):
    def explode(self):
        raise RuntimeError(f"boom with {SECRET}")

    monkeypatch.setattr(FolderHandler, "test", explode)
    with caplog.at_level(logging.INFO):
        result = run_test(folder_target)

    assert not result.ok
    assert result.checks[0].message.startswith("internal error: RuntimeError")
    assert SECRET not in caplog.text and "RuntimeError" in caplog.text
    folder_target.refresh_from_db()
    assert folder_target.last_test_ok is False
    assert SECRET not in str(folder_target.last_test_result)


def test_a_check_message_never_echoes_a_secret(s3_target, monkeypatch):
    from targets.kinds.base import CheckReport, TargetError

    def leaky(self):
        result = CheckReport()
        with result.check("login"):
            raise TargetError(f"rejected key {SECRET}")
        return result

    handler_class = type(s3_target.handler)
    monkeypatch.setattr(handler_class, "test", leaky)
    result = run_test(s3_target)
    assert SECRET not in result.checks[0].message
    assert "********" in result.checks[0].message


def test_the_test_writes_only_the_last_test_columns(folder_target):
    # An edit saved meanwhile (another admin tab) must survive the test.
    Target.objects.filter(pk=folder_target.pk).update(description="edited")
    run_test(folder_target)
    folder_target.refresh_from_db()
    assert folder_target.description == "edited"
    assert folder_target.last_test_ok is True


def test_the_command_prints_each_check(folder_target, capsys):
    call_command("test_target", "share")  # any case
    out = capsys.readouterr().out
    for check in ("folder exists", "is a folder", "writable", "free space"):
        assert check in out
    assert "Test of Share passed." in out


def test_the_command_fails_when_a_check_fails(tmp_path, capsys):
    FolderTarget.objects.create(name="Gone", path=str(tmp_path / "nope"))
    with pytest.raises(CommandError, match="Test of Gone failed: folder exists failed"):
        call_command("test_target", "Gone")
    assert "FAILED" in capsys.readouterr().out


def test_the_command_names_an_unknown_target(folder_target):
    with pytest.raises(
        CommandError, match="No target named 'nope'. Known targets: Share"
    ):
        call_command("test_target", "nope")


def test_users_need_a_login_for_the_chooser(client):
    assert client.get(ADD).status_code == 302
    assert User.objects.count() == 0


def test_dispatch_to_selected_targets_can_be_paused_and_resumed(
    admin_client, folder_target, dicom_target
):
    from dispatch.jobs.models import Job, State

    job = Job.objects.create(
        target=folder_target, folder="/x", source="admin", state=State.PAUSED
    )
    selected = [folder_target.pk, dicom_target.pk]

    response = admin_client.post(
        CHANGELIST,
        {"action": "pause_dispatch", "_selected_action": selected},
        follow=True,
    )
    assert "Paused dispatch to 2 target(s)" in response.content.decode()
    assert set(Target.objects.values_list("paused", flat=True)) == {True}

    response = admin_client.post(
        CHANGELIST,
        {"action": "resume_dispatch", "_selected_action": [folder_target.pk]},
        follow=True,
    )
    assert "Resumed dispatch to 1 target(s)" in response.content.decode()
    assert Target.objects.get(pk=folder_target.pk).paused is False
    assert Target.objects.get(pk=dicom_target.pk).paused is True
    job.refresh_from_db()
    assert job.state == State.QUEUED  # its waiting job goes out again


def test_the_pause_and_resume_actions_are_offered(admin_client, folder_target):
    body = admin_client.get(CHANGELIST).content.decode()
    assert "Pause dispatch to selected targets" in body
    assert "Resume dispatch to selected targets" in body


def test_the_admin_header_links_staff_to_the_query_page(admin_client):
    body = admin_client.get(reverse("admin:index")).content.decode()
    query = reverse("querytool:query")
    assert re.search(rf'<div id="user-tools">.*<a href="{query}">Query</a>', body, re.S)
    # Django's own header is still there.
    assert "Change password" in body and 'id="logout-form"' in body
    # Courier's name, not Django's; no "View site" (the Query link is the site).
    assert "<title>Status | Courier</title>" in body
    assert '<div id="site-name"><a href="/admin/">Courier</a></div>' in body
    assert "Django administration" not in body and "View site" not in body


def test_the_login_page_has_no_query_link(client):
    body = client.get(reverse("admin:login")).content.decode()
    assert reverse("querytool:query") not in body


def test_a_new_dicom_target_waits_10_s_for_a_response_unless_configured(settings):
    assert DicomTarget(name="a", host="h", called_aet="A").dimse_timeout == 10.0
    settings.COURIER_DIMSE_TIMEOUT = 4.0
    assert DicomTarget(name="b", host="h", called_aet="B").dimse_timeout == 4.0
