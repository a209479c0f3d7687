"""Vector indexes against the exact oracle, and the on-disk store: versions, checksums, lock, crashes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sfumato.errors import SfumatoError, UsageError
from sfumato.evaluate import recall_at_k
from sfumato.index import ExactIndex, FaissIndex, IndexWriter, default_kind, open_index, unit

SRC = str(Path(__file__).resolve().parents[1] / "src")


def random_unit(n, d, seed=0):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered_unit(n, d, centres=40, noise=0.35, seed=0):
    """Unit vectors around random centres: the structure real embeddings have and IVF exploits."""
    rng = np.random.default_rng(seed)
    c = random_unit(centres, d, seed + 1)
    return unit(c[rng.integers(centres, size=n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d))


def oracle(x, q, k=10, ids=None):
    ex = ExactIndex(x.shape[1])
    ex.add(np.arange(len(x)) if ids is None else ids, x)
    return ex.search(q, k)


# ---------------------------------------------------------------- vector indexes


def test_unit_is_the_normaliser():
    x = unit([[3.0, 4.0], [0.0, 2.0]])
    assert np.allclose(np.linalg.norm(x, axis=1), 1) and x.dtype == np.float32
    with pytest.raises(UsageError, match="zero"):
        unit([[0.0, 0.0]])


def test_exact_index_known_permutation_and_recall():
    d = 16
    x = random_unit(50, d)
    perm = np.random.default_rng(3).permutation(50)
    ex = ExactIndex(d)
    ex.add(perm * 7, x)  # id of row i is perm[i] * 7
    scores, ids = ex.search(x, 1)
    assert (ids[:, 0] == perm * 7).all() and np.allclose(scores[:, 0], 1, atol=1e-5)
    # recall@k of a known permutation of the truth
    truth = np.arange(10)[None, :]
    assert recall_at_k(truth[:, ::-1], truth, 10) == 1.0  # same set, other order
    assert recall_at_k(np.array([[0, 1, 2, 3, 4, 90, 91, 92, 93, 94]]), truth, 10) == 0.5
    assert recall_at_k(np.array([[5, 0, 9, 9, 9]]), truth, 2) == 0.5  # 0 is in truth[:2], 5 is not
    # a short index pads with -1
    s, i = ex.search(x[:2], 60)
    assert (i[:, 50:] == -1).all() and np.isneginf(s[:, 50:]).all()


def test_faiss_flat_is_exact():
    x, q = random_unit(1000, 32), random_unit(40, 32, seed=9)
    ids = np.arange(1000) * 3 + 1
    s0, i0 = oracle(x, q, 10, ids)
    f = FaissIndex("flat", 32)
    f.add(ids, x)
    s, i = f.search(q, 10)
    assert np.allclose(s, s0, atol=1e-5)
    assert recall_at_k(i, i0, 10) == 1.0


def test_hnsw_recall_on_random_unit_vectors():
    x, q = random_unit(3000, 32), random_unit(100, 32, seed=9)
    _, i0 = oracle(x, q)
    f = FaissIndex("hnsw", 32)
    f.add(np.arange(3000), x)
    assert recall_at_k(f.search(q, 10)[1], i0, 10) >= 0.9


def test_ivfpq_recall_with_sensible_params():
    # Uniform random vectors have no clusters for IVF or PQ to exploit (recall there is in the
    # benchmark); clustered unit vectors are what embeddings look like. One byte per dimension.
    allx = clustered_unit(2600, 32)
    x, q = allx[:2500], allx[2500:]
    _, i0 = oracle(x, q)
    f = FaissIndex("ivfpq", 32, {"nlist": 32, "m": 32, "nprobe": 16})
    f.add(np.arange(2500), x)
    assert f.params["nbits"] == 8
    assert recall_at_k(f.search(q, 10)[1], i0, 10) >= 0.9


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivfpq"])
def test_search_vectors_are_the_hits_stored_vectors(kind):
    x = clustered_unit(600, 16)
    idx = ExactIndex(16) if kind == "exact" else FaissIndex(kind, 16, {"nlist": 8} if kind == "ivfpq" else None)
    idx.add(np.arange(600) * 2 + 5, x)
    s, i = idx.search(x[:5], 7)
    s2, i2, v = idx.search_vectors(x[:5], 7)
    assert (i2 == i).all() and np.allclose(s2, s, atol=1e-5) and v.shape == (5, 7, 16)
    cos = (unit(v.reshape(-1, 16)) * x[(i.ravel() - 5) // 2]).sum(1)
    assert cos.min() > (0.9 if kind == "ivfpq" else 0.99999)  # ivfpq's are decoded from its codes
    _, ids, vecs = idx.search_vectors(x[:1], 700)  # a short index: -1 ids, zero vectors
    assert (ids[0, 600:] == -1).all() and not vecs[ids == -1].any()


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivfpq"])
def test_remove_save_load(kind, tmp_path):
    x = clustered_unit(600, 16)
    idx = ExactIndex(16) if kind == "exact" else FaissIndex(kind, 16, {"nlist": 8} if kind == "ivfpq" else None)
    idx.add(np.arange(600) + 100, x)
    gone = np.arange(100, 400, 2)
    assert idx.remove(gone) == len(gone)
    assert len(idx) == 600 - len(gone)
    assert not set(idx.ids().tolist()) & set(gone.tolist())
    _, ids = idx.search(x[:20], 5)
    assert not set(ids.ravel().tolist()) & set(gone.tolist())
    idx.save(tmp_path / "v.bin")
    back = type(idx).load(tmp_path / "v.bin")
    assert len(back) == len(idx) and sorted(back.ids()) == sorted(idx.ids())
    assert (back.search(x[:20], 5)[1] == ids).all()


def test_default_kind_by_size():
    assert default_kind(500) == "flat" and default_kind(500_000) == "hnsw" and default_kind(5_000_000) == "ivfpq"


# ---------------------------------------------------------------- the store


MODEL = {"path": "/models/m", "fingerprint": "f" * 64, "dim": 8}


def rows(start, n):
    return [{"path": f"/img/{i}.png", "caption": f"caption {i}", "width": 4, "height": 4, "sha256": f"{i:064d}"}
            for i in range(start, start + n)]


def make_store(path, n=20, kind="flat", d=8):
    with IndexWriter(path, create=True) as w:
        w.reset(MODEL, d, kind)
        w.add(random_unit(n, d), rows(0, n))
        return w.commit()


def assert_consistent(path):
    snap = open_index(path)
    ids = sorted(snap.vectors.ids().tolist())
    assert len(snap) == snap.count_rows() == snap.manifest["count"]
    assert ids == sorted(r[0] for r in snap.db.execute("SELECT id FROM items"))
    if len(snap):
        _, found = snap.vectors.search(random_unit(1, snap.dim, seed=5), 3)
        assert set(found[0].tolist()) - {-1} <= set(ids)
    return snap


def test_store_versions_and_cleanup(tmp_path):
    ix = tmp_path / "ix"
    m = make_store(ix)
    assert m["version"] == 1 and m["count"] == 20
    with IndexWriter(ix) as w:
        w.add(random_unit(5, 8, seed=1), rows(20, 5))
        w.commit()
        assert w.remove(w.find(["/img/3.png"], ["0" * 64])) == 2
        m = w.commit()
    assert m["version"] == 3 and m["count"] == 23 and m["next_id"] == 25
    assert sorted(p.name for p in ix.iterdir()) == [".lock", "manifest.json", "meta.000003.sqlite",
                                                    "vectors.000003.bin"]
    snap = assert_consistent(ix)
    assert snap.rows([4])[4]["caption"] == "caption 4"
    with IndexWriter(ix) as w:  # leaving without commit writes nothing
        w.remove([4])
    assert open_index(ix).manifest["version"] == 3 and len(open_index(ix)) == 23


def test_build_refuses_existing_index_and_foreign_folder(tmp_path):
    make_store(tmp_path / "ix")
    with pytest.raises(UsageError, match="already an index"):
        with IndexWriter(tmp_path / "ix", create=True):
            pass
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="other files"):
        with IndexWriter(tmp_path / "other", create=True):
            pass
    with IndexWriter(tmp_path / "new", create=True):  # a first build that never commits leaves nothing
        pass
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_damaged_files_caught_on_open(tmp_path, damage):
    ix = tmp_path / "ix"
    m = make_store(ix, n=50)
    vec, meta = ix / m["files"]["vectors"]["name"], ix / m["files"]["meta"]["name"]
    if damage == "truncate":
        vec.write_bytes(vec.read_bytes()[:-100])
        expect = "truncated"
    elif damage == "flip":
        b = bytearray(meta.read_bytes())
        b[len(b) // 2] ^= 0x40
        meta.write_bytes(bytes(b))
        expect = "corrupted"
    elif damage == "manifest":
        text = (ix / "manifest.json").read_text().replace('"count": 50', '"count": 51')
        (ix / "manifest.json").write_text(text)
        expect = "manifest is corrupted"
    else:
        vec.unlink()
        expect = "missing"
    with pytest.raises(SfumatoError, match=expect) as e:
        open_index(ix)
    assert "\n" not in str(e.value)
    with pytest.raises(SfumatoError):  # a writer refuses too, and changes nothing
        with IndexWriter(ix):
            pass


def test_missing_index_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such index"):
        open_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SfumatoError, match="not a sfumato index"):
        open_index(tmp_path / "empty")


HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from sfumato.index import IndexWriter
with IndexWriter({ix!r}):
    print("locked", flush=True)
    time.sleep(30)
"""


def test_second_writer_gets_lock_error(tmp_path):
    ix = tmp_path / "ix"
    make_store(ix)
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=SRC, ix=str(ix))], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(SfumatoError, match=rf"locked by another writer \(pid {p.pid}\)"):
            with IndexWriter(ix):
                pass
        assert len(open_index(ix)) == 20  # readers are not blocked
    finally:
        p.kill()
        p.wait()
    with IndexWriter(ix):  # the kernel drops the lock of a dead writer
        pass


WRITER = """
import os, signal, sys
sys.path.insert(0, {src!r})
import numpy as np
from sfumato import index as ix_mod
from sfumato.index import IndexWriter, unit
crash_at = {crash_at}
calls = [0]
real_replace, real_fsync = os.replace, os.fsync
def counted(fn):
    def wrapper(*a, **kw):
        calls[0] += 1
        if calls[0] == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **kw)
    return wrapper
os.replace, os.fsync = counted(real_replace), counted(real_fsync)
rng = np.random.default_rng(os.getpid())
print("ready", flush=True)
for step in range(10_000):
    with IndexWriter({ix!r}) as w:
        n = int(w.manifest["next_id"])
        w.add(unit(rng.standard_normal((400, 8))),
              [dict(path=f"/p/{{n + i}}", sha256=f"{{os.getpid()}}-{{n + i}}") for i in range(400)])
        if step % 3 == 2:
            w.remove(list(range(n - 300, n - 100)))
        w.commit()
"""


def run_writer(ix, crash_at=0, delay=None):
    p = subprocess.Popen([sys.executable, "-c", WRITER.format(src=SRC, ix=str(ix), crash_at=crash_at)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    if delay is not None:
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    return p


def test_sigkill_at_every_step_of_a_commit_and_at_random_times(tmp_path):
    ix = tmp_path / "ix"
    make_store(ix, n=10)
    versions = [1]
    # One commit = fsync file, replace, fsync folder for vectors, meta and manifest (9 calls): die at
    # each one, then at the first three of the next commit.
    for crash_at in range(1, 13):
        run_writer(ix, crash_at=crash_at)
        snap = assert_consistent(ix)
        versions.append(snap.manifest["version"])
    assert versions == sorted(versions) and versions[-1] > 1
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.05, 0.8, size=8):
        run_writer(ix, delay=float(delay))
        assert_consistent(ix)
    names = {p.name for p in ix.iterdir()}
    with IndexWriter(ix):  # the next writer sweeps what killed writers left behind
        pass
    left = {p.name for p in ix.iterdir()}
    m = json.loads((ix / "manifest.json").read_text())
    assert left == {".lock", "manifest.json", *(f["name"] for f in m["files"].values())}
    assert left <= names


def test_crash_during_first_build_leaves_no_index(tmp_path):
    ix = tmp_path / "ix"
    code = f"""
import os, signal, sys
sys.path.insert(0, {SRC!r})
import numpy as np
from sfumato.index import IndexWriter, unit
real = os.replace
def die(*a):
    if str(a[1]).endswith("manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a)
os.replace = die
with IndexWriter({str(ix)!r}, create=True) as w:
    w.reset({{"path": "m", "fingerprint": "x"}}, 8, "flat")
    w.add(unit(np.ones((3, 8))), [dict(path=str(i), sha256=str(i)) for i in range(3)])
    w.commit()
"""
    p = subprocess.run([sys.executable, "-c", code])
    assert p.returncode == -signal.SIGKILL
    with pytest.raises(SfumatoError, match="not a sfumato index"):
        open_index(ix)
    make_store(ix)  # a new build may take the folder over
    assert_consistent(ix)
    assert not any(p.name.startswith(".tmp-") for p in ix.iterdir())
    assert os.path.getsize(ix / "manifest.json") > 0
