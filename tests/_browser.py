"""What the browser tests share: the chromium/chromedriver lookup, a uvicorn server on a free
port in a thread, and one headless chromium (selenium)."""
from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

CHROME = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")


def require_browser() -> None:
    """Skip the calling test module, with the reason, when chromium or chromedriver is missing."""
    if CHROME is None or DRIVER is None:
        pytest.skip(f"chromium/chromedriver not installed (chromium: {CHROME}, chromedriver: {DRIVER}); "
                    "apt-get install -y chromium chromium-driver", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app):
    """Start ``app`` on 127.0.0.1 in a daemon thread; returns (server, thread, base URL)."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        if time.time() - t0 > 30 or not th.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    return srv, th, f"http://127.0.0.1:{port}"


def stop(srv, th) -> None:
    srv.should_exit = True
    th.join(10)


def chrome():
    """A headless chromium driver (a generator for a fixture: yields it, quits after)."""
    from selenium import webdriver
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
