"""The web page in a real headless browser (Debian chromium + chromium-driver, selenium).

Skipped, with the reason, only when selenium or the chromium/chromedriver binaries are missing
(.ci/run installs them). ``RSITR_SCREENSHOT=/path.png`` saves a screenshot of the result page.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("rasterio")
pytest.importorskip("faiss")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from _browser import chrome, require_browser, serve, stop  # noqa: E402
from rsitr.search import build as B  # noqa: E402
from rsitr.bench.search import write_sample_source  # noqa: E402
from rsitr.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow  # a headless browser and a live server

require_browser()

TILE = 96


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    src = write_sample_source(tmp_path_factory.mktemp("src"), n_png=4, grid=(3, 4), tile=TILE)
    idx = tmp_path_factory.mktemp("idx") / "index"
    B.build_index(src, "clip:tiny", idx, B.BuildOptions(tile_size=TILE, batch_size=16, keep_tokens=True, progress=False))
    srv, th, url = serve(create_app(idx))
    yield {"url": url, "source": src}
    stop(srv, th)


@pytest.fixture(scope="module")
def browser():
    yield from chrome()


def _images_loaded(drv, n):
    return drv.execute_script(
        "const im=[...document.querySelectorAll('#grid img')];"
        f"return im.length==={n} && im.every(i=>i.complete && i.naturalWidth>0);")


def test_text_search_shows_thumbnails_and_map(server, browser):
    browser.get(server["url"] + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "items" in d.find_element(By.ID, "info").text)
    assert "16 items" in browser.find_element(By.ID, "info").text
    box = browser.find_element(By.ID, "q")
    box.send_keys("a river next to green fields", Keys.ENTER)
    wait.until(lambda d: _images_loaded(d, 16))  # k=20 > 16 items: everything
    widths = browser.execute_script("return [...document.querySelectorAll('#grid img')].map(i=>i.naturalWidth)")
    assert len(widths) == 16 and min(widths) > 0
    assert "16 results" in browser.find_element(By.ID, "status").text
    # the footprint map: one rect per georeferenced result (12 GeoTIFF tiles) + the grey context layer
    assert browser.find_element(By.ID, "mapbox").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#map rect.hit")) == 12
    assert len(browser.find_elements(By.CSS_SELECTOR, "#map rect.ctx")) == 12
    shot = os.environ.get("RSITR_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)


def test_ftf_rerank_and_errors_in_page(server, browser):
    browser.get(server["url"] + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "items" in d.find_element(By.ID, "info").text)
    browser.execute_script("document.getElementById('k').value='10'; document.getElementById('rerank').value='ftf';")
    browser.find_element(By.ID, "q").send_keys("storage tanks", Keys.ENTER)
    wait.until(lambda d: _images_loaded(d, 10))
    # a server-side validation error is shown, not swallowed
    browser.execute_script("document.getElementById('q').removeAttribute('maxlength');")
    q = browser.find_element(By.ID, "q")
    q.clear()
    browser.execute_script("document.getElementById('q').value='x'.repeat(600);")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: "error 422" in d.find_element(By.ID, "status").text)


def test_image_upload_from_page(server, browser):
    browser.get(server["url"] + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "items" in d.find_element(By.ID, "info").text)
    browser.execute_script("document.getElementById('k').value='10';")
    png = sorted((server["source"] / "png").glob("*.png"))[2]
    browser.find_element(By.ID, "file").send_keys(str(png))
    wait.until(lambda d: _images_loaded(d, 10))
    first = browser.find_element(By.CSS_SELECTOR, "#grid .card .path").get_attribute("title")
    assert png.name in first
