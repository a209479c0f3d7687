"""Explain what the model did: per-word attention maps of a generation, grounding of phrases on a
given image, a word-by-word adherence audit, and the nearest training images.

    maps = word_maps(pipe, GenerationSettings("a red circle above a blue square", seed=1))  # + per-word maps
    g = ground(pipe, Image.open("x.png"), ["red circle", "blue square"])  # where each phrase is
    rows = audit(Image.open("x.png"), "three red squares", pipe=pipe)     # what the image got right
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .attention import capture_cross_attention, normalise
from .config import GenerationSettings
from .errors import UsageError
from .images import npz_bytes, png_bytes
from .sampling import encode_images
from .viz import make_grid

# Words that name nothing in an image; their tokens are left out of a phrase's map.
STOPWORDS = frozenset(
    "a an the of on in at to and or with is are be this that these those its it some one image picture "
    "photo view there here".split())
# Noise levels (of 1000 training timesteps) at which a given image is probed. Low noise keeps the
# image readable to the UNet; on held-out ShapesWorld (benchmarks/bench_explain.py) 100-300 pointed
# best, 500-900 close to chance.
GROUNDING_TIMESTEPS = (100, 200, 300)


# ---------------------------------------------------------------- rendering


def heat_colours(m: np.ndarray) -> np.ndarray:
    """[0, 1] map (H, W) -> RGB uint8, a dark-blue -> red -> yellow ramp (written by hand: no
    plotting library is a dependency)."""
    stops = np.array([[0, 0, 60], [40, 0, 160], [200, 30, 60], [250, 150, 0], [255, 255, 160]], np.float32)
    x = np.clip(m, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def overlay(image: Image.Image, m: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The image with a heat map (any size; resized to the image) blended over it."""
    img = image.convert("RGB")
    if m.shape != (img.height, img.width):
        m = np.asarray(Image.fromarray(m.astype(np.float32)).resize(img.size, Image.BILINEAR))
    heat = heat_colours(m).astype(np.float32)
    out = np.asarray(img, np.float32) * (1 - alpha) + heat * alpha
    return Image.fromarray(out.round().astype(np.uint8))


def overlay_grid(image: Image.Image, maps: list[np.ndarray], names: list[str], cell: int = 128) -> Image.Image:
    """The image, then one overlay panel per map, each named."""
    panels = [image.convert("RGB")] + [overlay(image, m) for m in maps]
    return make_grid(panels, ["image"] + list(names), cols=len(panels), cell=cell)


# ---------------------------------------------------------------- per-word maps of a generation


@dataclass
class WordMaps:
    image: Image.Image
    words: list[str]
    maps: np.ndarray  # (words, H, W) in [0, 1]

    def grid(self) -> Image.Image:
        return overlay_grid(self.image, list(self.maps), self.words)

    def save(self, png, npz) -> None:
        """The overlay grid and the arrays (words, maps), each written whole or not at all."""
        from .files import atomic_write_bytes

        atomic_write_bytes(png, png_bytes(self.grid()))
        atomic_write_bytes(npz, npz_bytes(words=np.array(self.words), maps=self.maps.astype(np.float32)))


def token_maps_to_words(tokenizer, text: str, maps: torch.Tensor, content_only: bool = False):
    """(T, H, W) token maps -> [(word, (H, W) map)], each word's tokens summed; start/end tokens
    never enter. With content_only, stop words are dropped. The text is read as the pipeline encodes
    it: weights and brackets are not words, and a long prompt's words are found in every chunk."""
    from .prompts import tokenize

    out = []
    for word, span in tokenize(tokenizer, text).words:
        span = [p for p in span if p < maps.shape[0]]
        if not span:
            continue
        key = re.sub(r"[^\w]", "", word.lower())
        if not key or (content_only and key in STOPWORDS):
            continue
        out.append((word, maps[span].sum(0)))
    return out


def word_maps_from_tokens(tokenizer, prompt: str, image: Image.Image, token_maps: torch.Tensor) -> WordMaps:
    """WordMaps of one image from its (T, H, W) token maps."""
    pairs = token_maps_to_words(tokenizer, prompt, token_maps)
    if not pairs:
        raise UsageError(f"no word of {prompt!r} reached the text encoder")
    return WordMaps(image, [p[0] for p in pairs], normalise(torch.stack([p[1] for p in pairs])).numpy())


def generation_capture(pipe, size=0, guidance: float = GenerationSettings.guidance):
    """A context that records the cross-attention of pipe.generate at the output size."""
    size = size or pipe.native
    w, h = (size, size) if isinstance(size, int) else size
    return capture_cross_attention(pipe.unet, h, w, cfg=guidance != 1.0)


def word_maps(pipe, settings: GenerationSettings) -> WordMaps:
    """Generate one image and the cross-attention map of every word of its prompt."""
    images, maps = pipe.generate(settings, n=1, capture=True)
    return word_maps_from_tokens(pipe.tokenizer, settings.prompt, images[0], maps[0])


# ---------------------------------------------------------------- grounding on a given image


@dataclass
class Grounding:
    image: Image.Image
    phrases: list[str]
    maps: np.ndarray  # (phrases, H, W) at the image's own size, each in [0, 1]
    probabilities: np.ndarray | None = None  # zero-shot over the phrases, when the model has a CLIP
    neighbours: list = field(default_factory=list)

    def peaks(self) -> list[tuple[int, int]]:
        """(x, y) of each map's maximum."""
        return [tuple(int(v) for v in np.unravel_index(m.argmax(), m.shape)[::-1]) for m in self.maps]

    def grid(self) -> Image.Image:
        return overlay_grid(self.image, list(self.maps), self.phrases)

    def save(self, folder) -> None:
        from pathlib import Path

        from .files import publish_dir

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        # One H x W array per phrase, in the order given ("00", "01", ...), and the phrases.
        (tmp / "heatmaps.npz").write_bytes(npz_bytes(
            phrases=np.array(self.phrases), **{f"{i:02d}": m.astype(np.float32) for i, m in enumerate(self.maps)}))
        (tmp / "overlay.png").write_bytes(png_bytes(self.grid()))
        publish_dir(tmp, folder)


def check_phrase(tokenizer, phrase: str) -> None:
    """A phrase must name something and fit the context."""
    words = [re.sub(r"[^\w]", "", w.lower()) for w in phrase.split()]
    if not any(w and w not in STOPWORDS for w in words):
        raise UsageError(f"phrase {phrase!r} has no content word (only {', '.join(repr(w) for w in words) or 'nothing'})")
    n = len(tokenizer(_as_caption(phrase)).input_ids)  # what ground() encodes
    if n > tokenizer.model_max_length:
        raise UsageError(f"phrase {phrase!r} is {n} tokens long; the model's context holds "
                         f"{tokenizer.model_max_length} (start and end tokens included)")


@torch.no_grad()
def phrase_word_maps(pipe, rgb: Image.Image, phrases: list[str], seed: int = 0,
                     timesteps: tuple[int, ...] = GROUNDING_TIMESTEPS) -> list[list[tuple[str, torch.Tensor]]]:
    """Each phrase's content words with their cross-attention maps (native size) on `rgb`: the image
    encoded with the VAE, noised to a few timesteps, the UNet run on the phrase, read at its finest
    cross-attention layers (see attention.py) and summed over the timesteps."""
    side = pipe.native
    pixels = torch.from_numpy(np.array(rgb.resize((side, side), Image.BICUBIC))).permute(2, 0, 1)[None]
    z0 = encode_images(pipe.vae, pixels)
    sched = _train_scheduler(pipe)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=g).to(pipe.device)
    ts = torch.tensor(timesteps, dtype=torch.long)
    noisy = torch.cat([sched.add_noise(z0, noise, t[None]) for t in ts])
    out = []
    for phrase in phrases:
        caption = _as_caption(phrase)
        text, _ = pipe.encode([caption])
        with capture_cross_attention(pipe.unet, side, side, finest=True) as store:
            pipe.unet(noisy, ts.to(pipe.device), encoder_hidden_states=text.expand(len(ts), -1, -1))
        out.append(token_maps_to_words(pipe.tokenizer, caption, store.maps().sum(0), content_only=True))
    return out


def ground(pipe, image: Image.Image, phrases: list[str], seed: int = 0,
           timesteps: tuple[int, ...] = GROUNDING_TIMESTEPS) -> Grounding:
    """Where is each phrase in `image`? The cross-attention to the phrase's content words
    (phrase_word_maps), summed, as a map per phrase at the image's size."""
    if not phrases:
        raise UsageError("give at least one phrase (--text)")
    for p in phrases:
        check_phrase(pipe.tokenizer, p)
    rgb = image.convert("RGB")
    maps = []
    for words in phrase_word_maps(pipe, rgb, phrases, seed, timesteps):
        # Words weigh by the attention they draw. With a text tower trained along the UNet, the shape
        # word (which in a causal tower has read the colour before it) points 0.68 and the colour word
        # 0.27; scaling each word's map alike let the colour word's noise win (0.57 pointing on
        # held-out scenes, 0.68 summed; benchmarks/grounding_readings.py).
        maps.append(torch.stack([m for _, m in words]).sum(0))
    # The UNet saw a square; stretch the maps back onto the image as it was given.
    maps = F.interpolate(torch.stack(maps)[None], size=(rgb.height, rgb.width), mode="bilinear",
                         align_corners=False)[0]
    return Grounding(rgb, list(phrases), normalise(maps).numpy())


def _as_caption(phrase: str) -> str:
    """Captions start with an article; a bare phrase ("red circle") is read as one would write it."""
    return phrase if phrase.split()[0].lower() in STOPWORDS else f"a {phrase}"


def _train_scheduler(pipe):
    """The model's noise schedule as a DDPM scheduler (add_noise at integer timesteps)."""
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in pipe.scheduler_config.items() if k in DDPMScheduler.__init__.__code__.co_varnames}
    return DDPMScheduler.from_config(cfg)


def zero_shot(embedder, image: Image.Image, phrases: list[str]) -> np.ndarray:
    from .search import classify

    if len(phrases) < 2:  # a softmax over one label says nothing; compare with the empty prompt
        return classify(embedder, [image], list(phrases) + ["nothing"])[0][:1]
    return classify(embedder, [image], phrases)[0]


# ---------------------------------------------------------------- adherence audit


@dataclass
class AuditRow:
    words: str  # the words of the prompt this row is about
    ok: bool | None  # None: could not be judged
    reason: str
    source: str  # checker | zero-shot | attention

    def to_dict(self) -> dict:
        return {"words": self.words, "ok": self.ok, "reason": self.reason, "source": self.source}


def _object_words(o) -> str:
    if o.shape == "digit":
        return " ".join(w for w in (o.color, "digit", str(o.digit)) if w)
    return " ".join(w for w in (o.size, o.color, o.shape) if w)


def checker_rows(image: Image.Image, prompt: str) -> list[AuditRow] | None:
    """Word-level verdicts from the ShapesWorld checker; None when the prompt is not of its grammar."""
    from collections import Counter

    from .shapesworld import spec
    from .shapesworld.checker import check, parse_image, parse_prompt

    try:
        want = parse_prompt(prompt)
    except ValueError:
        return None
    scene = parse_image(image)
    verdict = check(scene, want)
    rows = []
    if want.background:
        rows.append(AuditRow(f"on a {want.background} background", scene.background == want.background,
                             f"background is {scene.background}", "checker"))
    found = scene.objects
    for spec_obj, n in Counter(want.objects).items():
        words = _object_words(spec_obj)
        if n > 1:
            noun = spec.PLURALS.get(spec_obj.shape)
            words = f"{spec.NUMBER_WORDS[n]} {words[:-len(spec_obj.shape)] + noun if noun else words}"
        same_shape = [o for o in found if o.shape == spec_obj.shape
                      and (spec_obj.digit is None or o.digit == spec_obj.digit)]
        match = [o for o in same_shape if (spec_obj.color is None or o.color == spec_obj.color)
                 and (spec_obj.size is None or o.size == spec_obj.size)]
        if len(match) == n:
            reason = f"found {n}"
        elif same_shape and not match:
            seen = ", ".join(sorted({_object_words(o) for o in same_shape}))
            reason = f"found {len(same_shape)} {spec_obj.shape}{'s' if len(same_shape) != 1 else ''} but {seen}"
        else:
            reason = f"found {len(match)}" + (f" (and {len(found) - len(match)} other object"
                                                f"{'s' if len(found) - len(match) != 1 else ''})" if len(found) > len(match) else "")
        rows.append(AuditRow(words, len(match) == n, reason, "checker"))
    if want.relation:
        held = verdict.passed or "'" + want.relation_phrase + "'" not in verdict.reason
        rows.append(AuditRow(want.relation_phrase, held if len(found) == len(want.objects) else None,
                             "as named" if held else verdict.reason.split(": ", 1)[-1], "checker"))
    extra = len(found) - len(want.objects)
    if extra > 0:
        rows.append(AuditRow("(nothing else)", False, f"{extra} object{'s' if extra > 1 else ''} more than asked",
                             "checker"))
    rows.append(AuditRow("(whole prompt)", verdict.passed, verdict.reason, "checker"))
    return rows


def noun_phrases(prompt: str) -> list[str]:
    """Noun phrases of a prompt, split at relation words and 'and' (a rule, not a parser)."""
    from .shapesworld import spec

    t = " ".join(prompt.lower().split())
    t = re.sub(r"\bon an? (black|white|gray|grey) background\b", "", t)
    seps = sorted({*spec.WORD_RELATION} | {"and", "next to", "with"}, key=len, reverse=True)
    parts = re.split(r"\b(?:" + "|".join(re.escape(s) for s in seps) + r")\b", t)
    return [" ".join(p.split()) for p in parts if any(w not in STOPWORDS for w in p.split())]


def word_swaps(prompt: str) -> list[tuple[str, list[str], int]]:
    """For each colour, shape, number, size, digit and relation word of a prompt: (the words, the
    prompt with each alternative in their place, index of the original). The alternatives are the
    hard negatives CLIP was trained against, so a swap the model prefers is a word it missed."""
    from .shapesworld import spec

    t = " ".join(prompt.split())
    low = t.lower()
    out = []
    rel = next((w for w in sorted(spec.WORD_RELATION, key=len, reverse=True) if f" {w} " in f" {low} "), None)
    if rel is not None:
        alts = [ws[0] if spec.WORD_RELATION[rel] != r else rel for r, ws in spec.RELATION_WORDS.items()]
        i = low.index(f" {rel} ") + 1
        out.append((rel, [t[:i] + a + t[i + len(rel):] for a in alts], alts.index(rel)))
    words = t.split()
    groups = [list(spec.COLORS), list(spec.SHAPES), list(spec.PLURALS.values()), list(spec.NUMBERS),
              [str(d) for d in range(10)], ["small", "large"]]
    for j, w in enumerate(words):
        key = w.lower().strip(".,")
        key = spec.SIZE_WORDS["small"][0] if key in spec.SIZE_WORDS["small"] else (
            "large" if key in spec.SIZE_WORDS["large"] else key)
        vocab = next((g for g in groups if key in g), None)
        if vocab is None:
            continue
        k = vocab.index(key)
        # The original word stays in its own slot (a synonym such as "tiny" is not rewritten).
        alts = [" ".join(words[:j] + [w if i == k else v] + words[j + 1:]) for i, v in enumerate(vocab)]
        out.append((w, alts, k))
    return out


def zero_shot_rows(embedder, image: Image.Image, prompt: str) -> list[AuditRow]:
    """Word by word: does the model prefer the prompt to every version with that word swapped?"""
    rows = []
    for word, alts, k in word_swaps(prompt):
        probs = zero_shot(embedder, image, alts)
        top = int(probs.argmax())
        ok = top == k
        swapped = _swapped_word(alts[k], alts[top])
        rows.append(AuditRow(word, ok, f"p={probs[k]:.2f}" + ("" if ok else f"; the model prefers "
                                                              f"'{swapped}' (p={probs[top]:.2f})"), "zero-shot"))
    return rows


def _swapped_word(a: str, b: str) -> str:
    """The words of b that differ from a."""
    aw, bw = a.split(), b.split()
    i = next((i for i, (x, y) in enumerate(zip(aw, bw)) if x != y), 0)
    j = next((j for j, (x, y) in enumerate(zip(aw[::-1], bw[::-1])) if x != y), 0)
    return " ".join(bw[i:len(bw) - j])


def attention_rows(pipe, image: Image.Image, prompt: str) -> list[AuditRow]:
    """For a relation prompt, compare where the two phrases' attention peaks lie."""
    from .shapesworld import spec

    rel = next((w for w in sorted(spec.WORD_RELATION, key=len, reverse=True) if f" {w} " in f" {prompt.lower()} "), None)
    phrases = noun_phrases(prompt)
    if rel is None or len(phrases) != 2:
        return []
    g = ground(pipe, image, phrases)
    (ax, ay), (bx, by) = g.peaks()
    side = spec.WORD_RELATION[rel]
    dx, dy = bx - ax, by - ay
    ok = {"left": dx > 0, "right": dx < 0, "above": dy > 0, "below": dy < 0}[side]
    return [AuditRow(rel, ok, f"'{phrases[0]}' peaks at ({ax}, {ay}), '{phrases[1]}' at ({bx}, {by})", "attention")]


def audit(image: Image.Image, prompt: str, pipe=None, embedder=None) -> list[AuditRow]:
    """Word-by-word verdicts from every judge available: the checker (ShapesWorld prompts), zero-shot
    checks of each noun phrase (needs `embedder`) and attention peaks (needs `pipe`)."""
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    rows = checker_rows(image, prompt) or []
    if embedder is not None:
        rows += zero_shot_rows(embedder, image, prompt)
    if pipe is not None:
        rows += attention_rows(pipe, image, prompt)
    if not rows:
        rows.append(AuditRow(prompt, None, "no judge applies: " + "; ".join(_why_no_judge(prompt, pipe, embedder)),
                             "none"))
    return rows


def _why_no_judge(prompt: str, pipe, embedder) -> list[str]:
    """Why each judge had nothing to say about this prompt."""
    why = ["not a ShapesWorld prompt, the only kind the scene checker reads"]
    if embedder is None:
        why.append("no CLIP model (clip/) for zero-shot checks")
    else:
        why.append("no colour, shape, number, size, digit or relation word for CLIP to swap")
    if pipe is not None:
        why.append("no relation between two things for the attention check")
    return why


# ---------------------------------------------------------------- nearest training images


def neighbours(index, embedder, image: Image.Image, k: int = 5):
    """The k nearest indexed images and a novelty score, 1 - the highest cosine similarity."""
    from .index import open_index
    from .search import check_k, check_model, search

    check_k(k)
    snap = open_index(index)
    check_model(snap.manifest, embedder, snap.path)
    hits = search(snap, embedder.embed_images([image])[0], k)
    novelty = 1.0 - max((h.score for h in hits), default=0.0)
    return hits, novelty
