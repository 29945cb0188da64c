"""MoLE Studio engine: Mixture of LoRA Experts on unmodified diffusers / transformers models.

The public verbs (the README shows them in five lines):

    lora = load_lora("face.safetensors")                        # any diffusers / kohya LoRA file
    handle = attach(pipeline_components(pipe), [a, b, c])        # gated experts, base frozen
    result = train_gates(handle, DiffusionTask(pipe, examples))  # only the gates learn
    with handle.settings(mask={"face": False}): pipe(prompt)     # switch experts off, no retraining
    merged = merge_loras([a, b, c], method="svd", rank=8)        # the arithmetic peers

References: Wu, Huang, Wei, "Mixture of LoRA Experts", ICLR 2024 (arXiv 2404.13628).
"""
from .attach import MoleConfig, MoleHandle, attach
from .bank import Bank
from .engine import Engine, GenerateRequest
from .lora import Lora, LoraWeights, delta_weight, load_lora, pipeline_components, save_lora, validate_lora
from .merge import linear_factors, merge_loras, merged_weights, svd_factors
from .mixture import load_mixture, save_mixture
from .train import DiffusionTask, TokenTask, TrainConfig, train_gates

__all__ = [
    "Bank", "DiffusionTask", "Engine", "GenerateRequest", "Lora", "LoraWeights", "MoleConfig", "MoleHandle",
    "TokenTask", "TrainConfig", "attach", "delta_weight", "linear_factors", "load_lora", "load_mixture",
    "merge_loras", "merged_weights", "pipeline_components", "save_lora", "save_mixture", "svd_factors",
    "train_gates", "validate_lora",
]
