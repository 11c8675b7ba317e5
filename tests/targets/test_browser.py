"""Targets in headless Chromium, the way an admin works with them.

For every kind: open "Add target", choose the kind, fill the form, see the Save
buttons, save, open it again from the overview, press Test against the real peer and
read the result; then point the form at a wrong peer without saving, press Test again
and read what failed. A tour of the main pages saves the README's screenshots.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from dispatch.jobs.models import Job, State
from dispatch.receiving.models import ReceiverStatus
from dispatch.routing.models import ReceivedSeries
from targets.models import DicomTarget, FolderTarget, S3Target, Target
from targets.services import run_test
from tests.dicomgen import make_series
from tests.peers import free_port

pytestmark = pytest.mark.browser


@dataclass
class Case:
    """What to type for a kind, which checks must pass, and a wrong peer."""

    fields: dict[str, str | bool]
    passing: tuple[str, ...]
    wrong: dict[str, str]
    wrong_words: str
    unchanged: dict[str, object] = field(default_factory=dict)


def dicom_case(get, tmp: Path) -> Case:
    orthanc = get("orthanc")
    return Case(
        fields={
            "host": "127.0.0.1",
            "port": str(orthanc.dicom_port),
            "called_aet": orthanc.aet,
            # Orthanc is a Storage Commitment SCP: Test says so.
            "request_commitment": True,
        },  # fmt: skip
        passing=("TCP connect", "Association", "C-ECHO", "Storage Commitment"),
        wrong={"port": str(free_port())},
        wrong_words="connection refused",
        unchanged={"port": orthanc.dicom_port},
    )


def dicom_tls_case(get, tmp: Path) -> Case:
    peers = get("tls_peers")
    return Case(
        fields={
            "host": "127.0.0.1",
            "port": str(peers.good.port),
            "called_aet": peers.good.aet,
            "tls_ca_cert": peers.pki["ca.pem"],
            "tls_client_cert": peers.pki["client.pem"],
            "tls_client_key": peers.pki["client.key"],
        },  # fmt: skip
        passing=("TCP connect", "Association", "C-ECHO"),
        wrong={"port": str(peers.plain.port)},  # a storescp without TLS
        wrong_words="TLS",
        unchanged={"port": peers.good.port},
    )


def dicomweb_case(get, tmp: Path) -> Case:
    orthanc = get("orthanc_auth")
    return Case(
        fields={
            "url": orthanc.dicomweb_url,
            "auth": "basic",
            "username": "alice",
            "password": "s3cret",
        },  # fmt: skip
        passing=("Reachable", "Authentication"),
        wrong={"password": "not-the-password"},
        wrong_words="authentication failed",
        unchanged={"password": "s3cret"},
    )


def folder_case(get, tmp: Path) -> Case:
    (tmp / "share").mkdir()
    return Case(
        fields={"path": str(tmp / "share")},
        passing=("folder exists", "writable"),
        wrong={"path": str(tmp / "missing")},
        wrong_words="does not exist",
        unchanged={"path": str(tmp / "share")},
    )


def ssh_fields(sshd) -> dict:
    return {"host": "127.0.0.1", "port": str(sshd.port), "username": sshd.key_user,
            "private_key_path": str(sshd.client_key),
            "host_key": sshd.host_key_fingerprint,
            "path": str(sshd.home(sshd.key_user))}  # fmt: skip


def rsync_case(get, tmp: Path) -> Case:
    sshd = get("sshd")
    return Case(
        fields=ssh_fields(sshd),
        passing=("rsync on the server", "folder exists and is writable"),
        wrong={"path": "/no/such/folder"},
        wrong_words="/no/such/folder",
        unchanged={"path": str(sshd.home(sshd.key_user))},
    )


def sftp_case(get, tmp: Path) -> Case:
    sshd = get("sshd")
    return Case(
        fields=ssh_fields(sshd),
        passing=("folder exists and is writable",),
        wrong={"host_key": "SHA256:" + "A" * 43},
        wrong_words="host key mismatch",
        unchanged={"host_key": sshd.host_key_fingerprint},
    )


def s3_case(get, tmp: Path) -> Case:
    weed = get("seaweedfs")
    bucket = weed.create_bucket(f"browser-{uuid.uuid4().hex[:8]}")
    return Case(
        fields={
            "bucket": bucket,
            "endpoint_url": weed.endpoint_url,
            "addressing_style": "path",
            "access_key_id": weed.admin.access_key,
            "secret_key": weed.admin.secret_key,
        },  # fmt: skip
        passing=(
            "endpoint reachable",
            "credentials",
            "bucket reachable",
            "write probe",
        ),  # fmt: skip
        # A new endpoint clears the stored secret: it is typed again, as the form asks.
        wrong={
            "endpoint_url": f"http://127.0.0.1:{free_port()}",
            "secret_key": weed.admin.secret_key,
        },  # fmt: skip
        wrong_words="endpoint unreachable",
        unchanged={"endpoint_url": weed.endpoint_url},
    )


def xnat_case(get, tmp: Path) -> Case:
    fake, orthanc = get("xnat_fake"), get("orthanc")
    return Case(
        fields={
            "url": fake.url,
            "project": "PROJ1",
            "username": "alice",
            "password": "s3cret",
        },  # fmt: skip
        passing=("XNAT server", "Login", "Project", "Upload permission"),
        wrong={"url": f"http://127.0.0.1:{orthanc.http_port}", "password": "s3cret"},
        wrong_words="not an XNAT server",
        unchanged={"url": fake.url},
    )


CASES: dict[str, Callable] = {
    "dicom": dicom_case,
    "dicom_tls": dicom_tls_case,
    "dicomweb": dicomweb_case,
    "folder": folder_case,
    "rsync": rsync_case,
    "s3": s3_case,
    "sftp": sftp_case,
    "xnat": xnat_case,
}


def fill(browser, values: dict[str, str | bool]) -> None:
    """Type into the form as a person would: text, choices, ticks, secrets."""
    for name, value in values.items():
        # (one lookup: a missing element costs the implicit wait)
        found = browser.find_elements(
            By.CSS_SELECTOR,
            f'[name="{name}"], [name="{name}_0"]',  # _0: a secret
        )
        assert found, f"no field {name} on the page"
        element = found[0]
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        elif element.get_attribute("type") == "checkbox":
            if element.is_selected() != bool(value):
                element.click()
        else:
            element.clear()
            element.send_keys(str(value))


def messages(browser) -> str:
    return " | ".join(
        e.text for e in browser.find_elements(By.CSS_SELECTOR, "ul.messagelist li")
    )


def result_rows(browser, table: str) -> dict[str, list[str]]:
    rows = browser.find_elements(By.CSS_SELECTOR, f"{table} table.test-result tbody tr")
    return {
        cells[0]: cells[1:]
        for cells in (
            [td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows
        )
    }


def test_the_kinds_under_test_are_all_the_kinds():
    from targets.models import PROXIES

    assert set(CASES) == set(PROXIES)


@pytest.mark.parametrize("kind", list(CASES))
def test_an_admin_adds_saves_and_tests_each_kind_of_target(
    kind, request, admin_login, live_server, tmp_path
):
    case = CASES[kind](request.getfixturevalue, tmp_path)
    name = f"Browser {kind}"
    browser = admin_login()

    browser.get(f"{live_server.url}/admin/targets/target/add/")
    browser.find_element(By.CSS_SELECTOR, f'a[data-kind="{kind}"]').click()
    assert browser.title.startswith("Add ")
    # Every Save button is there and visible (an rsync help text once hid them all).
    for button in ("_save", "_continue", "_addanother", "_test"):
        assert browser.find_element(By.NAME, button).is_displayed(), button
    assert browser.find_element(By.ID, "tab-connection").is_displayed()
    fill(browser, {"name": name, **case.fields})
    browser.find_element(By.NAME, "_save").click()

    assert "was added successfully" in messages(browser), messages(browser)
    row = browser.find_element(
        By.XPATH, f"//table[@id='result_list']//tr[.//a[text()='{name}']]"
    )
    assert "active" in row.text and "never" in row.text
    row.find_element(By.LINK_TEXT, name).click()

    # Test the saved settings: the form is unchanged, so this is the stored test.
    browser.find_element(By.ID, "target-test-button").click()
    assert f"Test of {name} passed" in messages(browser), messages(browser)
    checks = result_rows(browser, ".field-last_test_display")
    for check in case.passing:
        assert checks.get(check, [""])[0] == "ok", (check, checks)
    assert all(r[0] in ("ok", "info") and r[2].endswith(" ms") for r in checks.values())

    # Point the form at a wrong peer, do not save, press Test: the edit is tested.
    fill(browser, case.wrong)
    browser.find_element(By.ID, "target-test-button").click()
    panel = browser.find_element(By.ID, "form-test-result")
    assert "failed" in panel.text and case.wrong_words in panel.text, panel.text
    assert "(not saved) failed" in messages(browser)
    for field_name, value in case.wrong.items():
        if field_name not in ("password", "secret_key"):  # secrets are never shown
            shown = browser.find_element(By.NAME, field_name).get_attribute("value")
            assert shown == value

    target = Target.objects.get(name=name).as_kind()
    assert target.last_test_ok is True  # still the saved settings' result
    for attribute, value in case.unchanged.items():
        assert getattr(target, attribute) == value


def test_a_dicomweb_target_with_a_file_url_is_a_local_query_source(
    admin_login, live_server, tmp_path, screenshots
):
    folder = make_series(tmp_path / "archive", 2).folder.parent
    browser = admin_login()
    browser.get(f"{live_server.url}/admin/targets/target/add/")
    hint = browser.find_element(
        By.CSS_SELECTOR, 'a[data-kind="dicomweb"]'
    ).find_element(By.XPATH, "..")
    assert "a local folder of DICOM files becomes a query source" in hint.text
    browser.find_element(By.CSS_SELECTOR, 'a[data-kind="dicomweb"]').click()

    http_only = ("qido_prefix", "auth", "verify_tls", "ca_bundle", "stow_batch_size")
    for name in http_only:
        assert browser.find_element(By.NAME, name).is_displayed(), name
    # Basic authentication shows the username and password, none hides them.
    assert not browser.find_element(By.NAME, "username").is_displayed()
    fill(browser, {"auth": "basic"})
    assert browser.find_element(By.NAME, "username").is_displayed()
    fill(browser, {"name": "Local archive", "url": f"file://{folder}",
                   "direction": "query"})  # fmt: skip
    for name in http_only + ("username",):
        assert not browser.find_element(By.NAME, name).is_displayed(), name
    browser.save_screenshot(str(screenshots / "add-dicomweb-local-folder.png"))
    browser.find_element(By.NAME, "_test").click()  # before saving
    panel = browser.find_element(By.ID, "form-test-result")
    assert "passed" in panel.text and "exists and is readable" in panel.text
    assert not Target.objects.exists()
    browser.find_element(By.NAME, "_save").click()
    assert "was added successfully" in messages(browser), messages(browser)
    assert Target.objects.get().is_query_source


def test_a_tour_of_the_main_pages(admin_login, live_server, tmp_path, orthanc,
                                  screenshots):  # fmt: skip
    """A small site as it looks in use; each main page is checked and photographed."""
    now = timezone.now()
    pacs = DicomTarget.objects.create(
        name="PACS", host="127.0.0.1", port=orthanc.dicom_port, called_aet=orthanc.aet,
        direction="both", contact_email="pacs-team@hospital.example",
        description="Main archive (Orthanc in the test lab)",
    )  # fmt: skip
    run_test(pacs)
    (tmp_path / "research").mkdir()
    research = FolderTarget.objects.create(name="Research share",
                                           path=str(tmp_path / "research"))  # fmt: skip
    run_test(research)
    cloud = S3Target.objects.create(
        name="Cloud archive", bucket="archive", access_key_id="courier",
        secret_key="x", endpoint_url=f"http://127.0.0.1:{free_port()}", paused=True,
    )  # fmt: skip
    FolderTarget.objects.create(name="Old share", path="/srv/old", enabled=False)
    for i, (target, state) in enumerate(
        [(pacs, State.DONE), (pacs, State.DONE), (research, State.SENDING),
         (pacs, State.QUEUED), (cloud, State.PAUSED), (research, State.FAILED)]
    ):  # fmt: skip
        Job.objects.create(
            target=target, folder=f"/spool/s{i}", source="route", state=state,
            series_uid=f"1.2.826.0.1.3680043.8.498.{i}", series_description="CT HEAD",
            total=120, sent=120 if state == State.DONE else 40,
            finished_at=now if state in (State.DONE, State.FAILED) else None,
            lease_expires_at=now + timedelta(minutes=2),
            last_error="association rejected: called AE title not recognised"
            if state == State.FAILED else "",
        )  # fmt: skip
    ReceiverStatus.objects.create(name="COURIER@11112", info={"stored": 1234})
    ReceivedSeries.objects.create(series_uid="1.2.3", folder="/spool/incoming/a",
                                  calling_aet="CT01", instance_count=120,
                                  state="routed", tags={"Modality": "CT"})  # fmt: skip
    browser = admin_login(through_form=True)
    browser.set_window_size(1680, 1050)  # a common desk screen, for the pictures
    try:
        tour(browser, live_server.url, pacs, screenshots)
    finally:
        browser.set_window_size(1280, 1024)


def tour(browser, url: str, pacs: Target, screenshots: Path) -> None:
    browser.get(f"{url}/admin/")
    panel = browser.find_element(By.ID, "courier-status")
    assert browser.find_element(By.ID, "site-name").text == "Courier"
    assert "listening" in panel.text and "COURIER@11112" in panel.text
    assert "Cloud archive" in panel.text and "Research share" in panel.text
    browser.save_screenshot(str(screenshots / "home.png"))

    browser.get(f"{url}/admin/targets/target/")
    rows = {
        r.find_element(By.CSS_SELECTOR, "th").text: r.text
        for r in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    }
    assert "paused" in rows["Cloud archive"] and "disabled" in rows["Old share"]
    assert "done" in rows["PACS"] and "failed" in rows["Research share"]
    browser.save_screenshot(str(screenshots / "targets.png"))

    browser.get(f"{url}/admin/targets/target/add/")
    browser.save_screenshot(str(screenshots / "add-target.png"))

    browser.get(f"{url}/admin/targets/target/{pacs.pk}/change/")
    host = browser.find_element(By.NAME, "host")
    contact = browser.find_element(By.NAME, "contact_email")
    assert host.is_displayed() and not contact.is_displayed()
    browser.find_element(By.ID, "tab-information").click()
    assert contact.is_displayed() and not host.is_displayed()
    assert contact.get_attribute("value") == "pacs-team@hospital.example"
    browser.find_element(By.ID, "tab-connection").click()
    browser.save_screenshot(str(screenshots / "target.png"))

    browser.get(f"{url}/admin/targets/target/{pacs.pk}/delete/")
    assert "cannot be deleted" in browser.find_element(By.ID, "target-has-jobs").text
    browser.save_screenshot(str(screenshots / "delete-target-with-jobs.png"))

    browser.get(f"{url}/admin/dispatch/job/")
    browser.save_screenshot(str(screenshots / "jobs.png"))
    for name in ("home", "targets", "add-target", "target", "jobs"):
        assert (screenshots / f"{name}.png").stat().st_size > 10_000
