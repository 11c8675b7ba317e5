"""An admin adds a DICOM target with User Identity and Storage Commitment in headless
Chromium, presses Test before saving, then saves: what was typed and tested is what
is kept."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from targets.models import Target
from tests.targets.test_admin import current_form_data
from tests.targets.test_browser import fill, messages

pytestmark = pytest.mark.browser


def test_a_dicom_target_tested_before_saving_keeps_its_login_and_commitment(
    admin_login, live_server, orthanc
):
    browser = admin_login()
    browser.get(f"{live_server.url}/admin/targets/target/add/")
    browser.find_element(By.CSS_SELECTOR, 'a[data-kind="dicom"]').click()
    fill(browser, {
        "name": "QA archive",
        "host": "127.0.0.1",
        "port": str(orthanc.dicom_port),
        "called_aet": orthanc.aet,
        "username": "alice",
        "password": "s3cret",
        "request_commitment": True,
    })  # fmt: skip
    browser.find_element(By.NAME, "_test").click()
    panel = browser.find_element(By.ID, "form-test-result")
    assert "passed" in panel.text, panel.text
    checks = panel.text
    assert "Storage Commitment ok" in checks and "C-ECHO ok" in checks, checks
    assert "s3cret" not in browser.page_source  # write-only, even after a Test
    # The password was used for the Test but is not in the form any more: on main
    # nothing said so, and Save kept the username without the password.
    said = messages(browser)
    assert "Type the password again before saving" in said, said

    fill(browser, {"password": "s3cret"})
    browser.find_element(By.NAME, "_save").click()
    assert "was added successfully" in messages(browser), messages(browser)
    target = Target.objects.get(name="QA archive").as_kind()
    assert (target.username, target.password) == ("alice", "s3cret")
    assert target.request_commitment is True


def _said(response) -> str:
    return " | ".join(str(m) for m in response.context["messages"])


def test_a_changed_password_tested_before_saving_is_asked_for_again(
    admin_client, storescp
):
    """Editing a saved target: a new password typed and tested is not in the form
    afterwards, and a blank one keeps the OLD password on Save: the page says to
    type it again. Without a typed secret there is no such warning."""
    target = Target.objects.create(
        name="QA edit", kind="dicom", host="127.0.0.1", port=storescp.port,
        called_aet=storescp.aet, username="alice", password="old-one",
    )  # fmt: skip
    url = f"/admin/targets/target/{target.pk}/change/"
    data = current_form_data(admin_client, url)

    tested = admin_client.post(url, {**data, "password_0": "new-one", "_test": "1"})
    assert "(not saved) passed" in tested.content.decode()
    assert "Type the password again before saving" in _said(tested), _said(tested)
    assert "new-one" not in tested.content.decode()

    data["port"] = str(storescp.port)  # an edit, so the Test is of the form
    data["description"] = "edited"
    plain = admin_client.post(url, {**data, "_test": "1"})
    assert "(not saved) passed" in plain.content.decode(), _said(plain)
    assert "again before saving" not in _said(plain), _said(plain)
    assert Target.objects.get(pk=target.pk).as_kind().password == "old-one"
