"""Headless Debian chromium driven by selenium, for the dashboard tests (no browser download)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
ARTIFACTS = Path(__file__).resolve().parents[2] / ".pytest_artifacts"
SETUP_HINT = "apt-get install -y chromium chromium-driver && pip install selenium"

# Number of traces shown (visible === true) in the plots that are on screen.
VISIBLE_TRACES_JS = """
return Array.from(document.querySelectorAll('.js-plotly-plot'))
  .filter(gd => gd.offsetParent !== null)
  .reduce((n, gd) => n + gd.data.filter(t => t.visible === undefined || t.visible === true).length, 0);
"""
RENDERED_PLOTS_JS = """
return Array.from(document.querySelectorAll('.js-plotly-plot'))
  .filter(gd => gd.querySelector('svg.main-svg') !== null).length;
"""


def require_browser() -> None:
    """Skip (with the set-up command) unless chromium, chromedriver and selenium are all there."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)}: {SETUP_HINT}")


@contextmanager
def chromium(profile: Path) -> Iterator:
    """A headless chromium with a fresh profile and browser console logging on."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def severe_console_errors(driver) -> list[str]:
    """SEVERE browser-console entries, ignoring a missing favicon."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "favicon" not in entry["message"]
    ]


def save_screenshot(driver, path: Path, max_height: int = 9000) -> Path:
    """A whole-page screenshot (the window grows to the page), also copied to .pytest_artifacts/."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    page = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(page, height), max_height))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(width, height)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    return path
