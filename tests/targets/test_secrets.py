"""Target secrets at rest: ciphertext in the database, hidden from repr, pages and logs,
and a wrong or missing encryption key is a start-up error (check courier.E001)."""

from __future__ import annotations

import logging
import uuid

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.urls import reverse

from targets.checks import check_encryption_key
from targets.models import RsyncTarget, S3Target, SftpTarget, Target
from targets.secrets import SecretKeyMismatch

pytestmark = pytest.mark.django_db

PASSWORD = "pw-" + uuid.uuid4().hex
SECRET_KEY = "sk-" + uuid.uuid4().hex
PASSPHRASE = "pp-" + uuid.uuid4().hex
PASTED_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key-"
    + uuid.uuid4().hex
    + "\n-----END OPENSSH PRIVATE KEY-----\n"
)
SECRETS = (PASSWORD, SECRET_KEY, PASSPHRASE, PASTED_KEY.splitlines()[1])


def make_targets() -> list[Target]:
    # Saved without clean(): the pasted key is not a real key, only a secret to hide.
    return [
        SftpTarget.objects.create(
            name="sftp secret",
            host="sftp.example.org",
            username="u",
            path="in",
            password=PASSWORD,
            private_key=PASTED_KEY,
            key_passphrase=PASSPHRASE,
        ),
        RsyncTarget.objects.create(
            name="rsync secret",
            host="rsync.example.org",
            username="u",
            path="in",
            password=PASSWORD,
        ),
        S3Target.objects.create(
            name="s3 secret",
            bucket="dicom",
            access_key_id="minio",
            secret_key=SECRET_KEY,
        ),
    ]


def raw_columns() -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT password, secret_key, key_passphrase, private_key "
            "FROM targets_target"
        )
        return repr(cursor.fetchall())


def test_secrets_are_stored_as_ciphertext():
    make_targets()
    stored = raw_columns()
    assert "fernet:" in stored
    for secret in SECRETS:
        assert secret not in stored


def test_secrets_read_back_decrypted_but_repr_hides_them():
    make_targets()
    target = SftpTarget.objects.get(name="sftp secret")
    assert target.password == PASSWORD
    assert target.key_passphrase == PASSPHRASE
    shown = repr(target.password) + repr(vars(target)) + repr(target)
    for secret in SECRETS:
        assert secret not in shown


def test_a_wrong_encryption_key_is_a_start_up_error(settings):
    make_targets()
    settings.COURIER_ENCRYPTION_KEY = "another-key-" + uuid.uuid4().hex

    errors = check_encryption_key(None)
    assert [e.id for e in errors] == ["courier.E001"]
    assert "cannot be decrypted" in errors[0].msg
    with pytest.raises(SystemCheckError, match="courier.E001"):
        call_command("check")
    with pytest.raises(SecretKeyMismatch):
        Target.objects.get(name="s3 secret")


def test_an_empty_encryption_key_is_a_start_up_error(settings):
    settings.COURIER_ENCRYPTION_KEY = ""
    assert [e.id for e in check_encryption_key(None)] == ["courier.E001"]
    with pytest.raises(SystemCheckError, match="COURIER_ENCRYPTION_KEY is empty"):
        call_command("check")


def test_the_right_key_passes_the_check():
    make_targets()
    assert check_encryption_key(None) == []


def test_no_secret_appears_in_the_admin_pages(admin_client, caplog):
    caplog.set_level(logging.DEBUG)
    targets = make_targets()
    pages = [admin_client.get(reverse("admin:targets_target_changelist"))]
    for target in targets:
        change = reverse("admin:targets_target_change", args=[target.pk])
        pages.append(admin_client.get(change))
        # A Test that fails (nothing listens there) must not echo a secret either.
        if target.kind == "s3":
            target.endpoint_url = "http://127.0.0.1:9"
            target.save()
        else:
            target.host, target.port, target.connect_timeout = "127.0.0.1", 9, 2
            target.save()
        test_url = reverse("admin:targets_target_test", args=[target.pk])
        pages.append(admin_client.post(test_url, follow=True))
    for response in pages:
        assert response.status_code == 200
        html = response.content.decode()
        for secret in SECRETS:
            assert secret not in html
    change_html = pages[1].content.decode()
    assert "secret-status" in change_html and ">set<" in change_html
    for secret in SECRETS:
        assert secret not in caplog.text


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_dumpdata_carries_only_ciphertext_and_loaddata_round_trips(tmp_path, fmt):
    from io import StringIO

    make_targets()
    out = StringIO()
    call_command("dumpdata", "targets.target", format=fmt, stdout=out)
    dumped = out.getvalue()
    assert "fernet:" in dumped
    for secret in SECRETS:
        assert secret not in dumped

    fixture = tmp_path / f"targets.{fmt}"
    fixture.write_text(dumped)
    Target.objects.all().delete()
    call_command("loaddata", str(fixture), stdout=StringIO())

    sftp = SftpTarget.objects.get(name="sftp secret")
    assert (sftp.password, sftp.key_passphrase) == (PASSWORD, PASSPHRASE)
    assert sftp.private_key == PASTED_KEY
    assert S3Target.objects.get(name="s3 secret").secret_key == SECRET_KEY
    # Stored encrypted once again, not as an encryption of the token.
    stored = raw_columns()
    for secret in SECRETS:
        assert secret not in stored
    assert "fernet:" in stored


def test_loaddata_with_another_key_fails_loudly(tmp_path, settings):
    from io import StringIO

    from django.core.serializers.base import DeserializationError

    make_targets()
    out = StringIO()
    call_command("dumpdata", "targets.target", stdout=out)
    fixture = tmp_path / "targets.json"
    fixture.write_text(out.getvalue())
    Target.objects.all().delete()
    settings.COURIER_ENCRYPTION_KEY = "another-key-" + uuid.uuid4().hex

    with pytest.raises(DeserializationError, match="cannot be decrypted"):
        call_command("loaddata", str(fixture), stdout=StringIO())
