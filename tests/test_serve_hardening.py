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
