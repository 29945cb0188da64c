"""Arrow (Ostapenko et al., 2024) over text LoRAs, run by PEFT itself: training-free per-token routing.

    with arrow_attached(model, [lora_a, lora_b, lora_c]):
        ids = decode(model, tokenizer, prompts)          # every Linear the LoRAs adapt routes by Arrow

PEFT 0.21's `create_arrow_model` loads each LoRA as a PEFT adapter and adds an "arrow_router" adapter: in
every adapted Linear, each expert's prototype is the top right singular vector of its ΔW = B A (power
iteration), each token's input x is scored |⟨x, v_i⟩| against every prototype, the top-k experts are mixed by
softmax(score / temperature), all without training. Our LoRAs (canonical form, mole_core.lora) are written as
PEFT adapter folders in a temporary directory first (scale folded into B, lora_alpha = r: PEFT's scale 1),
and the model is unloaded afterwards (`unload()`: the very same base modules are back).

Arrow needs every LoRA to have the same rank and the same target modules (PEFT checks it and says which
differs). `ARROW_TOP_K` and `ARROW_TEMPERATURE` are PEFT's ArrowConfig defaults (top_k capped at N).

References: Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs" (ICML 2024);
peft `src/peft/tuners/lora/arrow.py` (`ArrowConfig`, `create_arrow_model`, `ArrowLoraLinearLayer`).
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mole_core.lora import Lora

ARROW_TOP_K = 3               # peft.ArrowConfig's default
ARROW_TEMPERATURE = 1.0       # peft.ArrowConfig's default
ARROW_SEED = 0                # the prototypes' power iteration starts from a seeded vector: the same answers


def write_peft_adapter(lora: Lora, folder: Path) -> Path:
    """`lora` as a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig
    ranks = {w.rank for w in lora.modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"Arrow needs one rank per LoRA; '{lora.name}' has ranks {sorted(ranks)}.")
    r = ranks.pop()
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=r, lora_alpha=r, target_modules=sorted(lora.modules), lora_dropout=0.0).save_pretrained(str(folder))
    tensors = {}
    for key, w in lora.modules.items():
        tensors[f"base_model.model.{key}.lora_A.weight"] = w.A.float().contiguous()
        tensors[f"base_model.model.{key}.lora_B.weight"] = (w.B.float() * w.scale).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@contextmanager
def arrow_attached(model: nn.Module, loras: list[Lora], top_k: int = ARROW_TOP_K,
                   temperature: float = ARROW_TEMPERATURE):
    """While inside: `model` carries the LoRAs as PEFT adapters routed by Arrow (PEFT's own layers); on exit
    the model is unloaded, as found. ValueError (PEFT's sentence) when the LoRAs cannot be combined by Arrow."""
    from peft import ArrowConfig, create_arrow_model
    if len(loras) < 1:
        raise ValueError("Arrow needs at least one LoRA.")
    config = ArrowConfig(top_k=min(top_k, len(loras)), router_temperature=temperature, rng_seed=ARROW_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(write_peft_adapter(lora, Path(tmp) / f"expert_{i}")) for i, lora in enumerate(loras)]
        peft_model = create_arrow_model(model, paths, config)
    try:
        with torch.no_grad():
            yield peft_model
    finally:
        peft_model.unload()
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)
