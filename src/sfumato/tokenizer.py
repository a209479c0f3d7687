"""A byte-level BPE tokenizer trained on the captions, saved in CLIP's format.

The normaliser and pre-tokeniser are CLIP's (the ones transformers' CLIPTokenizer builds), so the
saved vocab.json + merges.txt load with `CLIPTokenizer.from_pretrained(folder)` and tokenize
exactly as they did during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_tokenizer(captions: Iterable[str], vocab_size: int, context_length: int, out: Path):
    """Train BPE on captions, write CLIP-format files to `out`, return the loaded CLIPTokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(captions, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))
    # Every byte as a word end too, so no text maps to the unknown token.
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    for ch in sorted(alphabet):
        vocab.setdefault(ch + "</w>", len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": BOS,
        "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, "do_lower_case": True}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=1))
    return load_tokenizer(out)


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def encode(tokenizer, captions: list[str]):
    """Token ids (B, context) padded with the end token; also the number of captions cut short."""
    import torch

    n = tokenizer.model_max_length
    full = tokenizer(captions, padding=False, truncation=False, verbose=False).input_ids
    cut = sum(len(ids) > n for ids in full)
    ids = tokenizer(captions, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    return ids.to(torch.long), cut
