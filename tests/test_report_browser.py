"""The reproduction report opened in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``,
installed by ``make browser``) driven through selenium.

It asserts, on ``index.html`` and on every page it links to: one claims-table row per claim in the results.json
files, every image loaded (``naturalWidth > 0``), every link resolves (a file that exists, and an element with the
fragment's id), and no console errors. It saves a full-page screenshot of ``index.html`` to the test's tmp dir (and
to ``$OPTISCOPE_SCREENSHOT`` when set). ``$OPTISCOPE_REPORT_DIR`` points it at an existing reproduction directory
(e.g. ``runs/all``) instead of the one it builds from the test-only fake experiments.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

TESTS = Path(__file__).resolve().parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                                reason="Debian chromium + chromium-driver not installed (run `make browser` as root)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    given = os.environ.get("OPTISCOPE_REPORT_DIR")
    if given:
        from optiscope.report.html import write_site

        write_site(Path(given))
        return Path(given)
    sys.path.insert(0, str(TESTS))
    import reproduce_fakes

    importlib.reload(reproduce_fakes)
    from optiscope.experiments.reproduce import reproduce
    from optiscope.report.html import finish_run, write_site

    out = tmp_path_factory.mktemp("site") / "all"
    try:
        reproduce(out, only=[*reproduce_fakes.NAMES[:4], reproduce_fakes.FAIL], parallel=False,
                  postprocess=finish_run)
    finally:
        reproduce_fakes.unregister()
    write_site(out)
    return out


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="optiscope-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _n_claims(out: Path) -> int:
    marker = json.loads((out / "reproduce.json").read_text())
    n = 0
    for name in marker["experiments"]:
        p = out / name / "results.json"
        if p.exists():
            n += len(json.loads(p.read_text()).get("claims", []))
    return n


def _check_page(driver, url: str) -> list[str]:
    """Open ``url``; assert images loaded and no console errors; return the page's link targets."""
    driver.get(url)
    assert driver.execute_script("return document.readyState") == "complete"
    imgs = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
    bad = [src for src, complete, w in imgs if not complete or not w]
    assert not bad, f"{url}: images not loaded: {bad}"
    errors = [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
    assert not errors, f"{url}: console errors: {errors}"
    return driver.execute_script("return Array.from(document.links).map(a => a.href)"), len(imgs)


def _resolve(href: str) -> tuple[Path, str]:
    base, frag = urldefrag(href)
    u = urlparse(base)
    assert u.scheme == "file", f"link {href} leaves the static site (no server, no network)"
    return Path(unquote(u.path)), frag


def test_report_in_chromium(site, driver, tmp_path):
    index = (site / "index.html").resolve()
    url = index.as_uri()
    links, n_img_index = _check_page(driver, url)
    rows = driver.execute_script("return document.querySelectorAll('#claims-table tbody tr').length")
    assert rows == _n_claims(site) > 0
    verdicts = driver.execute_script(
        "return Array.from(document.querySelectorAll('#claims-table tbody tr td:nth-child(6)')).map(t => t.innerText)")
    assert set(verdicts) <= {"holds", "does not hold", "untestable"}
    # claim text with markup shows as text, not as HTML
    text = driver.find_element("id", "claims-table").text
    if not os.environ.get("OPTISCOPE_REPORT_DIR"):
        assert "<b>not bold</b> & | pipe" in text
        assert driver.execute_script("return document.querySelectorAll('#claims-table b').length") == 0
        failed = driver.execute_script(
            "return Array.from(document.querySelectorAll('#experiments-table td.status-failed')).length")
        assert failed == 1
    # screenshot of the whole index page
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(int(height) + 120, 800), 6000))
    shot = tmp_path / "report_index.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    extra = os.environ.get("OPTISCOPE_SCREENSHOT")
    if extra:
        Path(extra).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, extra)
    driver.set_window_size(1400, 1000)
    # every link resolves; every linked page loads its images without console errors
    seen: set[Path] = {index}
    todo = list(links)
    n_pages, n_images = 1, n_img_index
    while todo:
        href = todo.pop()
        path, frag = _resolve(href)
        assert path.exists(), f"broken link {href}"
        if frag:
            if path != Path(urlparse(driver.current_url).path) and path.suffix == ".html":
                driver.get(path.as_uri())
            assert driver.execute_script("return document.getElementById(arguments[0]) !== null", frag), \
                f"link {href}: no element with id {frag!r}"
        if path.suffix == ".html" and path not in seen:
            seen.add(path)
            more, n = _check_page(driver, path.as_uri())
            if n_pages == 1:  # one experiment page, for a look
                h = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1400, min(max(int(h) + 120, 800), 8000))
                driver.save_screenshot(str(tmp_path / "report_experiment.png"))
                driver.set_window_size(1400, 1000)
            n_pages += 1
            n_images += n
            todo += more
    assert n_pages >= 2 and n_images >= 1
