"""What the server holds once started: a pipeline, an embedder and named indexes, loaded at start-up."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UsageError


@dataclass
class IndexHandle:
    """A named index: the committed snapshot searches read, swapped whole after each add."""

    name: str
    path: Path
    snapshot: object
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def uploads(self) -> Path:
        """Where images added over HTTP are kept, named by content (the index stores their paths)."""
        return self.path.with_name(self.path.name + ".uploads")

    def reload(self) -> None:
        from ..index import open_index

        self.snapshot = open_index(self.path)


class TextBatcher:
    """Concurrent text queries share forward passes of the text tower: a query that finds the tower
    busy waits, and the next pass embeds it together with everything else that queued meanwhile
    (one pass of 20 texts costs about what 2.5 single ones do on a CPU)."""

    MAX_BATCH = 64

    def __init__(self, embedder, lock: threading.Lock):
        self.embedder, self.lock = embedder, lock
        self.pending: list[tuple[str, dict]] = []
        self.pending_lock = threading.Lock()

    def embed(self, text: str):
        slot = {"done": threading.Event()}
        with self.pending_lock:
            self.pending.append((text, slot))
        while not slot["done"].is_set():
            with self.lock:  # whoever holds the tower serves the queue, in order
                if slot["done"].is_set():
                    break
                with self.pending_lock:
                    batch, self.pending = self.pending[:self.MAX_BATCH], self.pending[self.MAX_BATCH:]
                try:
                    vecs = self.embedder.embed_texts([t for t, _ in batch])
                except Exception as e:  # every waiter of this pass gets the error, not a hang
                    vecs = [e] * len(batch)
                for (_, s), v in zip(batch, vecs):
                    s["value"] = v
                    s["done"].set()
        if isinstance(slot["value"], Exception):
            raise slot["value"]
        return slot["value"]


@dataclass
class Models:
    pipe: object | None = None  # sfumato.pipeline.Pipeline
    embedder: object | None = None  # sfumato.embedding.Embedder
    indexes: dict[str, IndexHandle] = field(default_factory=dict)
    # Fast tokenizers fail when one instance is entered from two threads ("Already borrowed").
    embed_lock: threading.Lock = field(default_factory=threading.Lock)
    _texts: TextBatcher | None = None

    def text_vector(self, text: str):
        """The unit embedding of a (non-empty) query text; safe to call from many threads."""
        if not text or not text.strip():
            raise UsageError("text is empty; say what to look for")
        if self._texts is None:
            self._texts = TextBatcher(self.embedder, self.embed_lock)
        return self._texts.embed(text.strip())

    @property
    def name(self) -> str:
        return self.pipe.name if self.pipe is not None else self.embedder.folder.name


def model_loader(model: str | Path | None, indexes: list[str | Path] = (), device: str | None = None
                 ) -> Callable[[], Models]:
    """A function that loads the model folder (generation if it has a UNet, search if it has clip/)
    and opens each index, checking it was built with this model's CLIP. Without a model folder, the
    first index's own model is used (else the shipped one)."""

    def load() -> Models:
        from ..embedding import Embedder, resolve_model
        from ..index import open_index
        from ..pipeline import DEFAULT_MODEL, load as load_pipeline
        from ..search import check_model

        if model is None and indexes:
            from ..search import index_model

            folder = index_model(indexes[0])  # the model the index was built with, as `sfumato search` takes
        else:
            folder = Path(model) if model is not None else DEFAULT_MODEL
        if not folder.is_dir():
            raise UsageError(f"model folder {folder} does not exist")
        m = Models()
        if (folder / "unet").is_dir():
            m.pipe = load_pipeline(folder, device)
        if (folder / "clip").is_dir():
            m.embedder = Embedder.load(resolve_model(folder), device or "cpu")
        if m.pipe is None and m.embedder is None:
            raise UsageError(f"{folder} has neither a UNet (generation) nor clip/ (search)")
        for path in map(Path, indexes):
            name = path.name.removesuffix(".index") or path.name
            if name in m.indexes:
                raise UsageError(f"two indexes are named {name!r}; rename one folder")
            if m.embedder is None:
                raise UsageError(f"--index needs a model with clip/, and {folder} has none")
            snap = open_index(path)
            check_model(snap.manifest, m.embedder, path)
            m.indexes[name] = IndexHandle(name, path, snap)
        return m

    return load
