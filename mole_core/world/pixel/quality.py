"""The world's quality bars (the build's last stage, `eval`), measured with the oracle on images generated
from held-out seeds.

  oracle      accuracy on fresh clean renders (bar >= 0.98 per item)
  base        fraction of objects right (identity, colour, position) on one- and two-object captions
              (bar >= 0.90)
  each LoRA   alone, prompted with its trigger: fraction of images where the oracle finds the subject at
              the caption's position, or the style (bar >= 0.90); and base preservation: captions without
              the trigger, with the LoRA loaded vs without (caption fidelity both ways, agreement)

The LoRAs are loaded from the shipped bank files with the plain diffusers call `load_lora_weights`.
The figures and the bars go into build_report.json under stages.eval (mole_core.world.pixel.build writes it).

References: MoLE (Wu et al., ICLR 2024) §4: CLIP text-/image-alignment, which the oracle stands in for.
"""
from __future__ import annotations

import numpy as np
import torch

from mole_core.world.pixel import render as world
from mole_core.world.pixel.config import BuildConfig, LoraSpec, load_pipeline, log, lora_specs, rng_for
from mole_core.world.pixel.oracle import Oracle, accuracy_on_renders, caption_fidelity

BARS = {"oracle": 0.98, "base": 0.90, "lora": 0.90}     # the least each figure must reach


def generate(pipe, captions: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 32):
    """PIL images, one per caption, image i drawn from torch seed seeds[i]."""
    images = []
    for i in range(0, len(captions), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        images += pipe(captions[i:i + batch], generator=gens, num_inference_steps=steps,
                       guidance_scale=guidance).images
    return images


def held_out_seeds(rng: np.random.Generator, n: int) -> list[int]:
    """Generation seeds far from anything training used (training never seeds torch this high)."""
    return [int(s) for s in rng.integers(10 ** 9, 2 * 10 ** 9, n)]


def eval_base(cfg: BuildConfig, pipe, oracle: Oracle, rng) -> dict:
    n1 = cfg.eval_images // 2
    scenes = ([world.sample_scene(rng, n_objects=1) for _ in range(n1)]
              + [world.sample_scene(rng, n_objects=2) for _ in range(cfg.eval_images - n1)])
    captions = [world.caption(s) for s in scenes]
    readings = oracle.read(generate(pipe, captions, held_out_seeds(rng, len(captions)), cfg.steps, cfg.guidance))
    one, two = readings[:n1], readings[n1:]
    # objects the image shows at positions the caption leaves empty
    extra = np.mean([len(r.objects()) > len(s.objects) for r, s in zip(readings, scenes)])
    return {"images": len(captions),
            "objects_correct": caption_fidelity(readings, captions),
            "objects_correct_one_object": caption_fidelity(one, captions[:n1]),
            "objects_correct_two_objects": caption_fidelity(two, captions[n1:]),
            "images_with_extra_objects": float(extra)}


def found(reading, caption: str, spec: LoraSpec) -> bool:
    """The oracle finds the LoRA's subject where the caption puts it (or the LoRA's style)."""
    if spec.kind == "style":
        return reading.style_name == spec.key
    return all(reading.identity_at(pos) == ident
               for pos, ident, _ in world.parse_caption(caption) if ident == spec.key)


def eval_lora(cfg: BuildConfig, pipe, oracle: Oracle, spec: LoraSpec, rng) -> dict:
    """One LoRA loaded alone from the bank with `load_lora_weights`."""
    # 1. captions with the trigger, and ordinary captions for base preservation
    captions = [world.caption(spec.scene(rng)) for _ in range(cfg.eval_lora_images)]
    seeds = held_out_seeds(rng, len(captions))
    plain = [world.caption(world.sample_scene(rng, n_objects=int(rng.integers(1, 3))))
             for _ in range(cfg.eval_preserve_images)]
    plain_seeds = held_out_seeds(rng, len(plain))
    # 2. the base alone on the ordinary captions
    base_readings = oracle.read(generate(pipe, plain, plain_seeds, cfg.steps, cfg.guidance))
    # 3. the LoRA, from the shipped file
    pipe.load_lora_weights(str(cfg.bank_dir), weight_name=f"{spec.key}.safetensors", adapter_name=spec.key)
    try:
        readings = oracle.read(generate(pipe, captions, seeds, cfg.steps, cfg.guidance))
        lora_readings = oracle.read(generate(pipe, plain, plain_seeds, cfg.steps, cfg.guidance))
    finally:
        pipe.unload_lora_weights()
    hits = [found(r, c, spec) for r, c in zip(readings, captions)]
    agree = [r.objects() == b.objects() for r, b in zip(lora_readings, base_readings)]
    return {"kind": spec.kind, "trigger": spec.trigger, "images": len(captions),
            "found_rate": float(np.mean(hits)),
            "caption_fidelity_with_trigger": caption_fidelity(readings, captions),
            "preservation_caption_fidelity_base": caption_fidelity(base_readings, plain),
            "preservation_caption_fidelity_with_lora": caption_fidelity(lora_readings, plain),
            "preservation_same_objects_as_base": float(np.mean(agree)),
            "preservation_plain_style_rate": float(np.mean([r.style_name == world.DEFAULT_STYLE
                                                            for r in lora_readings]))}


def stage_eval(cfg: BuildConfig) -> dict:
    """Measure every bar on the built model and bank; -> the figures, with "bars": {name: figure, bar, passed}."""
    torch.manual_seed(cfg.seed + 1000)
    rng = rng_for(cfg, "eval")
    oracle = Oracle.load(cfg.model_dir / "oracle")
    pipe = load_pipeline(cfg.model_dir)
    # 1. the oracle on clean renders
    acc = accuracy_on_renders(oracle, rng, cfg.eval_oracle_images)
    log(f"BAR oracle item accuracy on {acc['images']} clean renders: {acc['item_accuracy']:.4f} "
        f"(bar >= {BARS['oracle']}; whole image right: {acc['image_accuracy']:.4f})")
    # 2. the base model
    base = eval_base(cfg, pipe, oracle, rng)
    log(f"BAR base objects correct on {base['images']} generated images: {base['objects_correct']:.4f} "
        f"(one-object {base['objects_correct_one_object']:.4f}, two-object "
        f"{base['objects_correct_two_objects']:.4f}; bar >= {BARS['base']})")
    figures = {"settings": {"num_inference_steps": cfg.steps, "guidance_scale": cfg.guidance},
               "oracle": acc, "base": base, "loras": {}}
    # 3. each LoRA alone
    for spec in lora_specs():
        if not (cfg.bank_dir / f"{spec.key}.safetensors").exists():
            raise ValueError(f"LoRA bank {cfg.bank_dir} lacks {spec.key}.safetensors; run the loras stage")
        fig = eval_lora(cfg, pipe, oracle, spec, rng)
        figures["loras"][spec.key] = fig
        log(f"BAR lora {spec.key} ({spec.trigger}) found in {fig['found_rate']:.4f} of {fig['images']} images "
            f"(bar >= {BARS['lora']}); preservation: caption fidelity base "
            f"{fig['preservation_caption_fidelity_base']:.4f} -> with LoRA "
            f"{fig['preservation_caption_fidelity_with_lora']:.4f}, same objects "
            f"{fig['preservation_same_objects_as_base']:.4f}")
    figures["bars"] = {
        "oracle_item_accuracy": {"figure": acc["item_accuracy"], "bar": BARS["oracle"]},
        "base_objects_correct": {"figure": base["objects_correct"], "bar": BARS["base"]},
        **{f"lora_{k}_found_rate": {"figure": v["found_rate"], "bar": BARS["lora"]}
           for k, v in figures["loras"].items()}}
    for bar in figures["bars"].values():
        bar["passed"] = bar["figure"] >= bar["bar"]
    return figures
