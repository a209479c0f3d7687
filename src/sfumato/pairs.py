"""Read a user's own corpus of image-caption pairs and report what is wrong with it.

Three source kinds are understood:

* a folder where every image (``.png .jpg .jpeg .webp``, any case) has a same-named ``.txt``
  caption beside it; sub-folders are walked recursively in sorted order;
* a manifest: a ``.jsonl`` file with ``image`` (or ``file``, or ``file_name``) and ``caption`` (or
  ``text``) per line, or a ``.csv`` file with those columns in its header; other names are given
  with ``image_column``/``caption_column``. Image paths are relative to the manifest's folder. A
  folder with ``manifest.jsonl`` at its top (a ShapesWorld folder) is read this way;
* a Hugging Face ``imagefolder``: a folder whose ``metadata.jsonl`` or ``metadata.csv`` files (at
  its top or in split folders such as ``train/``) list ``file_name`` and ``text``; images that no
  metadata file lists are reported as images without caption.

Bad entries are skipped and collected as ``Problem``s, or raise ``SfumatoError`` under
``strict=True``. ``list_images`` reads the same sources for an index, where captions are optional.
``sfumato data check DIR`` uses ``check_source`` and ``format_report``::

    from sfumato.pairs import check_source, format_report
    print("\\n".join(format_report(check_source("my_pairs/"))))
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import struct
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from .errors import SfumatoError, UsageError

DEFAULT_MAX_PIXELS = 4096 * 4096
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST_EXTS = (".jsonl", ".csv")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder
# Column names tried in order: sfumato's own, ShapesWorld's "file", Hugging Face's "file_name" and "text".
IMAGE_COLUMNS = ("image", "file", "file_name")
CAPTION_COLUMNS = ("caption", "text")
# Pillow only tries these decoders, so a GIF or TIFF renamed to .png is rejected, not silently read.
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")
# What Pillow raises on corrupt data; struct.error and EOFError come from some header parsers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# Problem kinds: short nouns the summary line counts ("2 image without caption").
CAPTION_WITHOUT_IMAGE = "caption without image"
IMAGE_WITHOUT_CAPTION = "image without caption"
DUPLICATE_IMAGE = "duplicate image"
MISSING_IMAGE = "missing image"
UNSUPPORTED_IMAGE = "unsupported image"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_TOO_LARGE = "image too large"
EMPTY_CAPTION = "empty caption"
NON_UTF8_CAPTION = "non-UTF-8 caption"
UNREADABLE_CAPTION = "unreadable caption"
BAD_MANIFEST = "bad manifest line"


class PairSource(str):
    """A source path that also names its manifest's image and caption columns (`--image-column`,
    `--caption-column`); it passes for a plain str wherever a source goes, e.g. through training."""

    image_column: str | None
    caption_column: str | None

    def __new__(cls, path: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None):
        self = super().__new__(cls, os.fspath(path))
        self.image_column, self.caption_column = image_column or None, caption_column or None
        return self


@dataclass(frozen=True)
class _Columns:
    image: tuple[str, ...] = IMAGE_COLUMNS
    caption: tuple[str, ...] = CAPTION_COLUMNS
    given: bool = False

    @classmethod
    def of(cls, source, image_column: str | None, caption_column: str | None) -> "_Columns":
        image_column = image_column or getattr(source, "image_column", None)
        caption_column = caption_column or getattr(source, "caption_column", None)
        return cls((image_column,) if image_column else IMAGE_COLUMNS,
                   (caption_column,) if caption_column else CAPTION_COLUMNS,
                   bool(image_column or caption_column))

    def describe(self) -> str:
        return f"an image column ({_either(self.image)}) and a caption column ({_either(self.caption)})"


def _either(names: tuple[str, ...]) -> str:
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


@dataclass(frozen=True)
class Pair:
    """One image and its caption. ``id`` is the image path relative to the source, no extension."""

    path: Path
    caption: str
    id: str
    size: tuple[int, int] | None = None
    # A manifest's whole line or row, so extra fields (ShapesWorld's scene facts) stay reachable.
    record: dict | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Problem:
    """Why one file or manifest line was skipped."""

    path: Path
    reason: str
    kind: str = ""


@dataclass
class PairReport:
    """The pairs read from ``source`` and the problems met on the way."""

    pairs: list[Pair]
    problems: list[Problem]
    source: Path

    def summary(self) -> dict:
        """Counts, problem kinds, image sizes ("WxH" -> n) and caption length in words."""
        words = [len(p.caption.split()) for p in self.pairs]
        spread = dict.fromkeys(("min", "median", "mean", "max"))
        if words:
            spread = {"min": min(words), "median": statistics.median(words),
                      "mean": statistics.fmean(words), "max": max(words)}
        return {
            "source": str(self.source),
            "count": len(self.pairs),
            "problems": len(self.problems),
            "problem_kinds": Counter(p.kind for p in self.problems),
            "sizes": Counter(f"{p.size[0]}x{p.size[1]}" for p in self.pairs if p.size),
            "caption_words": spread,
        }


@dataclass
class _Entry:
    """A candidate pair whose image has not been opened yet."""

    path: Path
    caption: str
    id: str
    record: dict | None = None


class _BadImage(Exception):
    """An image problem before it becomes a Problem or a SfumatoError."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def read_pairs(source: str | os.PathLike, *, strict: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS, verify_images: bool = True,
               progress: bool = False, image_column: str | None = None,
               caption_column: str | None = None) -> PairReport:
    """Read every image-caption pair under ``source``.

    Args:
        source: a caption folder, a folder with ``manifest.jsonl`` or Hugging Face ``metadata.jsonl``/
            ``metadata.csv`` files, or a ``.jsonl``/``.csv`` file (a ``PairSource`` may name the columns).
        strict: raise ``SfumatoError`` on the first problem instead of skipping it.
        max_pixels: reject images with more pixels than this, judged from the header alone.
            Pillow's own decompression-bomb guard stays on as well.
        verify_images: fully decode each image, which catches truncated files; otherwise only
            the header is read.
        progress: show a rich progress bar while images are checked.
        image_column, caption_column: the manifest's column names, when they are not among
            IMAGE_COLUMNS and CAPTION_COLUMNS.

    Returns:
        A ``PairReport`` with pairs in deterministic order and the problems met.

    Raises:
        UsageError: ``source`` does not exist or is not a folder or a .jsonl/.csv file; columns
            given for a caption folder.
        SfumatoError: under ``strict``, naming the path and the reason of the first problem.
    """
    root, manifests = _resolve_source(source)
    columns = _Columns.of(source, image_column, caption_column)
    report = PairReport(pairs=[], problems=[], source=Path(source))

    # Listing problems stay in file order among image problems, so strict stops at the first.
    if manifests:
        named: set[str] = set()
        items = [it for m in manifests for it in _list_manifest(m, root, columns, named)]
        if manifests[0].name in METADATA_FILES and Path(source).is_dir():
            items += _unlisted_images(root, named, manifests)
    elif columns.given:
        raise UsageError(f"{source}: --image-column and --caption-column name a manifest's columns, and "
                         f"{source} has none (no metadata.jsonl, metadata.csv or manifest.jsonl)")
    else:
        items = _list_folder(root)
    # Several manifest lines may caption one image: open it once, report it once.
    probed: dict[Path, tuple[int, int] | Problem] = {}
    for item in _maybe_track(items, f"Checking {source}", progress):
        if isinstance(item, _Entry):
            seen = item.path in probed
            if not seen:
                probed[item.path] = _probe_image(item.path, max_pixels, verify_images)
            size = probed[item.path]
            if not isinstance(size, Problem):
                report.pairs.append(Pair(item.path, item.caption, item.id, size, item.record))
                continue
            if seen:
                continue
            item = size
        if strict:
            raise SfumatoError(f"{item.path}: {item.reason}")
        report.problems.append(item)
    return report


def check_source(source: str | os.PathLike, **kw) -> PairReport:
    """``read_pairs`` with every image fully decoded; backs ``sfumato data check DIR``."""
    kw["verify_images"] = True
    return read_pairs(source, **kw)


def require_pairs(report: PairReport, source=None) -> PairReport:
    """The report, or a UsageError that says what was looked for when it holds no usable pair."""
    if report.pairs:
        return report
    source = report.source if source is None else source
    path = Path(source)
    n = len(report.problems)
    problems = f"; {n} problem{'s' if n != 1 else ''} (`sfumato data check` lists them)" if n else ""
    columns = _Columns.of(source, None, None)
    if path.is_dir() and not _folder_manifests(path):
        looked = (f"images ({', '.join(IMAGE_EXTS)}) each with a same-named .txt caption, a Hugging Face "
                  f"metadata.jsonl or metadata.csv ('file_name' and 'text' columns), or a manifest.jsonl")
    else:
        looked = f"manifest rows with {columns.describe()} naming an existing image"
    raise UsageError(f"no usable image-caption pairs in {source}: looked for {looked}{problems}")


def open_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and return an RGB image.

    Raises:
        SfumatoError: naming the path and why it could not be read (for an oversized image,
            its pixel count and the cap).
    """
    path = Path(path)
    try:
        with _opened(path, max_pixels) as im:
            im.load()
            return im.convert("RGB")
    except _BadImage as bad:
        raise SfumatoError(f"{path}: {bad.reason}") from None


def format_report(report: PairReport) -> list[str]:
    """Lines for the CLI: count, sizes, caption spread, each problem, then a skipped summary."""
    s = report.summary()
    lines = [f"{s['count']} pairs in {report.source}"]
    if s["sizes"]:
        common = s["sizes"].most_common()
        shown = ", ".join(f"{size} ({n})" for size, n in common[:5])
        more = f", and {len(common) - 5} more sizes" if len(common) > 5 else ""
        lines.append(f"image sizes: {shown}{more}")
    w = s["caption_words"]
    if w["min"] is not None:
        lines.append(f"caption words: min {w['min']}, median {w['median']:g}, "
                     f"mean {w['mean']:.1f}, max {w['max']}")
    lines += [f"{p.path}: {p.reason}" for p in report.problems]
    if report.problems:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(s["problem_kinds"].items()))
        total = s["count"] + s["problems"]
        lines.append(f"skipped {s['problems']} of {total} files: {kinds}")
    else:
        lines.append("no problems found")
    return lines


# --- sources ---------------------------------------------------------------------------------

def _resolve_source(source: str | os.PathLike) -> tuple[Path, list[Path]]:
    """Return (root that ids are relative to, manifest files; none for a caption folder)."""
    path = Path(source)
    if path.is_dir():
        return path, _folder_manifests(path)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTS:
        return path.parent, [path]
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    raise UsageError(f"{path}: not a folder or a .jsonl/.csv manifest")


def _folder_manifests(root: Path) -> list[Path]:
    """A folder's manifest.jsonl (ShapesWorld), else its Hugging Face metadata files, in sorted order."""
    if (root / "manifest.jsonl").is_file():
        return [root / "manifest.jsonl"]
    found = [p for p in _walk_files(root) if p.name in METADATA_FILES]
    for folder in {p.parent for p in found}:
        if all((folder / name).is_file() for name in METADATA_FILES):
            raise UsageError(f"{folder} holds both metadata.jsonl and metadata.csv; keep one")
    return found


def _unlisted_images(root: Path, named: set[str], manifests: list[Path]) -> list[Problem]:
    """Images under an imagefolder that no metadata row names."""
    names = " or ".join(sorted({m.name for m in manifests}))
    return [Problem(p, f"image without caption (no row of {names} names it)", IMAGE_WITHOUT_CAPTION)
            for p in _walk_files(root)
            if p.suffix.lower() in IMAGE_EXTS and os.path.normpath(p) not in named]


def _walk_files(root: Path) -> Iterator[Path]:
    """Yield files under root in sorted order, skipping hidden files and folders."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder, name)


def _list_folder(root: Path) -> list[_Entry | Problem]:
    """Pair each image with the .txt of the same name; report orphans on either side."""
    images: dict[Path, list[Path]] = defaultdict(list)
    captions: dict[Path, Path] = {}
    for path in _walk_files(root):
        ext = path.suffix.lower()
        if ext in IMAGE_EXTS:
            images[path.with_suffix("")].append(path)
        elif ext == ".txt":
            captions[path.with_suffix("")] = path
    items: list[_Entry | Problem] = []
    for stem in sorted(images.keys() | captions.keys(), key=lambda p: p.parts):
        txt, found = captions.get(stem), images.get(stem, [])
        if not found:
            reason = f"caption without image (no image named {stem.name})"
            items.append(Problem(txt, reason, CAPTION_WITHOUT_IMAGE))
        elif txt is None:
            reason = f"image without caption (no {stem.name}.txt)"
            items += [Problem(image, reason, IMAGE_WITHOUT_CAPTION) for image in found]
        else:
            caption = _read_caption_file(txt)
            items.append(caption if isinstance(caption, Problem)
                         else _Entry(found[0], caption, stem.relative_to(root).as_posix()))
            reason = f"duplicate image: {found[0].name} already uses {txt.name}"
            items += [Problem(extra, reason, DUPLICATE_IMAGE) for extra in found[1:]]
    return items


def _read_caption_file(path: Path) -> str | Problem:
    """Return the stripped caption, or the Problem that makes it unusable."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: drop a BOM some editors write
    except UnicodeDecodeError as exc:
        return Problem(path, f"caption is not UTF-8 (bad byte at offset {exc.start})",
                       NON_UTF8_CAPTION)
    except OSError as exc:
        return Problem(path, f"caption unreadable ({exc.strerror or exc})", UNREADABLE_CAPTION)
    if not text.strip():
        return Problem(path, "empty caption", EMPTY_CAPTION)
    return text.strip()


def _list_manifest(manifest: Path, root: Path, columns: _Columns, named: set[str]) -> list[_Entry | Problem]:
    """Read a .jsonl or .csv manifest into entries; image paths are relative to its folder, ids to root.
    Every image path a row names, usable or not, is added to `named`."""
    rows = _jsonl_rows(manifest) if manifest.suffix.lower() == ".jsonl" else _csv_rows(manifest, columns)
    out = []
    for lineno, row in rows:
        if isinstance(row, Problem):
            out.append(row)
            continue
        image = next((row[c] for c in columns.image if c in row), None)
        if isinstance(image, str) and image.strip():
            named.add(os.path.normpath(manifest.parent / image.strip()))
        out.append(_manifest_entry(manifest, lineno, row, root, columns))
    return out


def _jsonl_rows(manifest: Path) -> Iterator[tuple[int, dict | Problem]]:
    """Yield (line number, object or Problem) for each non-blank line."""
    for lineno, raw in enumerate(manifest.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            yield lineno, Problem(manifest, f"line {lineno}: not UTF-8", NON_UTF8_CAPTION)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = Problem(manifest, f"line {lineno}: not valid JSON ({exc.msg})", BAD_MANIFEST)
        if not isinstance(row, (dict, Problem)):
            row = Problem(manifest, f"line {lineno}: not a JSON object", BAD_MANIFEST)
        yield lineno, row


def _csv_rows(manifest: Path, columns: _Columns) -> Iterator[tuple[int, dict | Problem]]:
    """Yield (line number, row or Problem) for each data row of a CSV manifest with a header."""
    try:
        text = manifest.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        reason = f"manifest is not UTF-8 (bad byte at offset {exc.start})"
        yield 1, Problem(manifest, reason, NON_UTF8_CAPTION)
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if not set(columns.image) & set(header) or not set(columns.caption) & set(header):
        reason = f"line 1: header needs {columns.describe()}; it has {', '.join(header) or 'none'}"
        yield 1, Problem(manifest, reason, BAD_MANIFEST)
        return
    for row in reader:
        yield reader.line_num, row


def _manifest_entry(manifest: Path, lineno: int, row: dict, root: Path, columns: _Columns) -> _Entry | Problem:
    """Turn one manifest row into an entry, or the Problem saying what is missing."""
    image = next((row[c] for c in columns.image if c in row), None)
    caption = next((row[c] for c in columns.caption if c in row), None)
    where = f"line {lineno}"
    if not isinstance(image, str) or not image.strip():
        return Problem(manifest, f"{where}: lacks an image field ({_either(columns.image)})", BAD_MANIFEST)
    if not isinstance(caption, str):
        return Problem(manifest, f"{where}: lacks a caption text field ({_either(columns.caption)})", BAD_MANIFEST)
    if not caption.strip():
        return Problem(manifest, f"{where}: empty caption for {image}", EMPTY_CAPTION)
    # Paths may leave the manifest's folder on purpose (shared image stores), so no check here.
    path = manifest.parent / image.strip()
    item_id = Path(os.path.relpath(path.with_suffix(""), root)).as_posix()
    return _Entry(path, caption.strip(), item_id, dict(row))


# --- images ----------------------------------------------------------------------------------

def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """`open_image` for bytes in memory (an upload); errors name `name` instead of a path."""
    try:
        with _opened(io.BytesIO(data), max_pixels) as im:
            im.load()
            return im.convert("RGB")
    except _BadImage as bad:
        raise SfumatoError(f"{name}: {bad.reason}") from None


@contextmanager
def _opened(path, max_pixels: int) -> Iterator[Image.Image]:
    """Open an image (a path or a binary file) lazily, enforce the pixel cap from its header, and map
    errors to _BadImage."""
    if isinstance(path, Path) and path.suffix.lower() not in IMAGE_EXTS:
        raise _BadImage(UNSUPPORTED_IMAGE, f"unsupported image type '{path.suffix}' "
                        f"(expected {', '.join(IMAGE_EXTS)})")
    try:
        with Image.open(path, formats=_PIL_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise _BadImage(IMAGE_TOO_LARGE, f"image too large: {w}x{h} = {w * h:,} pixels, "
                                f"over the cap of {max_pixels:,} (max_pixels)")
            yield im
    except FileNotFoundError:
        raise _BadImage(MISSING_IMAGE, "image file not found") from None
    except Image.DecompressionBombError as exc:
        raise _BadImage(IMAGE_TOO_LARGE, f"image too large: {exc}") from None
    except UnidentifiedImageError:
        reason = "unreadable image: not a PNG, JPEG or WebP file"
        raise _BadImage(UNREADABLE_IMAGE, reason) from None
    except _DECODE_ERRORS as exc:
        reason = f"unreadable image: truncated or corrupt ({exc})"
        raise _BadImage(UNREADABLE_IMAGE, reason) from None


def _probe_image(path: Path, max_pixels: int, decode: bool) -> tuple[int, int] | Problem:
    """Return (w, h) of a usable image, or the Problem that makes it unusable."""
    try:
        with _opened(path, max_pixels) as im:
            if decode:
                im.load()
            return im.size
    except _BadImage as bad:
        return Problem(path, bad.reason, bad.kind)


def _maybe_track(items: list, description: str, show: bool):
    """Wrap items in a rich progress bar when asked; rich is imported only then."""
    if not show:
        return items
    from rich.progress import track

    return track(items, description=description, total=len(items))


# ---------------------------------------------------------------- images to index (captions optional)


@dataclass(frozen=True)
class ImageItem:
    """One image to index; caption None when the source has none for it."""

    path: Path
    caption: str | None = None


def list_images(sources: list[str | os.PathLike]) -> tuple[list[ImageItem], list[Problem]]:
    """Images of each source, in order: an image file, a folder (captions from .txt beside the
    images if present) or a .jsonl/.csv manifest. Problems of the listing are returned, not raised.
    """
    items: list[ImageItem] = []
    problems: list[Problem] = []
    for source in sources:
        path = Path(source)
        if path.is_file() and path.suffix.lower() in IMAGE_EXTS:
            txt = path.with_suffix(".txt")
            caption = _read_caption_file(txt) if txt.is_file() else None
            items.append(ImageItem(path, None if isinstance(caption, Problem) else caption))
            continue
        if path.is_file() and path.suffix.lower() not in MANIFEST_EXTS:
            problems.append(Problem(path, f"unsupported file type '{path.suffix}' (expected an image "
                                    f"{', '.join(IMAGE_EXTS)}, a folder or a .jsonl/.csv manifest)", "unsupported"))
            continue
        report = read_pairs(path, verify_images=False, max_pixels=DEFAULT_MAX_PIXELS)  # UsageError if missing
        found = [ImageItem(p.path, p.caption) for p in report.pairs]
        for pr in report.problems:
            if pr.kind in (IMAGE_WITHOUT_CAPTION, DUPLICATE_IMAGE):  # captions are optional here
                found.append(ImageItem(pr.path, None))
            elif pr.kind != CAPTION_WITHOUT_IMAGE:
                problems.append(pr)
        items += sorted(found, key=lambda it: it.path.parts) if not _is_manifest(path) else found
    return items, problems


def _is_manifest(path: Path) -> bool:
    return path.is_file() or bool(_folder_manifests(path))


def iter_batches(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of `items`, `size` long (the last may be shorter)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]
