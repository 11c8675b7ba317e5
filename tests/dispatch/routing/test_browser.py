"""Rules in headless Chromium, with `manage.py receive` and a worker process.

An admin adds a rule (MR from MR_* to the archive), previews it against the series
received so far, saves it; a modality sends an MR series with dcmtk's storescu; the
received series page shows it routed and its job done, and the archive has it.
"""

from __future__ import annotations

import subprocess
import time

import pydicom
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from dispatch.routing.models import ReceivedSeries, Rule
from targets.models import FolderTarget
from tests.dicomgen import make_series
from tests.peers import DCMTK_ENV

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WAIT = 90  # generous: the machine is shared


def fill(browser, name: str, value: str) -> None:
    element = browser.find_element(By.NAME, name)
    element.clear()
    element.send_keys(value)


def test_a_rule_added_and_previewed_in_the_browser_routes_what_a_modality_sends(
    admin_login, live_server, live_receiver, live_worker, tmp_path
):
    out = tmp_path / "archive"
    out.mkdir()
    FolderTarget.objects.create(name="Archive", path=str(out))
    # Series received earlier, for the preview.
    for n, (modality, calling) in enumerate([("MR", "MR_OLD"), ("CT", "CT_1")]):
        ReceivedSeries.objects.create(
            series_uid=f"1.2.3.{n}",
            folder=str(tmp_path / f"old{n}"),
            calling_aet=calling,
            called_aet="COURIER",
            state="unrouted",
            tags={"Modality": modality, "SeriesDescription": f"old {modality}"},
        )

    browser = admin_login()
    browser.get(f"{live_server.url}/admin/routing/rule/add/")
    fill(browser, "name", "MR to archive")
    archive = browser.find_element(By.CSS_SELECTOR, "#id_targets_from option")
    assert archive.text == "Archive"
    archive.click()
    browser.find_element(By.ID, "id_targets_add").click()
    Select(browser.find_element(By.NAME, "conditions-0-field")).select_by_value("tag")
    fill(browser, "conditions-0-keyword", "Modality")
    Select(browser.find_element(By.NAME, "conditions-0-operator")).select_by_value(
        "exact"
    )
    fill(browser, "conditions-0-value", "MR")
    browser.find_element(By.CSS_SELECTOR, "#conditions-group .add-row a").click()
    Select(browser.find_element(By.NAME, "conditions-1-field")).select_by_value(
        "calling_aet"
    )
    Select(browser.find_element(By.NAME, "conditions-1-operator")).select_by_value(
        "wildcard"
    )
    fill(browser, "conditions-1-value", "MR_*")

    # Preview (a new tab): the MR series matches, the CT one does not; nothing saved.
    rule_tab = browser.current_window_handle
    browser.find_element(By.NAME, "_preview").click()
    WebDriverWait(browser, WAIT).until(lambda d: len(d.window_handles) == 2)
    browser.switch_to.window(next(h for h in browser.window_handles if h != rule_tab))
    rows = {
        row.find_elements(By.TAG_NAME, "td")[2].text: row.get_attribute("class")
        for row in browser.find_elements(By.CSS_SELECTOR, "#preview-table tbody tr")
    }
    assert rows == {"MR_OLD": "preview-match", "CT_1": "preview-nomatch"}, rows
    assert not Rule.objects.exists()
    browser.close()
    browser.switch_to.window(rule_tab)

    browser.find_element(By.NAME, "_save").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.current_url.endswith("/rule/"))
    rule = Rule.objects.get()
    assert [t.name for t in rule.targets.all()] == ["Archive"]
    assert rule.conditions.count() == 2

    # A modality sends an MR series with dcmtk's storescu.
    series = make_series(tmp_path / "mr", 4, kind="mr")
    sent = subprocess.run(
        ["/usr/bin/storescu", "-aet", "MR_7", "-aec", "COURIER", "127.0.0.1",
         str(live_receiver.port), *map(str, series.files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr

    # The received series page shows it routed, its job done (reloading the page
    # as an admin would).
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        row = ReceivedSeries.objects.filter(series_uid=series.series_uid).first()
        if row is not None and "Done" in (
            job_states := row_text(browser, live_server, row)
        ):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(
            f"not routed: {row and row.state}\n{live_receiver.log()}\n"
            f"{live_worker.log()}"
        )
    assert "Routed" in job_states and "MR to archive" in job_states
    assert "Archive: Done" in job_states
    delivered = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in out.rglob("*")
        if p.is_file() and ".courier" not in p.name
    }
    assert delivered == set(series.sop_uids)


def row_text(browser, live_server, row: ReceivedSeries) -> str:
    browser.get(f"{live_server.url}/admin/routing/receivedseries/")
    found = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    return next((r.text for r in found if "MR_7" in r.text), "")
