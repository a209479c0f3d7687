"""The compatible endpoints: AUTOMATIC1111's /sdapi/v1 and clip-retrieval's back-end API, with the
request fields and response shapes their clients read. clip-retrieval's own client is used unchanged
(`pip install --no-deps clip-retrieval`, or SFUMATO_CLIP_RETRIEVAL_WHEEL=its .whl); tests that need an
optional tool skip without it, unless SFUMATO_REQUIRE names it (CI provides them): then they fail.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import threading
import time
import types
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageChops, PngImagePlugin

pytest.importorskip("fastapi")
from test_serve import blocker, build_kit, detail, make_client, png_b64, sample_b64, wait_ready  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict:
    return build_kit(tmp_path_factory)


@pytest.fixture(scope="module")
def client(kit):
    with make_client(kit) as c:
        wait_ready(c)
        yield c


def b64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def need(what: str, present: bool, hint: str) -> None:
    """Skip when an optional tool is missing, or fail when SFUMATO_REQUIRE says it must be there."""
    if present:
        return
    if what in os.environ.get("SFUMATO_REQUIRE", "").split():
        pytest.fail(f"{what} is missing but SFUMATO_REQUIRE requires it ({hint})")
    pytest.skip(f"{what} is not installed ({hint})")


@contextlib.contextmanager
def live_server(app):
    """The app served by uvicorn on a free loopback port, in a thread: real sockets, for clients that
    open their own connections and for clients that hang up."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    end = time.time() + 30
    while not server.started:
        assert time.time() < end and t.is_alive()
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def live(kit):
    from sfumato.server import create_app

    models = kit["models"]
    app = create_app(lambda: models)
    with live_server(app) as url:
        yield url, app


def txt2img(client, **body):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 5, **body})
    assert r.status_code == 200, r.json()
    return r.json()


def pixels(out: dict, i: int = 0) -> bytes:
    return b64_image(out["images"][i]).convert("RGB").tobytes()


# ---------------------------------------------------------------- AUTOMATIC1111


def test_txt2img_shape(client):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 11, "steps": 3, "cfg_scale": 5,
            "sampler_name": "Euler a", "batch_size": 2, "n_iter": 2, "restore_faces": False, "enable_hr": False,
            "override_settings": {}, "send_images": True}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200
    out = r.json()
    assert set(out) == {"images", "parameters", "info"} and len(out["images"]) == 4
    assert out["parameters"]["prompt"] == "a red circle" and out["parameters"]["cfg_scale"] == 5
    info = json.loads(out["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11 and info["sampler_name"] == "Euler a"
    assert info["width"] == info["height"] == 32 and len(info["infotexts"]) == 4
    img = b64_image(out["images"][3])
    assert img.size == (32, 32)
    assert img.info["parameters"] == info["infotexts"][3]
    assert "Negative prompt: blue" in info["infotexts"][0] and "Seed: 14" in info["infotexts"][3]


def test_txt2img_random_seed_and_sampler_index(client):
    out = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "seed": -1,
                                                  "sampler_index": "DDIM"}).json()
    info = json.loads(out["info"])
    assert info["seed"] >= 0 and info["sampler_name"] == "DDIM"


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "x", "steps": 151}, "steps must be between 1 and 150"),
    ({"prompt": "x", "batch_size": 4, "n_iter": 3}, "number of images must be between 1 and 8, got 12"),
    ({"prompt": "x", "sampler_name": "Karras Magic"}, "unknown scheduler"),
    ({"prompt": "x", "width": 2048}, "width must be between 0 and 1024"),
    ({"prompt": "x", "cfg_scale": 60}, "guidance must be between 0 and 50"),
    ({"prompt": "x", "batch_size": 0}, "at least 1"),
])
def test_txt2img_limits(client, body, needle):
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422 and needle in detail(r), r.json()


def test_img2img_with_mask(client, kit):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    body = {"prompt": "a blue square", "init_images": ["data:image/png;base64," + sample_b64(kit)],
            "mask": png_b64(mask), "denoising_strength": 0.6, "steps": 5, "seed": 3}
    out = client.post("/sdapi/v1/img2img", json=body).json()
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.6 and "Denoising strength: 0.6" in info["infotexts"][0]
    result = b64_image(out["images"][0]).convert("RGB")
    init = Image.open(sorted(kit["images"].glob("*.png"))[0]).convert("RGB")
    assert result.crop((0, 0, 16, 32)).tobytes() == init.crop((0, 0, 16, 32)).tobytes()  # unmasked kept
    assert out["parameters"]["init_images"] is None
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": []})
    assert r.status_code == 422 and "exactly one" in detail(r)


def test_progress_and_interrupt(kit):
    with make_client(kit) as c:
        wait_ready(c)
        idle = c.get("/sdapi/v1/progress").json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        hold, release = blocker(c.app.state.server)
        job = c.post("/v1/generate", json={"prompt": "a red circle", "steps": 150}).json()["id"]
        release.set()
        end = time.time() + 30
        while (p := c.get("/sdapi/v1/progress").json())["state"]["sampling_step"] < 2 or p["current_image"] is None:
            assert time.time() < end
            time.sleep(0.005)
        assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 150 and p["state"]["job"] == job
        b64_image(p["current_image"])  # a PNG preview
        assert "current_image" in c.get("/sdapi/v1/progress?skip_current_image=true").json()
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        while c.get(f"/v1/jobs/{job}").json()["status"] == "running":
            assert time.time() < end
            time.sleep(0.01)
        assert c.get(f"/v1/jobs/{job}").json()["status"] == "cancelled"


def test_samplers_models_options(client):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M Karras" in names
    models = client.get("/sdapi/v1/sd-models").json()
    assert len(models) == 1 and {"title", "model_name", "hash", "filename"} <= set(models[0])
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == models[0]["title"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["title"],
                                                  "live_previews_enable": False}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["live_previews_enable"] is False
    for body, needle in (({"sd_model_checkpoint": "sd_xl_base_1.0"}, "only"), ({"samples_format": "jpg"}, "png"),
                         ({"no_such_option": 1}, "unknown option 'no_such_option'"),
                         ({"live_previews_enable": "yes"}, "must be a bool")):
        r = client.post("/sdapi/v1/options", json=body)
        assert r.status_code == 422 and needle in detail(r)


def test_png_info(client):
    text = "a red circle\nNegative prompt: blue\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 32x32"
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    meta.add_text("Comment", "hello")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=meta)
    out = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()
    assert out["info"] == text and out["items"] == {"Comment": "hello"}
    assert out["parameters"]["Seed"] == "1" and out["parameters"]["negative_prompt"] == "blue"
    plain = client.post("/sdapi/v1/png-info", json={"image": png_b64(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


# webuiapi's txt2img payload with its defaults (webuiapi 0.9), but 64 px and 2 steps to be quick
WEBUIAPI_TXT2IMG = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
    "prompt": "a red circle", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7.0,
    "width": 64, "height": 64, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True, "sampler_name": "Euler a",
    "scheduler": "automatic", "sampler_index": "Euler a", "script_name": None, "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def test_webuiapi_defaults_pass_and_a_foreign_size_is_warned(client):
    info = json.loads(txt2img(client, **WEBUIAPI_TXT2IMG)["info"])
    assert info["width"] == 64 and info["sampler_name"] == "Euler a"
    assert len(info["warnings"]) == 1 and "native size 32x32" in info["warnings"][0]
    assert json.loads(txt2img(client)["info"])["warnings"] == []  # native size: nothing to say


def test_schedulers_endpoint_and_scheduler_field(client):
    listed = client.get("/sdapi/v1/schedulers").json()
    assert [(s["name"], s["label"]) for s in listed] == [("automatic", "Automatic"), ("uniform", "Uniform"),
                                                           ("karras", "Karras")]
    plain = txt2img(client, sampler_name="DPM++ 2M")
    karras = txt2img(client, sampler_name="DPM++ 2M", scheduler="Karras")
    assert pixels(karras) != pixels(plain)
    assert pixels(karras) == pixels(txt2img(client, sampler_name="DPM++ 2M Karras"))
    assert json.loads(karras["info"])["sampler_name"] == "DPM++ 2M Karras"
    assert "Sampler: DPM++ 2M Karras" in json.loads(karras["info"])["infotexts"][0]
    for same in ("Automatic", "automatic", "uniform"):
        assert pixels(txt2img(client, sampler_name="DPM++ 2M", scheduler=same)) == pixels(plain)


@pytest.mark.parametrize("body, needle", [
    ({"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler 'Karras' is available with sampler DPM++ 2M"),
    ({"scheduler": "Exponential"}, "scheduler 'Exponential' is not available; choose from Automatic, Uniform, Karras"),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Uniform"}, "scheduler 'Uniform' contradicts"),
])
def test_scheduler_refused(client, body, needle):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **body})
    assert r.status_code == 422 and needle in detail(r), r.json()


def test_send_images_false(client):
    out = txt2img(client, send_images=False, batch_size=2)
    assert out["images"] == [] and json.loads(out["info"])["all_seeds"] == [5, 6]


@pytest.mark.parametrize("path, body, field", [
    ("txt2img", {"restore_faces": True}, "restore_faces"),
    ("txt2img", {"styles": ["cinematic"]}, "styles"),
    ("txt2img", {"subseed": 3, "subseed_strength": 0.5}, "subseed_strength"),
    ("txt2img", {"seed_resize_from_w": 640}, "seed_resize_from_w"),
    ("txt2img", {"tiling": True}, "tiling"),
    ("txt2img", {"sampler_name": "Euler a", "eta": 0.5}, "eta"),
    ("txt2img", {"sampler_name": "DDIM", "eta": 1.0}, "eta"),
    ("txt2img", {"s_churn": 0.5}, "s_churn"),
    ("txt2img", {"s_noise": 1.003}, "s_noise"),
    ("txt2img", {"s_min_uncond": 0.2}, "s_min_uncond"),
    ("txt2img", {"script_name": "x/y/z plot"}, "script_name"),
    ("txt2img", {"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts"),
    ("txt2img", {"override_settings": {"sd_vae": "vae-ft-mse-840000.safetensors"}}, "override_settings.sd_vae"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers"),
    ("txt2img", {"override_settings": {"img2img_fix_steps": True}}, "override_settings.img2img_fix_steps"),
    ("txt2img", {"save_images": True}, "save_images"),
    ("txt2img", {"refiner_checkpoint": "sd_xl_refiner_1.0"}, "refiner_checkpoint"),
    ("txt2img", {"infotext": "a cat\nSteps: 20"}, "infotext"),
    ("txt2img", {"firstphase_width": 16}, "firstphase_width"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "Latent"}, "hr_upscaler"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ("txt2img", {"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
    ("txt2img", {"enable_hr": True, "hr_scale": 1.1}, "multiple of 4"),
    ("txt2img", {"distilled_cfg_scale": 3.5}, "distilled_cfg_scale: Extra inputs are not permitted"),
    ("img2img", {"enable_hr": True}, "enable_hr: Extra inputs are not permitted"),
    ("img2img", {"resize_mode": 3}, "resize_mode"),
    ("img2img", {"mask": "MASK", "inpainting_fill": 2}, "inpainting_fill"),
    ("img2img", {"mask": "MASK", "mask_round": False}, "mask_round"),
    ("img2img", {"initial_noise_multiplier": 1.2}, "initial_noise_multiplier"),
    ("img2img", {"latent_mask": "MASK"}, "latent_mask"),
])
def test_what_sfumato_cannot_do_is_refused_by_name(client, kit, path, body, field):
    base = {"prompt": "a red circle", "steps": 2}
    if path == "img2img":
        base["init_images"] = [sample_b64(kit)]
        if body.get("mask") == "MASK" or body.get("latent_mask") == "MASK":
            body = {k: png_b64(Image.new("L", (32, 32), 255)) if v == "MASK" else v for k, v in body.items()}
    r = client.post(f"/sdapi/v1/{path}", json={**base, **body})
    assert r.status_code == 422 and field in detail(r), r.json()


def test_hires_fix(client):
    first = txt2img(client, sampler_name="Euler")
    plain = b64_image(first["images"][0]).convert("RGB")
    body = {"sampler_name": "Euler", "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos",
            "hr_second_pass_steps": 4}
    # no second pass at strength 0: the first pass, upscaled
    same = txt2img(client, denoising_strength=0, **body)
    assert pixels(same) == plain.resize((64, 64), Image.LANCZOS).tobytes()
    out = txt2img(client, denoising_strength=0.6, batch_size=2, **body)
    info = json.loads(out["info"])
    assert [b64_image(i).size for i in out["images"]] == [(64, 64)] * 2 and info["all_seeds"] == [5, 6]
    assert info["width"] == 32 and info["denoising_strength"] == 0.6  # AUTOMATIC1111: the first pass's size
    text = info["infotexts"][1]
    for needle in ("Size: 32x32", "Seed: 6", "Hires upscale: 2", "Hires steps: 4", "Hires upscaler: Lanczos",
                   "Denoising strength: 0.6"):
        assert needle in text, text
    assert b64_image(out["images"][1]).info["parameters"] == text
    assert pixels(out) != pixels(same)
    sized = txt2img(client, enable_hr=True, hr_resize_x=48, hr_upscaler="Nearest", hr_sampler_name="DDIM",
                    hr_prompt="a blue circle")
    assert b64_image(sized["images"][0]).size == (48, 48)
    text = json.loads(sized["info"])["infotexts"][0]
    assert "Hires resize: 48x0" in text and "Hires sampler: DDIM" in text and 'Hires prompt: "a blue circle"' in text


def test_img2img_resize_modes(client, kit):
    wide = Image.new("RGB", (64, 32), (200, 0, 0))
    wide.paste((0, 0, 200), (0, 0, 16, 32))  # a blue band on the left quarter
    for mode in (0, 1, 2):
        body = {"prompt": "a red circle", "init_images": [png_b64(wide)], "resize_mode": mode, "steps": 4,
                "denoising_strength": 0}  # strength 0: the fitted init image comes back
        out = client.post("/sdapi/v1/img2img", json=body).json()
        img = b64_image(out["images"][0]).convert("RGB")
        assert img.size == (32, 32)
        left = img.getpixel((1, 16))
        if mode == 1:  # crop the middle: the blue band is cut off
            assert left[0] > 150 and left[2] < 50, left
        else:  # stretched or fitted: blue on the left
            assert left[2] > 150, (mode, left)
        if mode == 2:  # fitted 32x16 in the middle, the edges stretched into the rest
            assert img.getpixel((1, 1))[2] > 150


def test_inpainting_blur_invert_fill_and_only_masked(client, kit):
    init = Image.open(sorted(kit["images"].glob("*.png"))[0]).convert("RGB")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    body = {"prompt": "a blue square", "init_images": [png_b64(init)], "mask": png_b64(mask), "steps": 4,
            "seed": 3, "denoising_strength": 0.9}

    def run(**kw):
        r = client.post("/sdapi/v1/img2img", json={**body, **kw})
        assert r.status_code == 200, r.json()
        return b64_image(r.json()["images"][0]).convert("RGB"), json.loads(r.json()["info"])

    hard, _ = run()
    soft, info = run(mask_blur=4)
    assert "Mask blur: 4" in info["infotexts"][0]
    assert soft.crop((0, 0, 6, 32)).tobytes() == init.crop((0, 0, 6, 32)).tobytes()  # beyond the blur: kept
    assert soft.crop((12, 0, 16, 32)).tobytes() != init.crop((12, 0, 16, 32)).tobytes()  # the edge fades
    inverted, _ = run(inpainting_mask_invert=1)
    assert inverted.crop((16, 0, 32, 32)).tobytes() == init.crop((16, 0, 32, 32)).tobytes()
    assert inverted.crop((0, 0, 16, 32)).tobytes() != init.crop((0, 0, 16, 32)).tobytes()
    filled, info = run(inpainting_fill=0)
    assert "Masked content: fill" in info["infotexts"][0] and filled.tobytes() != hard.tobytes()
    assert filled.crop((0, 0, 16, 32)).tobytes() == init.crop((0, 0, 16, 32)).tobytes()
    small = Image.new("L", (32, 32), 0)
    small.paste(255, (20, 20, 26, 26))
    only, info = run(mask=png_b64(small), inpaint_full_res=True, inpaint_full_res_padding=2)
    assert "Inpaint area: Only masked" in info["infotexts"][0]
    diff = ImageChops.difference(only, init).getbbox()
    assert diff is not None and 18 <= diff[0] and 18 <= diff[1]  # only around the mask


def test_webuiapi_img2img_defaults_with_a_mask_pass(client, kit):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {**{k: v for k, v in WEBUIAPI_TXT2IMG.items() if not k.startswith(("hr_", "enable_hr", "firstphase"))},
            "init_images": [sample_b64(kit)], "mask": png_b64(mask), "resize_mode": 0, "denoising_strength": 0.75,
            "image_cfg_scale": 1.5, "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True,
            "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": 1,
            "include_init_images": False, "width": 32, "height": 32}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.json()
    assert b64_image(r.json()["images"][0]).size == (32, 32)


def test_webuiapi_client_unchanged(live, kit):
    """webuiapi, the Python client of AUTOMATIC1111's API, unchanged against a live server."""
    need("webuiapi", importlib.util.find_spec("webuiapi") is not None, "pip install webuiapi")
    import webuiapi

    url, _ = live
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]))  # asks for /scripts at once
    assert api.get_scripts() == {"txt2img": [], "img2img": []} and not api.has_controlnet
    out = api.txt2img(prompt="a red circle", width=64, height=64, steps=2, seed=1)
    assert isinstance(out.image, Image.Image) and out.image.size == (64, 64) and len(out.images) == 1
    assert out.info["seed"] == 1 and out.info["all_seeds"] == [1] and out.info["sampler_name"] == "Euler a"
    assert out.parameters["prompt"] == "a red circle" and "Seed: 1" in out.image.info["parameters"]
    again = api.txt2img(prompt="a red circle", width=64, height=64, steps=2, seed=1)
    assert again.image.tobytes() == out.image.tobytes()
    edited = api.img2img(images=[out.image], prompt="a blue circle", width=64, height=64, steps=2, seed=2)
    assert edited.image.size == (64, 64) and edited.info["denoising_strength"] == 0.75
    assert edited.image.tobytes() != out.image.tobytes()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    masked = api.img2img(images=[out.image], mask_image=mask, prompt="a blue square", width=64, height=64, steps=2)
    assert masked.image.size == (64, 64) and "Inpaint area: Only masked" in masked.info["infotexts"][0]
    read = api.png_info(out.image)  # webuiapi re-encodes the image with its text chunks
    assert read.info == out.image.info["parameters"] and read.parameters["Seed"] == "1"
    title = api.get_sd_models()[0]["title"]
    assert api.util_get_model_names() == [title] and api.util_get_current_model() == title
    api.util_set_model(title)
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    api.util_wait_for_ready(check_interval=0.1)  # reads /progress: nothing running
    # its defaults (512x512, 20 steps) are over the per-step cost cap of a 32-px model: refused at once
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="a red circle")
    assert e.value.args[0] == 422 and "over the limit per step" in e.value.args[1]


def test_client_that_hangs_up_has_its_job_cancelled(live):
    url, app = live
    server = app.state.server
    _, release = blocker(server)  # the lane is busy: the request's job waits behind it
    try:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "a red circle", "steps": 5}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        end = time.time() + 30
        while server.queue.pending() < 2:  # the blocker and the request's job
            assert time.time() < end
            time.sleep(0.01)
        job = next(j for j in list(server.queue._jobs.values()) if j.kind == "generate" and not j.done.is_set())
        sock.close()
        while not job.done.is_set():
            assert time.time() < end, "the job of a client that hung up was not cancelled"
            time.sleep(0.01)
        assert job.status == "cancelled" and server.queue.pending() == 1
    finally:
        release.set()


# ---------------------------------------------------------------- clip-retrieval


def test_indices_list(client):
    assert client.get("/indices-list").json() == ["shapes"]


def test_knn_service_text_image_embedding(client, kit):
    r = client.post("/knn-service", json={"text": "a red circle", "modality": "image", "num_images": 3,
                                          "indice_name": "shapes", "deduplicate": False, "use_safety_model": True,
                                          "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": ""})
    hits = r.json()
    assert r.status_code == 200 and len(hits) == 3
    assert {"id", "similarity", "caption", "image"} <= set(hits[0])
    assert b64_image(hits[0]["image"]).size == (32, 32)
    by_image = client.post("/knn-service", json={"image": sample_b64(kit, 4), "num_images": 1}).json()
    assert by_image[0]["id"] == 4 and by_image[0]["similarity"] > 0.999
    vec = kit["models"].embedder.embed_texts(["a red circle"])[0].tolist()
    by_vec = client.post("/knn-service", json={"embedding_input": vec, "num_images": 3}).json()
    assert [h["id"] for h in by_vec] == [h["id"] for h in hits]


@pytest.mark.parametrize("body, code, needle", [
    ({"text": "x", "modality": "text"}, 422, "image embeddings only"),
    ({"image_url": "http://example.org/a.png"}, 422, "fetches nothing"),
    ({"text": "x", "indice_name": "laion5B"}, 404, "no index named 'laion5B'"),
    ({"text": "x", "num_images": 10_000}, 422, "num_images must be between 1 and 200"),
    ({}, 422, "give text, image or embedding_input"),
])
def test_knn_service_rejects(client, body, code, needle):
    r = client.post("/knn-service", json=body)
    assert r.status_code == code and needle in detail(r), r.json()


def test_metadata(client):
    """clip-retrieval's shape, a plain list of {id, metadata}: its web page merges each metadata (caption, image)
    into the hit of that id (`(await getMetadata(ids)).map(({ id, metadata }) => ...)`)."""
    out = client.post("/metadata", json={"ids": [0, 3, 999], "indice_name": "shapes"}).json()
    assert isinstance(out, list) and [m["id"] for m in out] == [0, 3] and set(out[0]) == {"id", "metadata"}
    meta = out[1]["metadata"]
    assert isinstance(meta["caption"], str) and b64_image(meta["image"]).size == (32, 32)
    assert client.post("/metadata", json={"ids": [], "indice_name": "shapes"}).json() == []


def test_knn_service_result_ids_beyond_num_images(client):
    """Its web page asks for 40 images and 3,000 result ids, then the rest's metadata as the user scrolls."""
    hits = client.post("/knn-service", content=json.dumps({"text": "a red circle", "modality": "image", "num_images": 2,
                                                          "num_result_ids": 3000, "indice_name": "shapes"})).json()
    assert len(hits) == 8 and all(set(h) == {"id", "similarity", "caption", "image"} for h in hits[:2])
    assert all(set(h) == {"id", "similarity"} for h in hits[2:])
    r = client.post("/knn-service", json={"text": "x", "num_images": 2, "num_result_ids": 3001})
    assert r.status_code == 422 and "num_result_ids must be between 1 and 3000" in detail(r)


def test_knn_service_deduplicate(kit, tmp_path):
    """Two files of one picture (same pixels, other bytes): deduplicate keeps the better-ranked, as
    clip-retrieval's back end does; without it both come back."""
    from fastapi.testclient import TestClient

    from sfumato.index import open_index
    from sfumato.server import create_app
    from sfumato.server.models import IndexHandle, Models

    index = tmp_path / "dup"
    shutil.copytree(kit["index"], index)
    m = kit["models"]
    models = Models(pipe=m.pipe, embedder=m.embedder, indexes={"dup": IndexHandle("dup", index, open_index(index))})
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Comment", "a copy")
    buf = io.BytesIO()
    Image.open(sorted(kit["images"].glob("*.png"))[0]).save(buf, format="PNG", pnginfo=meta)
    with TestClient(create_app(lambda: models)) as c:
        wait_ready(c)
        r = c.post("/v1/index/dup/add", json={"images": [{"image": base64.b64encode(buf.getvalue()).decode()}]})
        assert r.json()["added"] == 1, r.json()
        body = {"image": sample_b64(kit, 0), "num_images": 9, "indice_name": "dup"}
        both = c.post("/knn-service", json={**body, "deduplicate": False}).json()
        assert {h["id"] for h in both[:2]} == {0, 8} and both[1]["similarity"] > 0.999
        one = c.post("/knn-service", json={**body, "deduplicate": True}).json()
        assert one[0]["id"] == both[0]["id"] and both[1]["id"] not in [h["id"] for h in one]
        assert c.post("/knn-service", json=body).json() == both  # the back end's default: false


def test_cors_opens_the_clip_retrieval_endpoints_to_named_origins(kit):
    """clip-retrieval's web page served elsewhere queries the back end from its own origin: --cors lets
    that origin (and only it, only there) through the origin check, with CORS headers the browser reads."""
    front, evil = "https://front.example", "https://evil.example"
    search = {"text": "a red circle", "num_images": 1, "indice_name": "shapes"}

    def preflight(c, path, origin, method="POST"):
        return c.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                        "Access-Control-Request-Headers": "content-type"})

    with make_client(kit, cors=[front], api_key="k") as c:
        key = {"Authorization": "Bearer k"}
        c.headers.update(key)
        wait_ready(c)
        del c.headers["Authorization"]
        for path, method in (("/knn-service", "POST"), ("/metadata", "POST"), ("/indices-list", "GET")):
            r = preflight(c, path, front, method)  # no key: a browser sends none in a preflight
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == front, (path, r.text)
            assert method in r.headers["access-control-allow-methods"]
        r = c.post("/knn-service", json=search, headers={"Origin": front, **key})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == front
        r = c.get("/indices-list", headers={"Origin": front, **key})
        assert r.json() == ["shapes"] and r.headers["access-control-allow-origin"] == front
        r = c.post("/knn-service", json=search, headers={"Origin": front})  # a refusal the page can read
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == front
        assert "access-control-allow-origin" not in preflight(c, "/knn-service", evil).headers
        r = c.post("/knn-service", json=search, headers={"Origin": evil, **key})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        # the other endpoints stay closed to that origin too
        assert "access-control-allow-origin" not in preflight(c, "/sdapi/v1/txt2img", front).headers
        assert c.post("/sdapi/v1/interrupt", headers={"Origin": front, **key}).status_code == 403
    with make_client(kit, cors=["*"]) as c:
        wait_ready(c)
        assert preflight(c, "/knn-service", evil).headers["access-control-allow-origin"] == "*"
        r = c.post("/knn-service", json=search, headers={"Origin": evil})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    with make_client(kit) as c:  # the default: no CORS, foreign POSTs refused
        wait_ready(c)
        r = preflight(c, "/knn-service", front)
        assert not any(h.startswith("access-control-") for h in r.headers)
        assert c.post("/knn-service", json=search, headers={"Origin": front}).status_code == 403


@pytest.mark.parametrize("origin", ["https://front.example/", "https://front.example/app", "front.example",
                                    "null", "https://Front.example"])
def test_cors_origin_must_be_one_a_browser_sends(origin, capsys):
    from sfumato.cli import main

    assert main(["serve", "--cors", origin]) == 2
    assert "--cors" in capsys.readouterr().err


def clip_client_module() -> types.ModuleType:
    """clip-retrieval's own client module, unchanged, from the wheel SFUMATO_CLIP_RETRIEVAL_WHEEL names or
    from an installed clip-retrieval. Only its file is loaded: the package's __init__ imports the whole
    back end (flask, faiss, torch models), which the client does not need."""
    need("requests", importlib.util.find_spec("requests") is not None, "pip install requests")
    wheel = os.environ.get("SFUMATO_CLIP_RETRIEVAL_WHEEL")
    if wheel:
        path = f"{wheel}/clip_retrieval/clip_client.py"
        with zipfile.ZipFile(wheel) as z:
            source = z.read("clip_retrieval/clip_client.py")
    else:
        found = importlib.util.find_spec("clip_retrieval")
        need("clip-retrieval", found is not None,
             "pip install --no-deps clip-retrieval, or SFUMATO_CLIP_RETRIEVAL_WHEEL=its .whl")
        path = str(Path(found.origin).with_name("clip_client.py"))
        source = Path(path).read_bytes()
    module = types.ModuleType("clip_client")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def test_clip_retrieval_client_unchanged(live, kit):
    """Its defaults: no Content-Type, aesthetic_score 9 and weight 0.5, safety and violence filters on,
    deduplicate on (the tiny random CLIP finds most of the 8 images near-duplicates)."""
    url, _ = live
    module = clip_client_module()
    client = module.ClipClient(url=url + "/knn-service", indice_name="shapes", num_images=3)
    every = module.ClipClient(url=url + "/knn-service", indice_name="shapes", num_images=3, deduplicate=False)
    assert len(every.query(text="a red circle")) == 3
    by_text = client.query(text="a red circle")
    assert isinstance(by_text, list) and 1 <= len(by_text) < 3, by_text
    assert {"id", "similarity", "caption", "image"} <= set(by_text[0])
    assert b64_image(by_text[0]["image"]).size == (32, 32)
    picture = sorted(kit["images"].glob("*.png"))[4]
    by_image = client.query(image=str(picture))  # the client reads the file and sends it as base64
    assert by_image[0]["id"] == 4 and by_image[0]["similarity"] > 0.999
    vec = kit["models"].embedder.embed_texts(["a red circle"])[0].tolist()
    assert [h["id"] for h in client.query(embedding_input=vec)] == [h["id"] for h in by_text]


def test_knn_service_reads_any_body_as_json(client):
    """clip-retrieval's web page posts JSON as text/plain, with its aesthetic fields as strings."""
    body = {"text": "a red circle", "modality": "image", "num_images": 2, "indice_name": "shapes",
            "aesthetic_score": "", "aesthetic_weight": "0.5"}
    r = client.post("/knn-service", content=json.dumps(body), headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert r.status_code == 200 and len(r.json()) == 2, r.json()
    r = client.post("/knn-service", json={**body, "aesthetic_score": "pretty"})
    assert r.status_code == 422 and "aesthetic_score" in detail(r)
    r = client.post("/knn-service", content=b"{not json", headers={"Content-Type": "text/plain"})
    assert r.status_code == 422 and "JSON" in detail(r)
    r = client.post("/metadata", content=json.dumps({"ids": [1], "indice_name": "shapes"}))
    assert r.status_code == 200 and r.json()[0]["id"] == 1
    schema = client.get("/openapi.json").json()["paths"]["/knn-service"]["post"]["requestBody"]
    assert "num_images" in schema["content"]["application/json"]["schema"]["properties"]
