"""A DICOMweb target's credentials with authentication left at "None": the form picks
the method they mean, or says why it will not (they were silently not sent)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from targets.models import DicomWebTarget
from targets.services import run_test
from tests.fixtures.web_peers import ORTHANC_USERS

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

ADD = reverse("admin:targets_target_add") + "?kind=dicomweb"


def form(url: str, **fields) -> dict:
    return {
        "name": "Web PACS",
        "direction": "store",
        "enabled": "on",
        "contact_email": "",
        "description": "",
        "max_connections": "1",
        "retry_max_attempts": "10",
        "retry_base_delay": "30",
        "retry_max_delay": "3600",
        "url": url,
        "qido_prefix": "",
        "wado_prefix": "",
        "stow_prefix": "",
        "auth": "none",
        "username": "",
        "password_0": "",
        "token_0": "",
        "verify_tls": "on",
        "ca_bundle": "",
        "request_timeout": "60",
        "stow_batch_size": "50",
        "stow_max_bytes": str(100 * 1024 * 1024),
        **fields,
    }


def errors(response) -> dict[str, list[str]]:
    assert response.status_code == 200, "the form was saved"
    return {k: list(v) for k, v in response.context["adminform"].form.errors.items()}


def test_a_login_with_authentication_none_is_saved_as_basic_and_test_passes(
    admin_client, orthanc_auth
):
    ((user, password),) = ORTHANC_USERS.items()
    response = admin_client.post(
        ADD,
        form(orthanc_auth.dicomweb_url, username=user, password_0=password),
    )
    assert response.status_code == 302, errors(response)
    target = DicomWebTarget.objects.get()
    assert target.auth == "basic"
    # The credentials are sent: Orthanc, which refuses anonymous access, answers.
    assert run_test(target).ok, target.last_test_message


@pytest.mark.parametrize(
    "fields, field, text",
    [
        ({"username": "alice"}, "auth", "The username 'alice' has no password"),
        ({"password_0": "s3cret"}, "auth", "A password is set without a username"),
        (
            {"username": "alice", "password_0": "s3cret", "token_0": "abc"},
            "auth",
            "Both a login and a bearer token are set",
        ),
    ],
    ids=["username-only", "password-only", "login-and-token"],
)
def test_credentials_that_name_no_method_are_a_form_error_saying_why(
    admin_client, fields, field, text
):
    response = admin_client.post(ADD, form("http://127.0.0.1:9/dicom-web", **fields))
    assert any(text in message for message in errors(response)[field])
    assert not DicomWebTarget.objects.exists()


def test_a_token_with_authentication_none_is_saved_as_bearer(admin_client):
    response = admin_client.post(
        ADD, form("http://127.0.0.1:9/dicom-web", token_0="secret-token")
    )
    assert response.status_code == 302, errors(response)
    assert DicomWebTarget.objects.get().auth == "bearer"
