"""MoLE Studio engine: Mixture of LoRA Experts on unmodified diffusers / transformers models.

The public verbs (the README shows them in five lines):

    lora = load_lora("face.safetensors")                        # any diffusers / kohya LoRA file
    handle = attach(pipeline_components(pipe), [a, b, c])        # gated experts, base frozen
    result = train_gates(handle, DiffusionTask(pipe, examples))  # only the gates learn
    with handle.settings(mask={"face": False}): pipe(prompt)     # switch experts off, no retraining
    merged = merge_loras([a, b, c], method="svd", rank=8)        # the arithmetic peers

The names are imported on first use (PEP 562 module __getattr__), so `import mole_core.defaults` and
`python -m mole_core --help` do not load torch and diffusers.

References: Wu, Huang, Wei, "Mixture of LoRA Experts", ICLR 2024 (arXiv 2404.13628).
"""
import importlib

# public name -> the module of the package that defines it
_EXPORTS = {
    "MoleConfig": "attach", "MoleHandle": "attach", "attach": "attach",
    "Bank": "image.bank", "TextEngine": "text.engine",
    "Engine": "image.engine", "GenerateRequest": "image.engine", "Mix": "mix",
    "compositing": "image.peers", "switching": "image.peers",
    "Lora": "lora", "LoraWeights": "lora", "delta_weight": "lora", "load_lora": "image.lora_files",
    "pipeline_components": "image.lora_files", "save_lora": "image.lora_files", "validate_lora": "image.lora_files",
    "linear_factors": "merge", "merge_loras": "merge", "merged_weights": "merge", "svd_factors": "merge",
    "load_mixture": "mixture", "save_mixture": "mixture",
    "DiffusionTask": "image.task", "TokenTask": "text.task", "TrainConfig": "train", "train_gates": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mole_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mole_core.{_EXPORTS[name]}"), name)
    globals()[name] = value          # later lookups are plain attributes
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
