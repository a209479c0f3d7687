"""The web page in a real browser: generate with progress and per-word maps, then search.

Needs the `playwright` package and a system Chromium (Debian: `apt-get install chromium`); playwright's
own browser download is never used. Skipped when either is missing. Screenshots go to a tmp folder.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no system chromium"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from test_serve import build_kit  # noqa: E402


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict:
    return build_kit(tmp_path_factory)


@pytest.fixture(scope="module")
def url(kit):
    """The app served by uvicorn on a free loopback port, in a thread."""
    import uvicorn

    from sfumato.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = kit["models"]
    server = uvicorn.Server(uvicorn.Config(create_app(lambda: models), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    end = time.time() + 30
    while not server.started:
        assert time.time() < end and t.is_alive()
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


def test_page_generates_searches_and_explains(url, kit, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('index')", timeout=30_000)
            page.fill("#prompt", "a red circle above a blue square")
            page.fill("#steps", "6")
            page.fill("#n", "2")
            page.check("#explainbox")
            page.click("#generate")
            page.wait_for_selector("#gallery .card", timeout=60_000)
            assert page.locator("#gallery .card").count() == 2
            assert "Steps: 6" in page.locator("#gallery .card pre").first.text_content()
            assert page.locator("#gallery .words figure").count() >= 2 * 4  # a, red, circle, above, ...
            assert page.eval_on_selector("#bar div", "e => e.style.width") == "100%"
            assert page.eval_on_selector("#preview", "e => e.naturalWidth") > 0
            page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)

            page.click("header button[data-tab=search]")
            page.fill("#query", "a red circle")
            page.click("#dosearch")
            page.wait_for_selector("#hits .card", timeout=30_000)
            assert page.locator("#hits .card").count() == 8
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
            query = sorted(kit["images"].glob("*.png"))[3]
            page.set_input_files("#sfile", str(query))  # this picture, but blue
            page.wait_for_selector("#simg:not([hidden])")
            page.fill("#query", "blue")
            page.fill("#k", "3")
            page.click("#dosearch")
            page.wait_for_function("document.querySelectorAll('#hits .card').length == 3")

            page.click("header button[data-tab=explain]")
            page.set_input_files("#efile", str(query))
            page.wait_for_selector("#eimg:not([hidden])")
            page.fill("#phrases", "red circle, blue square")
            page.click("#doexplain")
            page.wait_for_selector("#maps .card", timeout=30_000)
            assert page.locator("#maps .card").count() == 2
            assert "p=" in page.locator("#maps .card pre").first.text_content()
            page.screenshot(path=str(tmp_path / "heatmaps.png"), full_page=True)

            page.click("header button[data-tab=gen]")
            page.fill("#prompt", "x" * 1001)
            page.click("#generate")
            page.wait_for_function("document.getElementById('generr').textContent.includes('limit is 1000')")
        finally:
            browser.close()
    print(f"screenshots: {tmp_path}")
