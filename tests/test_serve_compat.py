"""The compatible endpoints: AUTOMATIC1111's /sdapi/v1 and clip-retrieval's back-end API, with the
request fields and response shapes their clients read."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image, PngImagePlugin

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


# ---------------------------------------------------------------- clip-retrieval


def test_indices_list(client):
    assert client.get("/indices-list").json() == ["shapes"]


def test_knn_service_text_image_embedding(client, kit):
    r = client.post("/knn-service", json={"text": "a red circle", "modality": "image", "num_images": 3,
                                          "indice_name": "shapes", "deduplicate": True, "use_safety_model": True,
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
    out = client.post("/metadata", json={"ids": [0, 3, 999], "indice_name": "shapes"}).json()
    assert [m["id"] for m in out["metadata"]] == [0, 3]
    assert isinstance(out["metadata"][0]["metadata"]["caption"], str)
