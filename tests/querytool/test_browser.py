"""The query page in headless Chromium, with a real worker process.

A search against each kind of source (DICOM and DICOMweb on Orthanc, a local
folder), against a host that does not resolve and a port that refuses; names and
dates as people read them; select-all; a destination found among a thousand targets;
a retrieval to a PACS that is down, which the page shows failing with the reason.
"""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from querytool.models import RetrievalJob
from targets.models import DicomTarget, DicomWebTarget, Target
from tests.fixtures.query_peers import QR_PASSWORD, QR_USER
from tests.peers import held_port

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WAIT = 90  # generous: the machine is shared


def search(browser, source: Target, patient_id: str = "P001") -> None:
    Select(browser.find_element(By.ID, "id_source")).select_by_value(str(source.pk))
    box = browser.find_element(By.ID, "id_patient_id")
    box.clear()
    box.send_keys(patient_id)
    browser.find_element(By.ID, "search-button").click()
    WebDriverWait(browser, WAIT).until(lambda d: f"source={source.pk}" in d.current_url)


def chosen_destination(browser) -> str:
    # One script, not a WebDriver call per option: there are a thousand.
    return browser.execute_script(
        "return document.getElementById('id_destination').selectedOptions[0].text"
    )


def studies(browser) -> list[list[str]]:
    rows = browser.find_elements(By.CSS_SELECTOR, "#study-table tbody tr")
    return [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def test_search_every_kind_of_source_and_retrieve_to_a_pacs_that_is_down(
    admin_login, live_server, live_worker, query_orthanc, query_studies, tmp_path
):
    pacs = DicomTarget.objects.create(
        name="PACS",
        host="127.0.0.1",
        port=query_orthanc.dicom_port,
        called_aet=query_orthanc.aet,
        direction="query",
        dimse_timeout=60,
        acse_timeout=30,
    )
    web = DicomWebTarget.objects.create(
        name="Web",
        url=query_orthanc.dicomweb_url,
        auth="basic",
        username=QR_USER,
        password=QR_PASSWORD,
        direction="query",
    )
    archive = DicomWebTarget.objects.create(
        name="Archive",
        url=query_studies.copy_to(tmp_path / "archive").as_uri(),
        direction="query",
    )
    nowhere = DicomTarget.objects.create(
        name="Nowhere", host="pacs.invalid", port=104, called_aet="X", direction="query"
    )
    closed = held_port()
    refusing = DicomTarget.objects.create(
        name="Refusing",
        host="127.0.0.1",
        port=closed.getsockname()[1],
        called_aet="X",
        direction="query",
    )
    down = held_port()
    Target.objects.bulk_create(
        Target(kind="dicom", name=f"Store-{i:04d}", host="10.0.0.1", port=104,
               called_aet="STORE")
        for i in range(1000)
    )  # fmt: skip
    down_pacs = DicomTarget.objects.create(
        name="Down PACS",
        host="127.0.0.1",
        port=down.getsockname()[1],
        called_aet="DOWN",
        retry_max_attempts=1,
    )
    doe = query_studies.by_accession("ACC001")

    browser = admin_login()
    browser.get(f"{live_server.url}/query/")
    for source in (pacs, web, archive):
        search(browser, source)
        found = studies(browser)
        assert len(found) == 2, (source.name, found)
        row = next(r for r in found if "ACC001" in r)
        # Names as people read them; dates in one format.
        assert row[1].splitlines() == ["DOE, JOHN", "P001"], (source.name, row)
        assert row[2:4] == ["1970-01-01", "2024-01-15"], (source.name, row)

    search(browser, nowhere)
    error = browser.find_element(By.ID, "query-error").text
    assert "the host name 'pacs.invalid' does not resolve" in error
    search(browser, refusing)
    error = browser.find_element(By.ID, "query-error").text
    assert f"connection refused by 127.0.0.1:{refusing.port}" in error

    # Open a study on the PACS: its series, with a box that checks them all.
    search(browser, pacs)
    browser.find_element(
        By.CSS_SELECTOR, f"tr[data-study='{doe.study_uid}'] .open-study"
    ).click()
    browser.find_element(By.ID, "select-all-series").click()
    boxes = browser.find_elements(By.CSS_SELECTOR, "#series-table input[name=series]")
    assert len(boxes) == 2 and all(b.is_selected() for b in boxes)

    # The archive: select all, then only one; find the PACS among 1,000 targets.
    search(browser, archive)
    select_all = browser.find_element(By.ID, "select-all-studies")
    select_all.click()
    boxes = browser.find_elements(By.CSS_SELECTOR, "#study-table input[name=study]")
    assert len(boxes) == 2 and all(b.is_selected() for b in boxes)
    select_all.click()
    assert not any(b.is_selected() for b in boxes)
    browser.find_element(
        By.CSS_SELECTOR, f"tr[data-study='{doe.study_uid}'] input[name=study]"
    ).click()
    browser.find_element(By.ID, "destination-filter").send_keys("down pacs")
    shown = browser.execute_script(
        "return Array.from(document.getElementById('id_destination').options)"
        ".filter(o => !o.hidden).map(o => o.text)"
    )
    assert shown == ["Down PACS (DICOM)"], shown[:5]
    assert chosen_destination(browser) == "Down PACS (DICOM)"
    browser.find_element(By.ID, "retrieve-button").click()

    WebDriverWait(browser, WAIT).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "tr[data-job]"))
    )
    job = RetrievalJob.objects.get()
    assert (
        "Queued 1 retrieval."
        in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
    )
    # The destination stays chosen for the next retrieval.
    assert chosen_destination(browser) == "Down PACS (DICOM)"

    # The worker retrieves the study, its send jobs fail: the row says so, with
    # the reason, and offers Retry (the page polls; it does not reload).
    row = f"tr[data-job='{job.pk}']"
    WebDriverWait(browser, WAIT).until(
        ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, f"{row} .job-state"), "Delivery failed"
        )
    )
    message = browser.find_element(By.CSS_SELECTOR, f"{row} .job-message").text
    assert (
        f"2 of 2 series could not be sent to Down PACS: gave up after 1 attempt: "
        f"connection refused by 127.0.0.1:{down_pacs.port}" in message
    ), message
    actions = browser.find_element(By.CSS_SELECTOR, f"{row} .job-actions")
    assert (
        actions.find_element(By.CSS_SELECTOR, "input[type=submit]").get_attribute(
            "value"
        )
        == "Retry"
    )
    closed.close()
    down.close()
