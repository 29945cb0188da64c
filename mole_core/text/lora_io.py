"""Text LoRA files: PEFT keys of a bare transformers model, read into mole_core.lora's canonical form.

`mole_core.image.lora_files.load_lora` reads pipeline LoRAs only: its keys must start with a pipeline component
('unet.', 'text_encoder.', ...) and it tells an SD/SDXL/SD3/FLUX family from them, so it refuses a LoRA of a
bare transformers model. A text LoRA file here holds, for every adapted module of the model,

    '<module path>.lora_A.weight'  (r, d_in)     '<module path>.lora_B.weight'  (d_out, r)

(PEFT's own `get_peft_model_state_dict` keys; a leading 'base_model.model.' is accepted and dropped), with the
scale folded into B unless the header gives 'lora_alpha' (then scale = lora_alpha / r, PEFT's rule) and
'mole.kind' = 'text'. `load_text_lora` gives a `Lora` keyed by the model's module paths, so
`attach(model, ...)`, `merge_loras` and `merged_weights(model, ...)` take it as they take any LoRA.

References: peft `get_peft_model_state_dict` / `set_peft_model_state_dict` (key layout); mole_core.lora.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mole_core.atomic import atomic_path
from mole_core.lora import MAX_ABS, Lora, LoraFileError, LoraWeights, fit_problems


PEFT_PREFIX = "base_model.model."


def load_text_lora(path: str | Path, name: str | None = None) -> Lora:
    """Read a text LoRA file (.safetensors) into canonical form; LoraFileError names what is wrong."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise LoraFileError(f"{path}: not a .safetensors file (text LoRAs are read from .safetensors only).")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoraFileError(f"{path}: not a readable .safetensors file: {e}") from e
    A, B = {}, {}
    for key, t in state.items():
        stem = key.removeprefix(PEFT_PREFIX)
        if stem.endswith(".lora_A.weight"):
            A[stem.removesuffix(".lora_A.weight")] = t
        elif stem.endswith(".lora_B.weight"):
            B[stem.removesuffix(".lora_B.weight")] = t
        else:
            raise LoraFileError(f"{path}: unexpected tensor '{key}' (a text LoRA holds '<module>.lora_A.weight' "
                                f"and '<module>.lora_B.weight' only).")
        if not torch.isfinite(t).all() or t.abs().max().item() > MAX_ABS:
            raise LoraFileError(f"{path}: tensor '{key}' holds non-finite values or values above {MAX_ABS:g}.")
    unpaired = sorted(A.keys() ^ B.keys())
    if unpaired:
        raise LoraFileError(f"{path}: module '{unpaired[0]}' has only one of its two LoRA factors.")
    if not A:
        raise LoraFileError(f"{path}: the file holds no LoRA factors.")
    alpha = metadata.get("lora_alpha")
    modules = {}
    for key in sorted(A):
        a, b = A[key], B[key]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise LoraFileError(f"{path}: module '{key}': A {tuple(a.shape)} and B {tuple(b.shape)} do not chain "
                                f"(Linear LoRAs only: A (r, d_in), B (d_out, r)).")
        scale = float(alpha) / a.shape[0] if alpha is not None else 1.0
        if not math.isfinite(scale):
            raise LoraFileError(f"{path}: lora_alpha {alpha!r} is not a finite number.")
        modules[key] = LoraWeights(A=a.contiguous(), B=b.contiguous(), scale=scale)
    return Lora(name=name or path.stem, modules=modules, path=str(path), format="peft", metadata=dict(metadata))


def save_text_lora(lora: Lora, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write `lora` atomically in the text-LoRA layout (scale folded into B: ΔW is exact without an alpha)."""
    path = Path(path)
    tensors = {}
    for key, w in lora.modules.items():
        tensors[f"{key}.lora_A.weight"] = w.A.float().contiguous()
        tensors[f"{key}.lora_B.weight"] = (w.B.float() * w.scale).contiguous()
    for key, t in tensors.items():   # never write a file that load_text_lora would refuse (as lora.save_lora)
        if not torch.isfinite(t).all() or t.abs().max().item() > MAX_ABS:
            raise LoraFileError(f"{path.name}: tensor '{key}' would hold values that are not finite or above "
                                f"{MAX_ABS:g} (weights too large?); nothing was written.")
    metadata = {"format": "pt", "mole.kind": "text", "mole.name": lora.name, **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def validate_text_lora(lora: Lora, model: nn.Module) -> None:
    """LoraFileError unless every module of `lora` is an nn.Linear of `model` of fitting shape."""
    problems = fit_problems(lora, model)
    if problems:
        raise LoraFileError(f"{Path(lora.path).name if lora.path else lora.name}: {len(problems)} of "
                            f"{len(lora.modules)} module(s) do not fit this model:\n  " + "\n  ".join(problems[:5]))


def lora_from_peft(peft_model, name: str, adapter: str = "default") -> Lora:
    """The canonical Lora of a peft-wrapped model's adapter (A, B and scale of every LoRA layer)."""
    from peft.tuners.lora import LoraLayer
    modules = {}
    for key, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            modules[key] = LoraWeights(A=module.lora_A[adapter].weight.detach().float().clone(),
                                       B=module.lora_B[adapter].weight.detach().float().clone(),
                                       scale=float(module.scaling[adapter]))
    return Lora(name=name, modules=modules, format="peft")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a PEFT adapter folder


def load_peft_adapter(folder: str | Path, model: nn.Module, name: str | None = None) -> Lora:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) in canonical form, read by
    PEFT itself: `PeftModel.from_pretrained` (its key handling, rank / alpha patterns, rsLoRA scaling) on
    `model`, the A, B and scale of every LoRA layer taken, then `unload()` (the model is left as found)."""
    from peft import PeftConfig, PeftModel
    folder = Path(folder)
    shown = folder.name
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as e:
        raise LoraFileError(f"{shown}: not a readable PEFT adapter folder ({e}).") from e
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise LoraFileError(f"{shown}: a {getattr(config.peft_type, 'value', config.peft_type)} adapter; only "
                            f"LoRA adapters can be experts.")
    if getattr(config, "use_dora", False):
        raise LoraFileError(f"{shown}: a DoRA adapter (its magnitude vectors are not a low-rank delta).")
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name="mole_import")
    except Exception as e:
        raise LoraFileError(f"{shown}: PEFT cannot load this adapter on the model: {e}") from e
    try:
        lora = lora_from_peft(peft_model, name or folder.name, adapter="mole_import")
    finally:
        peft_model.unload()
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)
    if not lora.modules:
        raise LoraFileError(f"{shown}: the adapter has no LoRA layer this engine can use (Linear layers only).")
    for w in lora.modules.values():
        if not (torch.isfinite(w.A).all() and torch.isfinite(w.B).all()) or max(
                w.A.abs().max().item(), w.B.abs().max().item()) > MAX_ABS or not math.isfinite(w.scale):
            raise LoraFileError(f"{shown}: the adapter holds non-finite values or values above {MAX_ABS:g}.")
    return dataclasses.replace(lora, path=str(folder / ADAPTER_FILES[1]), format="peft")


def adapter_folder(path: str | Path) -> Path | None:
    """The PEFT adapter folder `path` is (or whose adapter_model.safetensors it is), else None."""
    path = Path(path)
    folder = path.parent if path.name == ADAPTER_FILES[1] else path
    return folder if all((folder / f).is_file() for f in ADAPTER_FILES) else None


def read_text_lora(path: str | Path, model: nn.Module | None = None, name: str | None = None) -> Lora:
    """A text LoRA in canonical form from a .safetensors file with PEFT keys (`load_text_lora`) or from a PEFT
    adapter folder (read onto `model` by PEFT: `load_peft_adapter`)."""
    path = Path(path)
    folder = adapter_folder(path)
    if folder is not None:
        if model is None:
            raise ValueError(f"{folder.name} is a PEFT adapter folder: it is read onto the model.")
        return load_peft_adapter(folder, model, name=name)
    if path.is_dir():
        raise ValueError(f"{path.name}: a folder without {' and '.join(ADAPTER_FILES)} (not a PEFT adapter).")
    return load_text_lora(path, name=name)
