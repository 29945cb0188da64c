"""Model families: what differs between SD 1.x/2.x, SDXL, SD3 and FLUX, in one place.

A `Family` names the diffusers pipeline class whose LoRA loader reads its files, the denoiser ("unet" or
"transformer"), the models a LoRA may target (keyed as LoRA keys are written), how the starting noise is laid
out and which training objective the denoiser was trained with. Everything else in the package asks this
module instead of assuming a `StableDiffusionPipeline`:

    pipe = load_pipeline("models/flux-tiny", "cpu", torch.float32)      # any diffusers text-to-image folder
    family = family_of(pipe)                                             # FAMILIES["flux"]
    comps = components(pipe)                                             # ModuleDict(transformer, text_encoder)
    latents = latents_for(pipe, seed=1, height=512, width=512)           # packed (1, 1024, 64) for FLUX
    image = pipe(prompt, latents=latents, ...)                           # same seed -> same start, every method

`family_of_lora(state)` tells the family from a LoRA file's keys (and, where the names say nothing, from the
cross-attention width), before any conversion; mole_core.lora uses it to pick the pipeline class whose own
`lora_state_dict` converts the file.

References: diffusers `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline` (their
`prepare_latents` and `_pack_latents`, their `*LoraLoaderMixin.lora_state_dict`), kohya-ss sd-scripts
(`lora_te1_`/`lora_te2_` for SDXL, `lora_unet_double_blocks_`/`single_blocks_` for FLUX).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """One model family and how to drive it."""
    name: str                         # "sd" | "sdxl" | "sd3" | "flux": the key of FAMILIES, stored with a Lora
    title: str                        # for people: "FLUX.1"
    pipeline: str                     # the diffusers pipeline class whose lora_state_dict reads its LoRA files
    denoiser: str                     # "unet" | "transformer": the pipeline attribute that denoises
    lora_text_encoders: tuple         # text encoders the family's LoRA loader writes into (T5 never)
    packed: bool                      # latents packed 2×2 into tokens (FLUX) instead of (1, C, h, w)
    objective: str                    # "noise": DDPM ε / v / x0 per scheduler config; "flow": rectified flow
    kohya: bool                       # save_lora writes a kohya file for it (needs a diffusers reader AND writer)

    @property
    def lora_components(self) -> tuple:
        """The component names a LoRA of this family may target, denoiser first."""
        return (self.denoiser, *self.lora_text_encoders)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd", "Stable Diffusion 1.x/2.x", "StableDiffusionPipeline", "unet", ("text_encoder",),
           packed=False, objective="noise", kohya=True),
    Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", "unet", ("text_encoder", "text_encoder_2"),
           packed=False, objective="noise", kohya=True),
    Family("sd3", "Stable Diffusion 3", "StableDiffusion3Pipeline", "transformer",
           ("text_encoder", "text_encoder_2"), packed=False, objective="flow", kohya=False),
    Family("flux", "FLUX.1", "FluxPipeline", "transformer", ("text_encoder",),
           packed=True, objective="flow", kohya=False),
)}


def pipeline_class(family: Family | str):
    """The diffusers pipeline class of a family (imported lazily: diffusers is slow to import)."""
    import diffusers
    return getattr(diffusers, (FAMILIES[family] if isinstance(family, str) else family).pipeline)


# ----------------------------------------------------------------------------------------------
# The family of a pipeline
# ----------------------------------------------------------------------------------------------

def family_of(pipe) -> Family:
    """The family of a pipeline instance or class, by the LoRA loader mixin it inherits (so img2img,
    inpaint and ControlNet variants of a family count as that family). ValueError for any other pipeline."""
    from diffusers.loaders import (FluxLoraLoaderMixin, SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin,
                                   StableDiffusionXLLoraLoaderMixin)
    cls = pipe if isinstance(pipe, type) else type(pipe)
    for mixin, name in ((StableDiffusionXLLoraLoaderMixin, "sdxl"), (SD3LoraLoaderMixin, "sd3"),
                        (FluxLoraLoaderMixin, "flux"), (StableDiffusionLoraLoaderMixin, "sd")):
        if issubclass(cls, mixin):
            return FAMILIES[name]
    raise ValueError(f"{cls.__name__} is not a pipeline of a supported family (" +
                     ", ".join(f"{f.title}: {f.pipeline}" for f in FAMILIES.values()) + ").")


def denoiser(pipe) -> str:
    """'unet' or 'transformer': the attribute of `pipe` holding the denoising model."""
    return family_of(pipe).denoiser


def text_encoders(pipe) -> list[str]:
    """The text encoders `pipe` has, in order: 'text_encoder', 'text_encoder_2', 'text_encoder_3'."""
    return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]


def lora_root(model: nn.Module) -> nn.Module:
    """The module LoRA keys of `model` are relative to. transformers 5 dropped the `.text_model` level from
    CLIPTextModel but kept it in CLIPTextModelWithProjection (SDXL's second, SD3's both encoders); canonical
    keys never carry it (mole_core.lora), so such an encoder is addressed through its `.text_model`, which
    holds every layer a LoRA targets (diffusers' loader drops the level the same way, model by model)."""
    inner = getattr(model, "text_model", None)
    return inner if isinstance(inner, nn.Module) else model


def components(pipe) -> nn.ModuleDict:
    """The models a LoRA of `pipe`'s family may target, keyed as LoRA keys are written ('unet' |
    'transformer', 'text_encoder', 'text_encoder_2'), denoiser first; absent text encoders are left out; each
    text encoder through `lora_root`. `components(pipe).get_submodule('transformer.transformer_blocks.0.attn.to_q')`
    finds the module; the modules are the pipeline's own, so wrapping them changes the pipeline."""
    return nn.ModuleDict({n: lora_root(getattr(pipe, n)) for n in family_of(pipe).lora_components
                          if getattr(pipe, n, None) is not None})


# ----------------------------------------------------------------------------------------------
# Loading a pipeline
# ----------------------------------------------------------------------------------------------

def prepare(pipe, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, cpu_offload: bool = False):
    """Move `pipe` to device (and dtype), freeze every model and put it in eval, turn progress bars off.
    Returns `pipe`. Refuses a pipeline of no supported family.

    cpu_offload: instead of moving the whole pipeline, diffusers' `enable_model_cpu_offload(device=device)`:
    the models stay in CPU memory and each moves to the GPU only while it runs (one model on the GPU at a time).
    Needs a CUDA device (ValueError otherwise)."""
    family_of(pipe)
    if dtype is not None and getattr(pipe, family_of(pipe).denoiser).dtype != dtype:
        pipe.to(dtype=dtype)
    if cpu_offload:
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CPU offload (--cpu-offload) moves each model to a CUDA GPU while it runs; "
                             f"there is none here (device {device}). Leave it off on this machine.")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for model in pipe.components.values():
        if isinstance(model, nn.Module):
            model.requires_grad_(False).eval()
    return pipe


def load_pipeline(model, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  cpu_offload: bool = False):
    """Open any diffusers text-to-image folder (SD, SDXL, SD3, FLUX) with `DiffusionPipeline.from_pretrained`
    (local files only: nothing is downloaded), without a safety checker, then `prepare` it. `model` may also be
    an already loaded pipeline, which is only prepared. ValueError (naming the folder) when it is not a
    diffusers folder or not a supported family. cpu_offload: see `prepare`."""
    if not isinstance(model, (str, Path)):
        return prepare(model, device, dtype, cpu_offload)
    from diffusers import DiffusionPipeline
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder}: not a diffusers pipeline folder (no model_index.json).")
    config = DiffusionPipeline.load_config(str(folder), local_files_only=True)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in config else {}
    if dtype is not None:
        kwargs["dtype"] = dtype            # diffusers 0.42 renamed torch_dtype to dtype (as the engine uses)
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **kwargs)
    try:
        return prepare(pipe, device, dtype, cpu_offload)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Sizes and starting noise
# ----------------------------------------------------------------------------------------------

def default_size(pipe) -> tuple[int, int]:
    """(height, width) the model was trained at: the denoiser's `sample_size` (latent side) × the VAE's scale,
    or, for FLUX, whose transformer has no sample size, the pipeline's `default_sample_size` (128: 1024 px)."""
    model = getattr(pipe, denoiser(pipe))
    side = getattr(model.config, "sample_size", None) or pipe.default_sample_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    return side * pipe.vae_scale_factor, side * pipe.vae_scale_factor


def latent_shape(pipe, height: int, width: int) -> tuple[int, ...]:
    """The shape of the starting noise for one image, in the family's own layout:
    SD / SDXL / SD3 (1, C, h/f, w/f) with C the denoiser's in_channels and f the VAE scale factor;
    FLUX (1, (h/2f)·(w/2f), 4C) with C = in_channels / 4, as `FluxPipeline.prepare_latents` packs them.
    ValueError when a side is not a multiple of f (FLUX: 2f)."""
    family, f = family_of(pipe), pipe.vae_scale_factor
    step = 2 * f if family.packed else f
    for name, side in (("height", height), ("width", width)):
        if side < step or side % step:
            raise ValueError(f"The {name} must be a positive multiple of {step} for {family.title}; got {side}.")
    channels = getattr(pipe, family.denoiser).config.in_channels
    if family.packed:
        return 1, (height // step) * (width // step), channels
    return 1, channels, height // f, width // f


def latents_for(pipe, seed: int, height: int, width: int) -> torch.Tensor:
    """The starting noise for `seed` (float32, CPU, drawn from torch.Generator('cpu').manual_seed(seed)),
    laid out as the family's pipeline takes `latents=`. It is the very tensor the pipeline itself draws from
    `generator=torch.Generator('cpu').manual_seed(seed)` in float32, so every method starts from the same noise.
    """
    shape = latent_shape(pipe, height, width)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    if not family_of(pipe).packed:
        return torch.randn(shape, generator=generator)
    # FLUX: draw (1, C, h/f, w/f) exactly as FluxPipeline.prepare_latents does, then pack 2×2 patches.
    from diffusers import FluxPipeline
    f, c = pipe.vae_scale_factor, shape[2] // 4
    h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
    noise = torch.randn((1, c, h, w), generator=generator)
    return FluxPipeline._pack_latents(noise, 1, c, h, w)                  # (1, h/2 · w/2, 4C)


# ----------------------------------------------------------------------------------------------
# The family of a LoRA file
# ----------------------------------------------------------------------------------------------

# Top-level modules of the SD3 / FLUX transformers; a 'transformer.' key outside them is no LoRA of theirs.
TRANSFORMER_ROOTS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                     "proj_out", "norm_out", "time_text_embed", "pos_embed")
FLUX_BLOCKS = 19                     # FLUX.1 has 19 double blocks; SD3 / SD3.5 have 24 / 38 joint blocks
_FLUX_MARKS = re.compile(r"^lora_unet_(double|single)_blocks_|^lora_transformer_|single_transformer_blocks|"
                         r"x_embedder|guidance_embedder|^(diffusion_model\.)?(double|single)_blocks\.")
_SD3_MARKS = re.compile(r"^lora_unet_joint_blocks_|^transformer\.transformer_blocks\.\d+\.attn2\.|"
                        r"^transformer\.pos_embed")
_SDXL_MARKS = re.compile(r"^lora_te[12]_|^text_encoder_2\.|add_embedding|"
                         r"transformer_blocks[._][1-9]")           # SD 1.x/2.x UNets have one layer per transformer
_SD_MARKS = re.compile(r"^lora_te_|down_blocks[._]0[._]attentions")  # SDXL's first down block has no attention
_CROSS_ATTN = re.compile(r"attn2[._]to_[kv].*(lora_A|lora[._]down|lora_down)")
_UNET_KEYS = re.compile(r"^(unet\.|lora_unet_|text_encoder\.|text_encoder_2\.|lora_te[12]?_)")


def lora_families(state: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """Every family whose LoRA files the keys of `state` (a raw .safetensors dict) can be, most likely first;
    () when they fit none. Several when the names do not settle it: a UNet-only file of tiny or unusual
    widths fits SD and SDXL, a transformer file touching only the first 19 joint blocks fits FLUX and SD3.

    Evidence, strongest first: FLUX (kohya `lora_unet_double_blocks_`/`single_blocks_`, diffusers
    `single_transformer_blocks`, `x_embedder`), SD3 (`joint_blocks`, SD3.5's `attn2` in joint blocks, a joint
    block index ≥ 19), SDXL (`lora_te1_`/`lora_te2_`, `text_encoder_2.`, `add_embedding`, a second transformer
    layer, a 2048-wide cross-attention), SD 1.x/2.x (`lora_te_`, attention in the first down block, a 768- or
    1024-wide cross-attention)."""
    keys = list(state)
    if any(_FLUX_MARKS.search(k) for k in keys):
        return ("flux",)
    transformer = [k[len("transformer."):] for k in keys if k.startswith("transformer.")]
    if any(_SD3_MARKS.search(k) for k in keys):
        return ("sd3",) if all(_transformer_key(k) for k in transformer) else ()
    if transformer:
        if len(transformer) != len(keys) - sum(k.startswith(("text_encoder.", "text_encoder_2.")) for k in keys):
            return ()                                              # a transformer AND something else: no family
        if not all(_transformer_key(k) for k in transformer):
            return ()
        blocks = [int(m.group(1)) for k in transformer if (m := re.match(r"transformer_blocks\.(\d+)\.", k))]
        if blocks and max(blocks) >= FLUX_BLOCKS:
            return ("sd3",)
        if any(k.startswith("text_encoder_2.") for k in keys):
            return ("sd3",)                                        # FLUX's LoRAs never touch its T5
        return ("flux", "sd3")
    if not all(_UNET_KEYS.search(k) for k in keys):
        return ()
    widths = {state[k].shape[1] for k in keys if _CROSS_ATTN.search(k) and state[k].dim() == 2}
    if any(_SDXL_MARKS.search(k) for k in keys) or 2048 in widths:
        return ("sdxl",)
    if any(_SD_MARKS.search(k) for k in keys) or widths & {768, 1024}:
        return ("sd",)
    return ("sd", "sdxl")


def _transformer_key(key: str) -> bool:
    return key.split(".")[0] in TRANSFORMER_ROOTS


def family_of_lora(state: Mapping[str, torch.Tensor], prefer: Family | str | None = None) -> Family | None:
    """The family of a LoRA from its raw keys (see `lora_families`): `prefer` (typically the loaded model's
    family) when the keys fit it among others, else the most likely one; None when they fit no family."""
    fits = lora_families(state)
    prefer = prefer.name if isinstance(prefer, Family) else prefer
    if not fits:
        return None
    return FAMILIES[prefer if prefer in fits else fits[0]]


def default_guidance(model) -> float:
    """The guidance scale to start from for a model folder or hub id: the embedded world's measured best
    (defaults.DEFAULT_GUIDANCE), else the `guidance_scale` default of its pipeline class's own `__call__`
    (Stable Diffusion 7.5, SDXL 5.0, SD3 7.0, FLUX 3.5), read from model_index.json without loading weights."""
    import inspect

    import diffusers

    from mole_core.defaults import DEFAULT_GUIDANCE, DEFAULT_MODEL
    try:
        if Path(str(model)).resolve() == Path(DEFAULT_MODEL).resolve():
            return DEFAULT_GUIDANCE
        name = diffusers.DiffusionPipeline.load_config(str(model), local_files_only=True)["_class_name"]
        default = inspect.signature(getattr(diffusers, name).__call__).parameters["guidance_scale"].default
        return float(default)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return DEFAULT_GUIDANCE
