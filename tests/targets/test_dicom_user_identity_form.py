"""The DICOM target's User Identity login in the admin form: offered, validated,
stored encrypted and never shown back."""

from __future__ import annotations

import pytest
from django.db import connection

from targets.models import DicomTarget, Target
from tests.targets.test_admin import ADD, DICOM_FORM, change_url, form_errors

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

PASSWORD = "pacs-Login-7731"


@pytest.mark.parametrize("kind", ["dicom", "dicom_tls"])
def test_the_dicom_forms_offer_a_username_and_password(admin_client, kind):
    form = admin_client.get(f"{ADD}?kind={kind}").context["adminform"].form
    assert "username" in form.fields and "password" in form.fields
    assert "User Identity" in form.fields["username"].help_text


def test_a_password_without_a_username_is_a_form_error(admin_client):
    response = admin_client.post(f"{ADD}?kind=dicom", {**DICOM_FORM, "password_0": "x"})

    assert response.status_code == 200
    assert form_errors(response)["password"] == [
        "A password is sent only with a username (User Identity): enter the "
        "username too, or clear the password."
    ]
    assert not Target.objects.exists()


def test_the_login_is_saved_encrypted_and_never_shown_back(admin_client):
    response = admin_client.post(
        f"{ADD}?kind=dicom",
        {**DICOM_FORM, "username": " courier ", "password_0": PASSWORD},
    )

    assert response.status_code == 302, form_errors(response)
    target = DicomTarget.objects.get()
    assert (target.username, str(target.password)) == ("courier", PASSWORD)
    with connection.cursor() as cursor:
        cursor.execute("SELECT password FROM targets_target")
        (stored,) = cursor.fetchone()
    assert PASSWORD not in stored
    page = admin_client.get(change_url(target)).content.decode()
    assert PASSWORD not in page and "courier" in page
