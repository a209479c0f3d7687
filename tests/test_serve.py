"""The HTTP server: start-up and health, the auth rule, native jobs (events, cancel by id), search,
classify, explain, index add, and every limit. AUTOMATIC1111 and clip-retrieval endpoints are in
tests/test_serve_compat.py.

The models are tiny and random (tests/test_generate.py's SD folder plus tests/searchkit.py's CLIP),
built once per session; each test makes its own app around the loaded models.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from sfumato.cli import main  # noqa: E402
from sfumato.errors import UsageError  # noqa: E402
from sfumato.server import Limits, check_bind, create_app, model_loader  # noqa: E402
from searchkit import make_images, make_tiny_model  # noqa: E402
from test_generate import build_tiny_sd  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]  # the bomb test
_KIT: dict = {}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def kit(tmp_path_factory) -> dict:
    return build_kit(tmp_path_factory)


def build_kit(tmp_path_factory) -> dict:
    """A tiny SD folder with a clip/, an index of 8 images built with it, and the loaded Models
    (built once per session, for this file and tests/test_serve_compat.py)."""
    if not _KIT:
        root = tmp_path_factory.mktemp("serve")
        build_tiny_sd(root / "sd")
        make_tiny_model(root / "clip-src")
        shutil.copytree(root / "clip-src" / "clip", root / "sd" / "clip")
        images = make_images(root / "images", n=8)
        assert main(["index", "build", str(images), "--out", str(root / "shapes"), "--model", str(root / "sd")]) == 0
        _KIT.update(root=root, model=root / "sd", index=root / "shapes", images=images,
                    models=model_loader(root / "sd", [root / "shapes"])())
    return _KIT


def make_client(kit, **kw) -> TestClient:
    """A started app (lifespan run) around the session's loaded models; use as a context manager."""
    models = kit["models"]
    return TestClient(create_app(lambda: models, **kw))


def wait_ready(c: TestClient, timeout: float = 30) -> None:
    end = time.time() + timeout
    while c.get("/readyz").status_code != 200:
        assert time.time() < end, c.get("/readyz").json()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def client(kit):
    with make_client(kit) as c:
        wait_ready(c)
        yield c


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sample_b64(kit, i: int = 0) -> str:
    return png_b64(Image.open(sorted(kit["images"].glob("*.png"))[i]))


def wait_job(c, job_id: str, timeout: float = 60) -> dict:
    end = time.time() + timeout
    while True:
        j = c.get(f"/v1/jobs/{job_id}").json()
        if j["status"] in ("done", "failed", "cancelled"):
            return j
        assert time.time() < end, j
        time.sleep(0.02)


def blocker(server):
    """Put a job on the lane that holds it until the returned event is set."""
    release, running = threading.Event(), threading.Event()

    def run(job):
        running.set()
        release.wait(30)

    job = server.queue.submit("block", run)
    assert running.wait(10)
    return job, release


def detail(r) -> str:
    return r.json()["detail"]


# ---------------------------------------------------------------- start-up, health, auth


def test_import_is_light():
    code = "import sys, sfumato, sfumato.cli; print('fastapi' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"


def test_readyz_503_until_loaded_and_healthz_always(kit):
    gate = threading.Event()

    def slow_loader():
        gate.wait(10)
        return kit["models"]

    with TestClient(create_app(slow_loader)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        r = c.post("/v1/search", json={"text": "a red circle"})
        assert r.status_code == 503 and r.headers["retry-after"]
        gate.set()
        wait_ready(c)
        assert c.get("/readyz").json()["indexes"] == ["shapes"]


def test_load_error_is_reported(tmp_path):
    seen = []
    app = create_app(model_loader(tmp_path / "nope"), on_load_error=seen.append)
    with TestClient(app) as c:
        end = time.time() + 10
        while not seen and time.time() < end:
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503 and "does not exist" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200
    assert "does not exist" in seen[0]


def test_index_of_another_model_refused_at_load(kit, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(UsageError, match="another model"):
        model_loader(other, [kit["index"]])()


def test_index_alone_brings_its_own_model(kit):
    models = model_loader(None, [kit["index"]])()  # as `sfumato search INDEX` takes the index's model
    assert models.pipe is not None and models.pipe.folder == kit["model"] and "shapes" in models.indexes


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_key(host):
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_non_loopback_needs_a_key(host):
    with pytest.raises(UsageError, match="--api-key"):
        check_bind(host, None)
    check_bind(host, "secret")


def test_cli_refuses_public_bind_without_key(capsys, monkeypatch):
    monkeypatch.delenv("SFUMATO_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "7861"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and len(err.strip().splitlines()) == 1


def test_api_key(kit):
    with make_client(kit, api_key="s3cret") as c:
        c.headers["X-API-Key"] = "s3cret"  # /readyz needs the key too
        wait_ready(c)
        del c.headers["X-API-Key"]
        for path in ("/healthz", "/"):
            assert c.get(path).status_code == 200, path
        body = {"text": "a red circle", "k": 2}
        assert c.post("/v1/search", json=body).status_code == 401
        assert c.post("/v1/search", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/sdapi/v1/samplers").status_code == 401
        assert c.get("/indices-list").status_code == 401
        assert c.post("/v1/search", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/search", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        basic = base64.b64encode(b"user:s3cret").decode()
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Basic %%%"}).status_code == 401
        schemes = c.get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}  # documented in /docs


def test_malformed_basic_header_without_a_key(kit):
    with make_client(kit) as c:
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Basic %%%"}).status_code == 200


def test_page_and_docs(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needle in ('id="prompt"', 'id="negative"', 'id="bar"', 'id="gallery"', 'id="sdrop"', "/v1/explain",
                   "/v1/jobs/"):
        assert needle in r.text
    spec = client.get("/openapi.json").json()
    for path in ("/v1/generate", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/search", "/v1/classify",
                 "/v1/explain", "/v1/index/{name}/add", "/sdapi/v1/txt2img", "/knn-service"):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------- generation jobs


def sse_events(lines):
    """(event name, data) pairs of a server-sent-event stream's lines, as they arrive."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


def read_events(c, job_id: str) -> list[tuple[str, dict]]:
    with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


def test_generate_job_status_events_and_images(client):
    r = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 3, "n": 2, "seed": 7})
    assert r.status_code == 202
    job_id = r.json()["id"]
    events = read_events(client, job_id)
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and names.count("step") == 3
    steps = [d for n, d in events if n == "step"]
    assert [d["step"] for d in steps] == [1, 2, 3] and steps[-1]["progress"] == 1.0
    assert steps[0]["preview"].startswith("data:image/png;base64,") and steps[-1]["preview"]
    done = events[-1][1]
    assert done["status"] == "done" and len(done["images"]) == 2 and done["images"][1]["seed"] == 8
    j = client.get(f"/v1/jobs/{job_id}").json()
    assert j["status"] == "done" and j["progress"] == 1.0 and j["preview"].startswith("data:image/png")
    png = client.get(j["images"][0]["url"])
    assert png.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png.content))
    assert img.size == (32, 32) and "Seed: 7" in img.info["parameters"]
    assert "Steps: 3" in j["images"][0]["parameters"]
    assert client.get(f"/v1/jobs/{job_id}/images/2").status_code == 404
    assert client.get("/v1/jobs/nope").status_code == 404


def test_generate_with_word_maps(client):
    job = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 2, "explain": True}).json()
    wait_job(client, job["id"])
    j = client.get(f"/v1/jobs/{job['id']}?images=true").json()
    words = j["images"][0]["words"]
    assert [w["word"] for w in words] == ["a", "red", "circle"]
    assert all(w["overlay"].startswith("data:image/png;base64,") for w in words)
    assert j["images"][0]["data"].startswith("data:image/png;base64,")


def test_img2img_and_inpainting_jobs(client, kit):
    init = sample_b64(kit)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    job = client.post("/v1/generate", json={"prompt": "a blue square", "steps": 4, "init_image": init,
                                            "mask": png_b64(mask), "strength": 0.5}).json()
    j = wait_job(client, job["id"])
    assert j["status"] == "done" and "Denoising strength: 0.5" in j["images"][0]["parameters"]
    r = client.post("/v1/generate", json={"prompt": "x", "mask": png_b64(mask)})
    assert r.status_code == 422 and "init image" in detail(r)


def test_cancel_by_id_stops_that_job_only(kit):
    with make_client(kit) as c:
        wait_ready(c)
        server = c.app.state.server
        hold, release = blocker(server)
        a = c.post("/v1/generate", json={"prompt": "a red circle", "steps": 150}).json()["id"]
        b = c.post("/v1/generate", json={"prompt": "a blue square", "steps": 2}).json()["id"]
        waiting = c.post("/v1/generate", json={"prompt": "a green cross", "steps": 2}).json()["id"]
        assert c.get(f"/v1/jobs/{waiting}").json()["queue_position"] == 3
        r = c.delete(f"/v1/jobs/{waiting}")  # a waiting job ends at once
        assert r.json()["status"] == "cancelled"
        release.set()
        end = time.time() + 30
        while c.get(f"/v1/jobs/{a}").json()["step"] < 2:
            assert time.time() < end
            time.sleep(0.005)
        assert c.delete(f"/v1/jobs/{a}").status_code == 200
        ja = wait_job(c, a)
        assert ja["status"] == "cancelled" and ja["step"] < 150
        # Stopped within one step of the cancel: the callback checks the flag after every step.
        jb = wait_job(c, b)
        assert jb["status"] == "done" and len(jb["images"]) == 1
        names = [n for n, _ in read_events(c, a)]
        assert names[-1] == "failed"
        assert len(ja.get("images", [])) == 1  # what the sampler had reached
        assert c.delete(f"/v1/jobs/{b}").json()["status"] == "done"  # finished jobs stay as they are


def test_queue_full_gets_429_with_retry_after(kit):
    with make_client(kit, limits=Limits(max_queue=2)) as c:
        wait_ready(c)
        hold, release = blocker(c.app.state.server)
        body = {"prompt": "a red circle", "steps": 1}
        accepted = [c.post("/v1/generate", json=body) for _ in range(2)]
        assert all(r.status_code == 202 for r in accepted)
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "queue is full" in detail(r)
        assert c.post("/sdapi/v1/txt2img", json=body).status_code == 429
        release.set()
        for a in accepted:
            assert wait_job(c, a.json()["id"])["status"] == "done"


def test_search_and_health_do_not_wait_behind_generation(kit):
    with make_client(kit) as c:
        wait_ready(c)
        hold, release = blocker(c.app.state.server)
        try:
            t = time.time()
            assert c.get("/healthz").status_code == 200
            assert c.post("/v1/search", json={"text": "a red circle", "k": 3}).status_code == 200
            assert c.post("/knn-service", json={"text": "a red circle", "num_images": 2}).status_code == 200
            assert c.get("/sdapi/v1/progress").status_code == 200
            assert time.time() - t < 10
            assert not hold.done.is_set()
        finally:
            release.set()


def test_job_time_limit(kit):
    with make_client(kit, limits=Limits(job_seconds=0.05)) as c:
        wait_ready(c)
        job = c.post("/v1/generate", json={"prompt": "a red circle", "steps": 150}).json()
        j = wait_job(c, job["id"])
        assert j["status"] == "failed" and "time limit of 0.05 s" in j["error"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 150})
        assert r.status_code == 504 and "time limit" in detail(r)


def test_generate_draws_a_relation_with_layout_search_and_says_so(client):
    body = {"prompt": "a red circle to the left of a blue square", "steps": 2, "seed": 3}
    searched = read_events(client, client.post("/v1/generate", json={**body, "layout_search": 8}).json()["id"])[-1][1]
    plain = read_events(client, client.post("/v1/generate", json=body).json()["id"])[-1][1]
    assert "Layout search: 8, Layout seed: " in searched["images"][0]["parameters"]
    assert "Layout" not in plain["images"][0]["parameters"]


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "x", "steps": 1000}, "steps must be between 1 and 150, got 1000"),
    ({"prompt": "x", "steps": 0}, "steps must be between 1 and 150"),
    ({"prompt": "x", "n": 9}, "number of images must be between 1 and 8"),
    ({"prompt": "x", "width": 4096}, "width must be between 0 and 1024"),
    ({"prompt": "x", "width": 30}, "multiple of"),
    ({"prompt": "x", "guidance": 99}, "guidance must be between 0 and 50"),
    ({"prompt": "x", "strength": 2, "init_image": "AAAA"}, "init image"),
    ({"prompt": "x", "scheduler": "Nope"}, "unknown scheduler 'Nope'"),
    ({"prompt": "x" * 1001}, "prompt is 1001 characters long; the limit is 1000"),
    ({"prompt": "x", "negative": "y" * 2000}, "limit is 1000"),
    ({"prompt": "  "}, "the prompt is empty"),
    ({"prompt": "x", "seed": 2**40}, "seed must be between"),
    ({"prompt": "x", "layout_search": 17}, "layout search must be between 0 and 16, got 17"),
    ({"prompt": "x", "stepz": 3}, "stepz: Extra inputs are not permitted"),
    ({"prompt": "x", "steps": "many"}, "steps: "),
])
def test_generate_rejects_bad_requests(client, body, needle):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422 and needle in detail(r), r.json()


def test_request_body_cap(kit):
    with make_client(kit, limits=Limits(max_body=2000)) as c:
        wait_ready(c)
        r = c.post("/v1/search", json={"text": "x" * 5000})
        assert r.status_code == 413 and "2,000 bytes" in detail(r)

        def chunks():  # no Content-Length: the cap counts the streamed body
            for _ in range(10):
                yield b" " * 500

        r = c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/search", json={"text": "a red circle", "k": 1}).status_code == 200


def test_image_pixel_cap_and_bomb_guard(kit):
    with make_client(kit, limits=Limits(max_pixels=64 * 64)) as c:
        wait_ready(c)
        big = png_b64(Image.new("RGB", (65, 64)))
        r = c.post("/v1/search", json={"image": big})
        assert r.status_code == 422 and "over the cap of 4,096" in detail(r)
        bomb = png_b64(Image.new("1", (12000, 12000)))  # tiny file, 144 M pixels once decoded
        for path, body in (("/v1/search", {"image": bomb}), ("/v1/classify", {"images": [bomb], "labels": "a,b"}),
                           ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [bomb]}),
                           ("/knn-service", {"image": bomb}), ("/sdapi/v1/png-info", {"image": bomb})):
            r = c.post(path, json=body)
            assert r.status_code == 422 and "cap" in detail(r), (path, r.json())
        for bad in ("not base64!", base64.b64encode(b"not an image").decode()):
            r = c.post("/v1/search", json={"image": bad})
            assert r.status_code == 422 and ("base64" in detail(r) or "unreadable" in detail(r))


# ---------------------------------------------------------------- search, classify, explain, index add


def test_search_text_image_and_embedding(client, kit):
    r = client.post("/v1/search", json={"text": "a red circle", "k": 3})
    hits = r.json()["hits"]
    assert r.status_code == 200 and len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"]
    assert set(hits[0]) == {"id", "score", "caption", "url"}
    assert "/" + str(kit["root"]) not in json.dumps(r.json())  # no server paths come back
    img = client.get(hits[0]["url"])
    assert img.headers["content-type"] == "image/png"
    same = client.post("/v1/search", json={"image": sample_b64(kit, 2), "k": 1, "images": True}).json()["hits"][0]
    assert same["id"] == 2 and same["score"] > 0.999 and same["image"].startswith("data:image/png;base64,")
    r = client.post("/v1/search", json={"image": sample_b64(kit, 2), "text": "blue", "k": 2})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2
    vec = kit["models"].embedder.embed_texts(["a red circle"])[0].tolist()
    by_vec = client.post("/v1/search", json={"embedding": vec, "k": 3}).json()["hits"]
    assert [h["id"] for h in by_vec] == [h["id"] for h in hits]


@pytest.mark.parametrize("body, code, needle", [
    ({"text": "x", "k": 201}, 422, "k must be between 1 and 200"),
    ({"text": "x", "index": "../shapes"}, 404, "no index named '../shapes'"),
    ({}, 422, "give text, image"),
    ({"embedding": [1.0, 2.0]}, 422, "dimension 2"),
    ({"embedding": [0.0] * 32}, 422, "zero"),
    ({"text": "x", "alpha": 2}, 422, "alpha and method apply"),
    ({"text": "x" * 1001}, 422, "limit is 1000"),
])
def test_search_rejects_bad_requests(client, body, code, needle):
    r = client.post("/v1/search", json=body)
    assert r.status_code == code and needle in detail(r), r.json()


def test_index_paths_are_not_chosen_by_requests(client):
    assert client.get("/v1/index/shapes/images/999").status_code == 404
    assert client.get("/v1/index/..%2F..%2Fetc/images/0").status_code == 404
    assert client.post("/v1/index/..%2Fshapes/add", json={"images": []}).status_code == 404


def test_classify(client, kit):
    r = client.post("/v1/classify", json={"images": [sample_b64(kit, 0), sample_b64(kit, 1)],
                                          "labels": ["red circle", "blue square", "green cross"]})
    assert r.status_code == 200 and len(r.json()) == 2
    probs = r.json()[0]["probabilities"]
    assert set(probs) == {"red circle", "blue square", "green cross"} and abs(sum(probs.values()) - 1) < 1e-4
    assert client.post("/v1/classify", json={"images": [sample_b64(kit)], "labels": "a,b"}).status_code == 200
    for labels, needle in (("one", "at least two labels"), ("a,a", "given twice"), (["a,b", "c"], "comma")):
        r = client.post("/v1/classify", json={"images": [sample_b64(kit)], "labels": labels})
        assert r.status_code == 422 and needle in detail(r)


def test_explain_grounds_phrases(client, kit):
    r = client.post("/v1/explain", json={"image": sample_b64(kit), "phrases": ["red circle", "blue square"]})
    out = r.json()
    assert r.status_code == 200 and out["phrases"] == ["red circle", "blue square"]
    assert len(out["peaks"]) == 2 and len(out["overlays"]) == 2 and abs(sum(out["probabilities"]) - 1) < 1e-4
    r = client.post("/v1/explain", json={"image": sample_b64(kit), "phrases": ["the of"]})
    assert r.status_code == 422 and "no content word" in detail(r)


def test_index_add_then_search_finds_it(kit, tmp_path):
    index = tmp_path / "extra"
    shutil.copytree(kit["index"], index)
    models = model_loader(kit["model"], [index])()
    with TestClient(create_app(lambda: models)) as c:
        wait_ready(c)
        new = Image.new("RGB", (32, 32), (250, 10, 10))
        body = {"images": [{"image": png_b64(new), "caption": "a red square"}]}
        r = c.post("/v1/index/extra/add", json=body)
        assert r.status_code == 200 and r.json()["added"] == 1 and r.json()["total"] == 9
        again = c.post("/v1/index/extra/add", json=body).json()
        assert again["added"] == 0 and again["duplicates"] == 1
        hit = c.post("/v1/search", json={"index": "extra", "image": png_b64(new), "k": 1}).json()["hits"][0]
        assert hit["caption"] == "a red square" and hit["score"] > 0.999
        kept = list((tmp_path / "extra.uploads").iterdir())
        assert len(kept) == 2 and all(len(p.stem) == 64 for p in kept)  # named by sha256: png + txt
        r = c.post("/v1/index/extra/add", json={"images": [{"image": "AAAA"}]})
        assert r.status_code == 422
        r = c.post("/v1/index/nope/add", json=body)
        assert r.status_code == 404


def test_search_answers_while_index_grows(kit, tmp_path):
    """Searches read the committed snapshot; an add swaps it whole."""
    index = tmp_path / "grow"
    shutil.copytree(kit["index"], index)
    models = model_loader(kit["model"], [index])()
    with TestClient(create_app(lambda: models)) as c:
        wait_ready(c)
        errors = []

        def searcher():
            for _ in range(20):
                r = c.post("/v1/search", json={"index": "grow", "text": "a red circle", "k": 5})
                if r.status_code != 200:
                    errors.append(r.text)

        t = threading.Thread(target=searcher)
        t.start()
        rng = np.random.default_rng(0)
        imgs = [{"image": png_b64(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))}
                for _ in range(3)]
        assert c.post("/v1/index/grow/add", json={"images": imgs}).json()["total"] == 11
        t.join()
        assert not errors


def test_serve_help_lists_options():
    from typer.testing import CliRunner

    from sfumato.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--host", "--port", "--model", "--index", "--api-key", "--cors", "127.0.0.1", "7860"):
        assert flag in out


def test_package_files_present():
    static = Path(__import__("sfumato.server", fromlist=["x"]).__file__).parent / "static" / "index.html"
    assert static.is_file()


def test_a_failing_job_does_not_stop_the_lane(client):
    def boom(job):
        raise RuntimeError("boom")

    bad = client.app.state.server.queue.submit("test", boom)
    good = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 1}).json()["id"]
    assert wait_job(client, good)["status"] == "done"
    j = wait_job(client, bad.id)
    assert j["status"] == "failed" and j["error"] == "internal error: RuntimeError: boom"


def test_cli_serve_starts_answers_and_stops(kit):
    import os
    import socket

    import httpx

    import sfumato

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(sfumato.__file__).parents[1]), "SFUMATO_LOG": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "sfumato", "serve", "--port", str(port), "--model",
                             str(kit["model"]), "--index", str(kit["index"])], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end, ready = time.time() + 60, None
        while ready is None or ready.status_code != 200:
            assert proc.poll() is None and time.time() < end, proc.stderr.read() if proc.poll() is not None else ""
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.1)
        assert ready.json()["indexes"] == ["shapes"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"text": "a red circle", "k": 2}, timeout=10)
        assert r.status_code == 200 and len(r.json()["hits"]) == 2
    finally:
        proc.terminate()
        proc.wait(20)


def test_cli_serve_rejects_missing_model(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- text batching


class _SlowEmbedder:
    """Each pass takes 50 ms; a text's vector is its length, so answers can be checked."""

    def __init__(self, fail: bool = False):
        self.batches, self.fail = [], fail

    def embed_texts(self, texts):
        import time

        import numpy as np

        time.sleep(0.05)
        self.batches.append(len(texts))
        if self.fail:
            raise RuntimeError("tower broke")
        return np.array([[float(len(t))] for t in texts], np.float32)


def _concurrently(fn, n: int) -> list:
    import threading

    out, errors = [None] * n, []

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out, errors


def test_text_batcher_answers_each_query_and_shares_passes():
    import threading

    from sfumato.server.models import TextBatcher

    emb = _SlowEmbedder()
    b = TextBatcher(emb, threading.Lock())
    out, errors = _concurrently(lambda i: b.embed("x" * (i + 1)), 16)
    assert not errors
    assert [float(v[0]) for v in out] == [float(i + 1) for i in range(16)]
    assert sum(emb.batches) == 16 and len(emb.batches) < 16  # some passes served several queries


def test_text_batcher_passes_an_error_to_every_waiter():
    import threading

    from sfumato.server.models import TextBatcher

    b = TextBatcher(_SlowEmbedder(fail=True), threading.Lock())
    out, errors = _concurrently(lambda i: b.embed("q"), 6)
    assert len(errors) == 6 and all("tower broke" in str(e) for e in errors)
