"""The web UI in a real browser: Debian's headless Chromium driven by Selenium through chromium-driver.

Skipped only when Chromium or its driver is missing outside CI; with $CI set (where .ci/run installs both) a
missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlparse

import httpx
import pytest

from .conftest import thread_server, wait_for


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "Chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    browser_path, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_generate_in_the_browser_plays_the_video_and_fills_the_gallery(browser, tiny_pipe, tmp_path):
    from selenium.webdriver.common.by import By

    with thread_server(tiny_pipe, tmp_path / "data", max_steps=2000) as (url, _):
        browser.get(url)
        find = browser.find_element
        wait_for(lambda: len(find(By.ID, "size").find_elements(By.TAG_NAME, "option")) > 0, 30,
                 what="the model's presets")
        assert find(By.ID, "size").get_attribute("value") == "32x32"
        assert find(By.ID, "steps").get_attribute("value") == "3"

        # A long job: live progress with a preview frame, then cancel from the page.
        find(By.ID, "prompt").send_keys("a slow one")
        find(By.ID, "steps").clear()
        find(By.ID, "steps").send_keys("2000")
        find(By.ID, "generate").click()
        wait_for(lambda: browser.execute_script(
            "const p = document.getElementById('current-preview');"
            "return p.complete && p.naturalWidth === 32 && document.getElementById('current-progress').value > 0"),
            60, 0.1, "the live preview")
        long_id = wait_for(lambda: browser.execute_script("return state.current"), 10, what="the job id")
        find(By.ID, "cancel").click()
        with httpx.Client(base_url=url) as api:
            wait_for(lambda: api.get(f"/v1/videos/{long_id}").status_code == 404, 30, what="the cancel")

        # A short job: the result plays in the page and appears in the gallery with its settings.
        find(By.ID, "prompt").clear()
        find(By.ID, "prompt").send_keys("a red circle moving left")
        find(By.ID, "steps").clear()
        find(By.ID, "steps").send_keys("2")
        find(By.ID, "seed").send_keys("7")
        find(By.ID, "generate").click()
        wait_for(lambda: browser.execute_script(
            "const v = document.getElementById('current-video');"
            "return !v.classList.contains('hidden') && v.readyState >= 2 && v.videoWidth === 32 && !v.error"),
            60, 0.1, "the video to load and decode in the page")
        job_id = browser.execute_script("return state.current")
        card = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, f".card[data-id='{job_id}'] a.download"),
                        10, what="the gallery card")[0]
        assert card.get_attribute("href").endswith(f"/v1/videos/{job_id}/content?download=true")
        settings = find(By.CSS_SELECTOR, f".card[data-id='{job_id}'] .settings").text
        assert "32x32" in settings and "2 steps" in settings and "seed 7" in settings
        assert find(By.CSS_SELECTOR, f".card[data-id='{job_id}'] .badge").text == "completed"
        assert not browser.find_elements(By.CSS_SELECTOR, f".card[data-id='{long_id}']")

        # Everything the page loaded came from this server (no fonts, scripts or analytics from elsewhere).
        origins = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])")
        assert {urlparse(o).netloc for o in origins} == {urlparse(url).netloc}
