"""The target form in the admin, through Django's test client: Test on the settings in
the form (saved or not), help text that cannot break the page, required fields,
kind-aware fields, tabs, and the overview's status column and search."""

from __future__ import annotations

import base64
import json
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.contrib.admin import site
from django.test import RequestFactory
from django.urls import reverse

from targets.admin import settings_under_test
from targets.models import (
    PROXIES,
    DicomWebTarget,
    FolderTarget,
    Kind,
    SftpTarget,
    Target,
)
from tests.targets.test_admin import (
    ADD,
    CHANGELIST,
    DICOM_FORM,
    change_url,
    current_form_data,
    folder_form,
    form_errors,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]


class Tags(HTMLParser):
    """The elements a browser's parser sees (raw text such as `<script>` in a help
    text opens a script element that swallows what follows, here as in Chromium)."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def named(self, tag: str) -> set[str]:
        return {a.get("name", "") for t, a in self.tags if t == tag}


# -- help text cannot break the form (defect 1) -----------------------------------------


@pytest.mark.parametrize("kind", list(PROXIES))
def test_every_kind_s_form_has_all_its_fields_and_save_buttons(admin_client, kind):
    for url in (
        f"{ADD}?kind={kind}",
        change_url(Target.objects.create(name=f"t-{kind}", kind=kind)),
    ):
        html = admin_client.get(url).content.decode()
        parsed = Tags(html)
        inputs = (
            parsed.named("input") | parsed.named("select") | parsed.named("textarea")
        )
        assert {"_save", "_continue", "_test"} <= inputs, url
        for field in PROXIES[kind].connection_fields + ("contact_email", "paused"):
            assert field in inputs or f"{field}_0" in inputs, (url, field)


def test_the_rsync_completion_script_help_is_shown_as_text(admin_client):
    html = admin_client.get(f"{ADD}?kind=rsync").content.decode()
    assert "&lt;script&gt; &lt;destination_folder&gt; &lt;target_name&gt;" in html
    assert "<script> <destination_folder>" not in html


def test_no_help_text_or_description_is_raw_html(admin_client):
    """Every help text the admin shows is plain text, escaped on the page."""
    from django.contrib import admin

    for model in admin.site._registry:
        for field in model._meta.get_fields():
            text = str(getattr(field, "help_text", "") or "")
            if any(c in text for c in "<>&"):
                assert model is Target, (model, field.name)  # the one escaped below
    html = admin_client.get(f"{ADD}?kind=rsync").content.decode()
    assert "Run from the target folder as &lt;script&gt;" in html


# -- Test runs on the settings in the form (defect 5) -----------------------------------


@pytest.fixture
def share(tmp_path) -> FolderTarget:
    (tmp_path / "good").mkdir()
    return FolderTarget.objects.create(name="Share", path=str(tmp_path / "good"))


def test_test_checks_the_edited_settings_and_saves_nothing(
    admin_client, share, tmp_path
):
    data = current_form_data(admin_client, change_url(share))
    missing = str(tmp_path / "missing")

    response = admin_client.post(
        change_url(share), {**data, "path": missing, "_test": "Test"}
    )

    assert response.status_code == 200  # the form again, not a redirect
    html = response.content.decode()
    assert (
        "Test of the settings in the form (not saved) failed: folder exists failed"
        in html
    )
    assert 'id="form-test-result"' in html and "does not exist" in html
    assert f'value="{missing}"' in html  # the edit is still in the form
    share.refresh_from_db()
    assert share.path == str(tmp_path / "good")
    assert share.last_test_at is None  # the last test is about the saved settings


def test_test_of_the_unchanged_form_is_the_stored_last_test(admin_client, share):
    data = current_form_data(admin_client, change_url(share))

    response = admin_client.post(change_url(share), {**data, "_test": "Test"})

    assert response.status_code == 302 and response.url == change_url(share)
    html = admin_client.get(response.url).content.decode()
    assert "Test of Share passed" in html
    share.refresh_from_db()
    assert share.last_test_ok is True


def test_a_new_target_can_be_tested_before_it_is_saved(admin_client, tmp_path):
    response = admin_client.post(
        f"{ADD}?kind=folder", {**folder_form(tmp_path), "_test": "Test"}
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "(not saved) passed" in html
    assert "<td>writable</td>" in html
    assert not Target.objects.exists()


def test_an_invalid_form_is_not_tested(admin_client, share):
    data = current_form_data(admin_client, change_url(share))
    response = admin_client.post(
        change_url(share), {**data, "path": "relative/path", "_test": "Test"}
    )
    html = response.content.decode()
    assert "Not tested: correct the errors below first." in html
    assert form_errors(response) == {
        "path": ["Enter an absolute path (starting with /)."]
    }
    assert 'id="form-test-result"' not in html


def test_a_user_who_may_only_view_cannot_test_the_form(
    django_user_model, share, tmp_path
):
    from django.contrib.auth.models import Permission
    from django.test import Client

    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_target"))
    client = Client()
    client.force_login(user)
    html = client.get(change_url(share)).content.decode()
    assert 'name="_test"' not in html and "target-test-button" not in html
    response = client.post(
        change_url(share), {"path": str(tmp_path), "name": "Share", "_test": "Test"}
    )
    assert response.status_code == 403
    share.refresh_from_db()
    assert share.last_test_at is None


class Recorder(ThreadingHTTPServer):
    """A stranger's HTTP server that answers anything and records the logins."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.logins: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _RecordingHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - stdlib name
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Basic "):
            self.server.logins.append(base64.b64decode(auth[6:]).decode())
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_OPTIONS = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def stranger():
    server = Recorder()
    yield server
    server.shutdown()
    server.server_close()


def test_a_test_of_a_new_address_never_sends_the_stored_password(
    admin_client, orthanc_auth, stranger
):
    target = DicomWebTarget.objects.create(
        name="PACS web",
        url=orthanc_auth.dicomweb_url,
        auth="basic",
        username="alice",
        password="s3cret",
    )
    url = change_url(target)
    data = {**current_form_data(admin_client, url), "_test": "Test"}

    # Same address, another setting: blank means "keep", and the real peer agrees.
    kept = admin_client.post(url, {**data, "request_timeout": "30"})
    assert "Test of the settings in the form (not saved) passed" in (
        kept.content.decode()
    )

    # Another address, password left blank: the stored one stays home.
    moved = admin_client.post(url, {**data, "url": stranger.url}).content.decode()
    assert all("s3cret" not in login for login in stranger.logins), stranger.logins
    assert (
        "the stored password was not used (the address changed)" in moved
        or "needs a password" in moved
    )

    # Typed again in the same form, it is used.
    admin_client.post(url, {**data, "url": stranger.url, "password_0": "again"})
    assert "alice:again" in stranger.logins
    target.refresh_from_db()
    assert target.url == orthanc_auth.dicomweb_url and target.password == "s3cret"


def test_a_test_of_a_new_host_leaves_the_pinned_host_key_out(admin_user):
    pin = "SHA256:" + "A" * 43
    target = SftpTarget.objects.create(
        name="Drop",
        host="files.example.org",
        port=22,
        username="courier",
        password="pw-kept",
        path="/incoming",
        host_key=pin,
    )
    request = RequestFactory().get("/")
    request.user = admin_user
    model_admin = site._registry[Target]
    obj = model_admin.get_object(request, str(target.pk))
    form_class = model_admin.get_form(request, obj, change=True)
    initial = form_class(instance=obj)
    data = {
        name: initial[name].value()
        for name in initial.fields
        if name not in initial.secret_fields and initial[name].value() is not None
    }
    data = {k: ("on" if v is True else v) for k, v in data.items() if v is not False}

    same = form_class({**data, "connect_timeout": "5"}, instance=obj)
    assert same.is_valid(), same.errors
    tested, notes = settings_under_test(same)
    assert (tested.host_key, tested.password, notes) == (pin, "pw-kept", [])

    obj = model_admin.get_object(request, str(target.pk))
    moved = form_class({**data, "host": "elsewhere.example.org"}, instance=obj)
    if moved.is_valid():  # (a form may also refuse to keep them at all)
        tested, notes = settings_under_test(moved)
        assert (tested.host_key, tested.password) == ("", "")
        assert any("host key" in n for n in notes)


# -- kind-aware forms ---------------------------------------------------------------


def test_required_fields_are_marked_and_a_missing_one_is_named_once(admin_client):
    html = admin_client.get(f"{ADD}?kind=dicom").content.decode()
    for field in ("host", "port", "called_aet"):
        assert f'<label class="required" for="id_{field}">' in html
    assert '<label for="id_calling_aet">' in html  # optional: not marked

    response = admin_client.post(f"{ADD}?kind=dicom", {**DICOM_FORM, "host": ""})
    assert form_errors(response) == {"host": ["A DICOM target needs a host."]}


def test_the_layout_field_shows_its_default_and_the_tags_it_can_use(admin_client):
    from targets.series import HEADER_TAGS

    html = admin_client.get(f"{ADD}?kind=folder").content.decode()
    assert 'value="{StudyInstanceUID}/{SeriesInstanceUID}"' in html
    assert "the default is {StudyInstanceUID}/{SeriesInstanceUID}" in html
    assert ", ".join(HEADER_TAGS) in html


def test_the_kind_chooser_says_a_file_url_makes_a_folder_a_query_source(admin_client):
    html = admin_client.get(ADD).content.decode()
    assert (
        "With a file:// URL instead, a local folder of DICOM files becomes a query"
        in (html)
    )


def test_the_dicomweb_form_carries_the_rules_for_a_local_folder(admin_client):
    response = admin_client.get(f"{ADD}?kind=dicomweb")
    html = response.content.decode()
    start = html.index('<script id="target-show-if" type="application/json">')
    rules = json.loads(
        html[html.index(">", start) + 1 : html.index("</script>", start)]
    )
    local = next(r for r in rules if r["not_prefix"] == "file://")
    assert local["when"] == "url"
    assert {"qido_prefix", "auth", "password", "verify_tls", "stow_batch_size"} <= set(
        local["fields"]
    )
    assert "url" not in local["fields"]


def test_connection_information_and_dispatch_are_tab_sections(admin_client, share):
    html = admin_client.get(change_url(share)).content.decode()
    # Connection, Information, Query tool (who may export here), Dispatch.
    assert html.count('<fieldset class="module aligned target-tab"') == 4
    assert "targets/target_admin.js" in html
    assert "whom to call when this target has a problem" in html


# -- the overview ------------------------------------------------------------------------


def test_the_overview_shows_paused_and_disabled_and_filters_by_them(admin_client):
    FolderTarget.objects.create(name="Active", path="/a")
    FolderTarget.objects.create(name="Paused", path="/b", paused=True)
    FolderTarget.objects.create(name="Off", path="/c", enabled=False)

    html = admin_client.get(CHANGELIST).content.decode()
    for state in ("active", "paused", "disabled"):
        assert f'class="target-status-{state}"' in html
    for state, names in (
        ("active", ["Active"]),
        ("paused", ["Paused"]),
        ("disabled", ["Off"]),
    ):
        found = admin_client.get(CHANGELIST, {"status": state})
        assert [t.name for t in found.context["cl"].result_list] == names


def test_the_overview_search_finds_contact_and_description(admin_client):
    FolderTarget.objects.create(
        name="Research",
        path="/r",
        contact_email="imaging-it@hospital.example",
        description="Share of the cardiology research group",
    )
    FolderTarget.objects.create(name="Other", path="/o")
    for q in ("imaging-it@", "cardiology"):
        found = admin_client.get(CHANGELIST, {"q": q})
        assert [t.name for t in found.context["cl"].result_list] == ["Research"]


def test_the_kind_hint_of_each_kind_is_shown(admin_client):
    html = admin_client.get(reverse("admin:targets_target_add")).content.decode()
    for kind in Kind:
        assert f'data-kind="{kind.value}"' in html
