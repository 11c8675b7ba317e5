"""The query page in headless Chromium: search, open a study, retrieve, watch it finish."""

from __future__ import annotations

from pathlib import Path

import pytest

from querytool import services, tasks
from querytool.models import RetrievalJob
from targets.models import DicomTarget, FolderTarget

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def worker_queue(monkeypatch, immediate_huey) -> list[int]:
    """Collect queued retrievals; the test then runs them as the huey worker would.

    They run in the test's thread: with SQLite's in-memory test database only that
    thread shares the live server's connection. The send jobs they create run at
    once (huey immediate).
    """
    queued: list[int] = []
    monkeypatch.setattr(tasks, "retrieve_task", queued.append)
    return queued


def test_staff_searches_opens_a_study_and_retrieves_it_to_a_folder(
    admin_login,
    live_server,
    query_orthanc,
    query_studies,
    courier_dirs,
    worker_queue,
    tmp_path,
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    pacs = DicomTarget.objects.create(
        name="PACS",
        host="127.0.0.1",
        port=query_orthanc.dicom_port,
        called_aet=query_orthanc.aet,
        direction="query",
    )
    out = tmp_path / "delivered"
    out.mkdir()
    FolderTarget.objects.create(name="Delivered", path=str(out), direction="store")
    facts = query_studies.by_accession("ACC001")

    browser = admin_login()
    browser.get(f"{live_server.url}/query/")
    Select(browser.find_element(By.ID, "id_source")).select_by_value(str(pacs.pk))
    browser.find_element(By.ID, "id_patient_id").send_keys("P001")
    browser.find_element(By.ID, "search-button").click()

    rows = browser.find_elements(By.CSS_SELECTOR, "#study-table tbody tr")
    assert len(rows) == 2
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-study='{facts.study_uid}']")
    row.find_element(By.CLASS_NAME, "open-study").click()
    series = browser.find_element(By.ID, "series-table")
    assert "CT CHEST series 2" in series.text

    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-study='{facts.study_uid}']")
    row.find_element(By.CSS_SELECTOR, "input[name=study]").click()
    Select(browser.find_element(By.ID, "id_destination")).select_by_visible_text(
        "Delivered (Folder)"
    )
    browser.find_element(By.ID, "retrieve-button").click()

    # The click returns before the page has posted: wait for the job it makes.
    job = WebDriverWait(browser, 30).until(lambda _: RetrievalJob.objects.first())
    state = (By.CSS_SELECTOR, f"tr[data-job='{job.pk}'] .job-state")
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element(state, "Queued"))
    assert worker_queue == [job.pk]
    services.run_retrieval(job.pk)
    # The page's poll notices the job finished, without a reload.
    WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element(state, "Done"))
    count = browser.find_element(By.CSS_SELECTOR, f"tr[data-job='{job.pk}'] .job-count")
    assert count.text.startswith("5 / 5")
    assert (
        "Queued 2 send job(s) to Delivered"
        in browser.find_element(
            By.CSS_SELECTOR, f"tr[data-job='{job.pk}'] .job-message"
        ).text
    )
    assert len(list(Path(out).rglob("*.dcm"))) == 5
    actions = browser.find_element(
        By.CSS_SELECTOR, f"tr[data-job='{job.pk}'] .job-actions"
    )
    assert "Cancel" not in actions.get_attribute("innerHTML")
    # Leave the page so no poll reaches the live server after the test ends.
    browser.get("about:blank")
