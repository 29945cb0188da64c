"""What both engine benchmarks share: the SD 1.5 attention/feed-forward targets and three random LoRAs on them."""
from __future__ import annotations

import torch

from mole_core.lora import Lora, LoraWeights

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
RANK = 16


def target_paths(unet) -> list[str]:
    """The Linear layers of every transformer block's attention and feed-forward (160 in SD 1.5)."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)
            and "transformer_blocks" in n]


def random_loras(unet, paths, n=3, seed=0) -> list[Lora]:
    """n rank-16 LoRAs with non-zero B on `paths`, alphas 8, 12, 16, ... (so the scales differ)."""
    g = torch.Generator().manual_seed(seed)
    loras = []
    for i in range(n):
        modules = {}
        for p in paths:
            m = unet.get_submodule(p)
            modules[f"unet.{p}"] = LoraWeights(A=torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5,
                                               B=torch.randn(m.out_features, RANK, generator=g) * 0.1,
                                               scale=(8.0 + 4 * i) / RANK)
        loras.append(Lora(name=f"l{i}", modules=modules))
    return loras
