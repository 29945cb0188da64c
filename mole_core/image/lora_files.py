"""LoRA files of diffusers pipelines: diffusers / PEFT and kohya layouts of SD 1.x/2.x, SDXL, SD3 and FLUX.

Canonical form: a `Lora` is a dict from target-module key to `LoraWeights(A, B, scale)`.
Keys are "<component>.<module path>", e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
"transformer.single_transformer_blocks.0.attn.to_q" or "text_encoder.encoder.layers.0.self_attn.q_proj"
(transformers 5 has no `.text_model` level in CLIPTextModel; files that carry it are read without it), so that
`components.get_submodule(key)` finds the module (components = nn.ModuleDict of the pipeline's models, see
`mole_core.image.families.components`). A `Lora` also knows its family ("sd", "sdxl", "sd3", "flux";
mole_core.image.families), told from the file's keys.

Files: `load_lora` reads diffusers/PEFT and kohya/A1111 .safetensors of SD 1.x/2.x, SDXL, SD3 and FLUX through
the key conversion of that family's own diffusers pipeline class (`lora_state_dict`); `validate_lora` /
`check_family` check a LoRA against a model; `save_lora` writes either format atomically.

`delta_weight` is the one function that owns ΔW = s · B A (Linear and Conv2d, float32).

References: MoLE (Wu et al., ICLR 2024); peft `Linear.get_delta_weight` for the convention; diffusers
`StableDiffusionLoraLoaderMixin` / `StableDiffusionXLLoraLoaderMixin` / `SD3LoraLoaderMixin` /
`FluxLoraLoaderMixin.lora_state_dict`, diffusers `convert_state_dict_to_kohya` and kohya-ss sd-scripts for the
file layouts.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_kohya, convert_state_dict_to_peft
from safetensors.torch import save_file
from torch import nn

from mole_core.atomic import atomic_path
from mole_core.image.families import FAMILIES, Family, family_of_lora, lora_families, lora_root, pipeline_class
from mole_core.lora import (MAX_ABS, Lora, LoraFileError, LoraWeights, fit_problems,
                            read_safetensors, refuse_unsupported)


COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # the pipeline models a LoRA may target


DENOISERS = ("unet", "transformer")


KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")


KOHYA_TE_PREFIX = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


METADATA_KEY = "lora_adapter_metadata"                      # diffusers' key for the PEFT LoraConfig


FAMILY_KEY = "mole.family"                                  # header entry save_lora writes: the LoRA's family


def _rename_map(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, str]:
    """Old key -> new key of a diffusers key conversion, matched by tensor identity (values are not copied)."""
    new_by_id = {id(v): k for k, v in after.items()}
    return {k: new_by_id[id(v)] for k, v in before.items() if id(v) in new_by_id}


def _to_peft_keys(path: Path, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers' own conversion of every component's keys to PEFT form '<comp>.<path>.lora_A.weight'.

    Returns the converted dict and old key -> new key (so alphas can follow their weights).
    """
    out, renamed = {}, {}
    for comp in COMPONENTS:
        part = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
        if not part:
            continue
        if any("lora_A" in k or "lora_B" in k for k in part):
            conv = dict(part)                                          # already PEFT form
        elif comp in DENOISERS:
            conv = convert_unet_state_dict_to_peft(dict(part))         # what <denoiser>.load_lora_adapter does
        else:
            # kohya text-encoder keys come back mixed: attention in the old layout (`to_q_lora.down`), MLP in
            # the newer one (`lora_linear_layer`). diffusers' type sniffing picks one layout per dict (and then
            # leaves the other unconverted), so name the layouts explicitly, oldest first.
            conv = dict(part)
            if any("_lora." in k for k in conv):
                conv = convert_state_dict_to_peft(conv, original_type=StateDictType.DIFFUSERS_OLD)
            if any("lora_linear_layer" in k for k in conv):
                conv = convert_state_dict_to_peft(conv, original_type=StateDictType.DIFFUSERS)
        for old, new in _rename_map(part, conv).items():
            renamed[f"{comp}.{old}"] = f"{comp}.{new}"
        out.update({f"{comp}.{k}": v for k, v in conv.items()})
    stray = [k for k in state if k.split(".")[0] not in COMPONENTS]
    if stray:
        raise LoraFileError(f"{path}: key '{stray[0]}' belongs to none of {COMPONENTS}; this does not look like a "
                            f"LoRA for an SD, SDXL, SD3 or FLUX pipeline ({len(stray)} such key(s)).")
    return out, renamed


def _module_key(peft_key: str) -> str:
    """'<comp>.<path>.lora_A.weight' -> canonical module key '<comp>.<path>'.

    transformers 5 flattened CLIPTextModel (no `.text_model`), so the text-encoder prefix is dropped the way
    diffusers' own loader drops it.
    """
    key = peft_key.rsplit(".lora_", 1)[0]
    comp, _, rest = key.partition(".")
    if comp not in DENOISERS:
        rest = rest.removeprefix("text_model.")
    return f"{comp}.{rest}"


def _metadata_scales(path: Path, metadata: dict[str, str], ranks: dict[str, int]) -> dict[str, float]:
    """Per-module scale from diffusers' `lora_adapter_metadata` (a PEFT LoraConfig per component)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFileError(f"{path}: header entry '{METADATA_KEY}' is not valid JSON: {e}") from e
    scales = {}
    for key, r in ranks.items():
        comp, _, mod = key.partition(".")
        alpha = config.get(f"{comp}.lora_alpha")
        if alpha is None:
            continue
        for pattern, a in (config.get(f"{comp}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern.lstrip('^')})$", mod):   # PEFT's pattern rule
                alpha = a
        root = math.sqrt(r) if config.get(f"{comp}.use_rslora") else r
        scales[key] = float(alpha) / root
    return scales


def _lora_family(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str],
                 prefer: Family | str | None) -> tuple[Family, tuple[str, ...]]:
    """The family the file is read as, and every family its keys fit. Where the keys fit several (a UNet-only
    file: SD or SDXL), `prefer` (the model's family) wins, then the family save_lora wrote into the header."""
    fits = lora_families(state)
    if not fits:
        raise LoraFileError(f"{path}: the keys (e.g. '{next(iter(state))}') fit no supported family; this does not "
                            f"look like a LoRA for an SD 1.x/2.x, SDXL, SD3 or FLUX pipeline.")
    return family_of_lora(state, prefer if prefer is not None else metadata.get(FAMILY_KEY)), fits


def _diffusers_state_dict(path: Path, family: Family, state: dict[str, torch.Tensor]
                          ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The family's own `<Pipeline>.lora_state_dict`: diffusers' key layout and the alphas it keeps apart."""
    cls = pipeline_class(family)
    try:
        if family.name == "flux":     # kohya / XLabs / BFL layouts converted; kohya alphas folded into A and B
            return cls.lora_state_dict(dict(state), return_alphas=True)
        if family.name == "sd3":      # diffusers layout only; SD3LoraLoaderMixin reads no alphas
            return cls.lora_state_dict(dict(state)), None
        return cls.lora_state_dict(dict(state))
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise LoraFileError(f"{path}: diffusers' {family.pipeline} cannot read these LoRA keys: {e}") from e


def load_lora(path: str | Path, name: str | None = None, family: Family | str | None = None) -> Lora:
    """Read a .safetensors LoRA of an SD 1.x/2.x, SDXL, SD3 or FLUX pipeline into canonical form.

    Accepts diffusers/PEFT keys (`unet.…lora_A/lora_B`, `transformer.…`, `…lora.down/up`,
    `…processor.to_q_lora…`) and kohya/A1111 keys (`lora_unet_…lora_down/lora_up` + `.alpha`, `lora_te_`,
    `lora_te1_/te2_`, FLUX's `lora_unet_double_blocks_/single_blocks_`); the family is told from the keys
    (mole_core.image.families.lora_families) and the key conversion is that family's diffusers pipeline class's own
    (`lora_state_dict`). `family` (the loaded model's) settles files whose keys fit several families; it does
    not force a family the keys do not fit (see `check_family` for that refusal). Scale per module =
    alpha / rank, alpha from the file's `.alpha` tensors or its diffusers metadata; absent -> 1 (the
    diffusers/PEFT convention).
    Raises LoraFileError (a ValueError) for pickles, empty/truncated files, LyCORIS/DoRA variants,
    NaN/Inf weights, or keys that are not a LoRA of a supported pipeline.
    """
    # 1. read the file, refuse what the canonical form cannot hold
    path = Path(path)
    state, metadata = read_safetensors(path)
    refuse_unsupported(path, state)
    is_kohya = all(k.startswith(KOHYA_PREFIXES) for k in state)
    lora_family, fits = _lora_family(path, state, metadata, family)

    # 2. diffusers' own conversion to its key layout (+ kohya alphas)
    converted, network_alphas = _diffusers_state_dict(path, lora_family, state)
    converted = {k: v for k, v in converted.items() if not k.endswith(".alpha")}
    peft, renamed = _to_peft_keys(path, converted)

    # 3. group A/B per module
    A, B = {}, {}
    for k, v in peft.items():
        if k.endswith(".lora_A.weight"):
            A[_module_key(k)] = v
        elif k.endswith(".lora_B.weight"):
            B[_module_key(k)] = v
        else:
            raise LoraFileError(f"{path}: unexpected tensor '{k}' (only LoRA A/B weights and alphas are supported).")
    unpaired = sorted(A.keys() ^ B.keys())
    if unpaired:
        raise LoraFileError(f"{path}: module '{unpaired[0]}' has only one of its two LoRA factors (down/A, up/B).")

    # 4. scale = alpha / rank: kohya `.alpha` tensors (mapped through the renames), else diffusers metadata
    ranks = {key: a.shape[0] for key, a in A.items()}
    scales = _metadata_scales(path, metadata, ranks)
    for alpha_key, alpha in (network_alphas or {}).items():
        stem = alpha_key.removesuffix(".alpha")
        down = next((d for d in (stem, f"{stem}.lora.down.weight", f"{stem}.lora_A.weight") if d in renamed), None)
        if down is None:
            raise LoraFileError(f"{path}: alpha '{alpha_key}' matches no LoRA module.")
        key = _module_key(renamed[down])
        scales[key] = float(alpha) / ranks[key]

    modules = {key: LoraWeights(A=A[key].contiguous(), B=B[key].contiguous(), scale=scales.get(key, 1.0))
               for key in sorted(A)}
    for key, w in modules.items():
        if not math.isfinite(w.scale) or abs(w.scale) > MAX_ABS:
            raise LoraFileError(f"{path}: module '{key}' has the scale alpha/rank = {w.scale}; it must be a finite "
                                f"number of at most {MAX_ABS:g}.")
        if w.B.dim() != w.A.dim() or w.B.shape[1] != w.A.shape[0]:
            raise LoraFileError(f"{path}: module '{key}': down/A {tuple(w.A.shape)} and up/B {tuple(w.B.shape)} "
                                f"do not chain (B must be (d_out, {w.A.shape[0]}{', 1, 1' if w.A.dim() == 4 else ''})).")
    return Lora(name=name or path.stem, modules=modules, path=str(path),
                format="kohya" if is_kohya else "diffusers", metadata=dict(metadata), family=lora_family.name,
                fits=fits)


def pipeline_components(pipe) -> nn.ModuleDict:
    """The pipeline's models a LoRA can target, addressable by canonical key via `get_submodule` (text encoders
    through `families.lora_root`). `mole_core.image.families.components` is the same, limited to what the family's
    own LoRA loader targets (never FLUX's T5)."""
    return nn.ModuleDict({c: lora_root(getattr(pipe, c)) for c in COMPONENTS if getattr(pipe, c, None) is not None})


def family_problem(lora: Lora, family: Family | str | None) -> str | None:
    """Why `lora` is not for a model of `family`, naming both families; None when it is (or either is unknown)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    if family is None or lora.family is None or family.name in (lora.fits or (lora.family,)):
        return None
    mine = FAMILIES[lora.family]
    return (f"{Path(lora.path).name if lora.path else lora.name}: this is a {mine.title} LoRA ('{mine.name}'), "
            f"but the model is {family.title} ('{family.name}'); a LoRA only works on the model family it was "
            f"trained for.")


def check_family(lora: Lora, family: Family | str | None) -> None:
    """Raise LoraFileError naming both families unless `lora` is for a model of `family`."""
    problem = family_problem(lora, family)
    if problem:
        raise LoraFileError(problem)


def lora_problems(lora: Lora, components: nn.Module, family: Family | str | None = None) -> list[str]:
    """Every reason `lora` does not fit `components`, one human sentence each (empty list: it fits).
    Given the model's `family`, a LoRA of another family gets that one sentence (its shapes are moot)."""
    problem = family_problem(lora, family)
    return [problem] if problem else fit_problems(lora, components)


def validate_lora(lora: Lora, components: nn.Module, family: Family | str | None = None) -> None:
    """Raise LoraFileError unless `lora` is of the model's `family` (when given; see `check_family`) and every
    key resolves to an nn.Linear/nn.Conv2d of fitting shape.

    Linear: A (r, d_in), B (d_out, r). Conv2d: A (r, c_in, kh, kw), B (d_out, r, 1, 1).
    """
    check_family(lora, family)
    problems = lora_problems(lora, components)
    if problems:
        shown = "\n  ".join(problems[:5])
        more = f"\n  … and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LoraFileError(f"{Path(lora.path).name if lora.path else lora.name}: {len(problems)} of {len(lora.modules)} module(s) do not fit "
                            f"this model (a LoRA for another architecture?):\n  {shown}{more}")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a .safetensors file via a temp file in the same folder + os.replace: never half a file."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _kohya_name(key: str) -> str:
    """'unet.down_blocks.0.….to_q' -> 'lora_unet_down_blocks_0_…_to_q'; text encoders keep kohya's text_model_."""
    comp, _, rest = key.partition(".")
    if comp == "unet":
        return "lora_unet_" + rest.replace(".", "_")
    return KOHYA_TE_PREFIX[comp] + ("text_model." + rest).replace(".", "_")


def _file_key(key: str) -> str:
    """The module key as files write it: text encoders keep CLIP's `text_model.` level. diffusers drops it for a
    CLIPTextModel (flat in transformers 5) but needs it for a CLIPTextModelWithProjection (SDXL's second and
    SD3's encoders, which kept the level), and older readers always need it."""
    comp, _, rest = key.partition(".")
    return key if comp in DENOISERS else f"{comp}.text_model.{rest}"


def _kohya_sdxl(lora: Lora) -> dict[str, torch.Tensor]:
    """An SDXL LoRA in kohya keys by diffusers' own `convert_state_dict_to_kohya` ('lora_unet_…', 'lora_te1_…',
    'lora_te2_…'; UNet blocks in diffusers naming, which diffusers, ComfyUI and A1111 read), with
    alpha = scale · rank. Text-encoder keys get back the `text_model.` level kohya files carry."""
    peft, alpha_of = {}, {}
    for key, w in lora.modules.items():
        name = _file_key(key)
        peft[f"{name}.lora_A.weight"] = w.A.contiguous()
        peft[f"{name}.lora_B.weight"] = w.B.contiguous()
        alpha_of[id(peft[f"{name}.lora_A.weight"])] = w.scale * w.rank
    kohya = convert_state_dict_to_kohya(peft)
    for key, t in list(kohya.items()):
        if key.endswith(".lora_down.weight"):        # diffusers writes alpha = rank (scale 1); keep the real one
            kohya[f"{key.split('.')[0]}.alpha"] = torch.tensor(alpha_of[id(t)], dtype=torch.float32)
    return kohya


def _kohya_layout(lora: Lora, family: str | None) -> str | None:
    """The family whose kohya layout `lora` is written in: the known one, else (a merge of unknown family)
    told from its components: SDXL with a second text encoder, SD 1.x/2.x with a UNet only."""
    if family is not None:
        return family
    comps = {k.split(".")[0] for k in lora.modules}
    return "sdxl" if "text_encoder_2" in comps and "unet" in comps else "sd" if comps <= {"unet", "text_encoder"} \
        else None


def save_lora(lora: Lora, path: str | Path, format: str = "diffusers", family: str | None = None) -> None:
    """Write `lora` atomically as a .safetensors file that diffusers' `pipe.load_lora_weights` of its family reads.

    diffusers (every family): '<comp>.<path>.lora_A.weight' / '.lora_B.weight' with the scale folded into B
      (diffusers reads a file without alphas as scale 1, so ΔW is exact); text encoders of SDXL / SD3 / FLUX as
      'text_encoder.text_model.<path>' (see `_file_key`), of SD 1.x/2.x as 'text_encoder.<path>', as before.
    kohya: 'lora_unet_<path_with_underscores>.lora_down.weight' / '.lora_up.weight' / '.alpha' with
      alpha = scale · rank (so alpha / rank gives the scale back). SD 1.x/2.x: text encoder as 'lora_te_';
      SDXL: diffusers' `convert_state_dict_to_kohya` ('lora_te1_' / 'lora_te2_'). SD3 and FLUX are refused:
      diffusers reads kohya FLUX files (fused qkv, BFL block names) but has no writer for them, and SD3 has no
      kohya layout diffusers reads.
    `family` (default: the LoRA's own) is recorded in the header ('mole.family') and picks the kohya layout.
    """
    path = Path(path)
    family = family or lora.family
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family '{family}' (expected one of {', '.join(FAMILIES)}).")
    layout = _kohya_layout(lora, family)
    tensors: dict[str, torch.Tensor] = {}
    if format == "kohya" and layout is not None and not FAMILIES[layout].kohya:
        raise ValueError(f"{path.name}: no kohya format is written for {FAMILIES[layout].title} LoRAs (diffusers "
                         f"reads kohya FLUX files but offers no converter to write them, and reads no kohya SD3 "
                         f"files); save it with format='diffusers'.")
    if format == "kohya" and layout == "sdxl":
        tensors = _kohya_sdxl(lora)
    else:
        for key, w in lora.modules.items():
            if format == "diffusers":
                name = key if layout == "sd" else _file_key(key)   # SD 1.x/2.x files stay as they always were
                tensors[f"{name}.lora_A.weight"] = w.A.contiguous()
                tensors[f"{name}.lora_B.weight"] = (w.B.float() * w.scale).to(w.B.dtype).contiguous()
            elif format == "kohya":
                if key.split(".")[0] not in ("unet", *KOHYA_TE_PREFIX):
                    raise ValueError(f"{path.name}: module '{key}' has no kohya name (family unknown); save it with "
                                     f"format='diffusers' or pass family=.")
                name = _kohya_name(key)
                tensors[f"{name}.lora_down.weight"] = w.A.contiguous()
                tensors[f"{name}.lora_up.weight"] = w.B.contiguous()
                tensors[f"{name}.alpha"] = torch.tensor(w.scale * w.rank, dtype=torch.float32)
            else:
                raise ValueError(f"{path}: unknown LoRA file format '{format}' (expected 'diffusers' or 'kohya').")
    for key, t in tensors.items():   # never write a file that load_lora would refuse
        if not torch.isfinite(t).all() or t.abs().max().item() > MAX_ABS:
            raise LoraFileError(f"{path.name}: tensor '{key}' would hold values that are not finite or above "
                                f"{MAX_ABS:g} (weights too large?); nothing was written.")
    metadata = {"format": "pt", "mole.name": lora.name, "mole.format": format}
    if family not in (None, "sd"):   # SD 1.x/2.x is what a file without the key means
        metadata[FAMILY_KEY] = family
    _atomic_save(tensors, path, metadata)


def inspect_lora(path: str | Path, components: nn.Module | None = None, family: Family | str | None = None) -> dict:
    """A summary of a LoRA file for people: family, format, targets, module count, ranks, alphas, size, verdict.

    family: the model family its keys say ("sd", "sdxl", "sd3", "flux"; the given model's `family` where the
    keys fit several). verdict: "ok" (fits the given model), "readable (no model given to validate against)",
    or the error; ok: False when the file cannot be read or does not fit the given model (or family).
    """
    path = Path(path)
    info = {"file": str(path), "size_bytes": path.stat().st_size if path.is_file() else None,
            "family": None, "format": None, "targets": {}, "modules": 0, "linear": 0, "conv": 0,
            "ranks": [], "alphas": [], "verdict": None, "ok": False}
    try:
        lora = load_lora(path, family=family)
    except ValueError as e:
        info["verdict"] = str(e)
        return info
    info["family"], info["format"] = lora.family, lora.format
    for key, w in lora.modules.items():
        comp = key.split(".")[0]
        info["targets"][comp] = info["targets"].get(comp, 0) + 1
        info["conv" if w.A.dim() == 4 else "linear"] += 1
    info["modules"] = len(lora.modules)
    info["ranks"] = sorted({w.rank for w in lora.modules.values()})
    info["alphas"] = sorted({round(w.scale * w.rank, 6) for w in lora.modules.values()})
    wrong_family = family_problem(lora, family)
    problems = lora_problems(lora, components, family) if components is not None else [wrong_family] * bool(wrong_family)
    info["ok"] = not problems
    if components is None and family is None:
        info["verdict"] = "readable (no model given to validate against)"
    elif wrong_family:
        info["verdict"] = wrong_family
    else:
        info["verdict"] = "ok" if not problems else f"{len(problems)} module(s) do not fit: " + "; ".join(problems[:3])
    return info
