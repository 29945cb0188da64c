"""The text world's quality bars (the build's last stage, `eval`), measured by greedy exact match on
held-out words (never seen by any training item of any task).

  each LoRA   alone, on 100 held-out items of its task (bar >= 0.90), main LoRAs and distractors alike (the
              bar records its role); loaded from the shipped bank file
              (mole_core.text.lora_io.load_text_lora) and applied with mole_core.merge.merged_weights
  base        alone on every task: the bank's tasks (what the LoRAs add: should be far below the bar) and
              its own tasks
  main LoRAs  also on the other main LoRAs' tasks (a LoRA should not answer another one's instruction)
  preservation  each LoRA on the base tasks' held-out items (trigger-free prompts: no LoRA instruction word)
              against the base alone

References: FLAN / MoLE §4.2 (exact match on held-out task items).
"""
from __future__ import annotations

import torch

from mole_core.merge import merged_weights
from mole_core.text.models import load_model
from mole_core.world.text.config import TextBuildConfig, log, rng_for
from mole_core.text.decode import greedy
from mole_core.text.lora_io import load_text_lora
from mole_core.world.text.tasks import (BANK_TASKS, BASE_TASKS, LORA_TASKS, exact_match, sample_items, wilson,
                                      role as task_role)

BARS = {"lora": 0.90}                       # the least each LoRA alone must reach on its task


def held_out_sets(cfg: TextBuildConfig, n: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """Per task, n held-out (prompt, answer) items (fixed by the build seed)."""
    n = n or cfg.eval_items
    return {key: sample_items(task, rng_for(cfg, f"eval/{key}"), n, held_out=True)
            for key, task in {**BANK_TASKS, **BASE_TASKS}.items()}


def score(model, tokenizer, items) -> dict:
    """Exact match with its 95% Wilson interval."""
    predictions = greedy(model, tokenizer, [p for p, _ in items])
    k = sum(p == a for p, (_, a) in zip(predictions, items))
    lo, hi = wilson(k, len(items))
    return {"exact_match": exact_match(predictions, [a for _, a in items]), "ci95": [round(lo, 4), round(hi, 4)],
            "items": len(items), "sample": [{"input": p, "output": o, "expected": a}
                                            for (p, a), o in list(zip(items, predictions))[:3]]}


def stage_eval(cfg: TextBuildConfig) -> dict:
    torch.manual_seed(cfg.seed + 1000)
    model, tokenizer = load_model(cfg.model_dir)
    sets = held_out_sets(cfg)
    # 1. the base alone on every task
    base = {key: score(model, tokenizer, items) for key, items in sets.items()}
    for key, fig in base.items():
        log(f"base alone on {key}: exact match {fig['exact_match']:.3f}")
    # 2. each LoRA alone, from its shipped file
    loras = {}
    for key in BANK_TASKS:
        lora = load_text_lora(cfg.bank_dir / f"{key}.safetensors")
        role = task_role(key)
        with merged_weights(model, lora):
            own = score(model, tokenizer, sets[key])
            others = ({k: score(model, tokenizer, sets[k])["exact_match"] for k in LORA_TASKS if k != key}
                      if role == "main" else {})
            preserved = {k: score(model, tokenizer, sets[k])["exact_match"] for k in BASE_TASKS}
        loras[key] = {"role": role, "own_task": own, "other_lora_tasks": others, "base_tasks_with_lora": preserved,
                      "base_tasks_base_alone": {k: base[k]["exact_match"] for k in BASE_TASKS}}
        log(f"BAR {role} lora {key} alone on {own['items']} held-out items: exact match {own['exact_match']:.3f} "
            f"(bar >= {BARS['lora']}); base alone {base[key]['exact_match']:.3f}; base tasks with the LoRA "
            + ", ".join(f"{k} {v:.2f}" for k, v in preserved.items()))
    bars = {f"lora_{k}_exact_match": {"role": v["role"], "figure": v["own_task"]["exact_match"],
                                      "ci95": v["own_task"]["ci95"], "bar": BARS["lora"]}
            for k, v in loras.items()}
    for bar in bars.values():
        bar["passed"] = bar["figure"] >= bar["bar"]
    failed = [k for k, b in bars.items() if not b["passed"]]
    log(f"bars: {len(bars) - len(failed)} of {len(bars)} passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return {"held_out_items": cfg.eval_items, "base": base, "loras": loras, "bars": bars,
            "bars_passed": not failed, "bars_failed": failed}
