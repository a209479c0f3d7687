"""Vector indexes and the on-disk image index: vectors + SQLite metadata + a versioned manifest.

    from sfumato.index import open_index, IndexWriter
    snap = open_index("my.index")              # a committed version, checked and loaded in memory
    scores, ids = snap.vectors.search(q, 10)
    with IndexWriter("my.index") as w:         # takes the write lock (fcntl.flock) or fails at once
        w.add(vecs, rows); w.commit()

`VectorIndex` is the protocol; `ExactIndex` (torch matmul, the "flat" kind and the test oracle) and
`FaissIndex` (faiss-cpu: IndexFlatIP / IndexHNSWFlat / IndexIVFPQ, the `index` extra) implement it.
All of them compare L2-normalised vectors by inner product; `unit()` is the one place that
normalises.

A folder INDEX holds `manifest.json` and, per committed version v, `vectors.<v>.bin` and
`meta.<v>.sqlite`. A write builds the next version's files under temporary names, fsyncs them,
renames them into place and then atomically replaces `manifest.json` (which names them, with
their sha256 and size); only after that are the previous version's files deleted. A crash at any
point therefore leaves the last committed version intact, and a reader checks every file against
the manifest before using it.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import SfumatoError, UsageError
from .files import sha256_bytes as _sha256

FORMAT = "sfumato-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
KINDS = ("flat", "hnsw", "ivfpq")
FLAT_MAX = 100_000  # auto kind: exact search up to this many vectors, then HNSW
HNSW_MAX = 2_000_000  # ... and IVF-PQ (compressed codes) beyond
_OWN_FILE = re.compile(r"^(vectors\.\d+\.bin|meta\.\d+\.sqlite|\..*\.tmp-\d+)$")  # tmp: files.atomic_write_bytes


def unit(x) -> np.ndarray:
    """(N, D) or (D,) -> (N, D) float32 C-contiguous rows of length 1 (the only normaliser)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(norms == 0):
        raise UsageError("an embedding is zero or not finite; it has no direction to search by")
    return np.ascontiguousarray(x / norms)


def default_kind(n: int) -> str:
    return "flat" if n <= FLAT_MAX else "hnsw" if n <= HNSW_MAX else "ivfpq"


# ---------------------------------------------------------------- vector indexes


class VectorIndex(Protocol):
    kind: str
    dim: int

    def __len__(self) -> int: ...
    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None: ...
    def remove(self, ids: np.ndarray) -> int: ...
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def search_vectors(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def ids(self) -> np.ndarray: ...
    def to_bytes(self) -> bytes: ...
    def save(self, path: str | os.PathLike) -> None: ...


class ExactIndex:
    """Exact inner-product search by one matmul; ids (N,) int64 beside vectors (N, D) float32."""

    kind = "flat"

    def __init__(self, dim: int):
        self.dim = dim
        self._ids = np.zeros(0, np.int64)
        self._vecs = np.zeros((0, dim), np.float32)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids, vecs) -> None:
        ids, vecs = _check_add(self.dim, ids, vecs)
        self._ids = np.concatenate([self._ids, ids])
        self._vecs = np.concatenate([self._vecs, unit(vecs)])

    def remove(self, ids) -> int:
        keep = ~np.isin(self._ids, np.asarray(ids, np.int64))
        removed = int((~keep).sum())
        self._ids, self._vecs = self._ids[keep], self._vecs[keep]
        return removed

    def search(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> (Q, k) scores and ids, best first; -1 ids pad a short index."""
        top, idx = self._top(q, k)
        return _pad(top, self._ids[idx], k)

    def search_vectors(self, q, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """search, plus the hits' stored vectors (Q, k, D), zero where the id is -1."""
        top, idx = self._top(q, k)
        return (*_pad(top, self._ids[idx], k), _pad_vectors(self._vecs[idx], k))

    def _top(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = unit(q)
        scores = torch.from_numpy(q) @ torch.from_numpy(self._vecs).T  # (Q, N)
        top, idx = torch.topk(scores, min(k, len(self)), dim=1)  # (Q, n)
        return top.numpy(), idx.numpy()

    def ids(self) -> np.ndarray:
        return self._ids.copy()

    def vectors(self) -> np.ndarray:
        return self._vecs

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, ids=self._ids, vecs=self._vecs)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, dim: int | None = None, params: dict | None = None) -> "ExactIndex":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            ids, vecs = z["ids"].astype(np.int64), z["vecs"].astype(np.float32)
        index = cls(vecs.shape[1] if dim is None else dim)
        if vecs.shape != (len(ids), index.dim):
            raise ValueError(f"vectors of shape {vecs.shape} for {len(ids)} ids of dimension {index.dim}")
        index._ids, index._vecs = ids, vecs
        return index

    def save(self, path) -> None:
        _write_durably(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path) -> "ExactIndex":
        return cls.from_bytes(Path(path).read_bytes())


class FaissIndex:
    """A faiss index over unit vectors by inner product.

    flat: IndexIDMap2(IndexFlatIP); hnsw: IndexIDMap2(IndexHNSWFlat), removal rebuilds the graph
    from the stored vectors (HNSW cannot unlink nodes, faiss#3339); ivfpq: IndexIVFPQ, trained on
    the first vectors added, with its own ids (IVF stores ids natively, and an IDMap2 wrapper
    breaks its removal: faiss#4535, #4656).
    """

    DEFAULTS = {"flat": {}, "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128},
                "ivfpq": {"nlist": 0, "m": 0, "nbits": 0, "nprobe": 0}}  # 0: chosen from the data

    def __init__(self, kind: str, dim: int, params: dict | None = None):
        faiss = _faiss()
        if kind not in KINDS:
            raise UsageError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
        self.kind, self.dim = kind, dim
        self.params = {**self.DEFAULTS[kind], **(params or {})}
        self.index = None
        if kind == "flat":
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            self.index = self._new_hnsw()

    def _new_hnsw(self):
        faiss = _faiss()
        hnsw = faiss.IndexHNSWFlat(self.dim, int(self.params["M"]), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(self.params["ef_construction"])
        return faiss.IndexIDMap2(hnsw)

    def _train_ivfpq(self, x: np.ndarray) -> None:
        faiss = _faiss()
        p = self.params
        n = len(x)
        p["nlist"] = int(p["nlist"] or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1, 65536)))
        p["m"] = int(p["m"] or _pq_subquantizers(self.dim))
        p["nbits"] = int(p["nbits"] or max(1, min(8, int(math.log2(max(n, 8) / 4)))))  # 2**nbits <= n / 4
        p["nprobe"] = int(p["nprobe"] or min(p["nlist"], max(8, p["nlist"] // 4)))
        if self.dim % p["m"]:
            raise UsageError(f"ivfpq: m={p['m']} must divide the dimension {self.dim}")
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small collections: no warnings, train on what there is
        index.pq.cp.min_points_per_centroid = 1
        cap = max(39 * p["nlist"], 2 ** p["nbits"] * 64)  # training sample: faiss' rule of thumb
        sample = x if n <= cap else x[np.random.default_rng(0).choice(n, cap, replace=False)]
        try:
            index.train(sample)
        except RuntimeError as e:
            raise UsageError(f"ivfpq: cannot train on {n} vectors with {p} "
                             f"({str(e).strip().splitlines()[-1]}); use --kind flat or hnsw") from None
        self.index = index  # faiss' Python wrapper keeps `quantizer` alive with it

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def add(self, ids, vecs) -> None:
        ids, vecs = _check_add(self.dim, ids, vecs)
        x = unit(vecs)
        if self.index is None:  # ivfpq: train on the first batch
            self._train_ivfpq(x)
        self.index.add_with_ids(x, ids)

    def remove(self, ids) -> int:
        ids = np.asarray(ids, np.int64)
        if self.index is None or not len(ids):
            return 0
        if self.kind != "hnsw":
            return int(self.index.remove_ids(ids))
        have = self.ids()
        keep = ~np.isin(have, ids)
        vecs = self.index.index.reconstruct_n(0, len(have))
        self.index = self._new_hnsw()
        if keep.any():
            self.index.add_with_ids(np.ascontiguousarray(vecs[keep]), have[keep])
        return int((~keep).sum())

    def search(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search(q, k, vectors=False)

    def search_vectors(self, q, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """search, plus the hits' stored vectors (Q, k, D), zero where the id is -1; ivfpq's are
        decoded from its codes (faiss' search_and_reconstruct, as clip-retrieval reads them)."""
        return self._search(q, k, vectors=True)

    def _search(self, q, k: int, vectors: bool) -> tuple:
        q = unit(q)
        n = min(k, len(self))
        if n == 0:
            scores, ids = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
            vecs = np.zeros((len(q), 0, self.dim), np.float32)
        else:
            if self.kind == "hnsw":
                _faiss().downcast_index(self.index.index).hnsw.efSearch = max(int(self.params["ef_search"]), n)
            elif self.kind == "ivfpq":
                self.index.nprobe = int(self.params["nprobe"])
            if vectors:
                scores, ids, vecs = self.index.search_and_reconstruct(q, n)
                vecs = np.where((ids >= 0)[..., None], vecs, 0)  # faiss fills those of -1 ids with -1
            else:
                scores, ids = self.index.search(q, n)
        scores, ids = _pad(scores, ids, k)
        return (scores, ids, _pad_vectors(vecs, k)) if vectors else (scores, ids)

    def ids(self) -> np.ndarray:
        faiss = _faiss()
        if self.index is None:
            return np.zeros(0, np.int64)
        if self.kind != "ivfpq":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        inv = self.index.invlists
        out = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy() for i in range(inv.nlist)]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def to_bytes(self) -> bytes:
        if self.index is None:
            return b""
        return _faiss().serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, dim: int, kind: str, params: dict | None = None) -> "FaissIndex":
        index = cls(kind, dim, params)
        if data:
            index.index = _faiss().deserialize_index(np.frombuffer(data, np.uint8))
            if index.index.d != dim:
                raise ValueError(f"faiss index of dimension {index.index.d}, expected {dim}")
        return index

    def save(self, path) -> None:
        _write_durably(Path(path), self.to_bytes())
        Path(path).with_name(Path(path).name + ".json").write_text(
            json.dumps({"kind": self.kind, "dim": self.dim, "params": self.params}))

    @classmethod
    def load(cls, path) -> "FaissIndex":
        info = json.loads(Path(path).with_name(Path(path).name + ".json").read_text())
        return cls.from_bytes(Path(path).read_bytes(), info["dim"], info["kind"], info["params"])


def make_vector_index(kind: str, dim: int, params: dict | None = None) -> VectorIndex:
    """flat -> ExactIndex (no extra needed); hnsw / ivfpq -> FaissIndex."""
    if kind == "flat":
        return ExactIndex(dim)
    return FaissIndex(kind, dim, params)


def load_vector_index(data: bytes, kind: str, dim: int, params: dict | None = None) -> VectorIndex:
    if kind == "flat":
        return ExactIndex.from_bytes(data, dim)
    return FaissIndex.from_bytes(data, dim, kind, params)


def _pq_subquantizers(dim: int) -> int:
    """Bytes per code: a divisor of dim near dim/4 (dim/2 for small dims), at most 64."""
    target = dim // 2 if dim <= 64 else min(64, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _check_add(dim: int, ids, vecs) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(np.asarray(ids, np.int64).reshape(-1))
    vecs = np.atleast_2d(np.asarray(vecs, np.float32))
    if vecs.shape != (len(ids), dim):
        raise ValueError(f"{len(ids)} ids need vectors of shape ({len(ids)}, {dim}), got {vecs.shape}")
    return ids, vecs


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q, n = ids.shape
    if n == k:
        return scores.astype(np.float32), ids.astype(np.int64)
    s = np.full((q, k), -np.inf, np.float32)
    i = np.full((q, k), -1, np.int64)
    s[:, :n], i[:, :n] = scores, ids
    return s, i


def _pad_vectors(vecs: np.ndarray, k: int) -> np.ndarray:
    """(Q, n, D) -> (Q, k, D) float32, zeros after n (beside _pad's -1 ids)."""
    q, n, d = vecs.shape
    out = np.zeros((q, k, d), np.float32)
    out[:, :n] = vecs
    return out


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SfumatoError("the hnsw and ivfpq index kinds need faiss: pip install 'sfumato[index]'") from None
    return faiss


# ---------------------------------------------------------------- the on-disk index

SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    caption TEXT,
    width INTEGER,
    height INTEGER,
    sha256 TEXT NOT NULL UNIQUE,
    added TEXT NOT NULL
);
CREATE INDEX items_path ON items(path);
"""
COLUMNS = ("id", "path", "caption", "width", "height", "sha256", "added")


@dataclass
class Snapshot:
    """One committed version of an index, checked against its manifest and held in memory."""

    path: Path
    manifest: dict
    vectors: VectorIndex
    db: sqlite3.Connection

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def rows(self, ids) -> dict[int, dict]:
        ids = [int(i) for i in ids if 0 <= int(i) < 2**63]  # SQLite ids are int64; others are absent
        out = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(f"SELECT {','.join(COLUMNS)} FROM items WHERE id IN ({marks})", chunk):
                out[r[0]] = dict(zip(COLUMNS, r))
        return out

    def count_rows(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def sha256s(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT sha256 FROM items")}

    def find(self, paths: list[str], shas: list[str]) -> list[int]:
        """Ids of rows whose path or sha256 is among the given ones."""
        found = set()
        for col, values in (("path", paths), ("sha256", shas)):
            for start in range(0, len(values), 500):
                chunk = values[start:start + 500]
                marks = ",".join("?" * len(chunk))
                found |= {r[0] for r in self.db.execute(f"SELECT id FROM items WHERE {col} IN ({marks})", chunk)}
        return sorted(found)


def open_index(path: str | os.PathLike, attempts: int = 5) -> Snapshot:
    """Load the committed version of an index, verifying each file's size and sha256.

    Raises:
        UsageError: no index at `path`.
        SfumatoError: a file is missing, truncated or corrupted, or the manifest is unreadable.
    """
    root = Path(path)
    if not root.exists():
        raise UsageError(f"{root}: no such index (make one with `sfumato index build`)")
    if not (root / MANIFEST).is_file():
        raise SfumatoError(f"{root}: not a sfumato index (no {MANIFEST}); build one with `sfumato index build`")
    for attempt in range(attempts):
        manifest = read_manifest(root)
        try:
            blobs = {name: _read_checked(root, name, manifest["files"][name]) for name in ("vectors", "meta")}
        except FileNotFoundError as e:
            if read_manifest(root)["version"] != manifest["version"] and attempt < attempts - 1:
                continue  # a writer committed a newer version and removed this one meanwhile: retry
            raise SfumatoError(f"{root}: index file {Path(e.filename).name} is missing; the index is damaged, "
                               "rebuild it with `sfumato index build --overwrite`") from None
        return _snapshot(root, manifest, blobs)
    raise SfumatoError(f"{root}: the index kept changing while it was read; try again")  # pragma: no cover


def read_manifest(root: Path) -> dict:
    try:
        raw = (root / MANIFEST).read_bytes()
        manifest = json.loads(raw)
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        ok = manifest.get("checksum") == _sha256(_canonical(body))
    except (ValueError, AttributeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise SfumatoError(f"{root / MANIFEST}: manifest is corrupted (checksum mismatch or not JSON); "
                           "rebuild the index with `sfumato index build --overwrite`")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise SfumatoError(f"{root}: unsupported index format {manifest.get('format')} "
                           f"v{manifest.get('format_version')} (this sfumato reads {FORMAT} v{FORMAT_VERSION})")
    return manifest


def _read_checked(root: Path, name: str, entry: dict) -> bytes:
    path = root / entry["name"]
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        raise SfumatoError(f"{path}: truncated or resized ({len(data):,} bytes, the manifest says "
                           f"{entry['bytes']:,}); the index is damaged, rebuild it with "
                           "`sfumato index build --overwrite`")
    if _sha256(data) != entry["sha256"]:
        raise SfumatoError(f"{path}: corrupted (sha256 differs from the manifest's); the index is damaged, "
                           "rebuild it with `sfumato index build --overwrite`")
    return data


def _snapshot(root: Path, manifest: dict, blobs: dict[str, bytes]) -> Snapshot:
    try:
        vectors = load_vector_index(blobs["vectors"], manifest["kind"], manifest["dim"], manifest["params"])
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.deserialize(blobs["meta"])
        rows = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except SfumatoError:
        raise
    except Exception as e:  # checksums matched, so this is a bug or a foreign file, not bit rot
        raise SfumatoError(f"{root}: cannot read the index files ({type(e).__name__}: {e})") from None
    if not len(vectors) == rows == manifest["count"]:
        raise SfumatoError(f"{root}: inconsistent index ({len(vectors)} vectors, {rows} metadata rows, "
                           f"manifest says {manifest['count']}); rebuild it")
    return Snapshot(root, manifest, vectors, db)


class IndexWriter:
    """Exclusive writer: `with IndexWriter(path) as w: ...; w.commit()`.

    Takes `fcntl.flock` on INDEX/.lock without waiting (a second writer gets a clear error), loads
    the committed version (or starts empty with `reset`), and `commit()` publishes a new version.
    Leaving the block without commit writes nothing.
    """

    def __init__(self, path: str | os.PathLike, create: bool = False, overwrite: bool = False):
        self.root = Path(path)
        self.create, self.overwrite = create, overwrite
        self._lock_fd: int | None = None
        self._made_dir = False
        self.snapshot: Snapshot | None = None
        self.manifest: dict | None = None
        self.vectors: VectorIndex | None = None
        self.db: sqlite3.Connection | None = None

    # -- lock
    def __enter__(self) -> "IndexWriter":
        if self.create:
            if self.root.exists() and not self.root.is_dir():
                raise UsageError(f"{self.root} exists and is not a folder")
            if (self.root / MANIFEST).exists() and not self.overwrite:
                raise UsageError(f"{self.root} is already an index; add images with `sfumato index add`, "
                                 "or pass --overwrite to rebuild it")
            foreign = [p.name for p in self.root.iterdir() if p.name not in (MANIFEST, LOCK)
                       and not _OWN_FILE.match(p.name)] if self.root.is_dir() else []
            if foreign:
                raise UsageError(f"{self.root} is a folder with other files in it ({foreign[0]}, ...); "
                                 "choose a new --out")
            self._made_dir = not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.exists():
            raise UsageError(f"{self.root}: no such index (make one with `sfumato index build`)")
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SfumatoError(f"{self.root} is locked by another writer{f' (pid {holder})' if holder else ''}; "
                               "wait for it to finish and try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        try:
            self._collect_garbage()
            if (self.root / MANIFEST).exists() and self.create:  # --overwrite: even a damaged index
                self.manifest = {"version": self._last_version()}
            elif (self.root / MANIFEST).exists():
                self.snapshot = open_index(self.root)
                self.manifest = dict(self.snapshot.manifest)
                self.vectors, self.db = self.snapshot.vectors, self.snapshot.db
            elif not self.create:
                raise SfumatoError(f"{self.root}: not a sfumato index (no {MANIFEST})")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._made_dir and not (self.root / MANIFEST).exists():  # a first build that never committed
            for p in self.root.iterdir():
                if p.name == LOCK or _OWN_FILE.match(p.name):
                    p.unlink(missing_ok=True)
            try:
                self.root.rmdir()
            except OSError:
                pass

    def _last_version(self) -> int:
        try:
            return int(read_manifest(self.root)["version"])
        except SfumatoError:  # fall back on the newest file name
            found = [int(m.group(1)) for p in self.root.iterdir() if (m := re.match(r"^\w+\.(\d+)\.", p.name))]
            return max(found, default=0)

    # -- edits
    def reset(self, model: dict, dim: int, kind: str, params: dict | None = None) -> None:
        """Start from an empty index (build / --overwrite); the old version stays until commit."""
        if kind not in KINDS:
            raise UsageError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
        vectors = make_vector_index(kind, dim, params)
        old = self.manifest or {}
        now = _now()
        self.manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": old.get("version", 0),
                         "kind": kind, "dim": dim, "params": getattr(vectors, "params", {}), "count": 0,
                         "next_id": 0, "model": model, "created": now, "updated": now}
        self.vectors = vectors
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.executescript(SCHEMA)

    def add(self, vecs: np.ndarray, rows: list[dict]) -> list[int]:
        """Append vectors with their metadata rows (path, caption, width, height, sha256)."""
        if not rows:
            return []
        start = int(self.manifest["next_id"])
        ids = np.arange(start, start + len(rows), dtype=np.int64)
        self.vectors.add(ids, vecs)
        now = _now()
        self.db.executemany("INSERT INTO items (id, path, caption, width, height, sha256, added) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(int(i), r["path"], r.get("caption"), r.get("width"), r.get("height"), r["sha256"],
                              r.get("added", now)) for i, r in zip(ids, rows)])
        self.manifest["next_id"] = start + len(rows)
        return ids.tolist()

    def remove(self, ids: list[int]) -> int:
        if not ids:
            return 0
        removed = self.vectors.remove(np.asarray(ids, np.int64))
        self.db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])
        return removed

    def sha256s(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT sha256 FROM items")} if self.db else set()

    def find(self, paths: list[str], shas: list[str]) -> list[int]:
        return Snapshot(self.root, self.manifest, self.vectors, self.db).find(paths, shas)

    # -- publish
    def commit(self) -> dict:
        """Write the next version: data files, then the manifest by an atomic rename, then clean up."""
        self.db.commit()  # serialize() sees only committed pages
        rows = self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        if rows != len(self.vectors):
            raise SfumatoError(f"internal error: {len(self.vectors)} vectors but {rows} rows; nothing written")
        version = int(self.manifest["version"]) + 1
        files = {}
        for name, data, fname in (("vectors", self.vectors.to_bytes(), f"vectors.{version:06d}.bin"),
                                  ("meta", self.db.serialize(), f"meta.{version:06d}.sqlite")):
            _write_durably(self.root / fname, data)
            files[name] = {"name": fname, "bytes": len(data), "sha256": _sha256(data)}
        from . import __version__

        body = {**self.manifest, "version": version, "count": rows, "files": files, "updated": _now(),
                "params": getattr(self.vectors, "params", {}), "sfumato": __version__}
        body.pop("checksum", None)
        manifest = {**body, "checksum": _sha256(_canonical(body))}
        _write_durably(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())
        self.manifest = manifest
        self._collect_garbage()
        return manifest

    def _collect_garbage(self) -> None:
        """Delete our files the committed manifest does not name (left by crashes or old versions)."""
        keep = set()
        if (self.root / MANIFEST).exists():
            try:
                keep = {f["name"] for f in read_manifest(self.root)["files"].values()}
            except SfumatoError:
                return  # leave a damaged index as it is for the user to inspect
        for p in self.root.iterdir():
            if _OWN_FILE.match(p.name) and p.name not in keep:
                p.unlink(missing_ok=True)


def _write_durably(path: Path, data: bytes) -> None:
    from .files import atomic_write_bytes

    atomic_write_bytes(path, data)


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def disk_size(path: str | os.PathLike) -> int:
    """Bytes of the committed version's files plus the manifest."""
    root = Path(path)
    m = read_manifest(root)
    return (root / MANIFEST).stat().st_size + sum(f["bytes"] for f in m["files"].values())
