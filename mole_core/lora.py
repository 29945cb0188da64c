"""LoRA files and their deltas.

Canonical form: a `Lora` is a dict from target-module key to `LoraWeights(A, B, scale)`.
Keys are "<component>.<module path>", e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
or "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", so that
`components.get_submodule(key)` finds the module (components = nn.ModuleDict of the pipeline's models).

`delta_weight` is the one function that owns ΔW = s · B A (Linear and Conv2d, float32).

References: MoLE (Wu et al., ICLR 2024); peft `Linear.get_delta_weight` for the convention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraWeights:
    """One adapted module: ΔW = scale · B @ A."""
    A: torch.Tensor  # down: (r, d_in) for Linear | (r, c_in, kh, kw) for Conv2d
    B: torch.Tensor  # up:   (d_out, r) for Linear | (d_out, r, 1, 1) for Conv2d
    scale: float     # alpha / r

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class Lora:
    """A LoRA in canonical form: target-module key -> LoraWeights."""
    name: str                                   # display / expert name
    modules: dict[str, LoraWeights]             # "unet.<path>" | "text_encoder.<path>" -> weights
    path: str | None = None                     # file it came from, if any
    format: str = "diffusers"                   # "diffusers" | "kohya" (as read from disk)
    metadata: dict = field(default_factory=dict)


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B A in float32, shaped like the base weight.

    Linear: A (r, d_in), B (d_out, r) -> (d_out, d_in).
    Conv2d: A (r, c_in, kh, kw), B (d_out, r, 1, 1) -> (d_out, c_in, kh, kw).
    """
    A32, B32 = A.float(), B.float()
    if A.dim() == 2:
        return scale * (B32 @ A32)
    r = A.shape[0]
    return scale * (B32.reshape(B32.shape[0], r) @ A32.reshape(r, -1)).reshape(B.shape[0], *A.shape[1:])
