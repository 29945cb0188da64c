"""The composed-task measurement (the BBH analogue): held-out items of "outer inner: x" = outer(inner(x)),
a skill pair no training item ever showed, answered by every way of combining the two LoRAs.

    python -m mole_core.world.text composed [--pairs reverse+upper,...] [--items 50] [--out FILE]

Per pair: the base alone, each LoRA alone, the linear and SVD merges, untrained MoLE (== linear), and MoLE with
per-sample and per-token gates trained (mole_core.train.TokenTask, TextEngine.train) on (a) 5 training-word
items of the composed task, (b) the two LoRAs' own manifest examples. Exact match with 95% Wilson intervals.

References: MoLE (Wu et al., ICLR 2024) §4.2 and Table 3 (Flan-T5 LoRAs on BBH).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from mole_core.attach import MoleConfig
from mole_core.mix import Mix
from mole_core.world.text.config import log
from mole_core.world.text.tasks import COMPOSED_PAIRS, composed, sample_items, wilson
from mole_core.train import TrainConfig

GATE_TRAIN = TrainConfig(steps=100, lr=5e-3, batch_size=4, seed=0)   # gate training of the measurement


def _score(texts: list[str], items: list[tuple[str, str]]) -> dict:
    k = sum(t == a for t, (_, a) in zip(texts, items))
    lo, hi = wilson(k, len(items))
    return {"exact_match": k / len(items), "correct": k, "items": len(items), "ci95": [round(lo, 3), round(hi, 3)],
            "sample": [{"input": p, "output": t, "expected": a} for (p, a), t in list(zip(items, texts))[:2]]}


def measure_pair(engine, outer: str, inner: str, n: int = 50, seed: int = 0,
                 train: TrainConfig = GATE_TRAIN) -> dict:
    """Every method on n held-out items of the composed task outer∘inner."""
    task = composed(outer, inner)
    rng = np.random.default_rng([seed, 13])
    items = sample_items(task, rng, n, held_out=True)
    shots = sample_items(task, rng, 5, held_out=False)          # the 5 composed training examples
    own = None                                                   # the manifests' examples (engine default)
    prompts, keys = [p for p, _ in items], (outer, inner)
    rows = {}

    def run(label, mix):
        start = time.perf_counter()
        texts, _, _ = engine.answer(mix, prompts)
        rows[label] = {**_score(texts, items), "seconds": round(time.perf_counter() - start, 2)}
        log(f"{outer} {inner}: {label:34s} EM {rows[label]['exact_match']:.2f} {rows[label]['ci95']}")

    run("base", Mix("base"))
    run(f"single:{outer}", Mix(f"single:{outer}"))
    run(f"single:{inner}", Mix(f"single:{inner}"))
    run("linear", Mix("linear", keys))
    run("svd (rank 8)", Mix("svd", keys, rank=8))
    run("mole untrained", Mix("mole", keys))
    for gate in ("sample", "token"):
        for data, pairs in (("5 composed examples", shots), ("the two tasks' own examples", own)):
            start = time.perf_counter()
            mixture = engine.train(keys, MoleConfig(gate=gate), train, pairs=pairs)
            seconds = time.perf_counter() - start
            run(f"mole per-{gate}, gates on {data}", Mix("mole", keys, mixture=mixture))
            rows[f"mole per-{gate}, gates on {data}"].update(
                train_seconds=round(seconds, 1), mean_gates=[round(g, 3) for g in mixture.meta.get("mean_gates", [])])
    engine.release()
    return {"task": task.key, "items": n, "shots": [{"input": p, "output": a} for p, a in shots], "methods": rows}


def measure(engine, pairs=COMPOSED_PAIRS, n: int = 50, out: Path | None = None) -> dict:
    torch.manual_seed(0)
    report = {"train": {"steps": GATE_TRAIN.steps, "lr": GATE_TRAIN.lr, "batch_size": GATE_TRAIN.batch_size},
              "pairs": {}}
    for outer, inner in pairs:
        report["pairs"][f"{outer} {inner}"] = measure_pair(engine, outer, inner, n)
        if out is not None:
            Path(out).write_text(json.dumps(report, indent=2))
    return report
