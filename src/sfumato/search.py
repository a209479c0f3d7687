"""Fill an index with image embeddings, query it (text, image, image + words, raw embedding), and
classify images zero-shot against labels with a prompt-template ensemble.

    emb = Embedder.load("models/mine")
    build_index("data/shapes", "shapes.index", emb)
    hits = search(open_index("shapes.index"), Query(image="q.png", text="blue").validate().vector(emb), k=10)
    probs = classify(emb, [img], ["red circle", "blue square"])

Image + words ("blue", "in blue", "with a triangle") move the image's embedding along the words'
direction: `image + alpha * (text(words) - text(""))` by default (method "delta"), chosen by
benchmarks/eval_search.py on held-out ShapesWorld (see COMPOSITE_DEFAULT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .embedding import Embedder
from .errors import SfumatoError, UsageError
from .files import file_sha256
from .index import KINDS, IndexWriter, Snapshot, default_kind, read_manifest, unit
from .pairs import DEFAULT_MAX_PIXELS, ImageItem, Problem, iter_batches, list_images, open_image
from .progress import start_progress

# "delta": image + alpha * (text(words) - text("")); "sum": image + alpha * text(words).
COMPOSITE_METHODS = ("delta", "sum")
# Chosen by benchmarks/eval_search.py --sweep (tuning split, 800 queries, "small" preset CLIP): delta at
# alpha 1.0 had the best top-3 averaged over phrasings (0.308; sum 0.296) and, unlike sum (0.251 for
# "blue" vs 0.341 for "in blue"), barely depends on the phrasing: subtracting text("") removes what
# every text embedding shares. alpha <= 0.5 never leaves the query image's colour.
COMPOSITE_DEFAULT = {"method": "delta", "alpha": 1.0}
# Bare "{}" and "a {}" first: ShapesWorld captions read "a red circle".
TEMPLATES = ("{}", "a {}", "an image of a {}", "a picture of a {}", "a drawing of a {}")
MAX_K = 10_000
# Cosine similarity above which two hits are near-duplicates: clip-retrieval's (clip_back.py get_non_uniques)
DUPLICATE_SIMILARITY = 0.94


@dataclass
class WriteReport:
    """What a build, add or remove did."""

    index: Path
    added: int = 0
    removed: int = 0
    duplicates: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    not_found: list[Path] = field(default_factory=list)
    total: int = 0
    kind: str = ""
    version: int = 0


@dataclass
class Hit:
    id: int
    path: str
    caption: str | None
    score: float

    def to_dict(self) -> dict:
        return {"path": self.path, "caption": self.caption, "score": round(self.score, 6), "id": self.id}


# ---------------------------------------------------------------- writes


def build_index(source: str | os.PathLike, out: str | os.PathLike, embedder: Embedder, kind: str = "auto",
                overwrite: bool = False, params: dict | None = None, progress: bool = False) -> WriteReport:
    """Embed every image of `source` (folder or manifest) into a new index at `out`.

    Raises:
        UsageError: bad source or kind, `out` already an index without `overwrite`, or no usable image.
    """
    if kind != "auto" and kind not in KINDS:
        raise UsageError(f"unknown --kind {kind!r}; choose from auto, {', '.join(KINDS)}")
    items, problems = list_images([source])
    report = WriteReport(Path(out), problems=problems)
    with IndexWriter(out, create=True, overwrite=overwrite) as w:
        vecs, rows = _embed_items(items, embedder, set(), report, progress)
        if not rows:
            raise UsageError(f"no usable images in {source} ({len(report.problems)} skipped); nothing written")
        w.reset(embedder.info, embedder.dim, default_kind(len(rows)) if kind == "auto" else kind, params)
        w.add(vecs, rows)
        m = w.commit()
    report.added, report.total, report.kind, report.version = len(rows), m["count"], m["kind"], m["version"]
    return report


def add_to_index(index: str | os.PathLike, files: list[str | os.PathLike], embedder: Embedder,
                 progress: bool = False) -> WriteReport:
    """Append images (files, folders or manifests) to an index; images already in it are skipped."""
    items, problems = list_images(files)
    report = WriteReport(Path(index), problems=problems)
    with IndexWriter(index) as w:
        check_model(w.manifest, embedder, Path(index))
        vecs, rows = _embed_items(items, embedder, w.sha256s(), report, progress)
        if rows:
            w.add(vecs, rows)
            w.commit()
        report.added, report.total, report.kind = len(rows), len(w.vectors), w.manifest["kind"]
        report.version = w.manifest["version"]
    return report


def remove_from_index(index: str | os.PathLike, files: list[str | os.PathLike]) -> WriteReport:
    """Remove images by path (as given when added) or, for files still on disk, by content."""
    report = WriteReport(Path(index))
    with IndexWriter(index) as w:
        doomed: set[int] = set()
        for f in files:
            p = Path(f)
            shas = [file_sha256(p)] if p.is_file() else []
            ids = w.find([str(p.resolve())], shas)
            if not ids:
                report.not_found.append(p)
            doomed.update(ids)
        if doomed:
            report.removed = w.remove(sorted(doomed))
            w.commit()
        report.total, report.kind, report.version = len(w.vectors), w.manifest["kind"], w.manifest["version"]
    return report


def check_model(manifest: dict, embedder: Embedder, index: Path) -> None:
    """Refuse to mix embeddings of two models in one index."""
    want = manifest["model"]["fingerprint"]
    if embedder.fingerprint != want:
        raise UsageError(f"{index} holds embeddings of another model ({manifest['model'].get('path')}, "
                         f"fingerprint {want[:12]}); {embedder.folder} is {embedder.fingerprint[:12]}: "
                         "use the index's model, or rebuild the index with this one")


def index_model(index: str | os.PathLike) -> Path:
    """The model folder an index was built with (for when --model is not given)."""
    root = Path(index)
    if not root.exists():
        raise UsageError(f"{root}: no such index (make one with `sfumato index build`)")
    if not (root / "manifest.json").is_file():
        raise SfumatoError(f"{root}: not a sfumato index (no manifest.json)")
    path = Path(read_manifest(root)["model"]["path"])
    if not path.exists():
        raise UsageError(f"{root} was built with the model at {path}, which is gone; pass --model DIR "
                         "(the same model: its fingerprint is checked)")
    return path


def _embed_items(items: list[ImageItem], embedder: Embedder, seen: set[str], report: WriteReport,
                 progress: bool, batch_size: int = 64) -> tuple[np.ndarray, list[dict]]:
    """Open, dedupe (by sha256) and embed images; skipped ones go to the report."""
    vecs, rows = [], []
    bar = start_progress(len(items), "embedding images", stderr=True) if progress and items else None
    for batch in iter_batches(items, batch_size):
        images, batch_rows = [], []
        for it in batch:
            try:
                sha = file_sha256(it.path)
                if sha in seen:
                    report.duplicates.append(it.path)
                    continue
                img = open_image(it.path, max_pixels=DEFAULT_MAX_PIXELS)
            except SfumatoError as e:
                report.problems.append(Problem(it.path, str(e).removeprefix(f"{it.path}: "), "unreadable image"))
                continue
            except OSError as e:
                report.problems.append(Problem(it.path, f"unreadable ({e.strerror or e})", "unreadable image"))
                continue
            seen.add(sha)
            images.append(img)
            batch_rows.append({"path": str(it.path.resolve()), "caption": it.caption, "width": img.width,
                               "height": img.height, "sha256": sha})
        if images:
            vecs.append(embedder.embed_images(images))
            rows += batch_rows
        if bar:
            bar[0].advance(bar[1], len(batch))
    if bar:
        bar[0].stop()
    return (np.concatenate(vecs) if vecs else np.zeros((0, embedder.dim), np.float32)), rows


# ---------------------------------------------------------------- queries


@dataclass
class Query:
    """What to search by: words, an image, an image changed by words, or an embedding.

    The one set of rules for the CLI (`sfumato search`), the native API (/v1/search) and the
    clip-retrieval endpoint (/knn-service): `validate` says what is wrong in one line, `vector`
    embeds the query.

    Args:
        text: words to search by; with `image`, what to change in the image.
        image: a file path or an opened PIL image.
        embedding: a query vector, or a .npy/.safetensors file holding one.
        alpha, method: with image and text, how the words move the image (see COMPOSITE_DEFAULT).
    """

    text: str | None = None
    image: object = None
    embedding: object = None
    alpha: float | None = None
    method: str | None = None

    def validate(self, flag: str = "--") -> "Query":
        """Check which inputs go together; `flag` prefixes the names in messages ("--" for the CLI,
        "" for the API). Returns self.

        Raises:
            UsageError: a bad combination, empty words or an unknown composite method.
        """
        f = flag
        if self.embedding is not None and (self.text is not None or self.image is not None):
            raise UsageError(f"{f}embedding cannot be combined with {f}text or {f}image")
        if self.embedding is None and self.text is None and self.image is None:
            raise UsageError(f"give {f}text, {f}image, {f}image with {f}text, or {f}embedding")
        if self.text is not None and not self.text.strip():
            what = "say what to change in the image" if self.image is not None else "say what to look for"
            raise UsageError(f"{f}text is empty; {what}")
        if (self.alpha is not None or self.method is not None) and not (self.image is not None
                                                                         and self.text is not None):
            raise UsageError(f"{f}alpha and {f}method apply to {f}image with {f}text")
        if self.method is not None and self.method not in COMPOSITE_METHODS:
            raise UsageError(f"unknown composite method {self.method!r}; choose from {', '.join(COMPOSITE_METHODS)}")
        return self

    @property
    def needs_model(self) -> bool:
        """Whether the query is embedded by a model (everything but a given embedding)."""
        return self.embedding is None

    def vector(self, embedder: Embedder | None, dim: int | None = None, embed_text=None) -> np.ndarray:
        """The query as one vector.

        Args:
            embedder: the model that embeds text and images (unused for an embedding).
            dim: the index's dimension, checked for an embedding read from a file.
            embed_text: text -> unit vector for words alone (default: `embedder`, one text at a time).
        """
        if self.embedding is not None:
            if isinstance(self.embedding, (str, os.PathLike)):
                return read_embedding(self.embedding, dim)
            return np.asarray(self.embedding, np.float32)
        if self.image is not None and self.text is not None:
            return image_text_query(embedder, self.image, self.text, self.alpha, self.method)
        if self.image is not None:
            return image_query(embedder, self.image)
        if embed_text is not None:
            return embed_text(self.text)
        return text_query(embedder, self.text)


def text_query(embedder: Embedder, text: str) -> np.ndarray:
    if not text or not text.strip():
        raise UsageError("--text is empty; say what to look for")
    return embedder.embed_texts([text.strip()])[0]


def image_query(embedder: Embedder, path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`path` is a file or an already opened PIL image. Raises SfumatoError for a missing,
    unreadable or oversized (decompression bomb) image."""
    img = path if hasattr(path, "convert") else open_image(path, max_pixels=max_pixels)
    return embedder.embed_images([img])[0]


def compose(image_vec: np.ndarray, words_vec: np.ndarray, empty_vec: np.ndarray, alpha: float,
            method: str) -> np.ndarray:
    """Move an image embedding along the words' direction (inputs are unit vectors)."""
    if method == "delta":
        return image_vec + alpha * (words_vec - empty_vec)
    if method == "sum":
        return image_vec + alpha * words_vec
    raise UsageError(f"unknown composite method {method!r}; choose from {', '.join(COMPOSITE_METHODS)}")


def image_text_query(embedder: Embedder, path, words: str, alpha: float | None = None,
                     method: str | None = None) -> np.ndarray:
    """The embedding of "this image, but {words}"."""
    if not words or not words.strip():
        raise UsageError("--text is empty; say what to change in the image")
    t = embedder.embed_texts([words.strip(), ""])
    alpha = COMPOSITE_DEFAULT["alpha"] if alpha is None else alpha
    return compose(image_query(embedder, path), t[0], t[1], alpha, method or COMPOSITE_DEFAULT["method"])


def read_embedding(path: str | os.PathLike, dim: int | None = None) -> np.ndarray:
    """A (D,) or (1, D) vector from .npy (no pickles) or .safetensors (exactly one tensor)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such embedding file")
    try:
        if path.suffix.lower() == ".npy":
            x = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise UsageError(f"{path}: holds {len(tensors)} tensors; expected exactly one")
            x = next(iter(tensors.values()))
        else:
            raise UsageError(f"{path}: unsupported embedding file (expected .npy or .safetensors)")
    except UsageError:
        raise
    except Exception as e:
        raise SfumatoError(f"{path}: cannot read the embedding ({type(e).__name__}: {e})") from None
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1 or (dim is not None and x.shape[0] != dim):
        raise UsageError(f"{path}: embedding of shape {tuple(x.shape)}; the index needs a vector of {dim}")
    return x


def search(snapshot: Snapshot, query: np.ndarray, k: int = 10, deduplicate: bool = False) -> list[Hit]:
    """The k nearest images to one query vector, best first; with `deduplicate`, near-duplicates of a
    better hit are left out (see near_duplicates), so fewer may come back."""
    check_k(k)
    if query.shape[-1] != snapshot.dim:
        raise UsageError(f"query of dimension {query.shape[-1]}; the index holds {snapshot.dim}")
    if deduplicate:
        scores, ids, vecs = snapshot.vectors.search_vectors(query[None], k)  # the index normalises
        found = np.flatnonzero(ids[0] >= 0)  # not the -1 padding
        keep = np.delete(found, near_duplicates(vecs[0, found]))
        scores, ids = scores[:, keep], ids[:, keep]
    else:
        scores, ids = snapshot.vectors.search(query[None], k)
    rows = snapshot.rows(ids[0])
    return [Hit(int(i), rows[int(i)]["path"], rows[int(i)]["caption"], float(s))
            for s, i in zip(scores[0], ids[0]) if int(i) in rows]


def near_duplicates(vecs: np.ndarray, threshold: float = DUPLICATE_SIMILARITY) -> list[int]:
    """Positions in (N, D) vectors, best hit first, that clip-retrieval's `deduplicate` drops: vectors
    linked by cosine similarity above `threshold`, transitively, form a group whose first member stays."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    x = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    _, group = connected_components(csr_matrix(x @ x.T > threshold), directed=False)  # (N,) group of each
    first = np.unique(group, return_index=True)[1]
    return np.setdiff1d(np.arange(len(x)), first).tolist()


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise UsageError(f"-k must be between 1 and {MAX_K}, got {k}")


def hits_grid(hits: list[Hit], out: str | os.PathLike, cell: int = 128) -> Path:
    """A contact sheet of the hits with rank and score, written atomically as PNG."""
    from PIL import Image

    from .viz import make_grid

    images, labels = [], []
    for rank, h in enumerate(hits, 1):
        try:
            img = open_image(h.path)
        except SfumatoError:
            img = Image.new("RGB", (cell, cell), (160, 160, 160))
        images.append(img)
        labels.append(f"{rank}. {h.score:.3f} {h.caption or Path(h.path).name}")
    if not images:
        raise UsageError("no hits to draw")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--grid must name a .png file, got {out}")
    sheet = make_grid(images, labels, cell=cell)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- zero-shot


def check_templates(templates) -> None:
    """Each template holds exactly one {} and no other brace (it is filled by a plain replace)."""
    if not templates:
        raise UsageError("give at least one template")
    for t in templates:
        rest = t.replace("{}", "", 1)
        if "{}" not in t or "{" in rest or "}" in rest:
            raise UsageError(f"template {t[:60]!r} must hold exactly one {{}} (where the label goes) and no other brace")


def fill_template(template: str, label: str) -> str:
    """Put a label into a template; a label with its own article ("a red circle") keeps it.
    A plain replace, never str.format: a user's template carries no format specs."""
    label = label.strip()
    if label.lower().startswith(("a ", "an ", "the ")):
        template = template.replace("an {}", "{}").replace("a {}", "{}")
    return template.replace("{}", label, 1)


def label_embeddings(embedder: Embedder, labels: list[str], templates=TEMPLATES) -> np.ndarray:
    """(L, D): each label's mean embedding over the templates, renormalised (CLIP's ensemble)."""
    texts = [fill_template(t, lab) for lab in labels for t in templates]
    e = embedder.embed_texts(texts).reshape(len(labels), len(templates), -1).mean(axis=1)
    return unit(e)


def parse_labels(text: str | None, file: str | os.PathLike | None) -> list[str]:
    """Labels from "a,b,c" or a file (one a line); at least two, no empties or repeats."""
    if (text is None) == (file is None):
        raise UsageError("give --labels \"a,b\" or --labels-file FILE (one of them)")
    if file is not None:
        try:
            raw = Path(file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{file}: cannot read labels ({e})") from None
        labels = [s.strip() for s in raw if s.strip()]
    else:
        labels = [s.strip() for s in text.split(",")]
        if any(not s for s in labels):
            raise UsageError("--labels has an empty label (check the commas)")
    if len(labels) < 2:
        raise UsageError(f"zero-shot classification needs at least two labels, got {len(labels)}")
    dup = next((s for i, s in enumerate(labels) if s in labels[:i]), None)
    if dup:
        raise UsageError(f"label {dup!r} is given twice")
    return labels


def classify(embedder: Embedder, images, labels: list[str], templates=TEMPLATES) -> np.ndarray:
    """(N, L) probabilities: softmax over labels of the model's scaled cosine similarities."""
    check_templates(templates)
    return classify_embeddings(embedder, embedder.embed_images(list(images)), labels, templates)


def classify_embeddings(embedder: Embedder, image_emb: np.ndarray, labels: list[str],
                        templates=TEMPLATES) -> np.ndarray:
    """`classify` for images already embedded: (N, D) -> (N, L) probabilities."""
    import torch

    lab = label_embeddings(embedder, labels, templates)
    logits = embedder.logit_scale * torch.from_numpy(image_emb @ lab.T)
    return torch.softmax(logits.double(), dim=1).numpy()
