"""The text world's task families: FLAN-style instructions with exact answers, written by a generator.

    "reverse: abc" -> "cba"      "sort: dbca" -> "abcd"      "upper: abc" -> "ABC"
    "double: ab" -> "aabb"       "shift: abz" -> "bca"       (each one LoRA of the text bank)
    "copy: abc" -> "abc"         "lower: ABC" -> "abc"       "last: abc" -> "c"      "rotate: abcd" -> "bcda"
                                                             (the base model's mix: format, copying, case,
                                                              the ends of a string, moving characters)
    "reverse upper: abc" -> "CBA"   composed: "f g: x" = f(g(x)), never seen in training (the BBH analogue)

Words are 3-7 lowercase letters. Every word is either a training word or a held-out word, decided by a hash
of the word (`is_held_out`), so no held-out item of any task shares its word with any training item.

References: FLAN (Wei et al., 2022; Chung et al., 2022) for instruction-prefixed task mixtures; MoLE (Wu et
al., ICLR 2024) §4.2 (Flan-T5 task LoRAs, BBH as the unseen composed benchmark).
"""
from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from typing import Callable

import numpy as np

LETTERS = string.ascii_lowercase
MIN_LEN, MAX_LEN = 3, 7          # word lengths (a doubled word is at most 14 characters)
HELD_OUT_PERCENT = 10            # share of all words reserved for evaluation


def _shift(word: str) -> str:
    """Every letter to the next one, z -> a (capitals stay capitals)."""
    return "".join(chr((ord(c) - base + 1) % 26 + base) for c in word
                   for base in [65 if c.isupper() else 97])


@dataclass(frozen=True)
class TextTask:
    """One task family: the instruction word and the exact answer it asks for."""
    key: str                                   # bank key and instruction word ("reverse")
    fn: Callable[[str], str]                   # word -> answer
    description: str                           # one sentence for the bank and the app
    upper_input: bool = False                  # the input word is written in capitals ("lower: ABC")

    def item(self, word: str) -> tuple[str, str]:
        """(prompt, answer) for one word."""
        x = word.upper() if self.upper_input else word
        return f"{self.key}: {x}", self.fn(x)


LORA_TASKS = {t.key: t for t in (
    TextTask("reverse", lambda w: w[::-1], "writes the word backwards"),
    TextTask("sort", lambda w: "".join(sorted(w)), "writes the word's letters in alphabetical order"),
    TextTask("upper", str.upper, "writes the word in capitals"),
    TextTask("double", lambda w: "".join(c + c for c in w), "writes every letter twice"),
    TextTask("shift", _shift, "replaces every letter by the next one in the alphabet (z becomes a)"),
)}
BASE_TASKS = {t.key: t for t in (
    TextTask("copy", lambda w: w, "copies the word"),
    TextTask("lower", str.lower, "writes a capitalised word in small letters", upper_input=True),
    TextTask("last", lambda w: w[-1], "the word's last letter"),
    TextTask("rotate", lambda w: w[1:] + w[0], "moves the first letter to the end"),
)}
TASKS = {**LORA_TASKS, **BASE_TASKS}


def composed(outer: str, inner: str) -> TextTask:
    """The composed task "outer inner: x" = outer(inner(x)) (e.g. "reverse upper: abc" -> "CBA")."""
    f, g = LORA_TASKS[outer].fn, LORA_TASKS[inner].fn
    return TextTask(f"{outer} {inner}", lambda w: f(g(w)), f"{LORA_TASKS[outer].description}, after it "
                    f"{LORA_TASKS[inner].description}")


# The composed tasks measured (pairs of LoRA skills whose order does not matter, so either LoRA's
# instruction word may come first in the answer's sense: upper(reverse(x)) == reverse(upper(x)) etc.).
COMPOSED_PAIRS = (("reverse", "upper"), ("double", "upper"), ("reverse", "double"), ("shift", "reverse"),
                  ("sort", "upper"))


def is_held_out(word: str) -> bool:
    """Held-out words: a fixed 10% of all words, by hash (the same on every machine and run)."""
    return int(hashlib.sha256(word.lower().encode()).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def sample_word(rng: np.random.Generator, held_out: bool = False) -> str:
    """A random word of MIN_LEN..MAX_LEN letters from the training (or the held-out) words."""
    while True:
        n = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        word = "".join(LETTERS[i] for i in rng.integers(0, 26, n))
        if is_held_out(word) == held_out:
            return word


def sample_items(task: TextTask, rng: np.random.Generator, n: int, held_out: bool = False,
                 unique: bool = True) -> list[tuple[str, str]]:
    """n (prompt, answer) items of `task` (distinct words when `unique`)."""
    items, seen = [], set()
    while len(items) < n:
        word = sample_word(rng, held_out)
        if unique and word in seen:
            continue
        seen.add(word)
        items.append(task.item(word))
    return items


def exact_match(predictions: list[str], answers: list[str]) -> float:
    return float(np.mean([p == a for p, a in zip(predictions, answers)])) if answers else 0.0


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
