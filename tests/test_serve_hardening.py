"""The server against hostile and careless clients: no 500s on odd input, caps on what one request
may make the shared text tower or the generation lane do, host and origin checks, the key over the
docs, cheap refusals, and a clean stop."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
from test_serve import blocker, build_kit, detail, make_client, sample_b64, sse_events, wait_ready  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict:
    return build_kit(tmp_path_factory)


@pytest.fixture(scope="module")
def client(kit):
    with make_client(kit) as c:
        wait_ready(c)
        yield c


# ---------------------------------------------------------------- no 500s


def test_classify_template_with_two_slots_is_422(client, kit):
    body = {"images": [sample_b64(kit)], "labels": ["red circle", "blue square"], "templates": ["a {} {}"]}
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 422 and "exactly one {}" in detail(r)


def test_huge_ids_are_absent_not_500(client):
    r = client.post("/metadata", json={"ids": [2**70, 0], "indice_name": "shapes"})
    assert r.status_code == 200 and [m["id"] for m in r.json()] == [0]
    assert client.get("/v1/index/shapes/images/9223372036854775808").status_code == 404


# ---------------------------------------------------------------- what one request may ask of the text tower


@pytest.mark.parametrize("templates, needle", [
    (["a {}"] * 5000, "number of templates"),
    (["{0:>10000000}{{}}"], "no other brace"),
    (["x" * 2000 + "{}"], "templates[0]"),
])
def test_classify_template_caps(client, kit, templates, needle):
    body = {"images": [sample_b64(kit)], "labels": ["red circle", "blue square"], "templates": templates}
    t = time.perf_counter()
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 422 and needle in detail(r)
    assert time.perf_counter() - t < 2


def test_classify_label_caps(client, kit):
    body = {"images": [sample_b64(kit)], "labels": [f"l{i}" for i in range(100)]}
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 422 and "number of labels" in detail(r)
    body = {"images": [sample_b64(kit)], "labels": [f"l{i}" for i in range(60)], "templates": ["{}"] * 10}
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 422 and "labels x templates" in detail(r)


def test_classify_templates_are_not_formatted(client, kit):
    body = {"images": [sample_b64(kit)], "labels": ["red {0} circle", "blue square"], "templates": ["a picture: {}"]}
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 200 and set(r.json()[0]["probabilities"]) == {"red {0} circle", "blue square"}


# ---------------------------------------------------------------- hosts and origins


def test_allowed_hosts_rule():
    from sfumato.server import allowed_hosts

    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts("::1", ["box.lan"]) == ["127.0.0.1", "localhost", "[::1]", "box.lan"]
    assert allowed_hosts("0.0.0.0") is None
    assert allowed_hosts("0.0.0.0", ["box.lan"]) == ["127.0.0.1", "localhost", "[::1]", "box.lan"]


def test_foreign_host_is_refused(kit):
    from fastapi.testclient import TestClient

    from sfumato.server import allowed_hosts, create_app

    models = kit["models"]
    app = create_app(lambda: models, hosts=allowed_hosts("127.0.0.1", ["box.lan"]))
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        wait_ready(c)
        assert c.get("/healthz").status_code == 200
        for host in ("localhost:7860", "[::1]:7860", "box.lan"):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example"):
            assert c.get("/readyz", headers={"Host": host}).status_code == 400, host


def test_cross_origin_form_post_cannot_interrupt(kit):
    with make_client(kit) as c:
        wait_ready(c)
        server = c.app.state.server
        job, release = blocker(server)
        try:
            form = {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"}
            r = c.post("/sdapi/v1/interrupt", content=b"x=1", headers=form)
            assert r.status_code == 403 and not job.cancel_flag.is_set()
            r = c.post("/sdapi/v1/interrupt", headers={"Origin": "null"})
            assert r.status_code == 403 and not job.cancel_flag.is_set()
            r = c.post("/sdapi/v1/interrupt", headers={"Origin": "http://testserver"})  # the page itself
            assert r.status_code == 200 and job.cancel_flag.is_set()
            assert c.get("/healthz", headers={"Origin": "http://evil.example"}).status_code == 200
        finally:
            release.set()


# ---------------------------------------------------------------- the key covers the docs and /readyz


def test_docs_and_readyz_need_the_key(kit):
    with make_client(kit, api_key="s3cret") as c:
        assert c.get("/healthz").status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json", "/readyz"):
            r = c.get(path)
            assert r.status_code == 401 and "s3cret" not in r.text and "shapes" not in r.text, path
        assert c.get("/docs").headers["www-authenticate"].startswith("Basic")  # a browser asks for it
        key = {"Authorization": "Bearer s3cret"}
        end = time.time() + 30
        while c.get("/readyz", headers=key).status_code != 200:
            assert time.time() < end
            time.sleep(0.02)
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path, headers=key).status_code == 200, path
        assert "/v1/generate" in c.get("/openapi.json", headers=key).json()["paths"]


# ---------------------------------------------------------------- uploads: other formats, truncated PNGs


def _encoded(fmt: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "EPS", "BMP"])
def test_other_image_formats_get_415_naming_the_accepted_ones(client, fmt):
    import base64

    b = "data:image/png;base64," + base64.b64encode(_encoded(fmt)).decode()  # claims to be a PNG
    for path, body in (("/v1/search", {"image": b}), ("/v1/classify", {"images": [b], "labels": "a,b"}),
                       ("/v1/generate", {"prompt": "x", "init_image": b}),
                       ("/v1/explain", {"image": b, "phrases": ["red"]}),
                       ("/v1/index/shapes/add", {"images": [{"image": b}]}), ("/knn-service", {"image": b}),
                       ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [b]}),
                       ("/sdapi/v1/png-info", {"image": b})):
        r = client.post(path, json=body)
        assert r.status_code == 415, (path, r.status_code, r.text)
        assert "PNG, JPEG or WebP" in detail(r) and fmt in detail(r), (path, detail(r))


def _png_with_parameters() -> bytes:
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 20, Sampler: Euler, Seed: 1")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_png_info_refuses_a_truncated_or_corrupt_png_cleanly(client):
    import base64

    data = _png_with_parameters()
    whole = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(data).decode()})
    assert whole.status_code == 200 and whole.json()["parameters"]["Seed"] == "1"
    corrupt = bytearray(data)
    corrupt[data.index(b"IDAT") + 6] ^= 0xFF
    for bad in (data[:12], data[:40], data[:len(data) // 2], data[:-12], bytes(corrupt)):
        r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(bad).decode()})
        assert r.status_code == 422, (len(bad), r.text)
        assert "unreadable image" in detail(r) and "PNG" in detail(r), detail(r)
        assert " at 0x" not in r.text and "<" not in detail(r), detail(r)  # no object reprs


def test_uploads_never_show_object_reprs(client):
    import base64

    data = _png_with_parameters()
    for bad in (data[:40], data[:len(data) // 2]):
        b = base64.b64encode(bad).decode()
        for path, body in (("/v1/search", {"image": b}), ("/v1/index/shapes/add", {"images": [{"image": b}]})):
            r = client.post(path, json=body)
            assert r.status_code == 422 and " at 0x" not in r.text, (path, r.text)


# ---------------------------------------------------------------- index add that adds nothing


def test_index_add_of_nothing_usable_fails_with_one_line(kit, tmp_path, capsys):
    import shutil

    from sfumato.cli import main

    ix = tmp_path / "ix"
    shutil.copytree(kit["index"], ix)
    notimg = tmp_path / "notimg.png"
    notimg.write_text("this is not a picture")
    capsys.readouterr()
    assert main(["index", "add", str(ix), str(notimg)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: nothing added") and "notimg.png" in err[0], captured
    assert "Traceback" not in captured.err and "added 0" not in captured.out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["index", "add", str(ix), str(empty)]) == 1
    assert "nothing added" in capsys.readouterr().err
    # every image already there: the index holds them, which is what was asked
    assert main(["index", "add", str(ix), str(sorted(kit["images"].glob("*.png"))[0])]) == 0


# ---------------------------------------------------------------- compute cap


def test_job_cost_rule_and_default_cap():
    from sfumato.server import Limits
    from sfumato.server.limits import job_cost

    limits = Limits()
    assert job_cost(64, 64, 64, 50, 8) == (400, 8)  # 8 images x 50 steps at native size: allowed
    assert job_cost(64, 64, 64, 50, 8)[0] <= limits.max_cost and 8 <= limits.max_step_cost
    total, step = job_cost(1024, 1024, 64, 150, 1)  # forbidden on a 64-px model
    assert total == 38400 and (total > limits.max_cost and step > limits.max_step_cost)


@pytest.mark.parametrize("body, needles", [
    ({"prompt": "x", "width": 64, "height": 64, "n": 2, "steps": 150}, ["costs 1,200 ", "over the limit per job",
                                                                          "limits are 1,000 per job and 8 per step"]),
    ({"prompt": "x", "width": 1024, "height": 1024, "steps": 150}, ["costs 153,600 ", "1,024 per sampler step",
                                                                    "over the limit per step"]),
    ({"prompt": "x", "n": 8, "steps": 150}, ["costs 1,200 ", "over the limit per job"]),
])
def test_generation_over_the_compute_cap_is_422(client, body, needles):
    for path, b in (("/v1/generate", body), ("/sdapi/v1/txt2img", {**body, "batch_size": body.get("n", 1)})):
        b = {k: v for k, v in b.items() if not (path.startswith("/sdapi") and k == "n")}
        r = client.post(path, json=b)
        assert r.status_code == 422 and all(n in detail(r) for n in needles), (path, r.json())


def test_jobs_within_the_cap_are_accepted(kit):
    from sfumato.server import Limits
    from sfumato.server.work import prepare

    models, limits = kit["models"], Limits()
    assert prepare(models, limits, "x", steps=50, n=8).n == 8  # 400 at the tiny model's native 32 px
    assert prepare(models, limits, "x", width=64, height=64, n=2, steps=120).width == 64  # 8 per step, 960


def test_hires_fix_is_checked_as_one_job(kit):
    """Each pass within the cap, the two together over it: refused before anything runs, naming the total."""
    from sfumato.server import Limits

    with make_client(kit, limits=Limits(max_cost=50)) as c:
        wait_ready(c)
        body = {"prompt": "x", "steps": 10, "batch_size": 2, "enable_hr": True, "hr_scale": 2,
                "hr_upscaler": "Lanczos", "denoising_strength": 1.0}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422, r.json()
        for needle in ("costs 100 native-image steps in all", "first pass 32x32 x 10 steps x 2 image(s) = 20",
                       "hires pass 64x64 x 10 steps x 2 image(s) = 80", "over the limit of 50 per job"):
            assert needle in detail(r), detail(r)
        # the second pass runs steps x denoising_strength, 3 here: 20 + 2 images x 4 x 3 = 44
        assert c.post("/sdapi/v1/txt2img", json={**body, "denoising_strength": 0.3}).status_code == 200


def test_layout_search_counts_against_the_job_cost(kit):
    """Its look-ahead (8 candidates x half the steps per image) is checked before queueing, and named."""
    from sfumato.server import Limits

    with make_client(kit, limits=Limits(max_cost=50)) as c:
        wait_ready(c)
        body = {"prompt": "a red circle to the left of a blue square", "steps": 20, "layout_search": 8}
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 422 and "layout search over 8 noises" in detail(r), r.json()
        assert "over the limit per job" in detail(r), detail(r)
        assert c.post("/v1/generate", json={**body, "steps": 8}).status_code == 202  # 8 + 4 x 8 = 40
        assert c.post("/v1/generate", json={**body, "prompt": "a red circle"}).status_code == 202  # no relation


def test_a_cancel_stops_within_one_layer_not_one_step(kit):
    """The cancel lands before the next UNet layer runs, not after the rest of the sampler step."""
    from diffusers.models.resnet import ResnetBlock2D

    from sfumato.server import Limits
    from sfumato.server.jobs import Job, Stopped
    from sfumato.server.work import generation, prepare

    models = kit["models"]
    spec = prepare(models, Limits(), "a red circle", steps=5)
    job = Job("t", "generate", None, 60.0)
    blocks = [m for m in models.pipe.unet.modules() if isinstance(m, ResnetBlock2D)]
    ran = []

    def ran_block(module, args, output):
        ran.append(module)
        if len(ran) == len(blocks) + 1:
            job.cancel_flag.set()  # a DELETE arriving while the first block of the second step runs

    handles = [b.register_forward_hook(ran_block) for b in blocks]
    try:
        with pytest.raises(Stopped):
            generation(models, spec, Limits())(job)
    finally:
        for h in handles:
            h.remove()
    assert len(ran) == len(blocks) + 1, f"{len(ran) - len(blocks) - 1} more blocks ran after the cancel"
    assert isinstance(job.result, list) and len(job.result) == 1  # what the sampler reached, as before


# ---------------------------------------------------------------- cheap refusals


def test_full_queue_refuses_before_reading_the_body(kit):
    from sfumato.server import Limits

    with make_client(kit, limits=Limits(max_queue=1)) as c:
        wait_ready(c)
        hold, release = blocker(c.app.state.server)
        try:
            assert c.post("/v1/generate", json={"prompt": "a red circle", "steps": 1}).status_code == 202
            junk = {"content-type": "application/json"}  # parsing this would answer 422
            for path in ("/v1/generate", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/explain"):
                r = c.post(path, content=b"{not json", headers=junk)
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (path, r.text)
                assert "queue is full" in detail(r)
            assert c.post("/v1/search", content=b"{not json", headers=junk).status_code == 422  # not queued
        finally:
            release.set()


def test_a_missing_key_is_refused_before_the_body_is_parsed(kit):
    import base64

    from sfumato.server import Limits

    with make_client(kit, api_key="s3cret", limits=Limits(max_queue=0)) as c:
        junk = {"content-type": "application/json"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
            for path in ("/v1/generate", "/v1/search", "/sdapi/v1/png-info"):
                r = c.post(path, content=b"{not json", headers={**junk, **headers})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        basic = "Basic " + base64.b64encode(b"user:s3cret").decode()
        for good in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}, {"Authorization": basic},
                     {"Authorization": "Bearer", "X-API-Key": "s3cret"}):  # an empty Bearer: the header decides
            r = c.post("/v1/generate", content=b"{not json", headers={**junk, **good})
            assert r.status_code == 429, (good, r.text)  # the queue takes nothing: refused before parsing
            assert c.post("/v1/search", content=b"{not json", headers={**junk, **good}).status_code == 422


# ---------------------------------------------------------------- a clean stop


def _events_in_thread(c, job_id: str) -> tuple:
    import threading

    out: list = []

    def read():
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            for event in sse_events(r.iter_lines()):  # each one visible to the test as it arrives
                out.append(event)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, out


def test_drain_fails_jobs_closes_streams_and_refuses_new_work(kit):
    from sfumato.server import Limits

    with make_client(kit, limits=Limits(max_cost=1e6)) as c:
        wait_ready(c)
        server = c.app.state.server
        running = c.post("/v1/generate", json={"prompt": "a red circle", "steps": 150, "n": 8}).json()["id"]
        queued = c.post("/v1/generate", json={"prompt": "a blue square", "steps": 2}).json()["id"]
        end = time.time() + 60
        while server.queue.get(running).step < 1:
            assert time.time() < end
            time.sleep(0.01)
        reader, events = _events_in_thread(c, queued)
        while not events:
            assert time.time() < end
            time.sleep(0.01)
        server.drain()
        reader.join(10)
        assert not reader.is_alive(), "the event stream stayed open"
        assert events[-1][0] == "failed" and "shutting down" in events[-1][1]["error"]
        a, b = server.queue.get(running), server.queue.get(queued)
        assert b.status == "failed" and b.error == "the server is shutting down"
        assert a.done.wait(10) and a.status == "failed" and "shutting down" in a.error and a.step < 150
        r = c.post("/v1/generate", json={"prompt": "x"})
        assert r.status_code == 503 and "shutting down" in detail(r)
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200


def test_sigterm_with_an_open_event_stream_exits_within_seconds(kit):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    from pathlib import Path

    import httpx

    import sfumato

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(sfumato.__file__).parents[1]), "SFUMATO_LOG": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "sfumato", "serve", "--port", str(port), "--model",
                             str(kit["model"]), "--max-cost", "1000000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 180  # a loaded machine loads slowly
        while True:
            assert proc.poll() is None and time.time() < end, proc.stderr.read() if proc.poll() is not None else ""
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        running = httpx.post(f"{base}/v1/generate", json={"prompt": "a red circle", "steps": 150, "n": 8},
                             timeout=30).json()["id"]
        queued = httpx.post(f"{base}/v1/generate", json={"prompt": "a blue square", "steps": 2},
                            timeout=30).json()["id"]
        while httpx.get(f"{base}/v1/jobs/{running}", timeout=10).json()["step"] < 1:
            assert time.time() < end
            time.sleep(0.05)
        events: list = []

        def read():
            with httpx.stream("GET", f"{base}/v1/jobs/{queued}/events", timeout=60) as r:
                for event in sse_events(r.iter_lines()):
                    events.append(event)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while not events:
            assert time.time() < end
            time.sleep(0.02)
        t = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        took = time.time() - t
        reader.join(5)
        assert took < 8, f"exit took {took:.1f} s"
        assert events[-1][0] == "failed" and "shutting down" in events[-1][1]["error"], events[-1]
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
