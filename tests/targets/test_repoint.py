"""Re-pointing a target never carries its stored secrets (or SSH pin) to the new place.

The attack: edit a DICOMweb target's URL to a server you run, leave the password
blank ("keep"), press Test, and read the password there. Here that server is a real
HTTP server on loopback recording every request's Authorization header.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.test import Client
from django.urls import reverse

from targets.forms import REPOINT_NOTE
from targets.models import DicomWebTarget, SftpTarget, Target

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

PASSWORD = "the-stored-password-1234"
TOKEN = "the-stored-token-5678"


class Listener:
    """An HTTP server that answers QIDO-like requests and records who asked."""

    def __init__(self):
        self.requests: list[tuple[str, str | None]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                listener.requests.append((self.path, self.headers.get("Authorization")))
                body = b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_OPTIONS = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    @property
    def credentials(self) -> list[str]:
        return [auth for _, auth in self.requests if auth]


@pytest.fixture
def listener() -> Iterator[Listener]:
    peer = Listener()
    thread = threading.Thread(target=peer.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        peer.server.shutdown()
        peer.server.server_close()


def change_url(target: Target) -> str:
    return reverse("admin:targets_target_change", args=[target.pk])


def press_test(client: Client, target: Target) -> None:
    client.post(reverse("admin:targets_target_test", args=[target.pk]))


def current_form_data(client: Client, url: str) -> dict:
    """What the browser posts back from the change page if nothing is touched."""
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


@pytest.fixture
def web() -> DicomWebTarget:
    # A real-looking original server that is not listening: only the listener
    # may ever receive a request in these tests.
    return DicomWebTarget.objects.create(
        name="PACS web",
        url="http://127.0.0.1:9/dicom-web",
        auth="basic",
        username="courier",
        password=PASSWORD,
        direction="both",
    )


def test_a_new_url_with_the_password_left_blank_never_sends_the_password(
    admin_client, web, listener
):
    data = current_form_data(admin_client, change_url(web))

    response = admin_client.post(change_url(web), {**data, "url": listener.url})
    press_test(admin_client, DicomWebTarget.objects.get(pk=web.pk))

    # The save is refused with the reason; nothing reached the listener.
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "cleared because the URL changed" in " ".join(errors["password"])
    web.refresh_from_db()
    assert web.url == "http://127.0.0.1:9/dicom-web" and web.password == PASSWORD
    assert listener.credentials == []
    assert PASSWORD not in response.content.decode()


def test_a_password_entered_again_in_the_same_save_is_kept_and_used(
    admin_client, web, listener
):
    data = current_form_data(admin_client, change_url(web))

    response = admin_client.post(
        change_url(web), {**data, "url": listener.url, "password_0": "typed-again"}
    )
    assert response.status_code == 302
    press_test(admin_client, web)

    web.refresh_from_db()
    assert web.url == listener.url and web.password == "typed-again"
    assert listener.credentials  # the listener works, and got what was typed
    assert all("typed-again" not in c for c in listener.credentials)  # base64
    import base64

    assert {base64.b64decode(c.split()[1]).decode() for c in listener.credentials} == {
        "courier:typed-again"
    }


def test_a_saved_repoint_drops_the_stored_token_and_says_so(admin_client, listener):
    # A token left stored while authentication is off: the save is valid, so the
    # target really moves, and Test really talks to the listener.
    web = DicomWebTarget.objects.create(
        name="Old web", url="http://127.0.0.1:9/rs", auth="none", token=TOKEN
    )
    data = current_form_data(admin_client, change_url(web))
    data["auth"] = "bearer"
    data["token_0"] = ""

    refused = admin_client.post(change_url(web), {**data, "url": listener.url})
    assert refused.status_code == 200  # bearer needs a token: it was cleared

    data["auth"] = "none"
    response = admin_client.post(
        change_url(web), {**data, "url": listener.url}, follow=True
    )
    press_test(admin_client, web)

    web.refresh_from_db()
    assert web.url == listener.url and web.token == ""
    assert "stored bearer token was cleared" in response.content.decode()
    assert listener.requests and listener.credentials == []


def test_an_edit_that_keeps_the_address_keeps_the_secrets(admin_client, web):
    data = current_form_data(admin_client, change_url(web))

    response = admin_client.post(change_url(web), {**data, "description": "moved"})

    assert response.status_code == 302
    web.refresh_from_db()
    assert web.password == PASSWORD and web.description == "moved"


def sftp_target() -> SftpTarget:
    target = SftpTarget.objects.create(
        name="Share",
        host="files.example.org",
        port=22,
        username="courier",
        path="incoming",
        password=PASSWORD,
        host_key="SHA256:" + "A" * 43,
        host_key_type="ssh-ed25519",
        host_key_data="AAAAC3NzaC1lZDI1NTE5AAAAIB",
    )
    return target


@pytest.mark.parametrize(
    "change",
    [{"host": "evil.example.org"}, {"port": "2222"}, {"username": "someone"}],
    ids=["host", "port", "username"],
)
def test_moving_an_ssh_target_clears_its_password_and_host_key_pin(
    admin_client, change
):
    target = sftp_target()
    data = current_form_data(admin_client, change_url(target))

    response = admin_client.post(change_url(target), {**data, **change}, follow=True)

    target.refresh_from_db()
    assert (target.password, target.host_key) == ("", "")
    assert (target.host_key_type, target.host_key_data) == ("", "")
    assert "were cleared" in response.content.decode()


def test_a_fingerprint_typed_in_the_same_save_as_a_new_host_is_kept(admin_client):
    target = sftp_target()
    data = current_form_data(admin_client, change_url(target))
    new_pin = "SHA256:" + "B" * 43

    admin_client.post(
        change_url(target),
        {**data, "host": "new.example.org", "host_key": new_pin, "password_0": "pw2"},
    )

    target.refresh_from_db()
    assert (target.host_key, target.password) == (new_pin, "pw2")
    # The stored key belonged to the old pin.
    assert (target.host_key_type, target.host_key_data) == ("", "")


def test_the_change_form_says_what_moving_a_target_does(admin_client, web):
    html = admin_client.get(change_url(web)).content.decode()
    assert REPOINT_NOTE in html
