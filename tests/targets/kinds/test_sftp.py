"""SFTP targets against a real OpenSSH sshd on loopback (tests/fixtures/ssh_s3_peers.py)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from targets.kinds.base import PRESENT, SENT, TargetError
from targets.models import SftpTarget
from targets.series import scan_folder
from targets.ssh import pin_host_key
from tests.dicomgen import make_series
from tests.fixtures.ssh_s3_peers import Sshd, chown_to

pytestmark = pytest.mark.django_db


@pytest.fixture
def generated(tmp_path):
    return make_series(tmp_path / "src", 5)


@pytest.fixture
def make_target(sshd):
    def make(**fields) -> SftpTarget:
        values = {
            "name": f"sftp-{uuid.uuid4().hex[:8]}",
            "host": "127.0.0.1",
            "port": sshd.port,
            "username": sshd.key_user,
            "private_key_path": str(sshd.client_key),
            "path": f"incoming-{uuid.uuid4().hex[:8]}",
            "write_complete_marker": True,
        }
        values.update(fields)
        pin = values.pop("pin", True)
        target = SftpTarget.objects.create(**values)
        if pin:
            pin_host_key(target, sshd.host_key_fingerprint)
        return target

    return make


def series_dir(sshd: Sshd, user: str, target: SftpTarget, generated) -> Path:
    return sshd.home(user) / target.path / generated.study_uid / generated.series_uid


def test_it_uploads_each_instance_into_the_layout_folder_then_a_complete_marker(
    sshd, make_target, generated
):
    target = make_target()
    seen = []
    result = target.handler.send(scan_folder(generated.folder), progress=seen.append)

    assert [o.status for o in result.outcomes] == [SENT] * 5
    assert len(seen) == 5
    folder = series_dir(sshd, sshd.key_user, target, generated)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([f"{uid}.dcm" for uid in generated.sop_uids] + [".complete"])
    for path, uid in zip(generated.files, generated.sop_uids, strict=True):
        assert (folder / f"{uid}.dcm").read_bytes() == path.read_bytes()


def test_a_retry_uploads_only_missing_or_truncated_files(sshd, make_target, generated):
    target = make_target()
    target.handler.send(scan_folder(generated.folder))
    folder = series_dir(sshd, sshd.key_user, target, generated)
    (folder / f"{generated.sop_uids[0]}.dcm").unlink()
    truncated = folder / f"{generated.sop_uids[1]}.dcm"
    truncated.write_bytes(truncated.read_bytes()[:100])

    result = target.handler.send(scan_folder(generated.folder))

    by_uid = {o.sop_instance_uid: o.status for o in result.outcomes}
    assert by_uid[generated.sop_uids[0]] == SENT
    assert by_uid[generated.sop_uids[1]] == SENT
    assert [by_uid[u] for u in generated.sop_uids[2:]] == [PRESENT] * 3
    assert truncated.read_bytes() == generated.files[1].read_bytes()
    assert not [p for p in folder.iterdir() if p.name.startswith(".courier-part")]


def test_password_login_works(sshd, make_target, generated):
    target = make_target(
        username=sshd.password_user, private_key_path="", password=sshd.password
    )
    result = target.handler.send(scan_folder(generated.folder))
    assert result.sent == 5
    assert (
        len(list(series_dir(sshd, sshd.password_user, target, generated).glob("*.dcm")))
        == 5
    )


def test_a_wrong_password_fails_permanently_with_authentication_failed(
    sshd, make_target, generated, caplog
):
    caplog.set_level(logging.DEBUG)
    secret = "not-the-password-" + uuid.uuid4().hex
    target = make_target(
        username=sshd.password_user, private_key_path="", password=secret
    )

    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))
    result = target.handler.test()

    assert raised.value.permanent
    assert "authentication failed" in raised.value.message
    login = next(c for c in result.checks if c.name == "login")
    assert not login.ok and "authentication failed" in login.message
    assert secret not in raised.value.message
    assert secret not in str(result.as_dict())
    assert secret not in caplog.text


def test_the_exclusion_filter_skips_matching_files(sshd, make_target, generated):
    target = make_target(exclude="CT00001.dcm, *00005.dcm")
    result = target.handler.send(scan_folder(generated.folder))
    assert result.sent == 3
    assert (
        len(list(series_dir(sshd, sshd.key_user, target, generated).glob("*.dcm"))) == 3
    )


def test_test_shows_the_host_key_and_passes_every_check_when_pinned(sshd, make_target):
    target = make_target()
    folder = sshd.home(sshd.key_user) / target.path
    folder.mkdir()
    chown_to(folder, sshd.key_user)

    result = target.handler.test()

    assert result.ok, result.as_dict()
    assert [c.name for c in result.checks] == [
        "TCP connect",
        "SSH handshake and host key",
        "login",
        "folder exists and is writable",
    ]
    details = result.checks[1].details
    assert details["host_key_fingerprint"] == sshd.host_key_fingerprint
    assert details["host_key_type"] == "ssh-ed25519"
    assert not list((sshd.home(sshd.key_user) / target.path).iterdir())


def test_test_reports_a_missing_or_unwritable_folder(sshd, make_target):
    missing = make_target().handler.test()
    unwritable = make_target(path="/").handler.test()

    assert "does not exist" in missing.checks[-1].message
    assert not unwritable.ok
    assert "permission denied" in unwritable.checks[-1].message.lower()


def test_an_unpinned_host_key_refuses_sending_until_trusted_from_test(
    sshd, make_target, generated
):
    target = make_target(pin=False)

    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))
    assert raised.value.permanent
    assert "not pinned" in raised.value.message
    assert sshd.host_key_fingerprint in raised.value.message
    assert '"Trust host key" beside the Test result' in raised.value.message

    result = target.handler.test()
    handshake = result.checks[1]
    assert not handshake.ok and "not pinned" in handshake.message
    assert handshake.details["host_key_fingerprint"] == sshd.host_key_fingerprint
    # What "Trust host key" does with the Test result.
    target.last_test_result = result.as_dict()
    target.save()
    pin_host_key(target, handshake.details["host_key_fingerprint"])

    target.refresh_from_db()
    assert target.host_key == sshd.host_key_fingerprint
    assert target.handler.send(scan_folder(generated.folder)).sent == 5


def test_a_changed_host_key_fails_the_send_permanently_saying_so(tmp_path, generated):
    server = Sshd(tmp_path / "sshd")
    with server:
        target = SftpTarget.objects.create(
            name="rekeyed",
            host="127.0.0.1",
            port=server.port,
            username=server.key_user,
            private_key_path=str(server.client_key),
            path="incoming-rekeyed",
        )
        pinned = pin_host_key(target, server.host_key_fingerprint).fingerprint
        server.rekey()

        with pytest.raises(TargetError) as raised:
            target.handler.send(scan_folder(generated.folder))
        result = target.handler.test()

    assert raised.value.permanent
    assert "host key mismatch" in raised.value.message
    assert pinned in raised.value.message
    assert server.host_key_fingerprint in raised.value.message
    assert not result.ok
    assert "host key mismatch" in result.checks[1].message


def test_test_on_a_closed_port_returns_a_failed_check(make_target):
    from tests.peers import free_port

    target = make_target(port=free_port(), pin=False, connect_timeout=2)
    result = target.handler.test()
    assert not result.ok
    assert result.checks[0].name == "TCP connect"
    assert "connection refused" in result.checks[0].message


def test_the_admin_trust_action_pins_the_key_the_test_showed(
    sshd, make_target, admin_client
):
    from django.urls import reverse

    target = make_target(pin=False)
    admin_client.post(reverse("admin:targets_target_test", args=[target.pk]))
    changelist = reverse("admin:targets_target_changelist")

    response = admin_client.post(
        changelist,
        {"action": "trust_host_key", "_selected_action": [target.pk]},
        follow=True,
    )

    target.refresh_from_db()
    assert target.host_key == sshd.host_key_fingerprint
    assert (target.host_key_type, target.host_key_data) == sshd.host_key_public()
    assert f"pinned host key {sshd.host_key_fingerprint}" in response.content.decode()


def test_pinning_after_an_edit_checks_the_key_the_server_presents_now(
    sshd, make_target
):
    from datetime import timedelta

    from django.utils import timezone

    from targets.kinds.base import Check, CheckReport
    from targets.ssh import HostKey

    other = HostKey("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIB" + "A" * 42)
    target = make_target(pin=False)
    # A Test of another server, then the host was edited.
    target.last_test_result = CheckReport(
        checks=[Check("SSH handshake and host key", False, details=other.details())]
    ).as_dict()
    target.last_test_at = timezone.now() - timedelta(minutes=5)
    target.save()

    with pytest.raises(TargetError) as raised:
        pin_host_key(target, other.fingerprint)

    assert f"now presents {sshd.host_key_fingerprint}" in raised.value.message
    target.refresh_from_db()
    assert target.host_key == ""


def test_a_folder_the_user_cannot_create_fails_permanently_in_words(
    make_target, generated
):
    target = make_target(path="/courier-not-allowed-here")
    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))
    assert raised.value.permanent
    assert raised.value.message.startswith("permission denied while creating folder")


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        (
            {"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nZ2FyYmFnZQ==\n"},
            "private_key",
            "cannot be read",
        ),
        (
            {"private_key_path": "/nonexistent/id_ed25519"},
            "private_key_path",
            "not found",
        ),
        ({"private_key_path": "keys/id_ed25519"}, "private_key_path", "absolute"),
        ({"host_key": "MD5:aa:bb"}, "host_key", "SHA256 fingerprint"),
    ],
    ids=["garbage-key", "missing-key-file", "relative-key-path", "bad-fingerprint"],
)
def test_bad_ssh_settings_are_form_errors(fields, field, words):
    from django.core.exceptions import ValidationError

    target = SftpTarget(
        name="x", host="h.example.org", username="u", path="in", **fields
    )
    with pytest.raises(ValidationError) as raised:
        target.clean()
    message = " ".join(raised.value.message_dict[field])
    assert words in message
    assert "Z2FyYmFnZQ" not in message


def test_an_encrypted_key_without_its_passphrase_is_a_form_error(tmp_path):
    import subprocess

    from django.core.exceptions import ValidationError

    key = tmp_path / "id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret phrase", "-f", str(key)],
        check=True,
    )
    target = SftpTarget(
        name="x",
        host="h.example.org",
        username="u",
        path="in",
        private_key_path=str(key),
    )
    with pytest.raises(ValidationError) as raised:
        target.clean()
    assert "set its passphrase" in raised.value.message_dict["private_key_path"][0]

    target.key_passphrase = "secret phrase"
    target.clean()
    assert target.port == 22
