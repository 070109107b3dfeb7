"""The web page over a FAISS-backed and a Milvus-backed index (headless chromium): the same query,
typed or with a box drawn on the map, shows the same tiles from both stores."""
from __future__ import annotations


import pytest

pytest.importorskip("fastapi")
pytest.importorskip("rasterio")
pytest.importorskip("faiss")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from _browser import chrome, require_browser, serve, stop  # noqa: E402
from rsitr.retrieval.bbox import parse_bbox  # noqa: E402
from rsitr.search import build as B  # noqa: E402
from rsitr.bench.search import write_sample_source  # noqa: E402
from rsitr.serve.app import create_app  # noqa: E402

require_browser()

TILE = 96


def _serve(idx):
    return serve(create_app(idx, inference="torch"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    src = write_sample_source(tmp_path_factory.mktemp("src"), n_png=2, grid=(3, 4), tile=TILE)
    root = tmp_path_factory.mktemp("idx")
    model = B.load_model("clip:tiny")
    o = dict(tile_size=TILE, batch_size=16, progress=False, engine="torch")
    B.build_index(src, "clip:tiny", root / "faiss", B.BuildOptions(**o), model=model)
    B.build_index(src, "clip:tiny", root / "milvus", B.BuildOptions(**o, store="milvus", store_options={"uri": str(root / "m.db")}), model=model)
    running = {name: _serve(root / name) for name in ("faiss", "milvus")}
    items = B.read_items(root / "faiss", B.read_manifest(root / "faiss"))
    yield {name: url for name, (_, _, url) in running.items()}, items
    for srv, th, _ in running.values():
        stop(srv, th)


@pytest.fixture(scope="module")
def browser():
    yield from chrome()


def _ids(drv):
    return drv.execute_script("return [...document.querySelectorAll('#grid .card')].map(c => +c.dataset.id)")


def _query(drv, url, q, box=None, draw=False):
    drv.get(url + "/")
    wait = WebDriverWait(drv, 60)
    wait.until(lambda d: "items" in d.find_element(By.ID, "info").text)
    wait.until(lambda d: d.find_element(By.ID, "mapbox").is_displayed())  # context footprints shown before any search
    if box is not None:
        drv.find_element(By.ID, "bbox").send_keys(box)
    if draw:  # drag over the top-left part of the map
        drv.find_element(By.ID, "draw").click()
        svg = drv.find_element(By.ID, "map")
        w, h = svg.size["width"], svg.size["height"]
        ActionChains(drv).move_to_element_with_offset(svg, -w // 2 + 8, -h // 2 + 8).click_and_hold() \
            .move_by_offset(w // 3, h // 4).release().perform()
        wait.until(lambda d: d.find_element(By.ID, "bbox").get_attribute("value").count(",") == 3)
    drv.find_element(By.ID, "q").send_keys(q, Keys.ENTER)
    wait.until(lambda d: "results for" in d.find_element(By.ID, "status").text or "error" in d.find_element(By.ID, "status").text)
    return _ids(drv), drv.find_element(By.ID, "status").text, drv.find_element(By.ID, "bbox").get_attribute("value")


def test_same_page_query_from_both_stores(servers, browser):
    urls, items = servers
    geo = [it for it in items if it.wgs84]
    w, s, e, n = geo[0].wgs84
    box = f"{w},{min(g.wgs84[1] for g in geo)},{(w + e) / 2},{n}"
    want = {it.id for it in geo if it.wgs84[0] <= parse_bbox(box).east and it.wgs84[1] <= n}
    got = {}
    for name, url in urls.items():
        ids, status, _ = _query(browser, url, "a river next to green fields")
        assert len(ids) == 14 and "14 results" in status
        boxed, status, _ = _query(browser, url, "a river next to green fields", box=box)
        assert "inside the box" in status and set(boxed) <= want and boxed
        got[name] = (ids, boxed)
    assert got["faiss"] == got["milvus"]


def test_box_drawn_on_the_map(servers, browser):
    urls, items = servers
    res = {}
    for name, url in urls.items():
        ids, status, value = _query(browser, url, "storage tanks", draw=True)
        box = parse_bbox(value)
        inside = {it.id for it in items if it.wgs84 and it.wgs84[0] <= box.east and it.wgs84[2] >= box.west
                  and it.wgs84[1] <= box.north and it.wgs84[3] >= box.south}
        assert "inside the box" in status and set(ids) == inside and 0 < len(ids) < 12
        res[name] = ids
    assert res["faiss"] == res["milvus"]
    _, status, _ = _query(browser, urls["faiss"], "x", box="0,10,1,5")
    assert "error 422" in status and "south" in status
