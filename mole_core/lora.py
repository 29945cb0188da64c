"""LoRAs in canonical form, their one ΔW, and the fit rule (the core: no pipeline, no file layout).

A `Lora` is a dict from target-module key to `LoraWeights(A, B, scale)`; keys are "<component>.<module path>"
(e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" or "encoder.layers.0.self_attn.q_proj"),
so that `components.get_submodule(key)` finds the module. `delta_weight` is the one function that owns
ΔW = s · B A (Linear and Conv2d, float32). `module_problem` is the one fit rule (loading, merges and MoLE);
`fit_problems` applies it to every module of a LoRA. `read_safetensors` reads a file without unpickling
anything and `refuse_unsupported` refuses LyCORIS / DoRA / OFT variants and out-of-range values.

The wings read and write files: `mole_core.image.lora_files` (diffusers / kohya layouts of SD, SDXL, SD3,
FLUX), `mole_core.text.lora_io` (PEFT keys of transformers models).

References: MoLE (Wu et al., ICLR 2024); peft `Linear.get_delta_weight` for the convention.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


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
    family: str | None = None                   # "sd" | "sdxl" | "sd3" | "flux" (mole_core.image.families); None: unknown
    fits: tuple = ()                            # every family the file's keys fit (family is one); () = (family,)


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


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")  # refused: loading them runs arbitrary code


MAX_ABS = 1e4        # |weight| or alpha above this is refused: real LoRAs stay far below; fp16 tops out at 65504


MAX_RANK = 1024      # a LoRA rank above this is refused (a 206 MB rank-400,000 file took 2.5 GB to render)


# key marker -> what the file is. Checked before anything else reads the weights.
UNSUPPORTED_MARKERS = {
    "hada_w": "a LyCORIS LoHa (hada_*) file",
    "lokr_w": "a LyCORIS LoKr (lokr_*) file",
    "oft_": "an OFT / BOFT file",
    "lora_mid": "a LyCORIS LoCon file with a Tucker mid weight (lora_mid)",
    "dora_scale": "a DoRA file (dora_scale)",
    "lora_magnitude_vector": "a DoRA file (lora_magnitude_vector)",
    ".diff": "a full-weight difference (LyCORIS 'full'), not a LoRA",
    "w_norm": "a LyCORIS norm-layer file (w_norm)",
}


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or does not fit: the message names file, module and shapes."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a .safetensors file. Never unpickles anything."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(f"{path}: '{path.suffix}' files are Python pickles, which can run arbitrary code when "
                            f"loaded; they are refused. Convert the LoRA to .safetensors first.")
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise LoraFileError(f"{path}: the file is empty (0 bytes).")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / non-safetensors files
        raise LoraFileError(f"{path}: not a readable .safetensors file (truncated, corrupt or another format): "
                            f"{e}") from e
    if not tensors:
        raise LoraFileError(f"{path}: the file holds no tensors.")
    return tensors, metadata


def refuse_unsupported(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse LyCORIS / DoRA / OFT variants and non-finite weights, naming the first offending key."""
    for key in state:
        for marker, what in UNSUPPORTED_MARKERS.items():
            if marker in key:
                raise LoraFileError(f"{path}: this is {what} (key '{key}'); only plain LoRA (A/B or "
                                    f"lora_down/lora_up with optional alpha) is supported.")
    for key, t in state.items():
        if t.numel() == 0:
            raise LoraFileError(f"{path}: tensor '{key}' is empty (shape {tuple(t.shape)}): a LoRA of rank 0 "
                                f"changes nothing and is refused.")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise LoraFileError(f"{path}: tensor '{key}' contains {bad} NaN/Inf value(s).")
        largest = t.abs().max().item() if t.is_floating_point() else 0.0
        if largest > MAX_ABS:
            raise LoraFileError(f"{path}: tensor '{key}' holds values up to {largest:.3g}; LoRA "
                                f"weights (and alphas) above {MAX_ABS:g} would overflow the model, so the file "
                                f"is refused.")
        if "down" in key or "lora_A" in key:
            if t.dim() >= 2 and t.shape[0] > MAX_RANK:
                raise LoraFileError(f"{path}: tensor '{key}' has rank {t.shape[0]}; ranks above {MAX_RANK} "
                                    f"are refused.")


def _expected_shapes(module: nn.Module, r: int) -> tuple[tuple, tuple]:
    if isinstance(module, nn.Linear):
        return (r, module.in_features), (module.out_features, r)
    return (r, module.in_channels // module.groups, *module.kernel_size), (module.out_channels, r, 1, 1)


def module_problem(key: str, module: nn.Module, w: LoraWeights) -> str | None:
    """Why LoRA weights `w` cannot adapt `module` (None: they fit): the one fit rule of the project, used by
    `lora_problems` (loading, merges) and `attach` (MoLE) alike. A plain Linear, or a Conv2d without groups
    and with zero padding (the stacked-expert convolution and the merged ΔW both assume it)."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        kind = type(module)
        return (f"module '{key}': is a {kind.__module__}.{kind.__qualname__}, expected a plain torch.nn.Linear or "
                f"torch.nn.Conv2d")
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return (f"module '{key}': a grouped or non-zero-padded Conv2d is not supported (groups={module.groups}, "
                f"padding_mode={module.padding_mode})")
    exp_a, exp_b = _expected_shapes(module, w.rank)
    if tuple(w.A.shape) != exp_a or tuple(w.B.shape) != exp_b:
        return (f"module '{key}' ({type(module).__name__}): expected A {exp_a}, B {exp_b}; "
                f"found A {tuple(w.A.shape)}, B {tuple(w.B.shape)}")
    return None


def weight_module(components: nn.Module, key: str) -> nn.Module:
    """The module holding W for a LoRA key: `components.get_submodule(key)`, or, where an adapter wraps
    it (MoLE's layers keep it as `.base`, PEFT's as `.base_layer`), the wrapped nn.Linear / nn.Conv2d.
    AttributeError when the key does not resolve."""
    module = components.get_submodule(key)
    while not isinstance(module, (nn.Linear, nn.Conv2d)):
        inner = getattr(module, "base", None) or getattr(module, "base_layer", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def fit_problems(lora: Lora, components: nn.Module) -> list[str]:
    """Every reason `lora`'s modules do not fit `components`, one human sentence each (empty list: they fit)."""
    problems = []
    for key, w in lora.modules.items():
        try:
            module = weight_module(components, key)
        except AttributeError:
            comp = key.split(".")[0]
            where = "module" if comp in dict(components.named_children()) else f"component '{comp}'"
            problems.append(f"module '{key}': the model has no such {where}")
            continue
        problem = module_problem(key, module, w)
        if problem:
            problems.append(problem)
    return problems
