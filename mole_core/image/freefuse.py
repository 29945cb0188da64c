"""FreeFuse (Liu, Ding, Zhou, 2025, arXiv 2510.23515): training-free multi-subject LoRA fusion by automatic masks.
Written here from the paper's description (and a reading of its public code), on the project's own parts.

    masks = freefuse_masks(pipe, handle, call, grid, steps)      # phase 1: (N, h, w) one-hot on the latent grid
    with handle.settings(gates=equal, mask=present, regions=RegionMaps(masks, ...)):
        image = pipe(**call)                                     # phase 2: each LoRA only inside its mask

1. Phase 1 — the masks. The pipeline runs from the request's own starting latents with every LoRA off (each
   expert's strength 0: the base model bit for bit) for the first `collect_steps` denoising steps, and stops
   there (no image is decoded). The trigger-routing recorder (mole_core/routing.py, TriggerRouter) keeps, at every
   resolution that reads the text, each image token's cross-attention mass on each LoRA's trigger tokens (a UNet's
   cross-attention; SD3's / FLUX's joint attention) from the last denoiser call: the early step. The conditional
   row is used (the unconditional one has no trigger).
2. Each concept's map is brought to the latent grid (bilinear), averaged over the resolutions, and normalised over
   space on its own (min–max to [0, 1]: where in the image, not how much; the first-named word takes most
   attention everywhere on small models).
3. Balanced argmax: every pixel goes to the concept with the highest normalised score plus a per-concept bias; the
   biases are moved, a few rounds, towards equal areas (the paper's stabilised balanced argmax), so one concept
   cannot take the whole image. Only concepts whose trigger is in the prompt take part; an absent LoRA is off.
   No trigger in the prompt: every LoRA off, the base model.
4. Phase 2 — the image. The MoLE layers run with forced equal gates and the masks as regions (mole_core/regions.py):
   at every image-token module each pixel gets exactly its concept's LoRA at full strength (weight 1), the others
   0; modules that read text (the text encoders, a UNet's cross-attention keys / values, a transformer's context
   stream) get the LoRAs of the prompt's concepts at equal weights (1/n; FreeFuse confines the image side).

Cost: the collect steps (the base model with the attention probabilities computed explicitly) plus one MoLE
image; with 20 steps and `COLLECT_FRACTION`, about 1.25× one image plus the explicit attention.

One LoRA whose trigger is in the prompt gets the whole image (its mask covers every pixel): that LoRA alone.

References: FreeFuse (arXiv 2510.23515; yaoliliu/FreeFuse: mask_utils' balanced argmax and linear normalisation);
Prompt-to-Prompt (Hertz et al., 2022) for cross-attention maps as a subject's layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mole_core.attach import MoleConfig
from mole_core.regions import RegionMaps

# The MoLE attachment FreeFuse drives: per-token gates with the trigger-routing recorder (trigger tokens only,
# the activation words); the gates themselves are always forced (equal), so no gate is trained or read.
FREEFUSE_MOLE = MoleConfig(granularity="block", gate="token", route="trigger", route_tokens="trigger",
                           route_norm="mass", route_absent="keep", route_learn_beta=False)
COLLECT_FRACTION = 0.25        # masks from the denoiser call at this fraction of the steps (at least step 1)
BALANCE_ROUNDS = 30


def collect_steps(steps: int) -> int:
    """The denoising step whose attention gives the masks (1-based)."""
    return max(1, min(steps, round(COLLECT_FRACTION * steps)))


def record_masses(pipe, handle, call: dict, stop_after: int) -> dict[int, torch.Tensor]:
    """Run `pipe(**call)` with every LoRA at strength 0 for `stop_after` steps; -> {image tokens T: (T, N)} the
    conditional row's attention masses on each expert's trigger tokens at that step."""
    router = handle.router
    if router is None:
        raise ValueError("FreeFuse needs the trigger recorder (a MoLE attachment with route='trigger').")

    def stop(pipeline, i, t, kwargs):
        if i + 1 >= stop_after:
            pipeline._interrupt = True
        return {}

    router.masses = {}
    with torch.no_grad(), handle.settings(strengths=[0.0] * len(handle.expert_names)):
        pipe(**call, callback_on_step_end=stop, output_type="latent")
    return {T: m[-1].detach().float().cpu() for T, m in router.masses.items()}


def masks_from_masses(masses: dict[int, torch.Tensor], present: torch.Tensor, grid: tuple[int, int],
                      denoiser: str, patch: int = 1) -> torch.Tensor:
    """(N, h, w) one-hot masks (float) from {T: (T, N)} attention masses: per resolution to the grid, mean over
    resolutions, each concept min–max normalised over space, balanced argmax among the `present` (N,) bool
    concepts; absent concepts (and every concept when none is present) get an empty mask."""
    h, w = grid
    n = present.shape[0]
    shapes = RegionMaps(torch.zeros(n, h, w), denoiser, patch)
    maps = []
    for T, m in masses.items():
        rows_cols = shapes.grid_of(T)
        if rows_cols is None or m.shape != (T, n):
            continue
        m = m.T.reshape(n, *rows_cols)[None]
        maps.append(normalise(F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0]))
    out = torch.zeros(n, h, w)
    on = present.nonzero().flatten()
    if not maps or on.numel() == 0:
        return out
    scores = normalise(torch.stack(maps).mean(0))[on].flatten(1)                     # (K, h·w)
    owner = balanced_argmax(scores)
    out[on] = F.one_hot(owner, on.numel()).T.reshape(on.numel(), h, w).float()
    return out


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each concept's map (N, h, w) to [0, 1] over space on its own (min–max; a flat map becomes 0)."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-8)).reshape(maps.shape)


def balanced_argmax(scores: torch.Tensor, rounds: int = BALANCE_ROUNDS) -> torch.Tensor:
    """(K, P) scores -> (P,) the concept of each pixel: argmax of score + bias_k, the biases moved towards equal
    areas (P / K each) with a shrinking step, so the assignment settles."""
    K, P = scores.shape
    bias = torch.zeros(K, 1)
    for r in range(rounds):
        counts = torch.bincount((scores + bias).argmax(0), minlength=K).float()
        bias += ((P / K - counts) / P).unsqueeze(1) / math.sqrt(r + 1)
    return (scores + bias).argmax(0)
