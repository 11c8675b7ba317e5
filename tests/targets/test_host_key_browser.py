"""Pinning an SSH host key the way an admin does it, in headless Chromium: open the
SFTP target, press Test, compare the fingerprint, press "Trust host key" beside the
result, Test again."""

from __future__ import annotations

import uuid

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from targets.models import SftpTarget
from tests.fixtures.ssh_s3_peers import chown_to

pytestmark = pytest.mark.browser


def message_after_click(browser, element_id: str, expected: str) -> str:
    """Click, then wait for the next page's message (containing `expected`)."""
    browser.find_element(By.ID, element_id).click()

    def shown(driver) -> str | bool:
        texts = [
            e.text for e in driver.find_elements(By.CSS_SELECTOR, "ul.messagelist li")
        ]
        return next((t for t in texts if expected in t), False)

    # The click loads a new page: a message found on the old one can go stale
    # between finding it and reading it; look again.
    wait = WebDriverWait(
        browser, 60, ignored_exceptions=(StaleElementReferenceException,)
    )
    return wait.until(shown)


def test_trust_host_key_beside_the_test_result_pins_the_key_and_test_passes(
    admin_login, live_server, sshd
):
    target = SftpTarget.objects.create(
        name="Research SFTP",
        host="127.0.0.1",
        port=sshd.port,
        username=sshd.key_user,
        private_key_path=str(sshd.client_key),
        path=f"incoming-{uuid.uuid4().hex[:8]}",
    )
    folder = sshd.home(sshd.key_user) / target.path
    folder.mkdir()
    chown_to(folder, sshd.key_user)
    browser = admin_login()
    browser.get(f"{live_server.url}/admin/targets/target/{target.pk}/change/")
    browser.find_element(By.ID, "target-test-button")  # the page is there
    assert "trust-host-key-button" not in browser.page_source

    message = message_after_click(
        browser, "target-test-button", "Test of Research SFTP failed"
    )
    assert "not pinned" in message and '"Trust host key"' in message
    offer = browser.find_element(By.CSS_SELECTOR, ".trust-host-key")
    assert sshd.host_key_fingerprint in offer.text

    message_after_click(
        browser, "trust-host-key-button", f"pinned host key {sshd.host_key_fingerprint}"
    )
    target.refresh_from_db()
    assert target.host_key == sshd.host_key_fingerprint
    assert "trust-host-key-button" not in browser.page_source

    message_after_click(browser, "target-test-button", "Test of Research SFTP passed")
    assert "trust-host-key-button" not in browser.page_source
