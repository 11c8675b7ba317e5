"""The admin in headless Chromium: add a DICOM target pointing at the test Orthanc,
press Test and see its checks pass."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from targets.models import Target

pytestmark = pytest.mark.browser


def test_adding_a_dicom_target_and_testing_it_in_the_browser(
    admin_login, live_server, orthanc
):
    browser = admin_login()

    browser.get(f"{live_server.url}/admin/targets/target/add/")
    browser.find_element(By.CSS_SELECTOR, 'a[data-kind="dicom"]').click()
    assert "Add DICOM target" in browser.title
    fields = {
        "name": "Test Orthanc",
        "host": "127.0.0.1",
        "port": str(orthanc.dicom_port),
        "called_aet": orthanc.aet,
    }
    for name, value in fields.items():
        element = browser.find_element(By.NAME, name)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.NAME, "_save").click()

    # Back on the overview: the new target with its one-line address.
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 1, browser.page_source[:2000]
    assert f"127.0.0.1:{orthanc.dicom_port} {orthanc.aet}" in rows[0].text
    assert "never" in rows[0].text

    rows[0].find_element(By.LINK_TEXT, "Test Orthanc").click()
    browser.find_element(By.ID, "target-test-button").click()

    message = browser.find_element(By.CSS_SELECTOR, "ul.messagelist li")
    assert "Test of Test Orthanc passed" in message.text, message.text
    checks = browser.find_elements(By.CSS_SELECTOR, "table.test-result tbody tr")
    names = [row.find_element(By.CSS_SELECTOR, "td").text.lower() for row in checks]
    assert any("association" in n for n in names), names
    assert any("echo" in n for n in names), names
    for row in checks:
        cells = [td.text for td in row.find_elements(By.CSS_SELECTOR, "td")]
        informational = cells[1] == "info"
        assert cells[1] == "ok" or informational, cells
        assert cells[3].endswith(" ms")

    target = Target.objects.get(name="Test Orthanc")
    assert target.last_test_ok is True

    # The overview now shows the result and its time.
    browser.get(f"{live_server.url}/admin/targets/target/")
    badge = browser.find_element(By.CSS_SELECTOR, "#result_list .test-ok")
    assert badge.text == "ok"
