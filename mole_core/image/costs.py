"""What a job will take on the running machine: seconds per denoising step of each kind of image and per
gate-training step of each gate kind, timed here (a short calibration at start-up, then every real run).

    costs = Costs()                              # reference timings until this machine has timed itself
    engine.calibrate()                           # a few seconds: every kind timed on this machine
    costs.seconds(mixes=[Mix("mole", keys)], denoise_steps=20)
    costs.seconds(train_steps=150, gate="routed", experts=3)
    costs.source                                 # what the numbers come from, in words, for the UI

A kind's cost is a running mean (the newest run weighs 0.3), so a machine that gets busier or quieter is
followed within a few runs. Costs are kept for two experts; more experts cost `expert_factor(n)` times as
much for MoLE images and gate training (measured: about +8% per expert), N LoRAs cost a LoRA Composite
image N merge images, and a MoLE image with K placed experts costs 1 + K images (one regional pass each).

References: none (bookkeeping); the reference timings are this project's 2-core CPU machine, quiet.
"""
from __future__ import annotations

import math

from mole_core.defaults import COSTS, DEFAULT_DENOISE_STEPS

EXPERT_SHARE = 0.08     # extra cost per expert beyond two, MoLE images and gate training (measured, noisy)
BATCH = 4               # costs of training steps are kept at this batch size
CALIBRATION_STEPS = 2   # denoising steps per image kind, and timed training steps per gate kind, at calibration


def image_kind(mix) -> str:
    """The cost kind of one image drawn with this Mix (a key of COSTS)."""
    if mix.method == "mole":
        return "denoise_step_mole_token" if mix.gate in ("token", "routed") else "denoise_step_mole_sample"
    if mix.method == "freefuse":          # per-pixel weights on the MoLE layers, after the collect steps
        return "denoise_step_mole_token"
    if mix.method == "base":
        return "denoise_step"
    if mix.method == "switch":
        return "denoise_step_switch"
    return "denoise_step_merge"       # the merges, one LoRA alone, and (per LoRA) LoRA Composite


def regional_passes(mix) -> int:
    """Denoiser calls a MoLE image makes per step beyond its own: one per placed expert when some expert is placed
    somewhere other than the whole image (mole_core/image/regional.py)."""
    regions = mix.placement or {}
    placed = any(not (getattr(v, "whole", False) or (isinstance(v, str) and v.strip().lower() == "whole"))
                 for v in regions.values())
    off = {k for k, on in (mix.mask or {}).items() if not on}
    return len([k for k in regions if k not in off]) if placed else 0


def train_kind(gate: str) -> str:
    return "train_step_token" if gate in ("token", "routed") else "train_step_sample"


def expert_factor(experts: int) -> float:
    return 1 + EXPERT_SHARE * max(0, int(experts) - 2)


def batch_factor(batch_size: int) -> float:
    """Cost of a training step at this batch size relative to batch 4 (measured: batch 2 costs 0.65×)."""
    return 0.3 + 0.7 * batch_size / BATCH


class Costs:
    """Seconds per unit of work on this machine, by kind; `source` says where they come from."""

    def __init__(self):
        self.table = dict(COSTS)
        self.source = "reference timings of a quiet 2-core CPU; this machine has not timed itself yet"

    # ---- what a job will take ----------------------------------------------------------------
    def image_seconds(self, mix, denoise_steps: int = DEFAULT_DENOISE_STEPS) -> float:
        n = max(2, len(mix.keys))
        per_step = self.table[image_kind(mix)]
        if mix.method == "mole":
            per_step *= expert_factor(n) * (1 + regional_passes(mix))
        elif mix.method == "freefuse":        # + the collect steps (a quarter, freefuse.COLLECT_FRACTION)
            per_step *= expert_factor(n) * 1.25
        elif mix.method == "composite":
            per_step *= n
        return per_step * denoise_steps

    def train_seconds(self, steps: int, gate: str = "sample", experts: int = 2, batch_size: int = BATCH) -> float:
        return steps * self.table[train_kind(gate)] * expert_factor(experts) * batch_factor(batch_size)

    def seconds(self, mixes=(), denoise_steps: int = DEFAULT_DENOISE_STEPS, train_steps: int = 0,
                gate: str = "sample", experts: int = 2, batch_size: int = BATCH, images: int = 0) -> float:
        """Images drawn with `mixes` (one each), `images` more at the base model's cost, and `train_steps`."""
        return (sum(self.image_seconds(m, denoise_steps) for m in mixes)
                + images * denoise_steps * self.table["denoise_step"]
                + (self.train_seconds(train_steps, gate, experts, batch_size) if train_steps else 0.0))

    # ---- what this machine measured ----------------------------------------------------------
    def measured_image(self, mix, seconds: float, denoise_steps: int) -> None:
        """One image drawn with `mix` took `seconds`."""
        share = self.image_seconds(mix, denoise_steps) / self.table[image_kind(mix)]   # steps × expert factor
        self._update(image_kind(mix), seconds / share)

    def measured_training(self, gate: str, seconds_per_step: float, experts: int, batch_size: int) -> None:
        kind = train_kind(gate)
        self._update(kind, seconds_per_step / (expert_factor(experts) * batch_factor(batch_size)))

    def _update(self, kind: str, value: float, weight: float = 0.3) -> None:
        if math.isfinite(value) and value > 0:
            self.table[kind] = (1 - weight) * self.table[kind] + weight * value
            if not self.source.startswith("timed on this machine at start-up"):
                self.source = "timed on this machine in its last runs"
            else:
                self.source = "timed on this machine at start-up and in its last runs"

    def calibrated(self, measured: dict[str, float]) -> None:
        """Replace the reference timings with those `Engine.calibrate` took here (kind -> seconds per unit at
        two experts); with no merge timed (a bank of fewer than two), the other image kinds scale with the
        base model's step."""
        self.table.update({k: v for k, v in measured.items() if math.isfinite(v) and v > 0})
        if "denoise_step_merge" not in measured and "denoise_step" in measured:
            scale = measured["denoise_step"] / COSTS["denoise_step"]
            self.table.update({k: COSTS[k] * scale for k in COSTS if k.startswith("denoise_step_")})
        self.source = "timed on this machine at start-up"
