"""The server against hostile and careless clients: no 500s on odd input, caps on what one request
may make the shared text tower or the generation lane do, host and origin checks, the key over the
docs, cheap refusals, and a clean stop."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
from test_serve import blocker, build_kit, detail, make_client, sample_b64, wait_ready  # noqa: E402

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
    assert r.status_code == 200 and [m["id"] for m in r.json()["metadata"]] == [0]
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
