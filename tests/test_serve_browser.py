"""The web page in a real browser: generate (Ctrl+Enter, one job at a time, random seed shown, per-word
maps), open an image large and download it, copy and paste AUTOMATIC1111 parameters, the gallery
after a reload, img2img and inpainting with a painted mask, search (Enter) and heat maps.

Needs the `playwright` package and a system Chromium (Debian: `apt-get install chromium`); playwright's
own browser download is never used. Skipped when either is missing, unless SFUMATO_REQUIRE names them
(CI installs both): then it fails. Screenshots go to SFUMATO_SCREENSHOTS, else a tmp folder.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from test_serve import blocker, build_kit  # noqa: E402
from test_serve_compat import live_server, need  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PARAMETERS = ("a green cross\nNegative prompt: red\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, "
              "Seed: 1234, Size: 32x32, Model hash: 0123456789, Model: sd")


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict:
    return build_kit(tmp_path_factory)


@pytest.fixture(scope="module")
def served(kit):
    from sfumato.server import create_app

    models = kit["models"]
    app = create_app(lambda: models)
    with live_server(app) as url:
        yield url, app.state.server


@pytest.fixture
def shots(tmp_path) -> Path:
    out = Path(os.environ.get("SFUMATO_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def cards(page) -> int:
    return page.locator("#gallery .card").count()


def test_page(served, kit, shots):
    need("playwright", importlib.util.find_spec("playwright") is not None, "pip install playwright")
    need("chromium", CHROMIUM is not None, "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    url, server = served
    pictures = sorted(kit["images"].glob("*.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True)
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
            page = context.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('index')", timeout=30_000)

            # ---- Ctrl+Enter generates; one job of this page at a time; seed -1 is random and shown
            assert page.input_value("#seed") == "-1"
            page.fill("#prompt", "a red circle above a blue square")
            page.fill("#steps", "6")
            page.fill("#n", "2")
            page.check("#explainbox")
            _, release = blocker(server)  # hold the lane so the job is still waiting below
            try:
                page.press("#prompt", "Control+Enter")
                page.wait_for_function("document.getElementById('stepinfo').textContent.startsWith('queued')")
                assert page.locator("#generate").is_disabled()
                page.press("#negative", "Control+Enter")  # ignored while the job runs
            finally:
                release.set()
            page.wait_for_selector("#gallery .card", timeout=60_000)
            page.wait_for_function("!document.getElementById('generate').disabled")
            assert cards(page) == 2 and server.queue.pending() == 0
            first = page.locator("#gallery .card pre").first.text_content()
            assert "Steps: 6" in first
            seed = int(re.search(r"Seed: (\d+)", first).group(1))
            assert page.text_content("#seedinfo") == f"seeds {seed}–{seed + 1}" and page.input_value("#seed") == "-1"
            assert f"seed {seed}" in page.locator("#gallery .card .tools").first.text_content()
            assert page.locator("#gallery .words figure").count() >= 2 * 4  # a, red, circle, above, ...
            assert page.eval_on_selector("#bar div", "e => e.style.width") == "100%"
            assert page.eval_on_selector("#preview", "e => e.naturalWidth") > 0
            page.click("#reuseseed")
            assert page.input_value("#seed") == str(seed)
            page.screenshot(path=str(shots / "generate.png"), full_page=True)

            # ---- open large, download, copy parameters
            page.locator("#gallery .card > img").first.click()
            assert page.is_visible("#lightbox")
            assert page.get_attribute("#lbimg", "src") == page.locator("#gallery .card > img").first.get_attribute("src")
            page.screenshot(path=str(shots / "large.png"))
            with page.expect_download() as dl:
                page.click("#lbdown")
            assert dl.value.suggested_filename == f"sfumato-{seed}.png"
            saved = Image.open(dl.value.path())
            assert saved.format == "PNG" and saved.info["parameters"] == first
            page.keyboard.press("ArrowRight")
            assert f"Seed: {seed + 1}" in page.text_content("#lbtext")
            page.keyboard.press("Escape")
            assert not page.is_visible("#lightbox")
            page.locator("#gallery .card button.copy").first.click()
            assert page.evaluate("navigator.clipboard.readText()") == first

            # ---- an AUTOMATIC1111 parameters text pasted into the prompt fills the form
            page.fill("#prompt", "")
            page.eval_on_selector("#prompt", """(e, text) => {
                const data = new DataTransfer(); data.setData('text/plain', text);
                e.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
            }""", PARAMETERS)
            form = {k: page.input_value(f"#{k}") for k in ("prompt", "negative", "steps", "guidance", "seed", "width",
                                                            "height", "scheduler")}
            assert form == {"prompt": "a green cross", "negative": "red", "steps": "7", "guidance": "5.5",
                            "seed": "1234", "width": "32", "height": "32", "scheduler": "DPM++ 2M Karras"}
            page.fill("#prompt", "x")
            page.evaluate("text => navigator.clipboard.writeText(text)", PARAMETERS.replace("Steps: 7", "Steps: 9"))
            page.click("#pasteparams")  # the button reads the clipboard (asynchronously: wait for the form)
            page.wait_for_function("document.querySelector('#steps').value === '9'", timeout=10_000)
            assert page.input_value("#prompt") == "a green cross"

            # ---- the gallery survives a reload
            page.reload()
            page.wait_for_function("document.getElementById('status').textContent.includes('index')", timeout=30_000)
            assert cards(page) == 2 and page.locator("#gallery .card pre").first.text_content() == first

            # ---- image to image
            page.click(".modes button[data-mode=img2img]")
            page.set_input_files("#ifile", str(pictures[0]))
            page.wait_for_selector("#iimg:not([hidden])")
            for field, value in (("prompt", "a blue square"), ("steps", "4"), ("n", "1"), ("seed", "3"),
                                 ("strength", "0.5")):
                page.fill(f"#{field}", value)
            page.uncheck("#explainbox")
            with page.expect_request("**/v1/generate") as sent:
                page.click("#generate")
            body = sent.value.post_data_json
            assert body["init_image"].startswith("data:image/png") and body["strength"] == 0.5 and "mask" not in body
            page.wait_for_function("document.querySelectorAll('#gallery .card').length == 3", timeout=60_000)
            assert "Denoising strength: 0.5" in page.locator("#gallery .card pre").first.text_content()

            # ---- inpainting: paint the right half of the picture
            page.click(".modes button[data-mode=inpaint]")
            page.wait_for_function("document.getElementById('mask').width == 32")
            box = page.locator("#mask").bounding_box()
            page.click("#generate")  # nothing painted yet
            assert "paint the area" in page.text_content("#generr")
            page.fill("#brush", "25")
            page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + 5)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] - 5, steps=8)
            page.mouse.up()
            with page.expect_request("**/v1/generate") as sent:
                page.click("#generate")
            mask = Image.open(io.BytesIO(base64.b64decode(sent.value.post_data_json["mask"].split(",", 1)[1])))
            mask = mask.convert("L")
            assert mask.size == (32, 32) and mask.getpixel((25, 16)) == 255 and mask.getpixel((4, 16)) == 0
            page.wait_for_function("document.querySelectorAll('#gallery .card').length == 4", timeout=60_000)
            page.screenshot(path=str(shots / "inpaint.png"), full_page=True)
            page.locator("#gallery .card").nth(3).locator("text=→ img2img").click()  # send a gallery image back
            assert page.is_visible("#initrow") and not page.is_visible("#paintrow")
            assert page.get_attribute("#iimg", "src") == page.locator("#gallery .card > img").nth(3).get_attribute("src")

            # ---- search: Enter searches
            page.click("header button[data-tab=search]")
            page.fill("#query", "a red circle")
            page.press("#query", "Enter")
            page.wait_for_selector("#hits .card", timeout=30_000)
            assert page.locator("#hits .card").count() == 8
            page.screenshot(path=str(shots / "search.png"), full_page=True)
            page.set_input_files("#sfile", str(pictures[3]))  # this picture, but blue
            page.wait_for_selector("#simg:not([hidden])")
            page.fill("#query", "blue")
            page.fill("#k", "3")
            page.press("#k", "Enter")
            page.wait_for_function("document.querySelectorAll('#hits .card').length == 3")

            # ---- heat maps
            page.click("header button[data-tab=explain]")
            page.set_input_files("#efile", str(pictures[3]))
            page.wait_for_selector("#eimg:not([hidden])")
            page.fill("#phrases", "red circle, blue square")
            page.press("#phrases", "Enter")
            page.wait_for_selector("#maps .card", timeout=30_000)
            assert page.locator("#maps .card").count() == 2
            assert "p=" in page.locator("#maps .card pre").first.text_content()
            page.screenshot(path=str(shots / "heatmaps.png"), full_page=True)

            # ---- a mistake is shown, and the button comes back
            page.click("header button[data-tab=gen]")
            page.click(".modes button[data-mode=txt2img]")
            page.fill("#prompt", "x" * 1001)
            page.click("#generate")
            page.wait_for_function("document.getElementById('generr').textContent.includes('limit is 1000')")
            assert not page.locator("#generate").is_disabled()
        finally:
            browser.close()
    print(f"screenshots: {shots}")
