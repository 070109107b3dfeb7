"""The web page in a real headless browser (Debian chromium + chromium-driver, selenium).

Skipped, with the reason, only when selenium or the chromium/chromedriver binaries are missing
(.ci/run installs them). ``RSITR_SCREENSHOT=/path.png`` saves a screenshot of the result page.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("rasterio")
pytest.importorskip("faiss")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from rsitr.search import build as B  # noqa: E402
from rsitr.bench.search import write_sample_source  # noqa: E402
from rsitr.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow  # a headless browser and a live server

CHROME = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
if CHROME is None or DRIVER is None:
    pytest.skip(f"chromium/chromedriver not installed (chromium: {CHROME}, chromedriver: {DRIVER}); "
                "apt-get install -y chromium chromium-driver", allow_module_level=True)

TILE = 96


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    src = write_sample_source(tmp_path_factory.mktemp("src"), n_png=4, grid=(3, 4), tile=TILE)
    idx = tmp_path_factory.mktemp("idx") / "index"
    B.build_index(src, "clip:tiny", idx, B.BuildOptions(tile_size=TILE, batch_size=16, keep_tokens=True, progress=False))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(idx), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        if time.time() - t0 > 30 or not th.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "source": src}
    srv.should_exit = True
    th.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROME
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
              "--disable-extensions", "--no-first-run"):
        opts.add_argument(a)
    try:
        drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    except Exception as exc:  # noqa: BLE001 - an installed but unusable browser is an error, not a skip
        pytest.fail(f"chromium is installed but did not start: {exc}")
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


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
