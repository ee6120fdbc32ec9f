"""The web dashboard in real headless Chromium.

Debian's `chromium` and `chromedriver` (installed by scripts/test), driven by Selenium with the
driver path given explicitly (Selenium never downloads anything). The page is loaded from the
test server, a token is typed into it like a person would, and the test checks what the page
shows (pools, the session, events, charts), saves a screenshot, and deletes a session with the
page's button. The screenshot is kept in target/e2e-artifacts/ for people to look at.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from e2e_support import POOL_NAME

ARTIFACTS = Path(os.environ.get("SANDPOOL_E2E_ARTIFACTS", Path(__file__).resolve().parents[2] / "target" / "e2e-artifacts"))
WAIT_S = 20


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.fail("chromium and chromedriver are not installed (scripts/test installs the Debian packages)", pytrace=False)
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def execute(pool_endpoint: str, token: str, identifier: str, code: str) -> None:
    resp = requests.post(
        f"{pool_endpoint}/executions",
        params={"api-version": "2025-10-02-preview", "identifier": identifier},
        headers={"Authorization": f"Bearer {token}"},
        json={"code": code},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text


def connect(browser, base_url: str, token: str) -> WebDriverWait:
    browser.get(f"{base_url}/dashboard")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{base_url}/dashboard")
    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    browser.find_element(By.ID, "connect").click()
    return WebDriverWait(browser, WAIT_S)


def session_row(identifier: str) -> tuple[str, str]:
    return (By.CSS_SELECTOR, f'#sessions tr[data-identifier="{identifier}"]')


def test_a_contributor_sees_the_pool_its_sessions_and_events_and_deletes_one(
    browser, base_url, pool_endpoint, sandpool_server, token, session_id
):
    execute(pool_endpoint, token, session_id, "x = 1")
    execute(pool_endpoint, token, session_id, "raise ValueError('shown as an error outcome')")
    contributor = sandpool_server.issue_token("contributor")
    wait = connect(browser, base_url, contributor)

    row = wait.until(EC.presence_of_element_located(session_row(session_id)))
    assert "starting" not in row.text
    pool_row = browser.find_element(By.CSS_SELECTOR, f'#pools tr[data-pool="{POOL_NAME}"]')
    assert int(pool_row.find_element(By.CSS_SELECTOR, "td.allocated").text) >= 1
    assert int(pool_row.find_element(By.CSS_SELECTOR, "td.ready").text) >= 0
    wait.until(lambda b: any(session_id in li.text and "outcome=error" in li.text for li in b.find_elements(By.CSS_SELECTOR, "#events li")))
    # The charts drew this minute's allocation and executions.
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-executions rect.failures")
    assert "new sessions in the last hour" in browser.find_element(By.ID, "legend-allocations").text
    assert "Connected as sandpool-cli (contributor)" in browser.find_element(By.ID, "status").text

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = browser.get_screenshot_as_png()
    (ARTIFACTS / "dashboard.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 1000 and height >= 500, (width, height)

    # Delete takes two clicks: the first arms the button.
    row.find_element(By.CSS_SELECTOR, "button.delete").click()
    armed = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, f'#sessions tr[data-identifier="{session_id}"] button.confirm-delete')))
    assert armed.text == "Really delete"
    armed.click()
    wait.until(EC.invisibility_of_element_located(session_row(session_id)))
    assert f"Deleted session {session_id}" in browser.find_element(By.ID, "notice").text
    resp = requests.get(
        f"{pool_endpoint}/session",
        params={"api-version": "2025-10-02-preview", "identifier": session_id},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert resp.status_code == 404, resp.text


def test_a_reader_sees_counts_and_hashes_but_no_identifiers_or_delete_buttons(browser, base_url, pool_endpoint, sandpool_server, token, session_id):
    execute(pool_endpoint, token, session_id, "1")
    reader = sandpool_server.issue_token("reader")
    wait = connect(browser, base_url, reader)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#sessions tbody tr")))
    page = browser.find_element(By.ID, "content").text
    assert session_id not in page
    identifiers = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#sessions tbody tr code")]
    assert identifiers and all(text.startswith("id:") for text in identifiers), identifiers
    assert not browser.find_elements(By.CSS_SELECTOR, "#sessions button")
    assert not browser.find_element(By.ID, "events-section").is_displayed()


def test_a_token_without_the_role_or_no_token_is_refused_on_the_page(browser, base_url, sandpool_server):
    executor = sandpool_server.issue_token()
    wait = connect(browser, base_url, executor)
    wait.until(lambda b: "AuthorizationFailed" in b.find_element(By.ID, "status").text)
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    assert not browser.find_element(By.ID, "content").is_displayed()
    wait = connect(browser, base_url, "not-a-token")
    wait.until(lambda b: "Unauthorized" in b.find_element(By.ID, "status").text)
    # The page itself carries a strict content security policy.
    resp = requests.get(f"{base_url}/dashboard", timeout=30)
    assert "script-src 'self'" in resp.headers["content-security-policy"]
