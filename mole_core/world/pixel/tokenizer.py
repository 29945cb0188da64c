"""A CLIP BPE tokenizer built for the pixel world: every world word and trigger is exactly one token.

The vocabulary holds the 26 letters (alone and word-final, so any other word still tokenizes, letter by
letter) plus one merge chain per world word. Merge chains of different words can intercept each other
(the pair "r e" of "red" fires inside "green" before "g r" does), so after writing the chains we tokenize
every word and append merges for whatever pieces came out until each word is one token.

References: CLIP's byte-level BPE (openai/CLIP `simple_tokenizer.py`); tests/tiny.py `build_tokenizer`.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

from mole_core.atomic import write_text
from mole_core.world.pixel.render import WORDS

MODEL_MAX_LENGTH = 28   # BOS + the longest caption (3 objects + style = 24 words) + EOS, with room


def build_tokenizer(folder: str | Path, words=WORDS, model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Write vocab.json + merges.txt into `folder` and return the CLIPTokenizer reading them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(token):
        vocab.setdefault(token, len(vocab))

    def add_merge(left, right):
        pair = f"{left} {right}"
        if pair not in merges:
            merges.append(pair)
        add(left + right)

    for ch in string.ascii_lowercase:
        add(ch)
        add(ch + "</w>")
    for special in ("<|startoftext|>", "<|endoftext|>"):
        add(special)
    for word in words:   # ((c1 c2) c3) ... c_n</w>
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            add_merge(current, part)
            current += part

    def load():
        write_text(folder / "vocab.json", json.dumps(vocab))
        write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                             model_max_length=model_max_length)

    for _ in range(10):   # repair intercepted chains; converges in one or two rounds
        tokenizer = load()
        broken = {w: tokenizer.tokenize(w) for w in words if len(tokenizer.tokenize(w)) != 1}
        if not broken:
            return tokenizer
        for pieces in broken.values():
            current = pieces[0]
            for piece in pieces[1:]:
                add_merge(current, piece)
                current += piece
    raise ValueError(f"world tokenizer in {folder}: words still split into several tokens: {broken}")
