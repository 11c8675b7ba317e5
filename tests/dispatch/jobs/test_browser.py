"""The jobs pages in headless Chromium, with a real worker process and a real peer.

A series is queued to a PACS that is down (dcmtk storescp, its port held so
connections are refused); the job fails; the PACS starts (slow: 1 s per instance);
Retry on the job's page; the jobs list and the job page show progress moving without
reloading; Cancel; Retry; the job ends done with every instance on the peer.
"""

from __future__ import annotations

import re

import pytest
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from dispatch.jobs import direct, services
from dispatch.jobs.models import Job, State
from targets.models import DicomTarget, Target
from tests.dicomgen import make_series
from tests.peers import StoreSCP, held_port

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WAIT = 90  # generous: the machine is shared
# Some but not all of the eight instances sent.
MOVING = re.compile(r"[1-7] / 8$")


def text_of(browser, css: str) -> str:
    try:
        return browser.find_element(By.CSS_SELECTOR, css).text
    except StaleElementReferenceException:
        return ""


def wait_text(browser, css: str, predicate, what: str) -> str:
    """Wait until the text of `css` satisfies `predicate`; return it."""
    seen: list[str] = []

    def check(driver):
        text = text_of(driver, css)
        seen.append(text)
        return text if predicate(text) else False

    try:
        return WebDriverWait(browser, WAIT, poll_frequency=0.2).until(check)
    except Exception as exc:
        raise AssertionError(f"{what}: last seen {seen[-3:]}") from exc


def absent(browser, element_id: str) -> bool:
    """No such element now (without the driver's implicit wait for one to appear)."""
    return browser.execute_script(
        "return document.getElementById(arguments[0]) === null", element_id
    )


def click(browser, element_id: str) -> None:
    """Click a button that a self-reloading page may be re-rendering."""

    def press(driver):
        try:
            driver.find_element(By.ID, element_id).click()
            return True
        except (StaleElementReferenceException, NoSuchElementException):
            return False

    WebDriverWait(browser, WAIT).until(press)


def test_a_job_fails_is_retried_from_its_page_moves_is_cancelled_and_ends_done(
    admin_login, live_server, live_worker, tmp_path
):
    peer = StoreSCP(tmp_path / "pacs", extra_args=["--sleep-after", "1"])
    held = held_port()  # the PACS is down: connections are refused
    peer.port = held.getsockname()[1]
    target = DicomTarget.objects.create(
        name="Slow PACS",
        host="127.0.0.1",
        port=peer.port,
        called_aet=peer.aet,
        retry_max_attempts=1,
    )
    series = make_series(tmp_path / "in", 8)
    job = direct.queue_series(target, series.folder).job
    job_page = f"{live_server.url}/admin/dispatch/job/{job.pk}/change/"
    browser = admin_login()

    # The list shows it fail without being reloaded.
    browser.get(f"{live_server.url}/admin/dispatch/job/")
    state = f".job-state[data-job='{job.pk}']"
    wait_text(browser, state, lambda t: t == "Failed", "job failed on the list")
    assert "connection refused" in text_of(browser, f".job-status[data-job='{job.pk}']")

    browser.get(job_page)
    assert "connection refused by 127.0.0.1" in text_of(browser, "#job-live")
    assert absent(browser, "job-cancel-button")

    held.close()
    with peer:
        click(browser, "job-retry-button")
        assert "1 job queued again." in text_of(browser, "ul.messagelist")

        # The list, left open, shows the progress move: no reload in between.
        browser.get(f"{live_server.url}/admin/dispatch/job/")
        browser.execute_script("window.stayedOnThisPage = true")
        progress = f".job-progress[data-job='{job.pk}']"
        loaded = text_of(browser, progress)
        wait_text(
            browser,
            progress,
            lambda t: MOVING.match(t) and t != loaded,
            "progress moving on the list",
        )
        assert browser.execute_script("return window.stayedOnThisPage") is True
        assert text_of(browser, state) == "Sending"

        # The job page too, then Cancel while it sends.
        browser.get(job_page)
        browser.execute_script("window.stayedOnThisPage = true")
        progress = "#job-live .job-progress"
        loaded = text_of(browser, progress)
        wait_text(
            browser,
            progress,
            lambda t: MOVING.match(t) and t != loaded,
            "progress moving on the job page",
        )
        assert browser.execute_script("return window.stayedOnThisPage") is True
        click(browser, "job-cancel-button")
        wait_text(browser, "#job-live .job-state", lambda t: t == "Cancelled", "cancel")
        cancelled = Job.objects.get(pk=job.pk)
        assert cancelled.state == State.CANCELLED and 0 < cancelled.sent < 8

        # Retry once more: the page follows it to the end by itself.
        click(browser, "job-retry-button")
        wait_text(browser, "#job-live .job-state", lambda t: t == "Done", "done")
        assert text_of(browser, "#job-live .job-progress") == "8 / 8"
        received = len(peer.files())

    job.refresh_from_db()
    assert (job.state, job.sent, job.attempt_count) == (State.DONE, 8, 3)
    attempts = [
        (
            row.find_element(By.CSS_SELECTOR, "td.field-number").text,
            row.find_element(By.CSS_SELECTOR, "td.field-outcome").text,
        )
        for row in browser.find_elements(
            By.CSS_SELECTOR, "#attempts-group tbody tr.has_original"
        )
    ]
    assert attempts == [("1", "failed"), ("2", "cancelled"), ("3", "done")], attempts
    # Every instance reached the PACS (storescp names files by SOP Instance UID).
    assert received == 8
    assert absent(browser, "job-retry-button")  # done: no Retry


def test_the_target_filter_is_a_search_box_with_a_thousand_targets(
    admin_login, live_server, tmp_path
):
    Target.objects.bulk_create(
        Target(kind="dicom", name=f"PACS-{i:04d}", host="10.0.0.1", port=104,
               called_aet="PACS")
        for i in range(1000)
    )  # fmt: skip
    wanted, other = Target.objects.filter(name__in=["PACS-0421", "PACS-0777"])
    series = make_series(tmp_path / "in", 1)
    for target in (wanted, other):
        services.create_jobs(
            series.folder, [target], owned_spool=False, enqueue_now=False
        )

    browser = admin_login()
    browser.get(f"{live_server.url}/admin/dispatch/job/")
    sidebar = browser.find_element(By.ID, "changelist-filter")
    assert sidebar.size["height"] < 2000, sidebar.size  # not a link per target
    box = browser.find_element(By.ID, "target-filter-name")
    suggestions = browser.find_elements(By.CSS_SELECTOR, "#target-filter-names option")
    # Suggested: the targets that have jobs.
    assert sorted(o.get_attribute("value") for o in suggestions) == [
        "PACS-0421",
        "PACS-0777",
    ]
    box.send_keys("pacs-0421")
    browser.find_element(By.ID, "target-filter-submit").click()
    WebDriverWait(browser, WAIT).until(lambda d: "target_name=" in d.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 1 and "PACS-0421" in rows[0].text
    assert (
        browser.find_element(By.ID, "target-filter-name").get_attribute("value")
        == "PACS-0421"
    )
    # Other filters are kept when the target changes.
    browser.get(f"{live_server.url}/admin/dispatch/job/?state__exact=queued")
    box = browser.find_element(By.ID, "target-filter-name")
    box.send_keys("PACS-0777")
    browser.find_element(By.ID, "target-filter-submit").click()
    WebDriverWait(browser, WAIT).until(lambda d: "target_name=" in d.current_url)
    assert "state__exact=queued" in browser.current_url
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 1 and "PACS-0777" in rows[0].text
