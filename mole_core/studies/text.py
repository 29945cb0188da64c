"""The text study: the paper's NLP tables (MoLE §4.2, Tables 3 and 6) on the text world, every method on the
same held-out items, exact match with 95% Wilson intervals, cost per method.

    Part A  multi-task: the pool's LoRAs, gates trained on a few examples of each task (the manifests'),
            exact match per task and the mean.
    Part B  composed tasks (the BBH analogue): "outer inner: x" = outer(inner(x)), never trained; gates and
            LoraHub weights fitted on 5 examples of the composed task; exact match on held-out items.
    Part C  more LoRAs: Part A (the main tasks asked) with distractor LoRAs in the pool (8, 16); Part C' is Part B
            with pools of 4 / 8 / 16 LoRAs (the pair's two + distractors).

Methods (`method_rows`): the base, each LoRA alone (Part A), the linear merge (NLA: weights normalised to sum
1), PEMs (Zhang et al. 2023, task arithmetic: the LoRAs added, weight 1 each), SVD, TIES and DARE of the sum,
LoraHub (Huang et al. 2023: one weight per LoRA found gradient-free with nevergrad on the few examples, loss
+ 0.05·Σ|w|, weights in [-1.5, 1.5], as its paper), and MoLE (per sample and per token, each granularity).

References: MoLE (Wu, Huang, Wei, ICLR 2024) §4.2; LoraHub (Huang et al., 2023, `lorahub/algorithm.py`:
NGOpt, budget, L1 term); PEMs (Zhang et al., 2023); docs/PEERS.md.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mole_core.atomic import write_text
from mole_core.attach import MoleConfig
from mole_core.bank import usable_entry
from mole_core.merge import merge_loras, merged_weights
from mole_core.mix import Mix
from mole_core.world.text.tasks import TASKS, composed, sample_items, wilson
from mole_core.train import TrainConfig
from mole_core.text.task import TokenTask


@dataclass
class TextStudyConfig:
    """What one text study measures."""
    items: int = 50                                   # held-out items per task / composed task
    shots: int = 5                                    # Part B / C: examples of the composed task (gates, LoraHub)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=5e-3, batch_size=8, seed=0))
    granularities: tuple = ("block", "layer", "matrix", "network")
    gates: tuple = ("sample", "token")                # the paper's gate and per-token, at each granularity
    prompt_gate: bool = True                          # + MoLE with the prompt gate (mole_core.text.gate)
    merges: tuple = ("linear", "pems", "svd", "ties", "dare", "lorahub", "arrow")
    lorahub_budget: int = 40                          # nevergrad evaluations (LoraHub's default)
    lorahub_l1: float = 0.05                          # LoraHub's regularisation
    seed: int = 0


def similarity(a: str, b: str) -> float:
    """1 − Levenshtein(a, b) / max(len(a), len(b)): 1 for the same text, 0 for nothing in common."""
    if not a and not b:
        return 1.0
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return 1.0 - row[-1] / max(len(a), len(b))


def score(texts: list[str], items: list[tuple[str, str]]) -> dict:
    """Exact match, its 95% Wilson interval, the mean character similarity (partial credit), two samples."""
    k = sum(t == a for t, (_, a) in zip(texts, items))
    lo, hi = wilson(k, len(items))
    sims = [similarity(t, a) for t, (_, a) in zip(texts, items)]
    return {"exact_match": round(k / len(items), 4), "correct": k, "items": len(items),
            "ci95": [round(lo, 3), round(hi, 3)], "similarity": round(float(np.mean(sims)), 4),
            "similarity_ci95": round(float(1.96 * np.std(sims) / np.sqrt(len(sims))), 4),
            "sample": [{"input": p, "output": t, "expected": a} for (p, a), t in list(zip(items, texts))[:2]]}


def full_loss(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """The mean token loss of the model on every pair at once (LoraHub's objective, deterministic)."""
    task = TokenTask(model, tokenizer, pairs)
    ids, labels = zip(*task.items)
    n = max(len(s) for s in ids)
    device = next(model.parameters()).device

    def pad(seqs, value, width):
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], device=device)

    width_labels = max(len(s) for s in labels)
    with torch.no_grad():
        return float(model(input_ids=pad(ids, task.pad_id, n), attention_mask=pad([[1] * len(s) for s in ids], 0, n),
                           labels=pad(labels, -100, width_labels)).loss)


def lorahub_weights(engine, keys: list[str], pairs: list[tuple[str, str]], budget: int = 40, l1: float = 0.05,
                    seed: int = 0) -> list[float]:
    """LoraHub: w = argmin loss(Σ w_i ΔW_i; pairs) + l1·Σ|w_i| by nevergrad's NGOpt, w_i ∈ [-1.5, 1.5], from 0."""
    import nevergrad as ng
    loras = [engine.lora(k) for k in keys]
    model, tok = engine.model, engine.tokenizer

    def objective(w):
        merged = merge_loras(loras, [float(x) for x in w], method="linear", normalize=False)
        with engine.experts_off(), merged_weights(model, merged):
            return full_loss(model, tok, pairs) + l1 * float(np.abs(w).sum())

    param = ng.p.Array(init=[0.0] * len(keys), lower=-1.5, upper=1.5)
    param.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    with warnings.catch_warnings():                      # scipy's COBYLA inside NGOpt warns about its own defaults
        warnings.simplefilter("ignore", UserWarning)
        best = optimizer.minimize(objective)
    return [round(float(x), 4) for x in best.value]


def method_rows(engine, keys: list[str], pairs: list[tuple[str, str]], cfg: TextStudyConfig,
                singles: bool = False, oracle: dict[str, str] | None = None) -> list[tuple[str, Mix | dict, float]]:
    """(label, Mix, seconds spent fitting it) for every method over `keys`; gates and LoraHub fitted on `pairs`.
    oracle {task: key}: + the ceiling row, each task's items answered by its own LoRA (a Mix per task)."""
    keys = list(keys)
    rows = [("base", Mix("base"), 0.0)]
    if oracle:
        rows.append(("Oracle (own LoRA per task)", {t: Mix(f"single:{k}") for t, k in oracle.items()}, 0.0))
    if singles:
        rows += [(f"{k} alone", Mix(f"single:{k}"), 0.0) for k in keys]
    top = max(w.rank for k in keys for w in engine.lora(k).modules.values())
    merges = {"linear": lambda: Mix("linear", tuple(keys)),
              "pems": lambda: Mix("linear", tuple(keys), normalize=False),
              "svd": lambda: Mix("svd", tuple(keys), rank=top),
              "ties": lambda: Mix("ties", tuple(keys), rank=top * len(keys)),
              "dare": lambda: Mix("dare", tuple(keys), rank=top * len(keys))}
    for name in cfg.merges:
        if name == "lorahub":
            start = time.perf_counter()
            w = lorahub_weights(engine, keys, pairs, cfg.lorahub_budget, cfg.lorahub_l1, cfg.seed)
            rows.append(("LoraHub", Mix("linear", tuple(keys), weights=dict(zip(keys, w)), normalize=False),
                         time.perf_counter() - start))
        elif name == "arrow":
            rows.append(("Arrow (PEFT, training-free)", Mix("arrow", tuple(keys)), 0.0))
        else:
            label = {"linear": "linear (NLA)", "pems": "PEMs (sum)", "svd": f"SVD r={top}",
                     "ties": "TIES", "dare": "DARE"}[name]
            rows.append((label, merges[name](), 0.0))
    rows.append(("MoLE untrained", Mix("mole", tuple(keys)), 0.0))
    if cfg.prompt_gate:
        start = time.perf_counter()
        mixture = engine.train(keys, MoleConfig(gate="prompt"), cfg.train, pairs=pairs)
        rows.append(("MoLE prompt gate (default)", Mix("mole", tuple(keys), mixture=mixture), time.perf_counter() - start))
    for granularity in cfg.granularities:
        for gate in cfg.gates:
            start = time.perf_counter()
            mixture = engine.train(keys, MoleConfig(granularity=granularity, gate=gate), cfg.train, pairs=pairs)
            rows.append((f"MoLE {granularity}, per-{gate}", Mix("mole", tuple(keys), mixture=mixture),
                         time.perf_counter() - start))
    return rows


def run_rows(engine, rows, tasks: dict[str, list[tuple[str, str]]], log=print) -> dict:
    """Every (label, Mix) on every task's items: {label: {"tasks": {task: score}, "mean", "fit_seconds",
    "seconds_per_item"}}."""
    out = {}
    for label, mix, fit in rows:
        start, per_task = time.perf_counter(), {}
        for task, items in tasks.items():
            texts, _, _ = engine.answer(mix[task] if isinstance(mix, dict) else mix, [p for p, _ in items])
            per_task[task] = score(texts, items)
        n = sum(len(items) for items in tasks.values())
        k = sum(s["correct"] for s in per_task.values())
        lo, hi = wilson(k, n)
        out[label] = {"tasks": per_task, "mean": round(float(np.mean([s["exact_match"] for s in per_task.values()])), 4),
                      "similarity": round(float(np.mean([s["similarity"] for s in per_task.values()])), 4),
                      "pooled_ci95": [round(lo, 3), round(hi, 3)], "fit_seconds": round(fit, 1),
                      "seconds_per_item": round((time.perf_counter() - start) / n, 4)}
        if not isinstance(mix, dict) and mix.mixture is not None:
            out[label]["mean_gates"] = [round(g, 3) for g in mix.mixture.meta.get("mean_gates", [])]
        if label == "LoraHub" and not isinstance(mix, dict):
            out[label]["weights"] = {k: round(float(v), 4) for k, v in (mix.weights or {}).items()}
        log(f"  {label:28s} mean EM {out[label]['mean']:.3f} sim {out[label]['similarity']:.3f}  " +
            " ".join(f"{t}={s['exact_match']:.2f}" for t, s in per_task.items()))
    engine.release()
    return out


def task_items(task_key: str, n: int, seed: int, held_out: bool = True) -> list[tuple[str, str]]:
    task = TASKS[task_key] if task_key in TASKS else composed(*task_key.split(" "))
    return sample_items(task, np.random.default_rng([seed, sum(map(ord, task_key))]), n, held_out=held_out)


def part_a(engine, keys: list[str], cfg: TextStudyConfig, log=print, asked: list[str] | None = None) -> dict:
    """Multi-task: gates trained on the manifests' examples of every task of the pool `keys`; the items of the
    tasks of `asked` (default: all of `keys`) answered. Part C is this with distractors in the pool."""
    asked = list(asked or keys)
    log(f"Part A: multi-task over {', '.join(keys)}; asked: {', '.join(asked)}")
    entries = {k: usable_entry(engine.bank, k) for k in dict.fromkeys([*keys, *asked])}   # ValueError: unknown
    oracle = {entries[k].task: k for k in asked}
    tasks = {name: task_items(name, cfg.items, cfg.seed) for name in oracle}
    pairs = [p for k in keys for p in entries[k].examples]
    rows = method_rows(engine, keys, pairs, cfg, singles=asked == keys, oracle=oracle)
    return {"keys": keys, "asked": asked, "train_pairs": len(pairs), "methods": run_rows(engine, rows, tasks, log)}


def part_b(engine, pair: tuple[str, str], keys: list[str], cfg: TextStudyConfig, log=print) -> dict:
    """One composed task over the pool `keys`: gates and LoraHub on `cfg.shots` examples of it."""
    name = " ".join(pair)
    shots = task_items(name, cfg.shots, cfg.seed + 1, held_out=False)
    log(f"composed '{name}' over {len(keys)} LoRAs ({', '.join(keys)}); {cfg.shots} shots")
    rows = method_rows(engine, keys, shots, cfg)
    return {"task": name, "keys": list(keys), "shots": [{"input": p, "output": a} for p, a in shots],
            "methods": run_rows(engine, rows, {name: task_items(name, cfg.items, cfg.seed)}, log)}


def pool(pair: tuple[str, str], order: list[str], n: int) -> list[str]:
    """The pair's two LoRAs + the first n - 2 others of `order`."""
    return list(pair) + [k for k in order if k not in pair][: n - 2]


def save(report: dict, path: Path) -> None:
    write_text(path, json.dumps(report, indent=2))


def markdown(report: dict) -> str:
    """Tables: Part A per task; Parts B and C per composed task; MoLE rows marked."""
    lines = []
    if "A" in report:
        a = report["A"]
        tasks = list(next(iter(a["methods"].values()))["tasks"])
        lines += [f"### Part A — multi-task ({len(a['keys'])} LoRAs, {report['config']['items']} held-out items "
                  f"per task; exact match, mean and pooled 95% interval)", "",
                  "| method | " + " | ".join(tasks) + " | mean | 95% CI | char. similarity | fit s | s/item |",
                  "|---|" + "---|" * (len(tasks) + 5)]
        for label, r in a["methods"].items():
            lines.append(f"| {label} | " + " | ".join(f"{r['tasks'][t]['exact_match']:.2f}" for t in tasks)
                         + f" | **{r['mean']:.3f}** | {r['pooled_ci95'][0]:.2f}–{r['pooled_ci95'][1]:.2f} | "
                           f"{r['similarity']:.2f} | {r['fit_seconds']:.1f} | {r['seconds_per_item']:.3f} |")
        lines.append("")
    for part, title in (("B", "Part B — composed tasks (never trained), 5 shots"),
                        ("C", "Part C — the 5 main tasks asked, distractor LoRAs in the pool"),
                        ("C_composed", "Part C' — composed tasks as the pool grows")):
        if part not in report:
            continue
        cells = report[part]
        columns = list(cells)
        labels = list(dict.fromkeys(label for c in cells.values() for label in c["methods"]))
        lines += [f"### {title} (exact match on {report['config']['items']} held-out items with its 95% interval · "
                  f"mean character similarity)", "",
                  "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for label in labels:
            row = []
            for c in columns:
                r = cells[c]["methods"].get(label)
                row.append("–" if r is None else
                           f"{r['mean']:.2f} ({r['pooled_ci95'][0]:.2f}–{r['pooled_ci95'][1]:.2f}) · {r['similarity']:.2f}")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def config_dict(cfg: TextStudyConfig) -> dict:
    d = {k: getattr(cfg, k) for k in ("items", "shots", "granularities", "gates", "prompt_gate", "merges", "lorahub_budget",
                                      "lorahub_l1", "seed")}
    d["train"] = {"steps": cfg.train.steps, "lr": cfg.train.lr, "batch_size": cfg.train.batch_size,
                  "balance_alpha": cfg.train.balance_alpha, "seed": cfg.train.seed}
    return d


def with_train(cfg: TextStudyConfig, **changes) -> TextStudyConfig:
    return replace(cfg, train=replace(cfg.train, **changes))
