"""Regional passes: each placed expert denoises its region in a call of its own, reading its own phrase.

Placing experts (`Mix.regions`) confines each expert's gate weight to its region inside one denoiser call
(mole_core/regions.py). That alone does not make three subjects appear on a small model: every pixel reads the
whole prompt, and the model draws the subjects the whole prompt suggests to it (two of three on the pixel world,
docs/results_composition.md). So each placed expert also gets a denoiser call of its own at every step — its
experts only (it, and the experts the user placed nowhere), everywhere, reading the clauses of the prompt that
name it (`regions.region_phrases`) — and the noise predictions are fused by the regions:

    ε(p) = Σ_k w̃_k(p) ε_k(p) + (1 − Σ_k w̃_k(p)) ε(p)_MoLE          w̃ = w / max(1, Σ_k w_k): overlaps share

where ε_MoLE is the call as it is without passes (the pixels no region covers keep it). MultiDiffusion's fusion of
predictions by region (Bar-Tal et al., 2023), with each region's own LoRA as ComfyUI's masked conditioning does.

Each phrase is encoded by the pipeline itself, so every family gets what its denoiser reads (SD 1.x / SDXL's text
states, pooled embeddings and time ids; SD3's and FLUX's pooled projections and text ids): `conditioning` runs the
pipeline on the phrase for its first step with the pass's experts and keeps the denoiser's text arguments.
Cost per image: one more denoiser call per placed expert and step, and one more prompt encoding per placed expert.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# the denoiser's keyword arguments that come from the prompt (the rest: latents, timestep, sizes, guidance)
TEXT_KWARGS = ("encoder_hidden_states", "pooled_projections", "txt_ids", "added_cond_kwargs",
               "encoder_attention_mask")


@dataclasses.dataclass
class Pass:
    """One placed expert's pass: the experts on in it (`mask`, N bools), the text arguments of each denoiser
    call of a step (`texts`: one per call; two where a pipeline calls its denoiser twice per step), and its
    region's weights on the latent grid (h, w)."""
    mask: list[bool]
    texts: list[dict]
    weights: torch.Tensor


def conditioning(pipe, denoiser: nn.Module, call: dict) -> list[dict]:
    """The text keyword arguments of each denoiser call in the first step of `pipe(**call)` (the pipeline stops
    after that step; nothing is decoded)."""
    seen = []

    def keep(module, args, kwargs):
        seen.append({k: kwargs[k] for k in TEXT_KWARGS if k in kwargs})

    def stop(pipeline, i, t, kwargs):
        pipeline._interrupt = True
        return {}

    hook = denoiser.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**call, callback_on_step_end=stop, output_type="latent")
    finally:
        hook.remove()
    if not seen or "encoder_hidden_states" not in seen[0]:
        raise RuntimeError(f"Regions: {type(pipe).__name__} does not pass its denoiser the prompt's states by "
                           f"keyword; regional passes cannot be run on it.")
    return seen


def fusion_weights(weights: torch.Tensor, like: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """(K, h, w) region weights on the latent grid -> w̃ broadcastable against a denoiser output `like`:
    (K, 1, 1, H, W) for (B, C, H, W), (K, 1, T, 1) for a packed (B, T, D) one (FLUX: `patch` latent pixels a
    side per token)."""
    w = weights.float() / weights.float().sum(0).clamp_min(1)
    h, wd = w.shape[1:]
    if like.dim() == 4:
        size = like.shape[-2:]
        w = F.interpolate(w[None], size=size, mode="area")[0] if tuple(size) != (h, wd) else w
        return w[:, None, None].to(like.device, like.dtype)
    size = (math.ceil(h / patch), math.ceil(wd / patch))
    w = F.interpolate(w[None], size=size, mode="area")[0] if size != (h, wd) else w
    if size[0] * size[1] != like.shape[1]:
        raise RuntimeError(f"Regions: the denoiser gave {like.shape[1]} tokens for a {h}×{wd} latent grid.")
    return w.flatten(1)[:, None, :, None].to(like.device, like.dtype)


@contextmanager
def regional(denoiser: nn.Module, handle, passes: list[Pass], patch: int = 1):
    """Inside, every call of `denoiser` returns the fused prediction (module docstring): after the call itself,
    one call per pass with that pass's experts (`handle.apart`) and text."""
    if not passes:
        yield
        return
    state = {"inside": False, "calls": 0, "weights": {}}

    def fuse(module, args, kwargs, output):
        if state["inside"]:
            return None
        index, state["calls"] = state["calls"], state["calls"] + 1
        main = output[0] if isinstance(output, tuple) else output.sample
        shape = tuple(main.shape)
        if shape not in state["weights"]:
            state["weights"][shape] = fusion_weights(torch.stack([p.weights for p in passes]), main, patch)
        w = state["weights"][shape]
        fused = main * (1 - w.sum(0))
        for p, wk in zip(passes, w):
            state["inside"] = True
            try:
                with handle.apart(p.mask):
                    out = module(*args, **{**kwargs, **p.texts[index % len(p.texts)]})
            finally:
                state["inside"] = False
            fused = fused + wk * (out[0] if isinstance(out, tuple) else out.sample)
        return (fused, *output[1:]) if isinstance(output, tuple) else type(output)(sample=fused)

    hook = denoiser.register_forward_hook(fuse, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
