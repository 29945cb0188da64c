"""Build the text world from nothing: tokenizer, base model, one LoRA per task family, and the measured bars.

Stages (`STAGES`, in this order), each with a fixed seed, each skipped when its output exists (unless forced):
  base   a tiny encoder-decoder, BartForConditionalGeneration from a BartConfig (Flan-T5's shape: encoder,
         decoder, cross-attention; ~1.4M parameters). Not T5 itself: measured here, a T5 of the same size
         trained the same way (3000 steps) copied only 8% of held-out words, writing the right letters in
         the wrong order: T5 has only relative position biases, so its bidirectional encoder has no cheap way
         to tell its letters' order, while BART's learned absolute positions give it directly. Trained on the
         base mix (copy of small and capital words, lower, title, last, rotate: the instruction format,
         copying, reading and writing both cases, string ends, moving letters) and saved with its character tokenizer as an ordinary transformers folder
         (assets/text-world/: `from_pretrained` loads both).
  loras  one LoRA per bank task (tasks.BANK_TASKS: 5 main, 11 distractors) on the frozen base with peft's
         `LoraConfig` (rank 8 on every attention and MLP Linear), batches with a share of base-task items
         (prior preservation), each for its task's share of `lora_steps`; saved as text_bank/<key>.safetensors
         (mole_core.text.lora_io) + a manifest text_bank/<key>.json with held-in example pairs
         (gate-training data) and its role ("main" or "distractor").
  eval   the bars (mole_core.world.text.quality): each LoRA alone and the base alone on held-out items.
Every stage records its figures and seconds in assets/text-world/build_report.json.

References: FLAN (Chung et al., 2022) task mixtures; peft `get_peft_model` + `LoraConfig`; MoLE (Wu et al.,
ICLR 2024) §4.2 (Flan-T5 task LoRAs); mole_core.world.pixel.build (the image world this one mirrors).
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import BartForConditionalGeneration

from mole_core.atomic import write_text
from mole_core.text.models import load_model
from mole_core.world.text.config import LORA_TARGETS, TextBuildConfig, log, rng_for
from mole_core.text.lora_io import lora_from_peft, save_text_lora
from mole_core.world.text.quality import stage_eval
from mole_core.world.text.tasks import BANK_TASKS, BASE_TASKS, TextTask, role, sample_items
from mole_core.world.text.tokenizer import build_tokenizer

STAGES = ("base", "loras", "eval")


# ---------------------------------------------------------------------------------------------
# Small helpers

def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def update_report(cfg: TextBuildConfig, stage: str, figures: dict, seconds: float) -> None:
    path = cfg.model_dir / "build_report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    if stage == "loras" and cfg.loras:          # a partial rerun (--lora KEYS): keep the other LoRAs' figures
        kept = {k: v for k, v in report.get("stages", {}).get("loras", {}).items() if k != "seconds"}
        figures = {**kept, **figures}
        seconds = sum(v["seconds"] for v in figures.values())
    report.setdefault("stages", {})[stage] = {"seconds": round(seconds, 1), **figures}
    report["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    report["total_seconds"] = round(sum(s["seconds"] for s in report["stages"].values()), 1)
    write_json(path, report)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    warmup = min(warmup, max(1, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_tensors(tokenizer, items: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask of the prompts, labels of the answers (padding -> -100)."""
    enc = tokenizer([p for p, _ in items], padding=True, return_tensors="pt")
    labels = tokenizer([a for _, a in items], padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def draw_batch(rng: np.random.Generator, tasks: list[TextTask], n: int, weights=None) -> list[tuple[str, str]]:
    """n training items, each of a task drawn with probabilities `weights` (default: uniform)."""
    picks = rng.choice(len(tasks), size=n, p=weights)
    return [sample_items(tasks[i], rng, 1, held_out=False, unique=False)[0] for i in picks]


def fit(model, params, tokenizer, rng, tasks, weights, steps: int, batch: int, lr: float, what: str) -> list[float]:
    """AdamW on `params` for `steps` steps of the token loss; the running losses every 10% of the steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, running = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = model(**batch_tensors(tokenizer, draw_batch(rng, tasks, batch, weights))).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
            losses.append(round(float(np.mean(running)), 5))
            log(f"{what} step {step + 1}/{steps} loss {losses[-1]:.4f}")
            running = []
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# 1. The base model

def stage_base(cfg: TextBuildConfig) -> dict:
    torch.manual_seed(cfg.seed + 1)
    rng = rng_for(cfg, "base")
    with tempfile.TemporaryDirectory(dir=cfg.model_dir.parent) as tmp:
        tokenizer = build_tokenizer(tmp)
        model = BartForConditionalGeneration(cfg.model_config(len(tokenizer)))
        losses = fit(model, list(model.parameters()), tokenizer, rng, list(BASE_TASKS.values()), None,
                     cfg.base_steps, cfg.base_batch, cfg.base_lr, "base")
        model.save_pretrained(tmp)
        report = cfg.model_dir / "build_report.json"
        kept = report.read_text() if report.exists() else None
        if cfg.model_dir.exists():
            shutil.rmtree(cfg.model_dir)
        shutil.copytree(tmp, cfg.model_dir)
        if kept is not None:
            write_text(report, kept)
    n = sum(p.numel() for p in model.parameters())
    log(f"base saved to {cfg.model_dir} ({n} parameters)")
    return {"parameters": n, "losses": losses, "tasks": list(BASE_TASKS)}


# ---------------------------------------------------------------------------------------------
# 2. The LoRA bank

def manifest(cfg: TextBuildConfig, task: TextTask, rng) -> dict:
    """The bank manifest of one LoRA; its examples are training words (never held-out ones)."""
    examples = sample_items(task, rng, cfg.examples, held_out=False)
    return {"name": task.key.capitalize(), "kind": "text", "task": task.key, "trigger": task.key,
            "role": role(task.key),
            "description": f"{task.key}: {task.description} (e.g. '{examples[0][0]}' -> '{examples[0][1]}')",
            "base_model": "text-world", "default_weight": 1.0,
            "examples": [{"input": p, "output": a} for p, a in examples]}


def stage_loras(cfg: TextBuildConfig) -> dict:
    cfg.bank_dir.mkdir(parents=True, exist_ok=True)
    keys = cfg.loras or tuple(BANK_TASKS)
    figures = {}
    prior = list(BASE_TASKS.values())
    for key in keys:
        start = time.perf_counter()
        task = BANK_TASKS[key]
        steps = max(1, round(cfg.lora_steps * task.steps))
        rng = rng_for(cfg, f"lora/{key}")
        torch.manual_seed(cfg.seed + 2)
        model, tokenizer = load_model(cfg.model_dir)
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                      target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none"))
        tasks = [task, *prior]
        weights = [1 - cfg.lora_prior] + [cfg.lora_prior / len(prior)] * len(prior)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        losses = fit(peft_model, params, tokenizer, rng, tasks, weights, steps, cfg.lora_batch,
                     cfg.lora_lr, f"lora {key}")
        lora = lora_from_peft(peft_model, key)
        save_text_lora(lora, cfg.bank_dir / f"{key}.safetensors",
                       {"mole.task": key, "r": str(cfg.lora_rank), "target_modules": ",".join(LORA_TARGETS)})
        write_json(cfg.bank_dir / f"{key}.json", manifest(cfg, task, rng_for(cfg, f"examples/{key}")))
        figures[key] = {"losses": losses, "steps": steps, "modules": len(lora.modules), "rank": cfg.lora_rank,
                        "seconds": round(time.perf_counter() - start, 1)}
        log(f"lora {key}: {len(lora.modules)} modules, {figures[key]['seconds']} s")
    return figures


# ---------------------------------------------------------------------------------------------
# The whole build

def run_build(cfg: TextBuildConfig, stages=STAGES, force: bool = False) -> dict:
    torch.set_num_threads(cfg.threads)
    cfg.model_dir.parent.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}' (expected some of {', '.join(STAGES)})")
    runners = {"base": stage_base, "loras": stage_loras, "eval": stage_eval}
    done = {"base": lambda: (cfg.model_dir / "config.json").exists(),
            "loras": lambda: all((cfg.bank_dir / f"{k}.safetensors").exists()
                                 for k in (cfg.loras or BANK_TASKS)),
            "eval": lambda: False}
    for stage in STAGES:
        if stage not in stages:
            continue
        if done[stage]() and not force:
            log(f"stage {stage}: outputs exist, skipped (--force redoes it)")
            continue
        log(f"stage {stage} ...")
        start = time.perf_counter()
        figures = runners[stage](cfg)
        update_report(cfg, stage, figures, time.perf_counter() - start)
        log(f"stage {stage} done in {time.perf_counter() - start:.1f}s")
    path = cfg.model_dir / "build_report.json"
    return json.loads(path.read_text()) if path.exists() else {}
