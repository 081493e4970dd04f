"""Headless chromium for agents in the `web` template: Debian's chromium, no browser downloads.

from mvm_browser import playwright_chromium, selenium_chromium

with playwright_chromium() as browser:          # Playwright's sync API, executable_path set
    page = browser.new_page(); page.goto("http://127.0.0.1:8000"); print(page.title())

driver = selenium_chromium()                    # Selenium with Debian's chromedriver
driver.get("http://127.0.0.1:8000"); print(driver.title); driver.quit()
"""

from __future__ import annotations

import contextlib
import os

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_PATH", "/usr/bin/chromedriver")
# A microVM has no GPU and a small /dev/shm; as root chromium also needs --no-sandbox.
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


@contextlib.contextmanager
def playwright_chromium(**launch):
    """A Playwright Browser on Debian's chromium (sync API), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, **launch)
        try:
            yield browser
        finally:
            browser.close()


def selenium_chromium():
    """A Selenium Chrome WebDriver on Debian's chromium and chromedriver; call quit() when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ARGS:
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
