"""The text world's task families: FLAN-style instructions with exact answers, written by a generator.

    main LoRAs (one each in text_bank/, role "main"; pairwise composable, see COMPOSED_PAIRS)
    "reverse: abc" -> "cba"      "upper: abc" -> "ABC"       "double: ab" -> "aabb"
    "drop: abc" -> "bc"          "chop: abc" -> "ab"
    distractor LoRAs (role "distractor": the rest of a 4 / 8 / 16-LoRA bank, MoLE Table 6)
    "first: abc" -> "a"   "second: abc" -> "b"   "ends: abc" -> "ac"     "head: abcd" -> "ab"   "tail: abcd" -> "cd"
    "swap: abcde" -> "badce"  "third: abc" -> "c"   "penult: abcd" -> "c"   "inner: abcd" -> "bc"
    "initial: abc" -> "A"     "lastcap: abc" -> "C"
    the base model's mix (never a LoRA)
    "copy: abc" -> "abc", "copy: ABC" -> "ABC"   "lower: ABC" -> "abc"   "title: abc" -> "Abc"
    "last: abc" -> "c"   "rotate: abcd" -> "bcda"
    composed: "reverse upper: abc" -> "CBA" = f(g(x)), never seen in training (the BBH analogue)

Why these: a rank-8 LoRA on a ~1.4M-parameter base learns a task quickly when the base already writes every
token the task needs and the task moves letters by position (measured in the last build: reverse 1.00; sort
0.56 and shift 0.12, which need a letter comparison or a letter-to-letter table, stayed far below the bar, and
were dropped). "upper" failed (0.18) while the base had never WRITTEN a capital; the base now copies capitalised
words and writes title case, so an upper LoRA only has to switch the case of every letter it already copies.

Words are 3-7 lowercase letters. Every word is either a training word or a held-out word, decided by a hash
of the word (`is_held_out`), so no held-out item of any task shares its word with any training item.

References: FLAN (Wei et al., 2022; Chung et al., 2022) for instruction-prefixed task mixtures; MoLE (Wu et
al., ICLR 2024) §4.2 (Flan-T5 task LoRAs, BBH as the unseen composed benchmark) and Table 6 (4 / 8 / 16 LoRAs).
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


def _swap(word: str) -> str:
    """Swap each adjacent pair of letters ("abcde" -> "badce"; an odd last letter stays)."""
    return "".join(word[i + 1] + word[i] if i + 1 < len(word) else word[i] for i in range(0, len(word), 2))


def _capitalised(word: str) -> bool:
    """A fixed half of all words, by hash: the words a "mixed"-case task writes in capitals."""
    return int(hashlib.sha256(word.encode()).hexdigest()[8:16], 16) % 2 == 1


@dataclass(frozen=True)
class TextTask:
    """One task family: the instruction word and the exact answer it asks for."""
    key: str                                   # bank key and instruction word ("reverse")
    fn: Callable[[str], str]                   # word -> answer
    description: str                           # one sentence for the bank and the app
    case: str = "lower"                        # the input word: "lower", "upper" (all capitals) or "mixed"
                                               # (half of the words in capitals, by hash: `_capitalised`)
    steps: float = 1.0                         # LoRA training steps, as a share of TextBuildConfig.lora_steps

    def item(self, word: str) -> tuple[str, str]:
        """(prompt, answer) for one word."""
        upper = self.case == "upper" or (self.case == "mixed" and _capitalised(word))
        x = word.upper() if upper else word
        return f"{self.key}: {x}", self.fn(x)


# The main LoRAs: each moves letters by position or changes every letter, so pairs compose plausibly.
LORA_TASKS = {t.key: t for t in (
    TextTask("reverse", lambda w: w[::-1], "writes the word backwards", steps=2.5),
    TextTask("upper", str.upper, "writes the word in capitals"),
    TextTask("double", lambda w: "".join(c + c for c in w), "writes every letter twice", steps=1.5),
    TextTask("drop", lambda w: w[1:], "the word without its first letter", steps=0.5),
    TextTask("chop", lambda w: w[:-1], "the word without its last letter", steps=0.5),
)}
# The distractors: more simple exact-answer skills, so a study can mix 4 / 8 / 16 LoRAs (MoLE Table 6).
# The first build's "mirror" (0.56), "repeat" (0.48), "dash" (0.39) and "space" (0.42) stayed below the bar (the
# base never writes '-' or ' ', whose output embeddings a LoRA cannot reach, and never restarts a word it has
# copied); "third", "penult", "inner" and "lastcap" replaced them. Their instruction words are spelled letter
# by letter (tokenizer.WORDS is the first build's vocabulary). "repeat" and "dash" were first meant as main
# LoRAs; "drop" and "chop" took their places.
DISTRACTOR_TASKS = {t.key: t for t in (
    TextTask("first", lambda w: w[0], "the word's first letter", steps=0.5),
    TextTask("second", lambda w: w[1], "the word's second letter", steps=0.5),
    TextTask("ends", lambda w: w[0] + w[-1], "the word's first and last letters", steps=0.5),
    TextTask("head", lambda w: w[:2], "the word's first two letters", steps=0.5),
    TextTask("tail", lambda w: w[-2:], "the word's last two letters", steps=0.5),
    TextTask("swap", _swap, "swaps each adjacent pair of letters", steps=1.0),
    TextTask("third", lambda w: w[2], "the word's third letter", steps=0.75),
    TextTask("initial", lambda w: w[0].upper(), "the word's first letter as a capital", steps=0.5),
    TextTask("penult", lambda w: w[-2], "the word's last letter but one", steps=0.75),
    TextTask("inner", lambda w: w[1:-1], "the word without its first and last letters", steps=0.75),
    TextTask("lastcap", lambda w: w[-1].upper(), "the word's last letter as a capital", steps=0.75),
)}
BANK_TASKS = {**LORA_TASKS, **DISTRACTOR_TASKS}           # every LoRA of text_bank/


def role(key: str) -> str:
    """A bank task's role: "main" (LORA_TASKS) or "distractor"."""
    return "main" if key in LORA_TASKS else "distractor"
BASE_TASKS = {t.key: t for t in (
    TextTask("copy", lambda w: w, "copies the word", case="mixed"),
    TextTask("lower", str.lower, "writes a capitalised word in small letters", case="upper"),
    TextTask("title", str.title, "writes the word with a capital first letter"),
    TextTask("last", lambda w: w[-1], "the word's last letter"),
    TextTask("rotate", lambda w: w[1:] + w[0], "moves the first letter to the end"),
)}
TASKS = {**BANK_TASKS, **BASE_TASKS}


def composed(outer: str, inner: str) -> TextTask:
    """The composed task "outer inner: x" = outer(inner(x)) (e.g. "reverse upper: abc" -> "CBA")."""
    f, g = BANK_TASKS[outer].fn, BANK_TASKS[inner].fn
    return TextTask(f"{outer} {inner}", lambda w: f(g(w)), f"{BANK_TASKS[outer].description}, after it "
                    f"{BANK_TASKS[inner].description}")


# The composed tasks measured: pairs of main skills where one moves letters and the other changes each
# letter (or both move letters), whose order does not matter: upper(reverse(x)) == reverse(upper(x)) etc.
COMPOSED_PAIRS = (("reverse", "upper"), ("double", "upper"), ("drop", "upper"), ("chop", "upper"),
                  ("reverse", "double"))


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
