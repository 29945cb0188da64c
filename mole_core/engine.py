"""The engine: one loaded pipeline, a LoRA bank, and every way of combining LoRAs side by side.

`Engine` is what the app, the CLI and the evaluation talk to. It owns one Stable Diffusion pipeline
(loaded lazily) and a `Bank`, and renders the same prompt and seed with

    "mole"          the LoRAs as gated experts (trained gates from a Mixture, or untrained = equal weights)
    "linear"        W + Σ w_i s_i B_i A_i, weights normalised to sum 1 unless normalize=False
    "svd"           the rank-r truncated SVD of that same ΔW
    "base"          the model without any LoRA
    "single:<key>"  one LoRA of the bank alone, at its own scale

Contract (what the callers rely on):
- Same seed -> same starting latents for every method (drawn with a seeded CPU generator and passed
  as `latents=`), and the same image on every run.
- Every call leaves the shared pipeline as it found it: MoLE settings are context managers of the
  attachment, merges go through `merged_weights`, which restores the pristine weights; nothing is added
  into a weight twice. One MoLE attachment is kept for the current keys, granularity and gate kind and re-attached
  only when they change; while it stays attached, the other methods run with every expert masked off,
  which is the base model exactly (the wrapped layers then return their base layer's output untouched).
- A `threading.Lock` serialises the calls that use the model, so two users of one engine take turns.

References: MoLE (Wu et al., ICLR 2024, arXiv 2404.13628); diffusers `StableDiffusionPipeline.__call__`
(the `latents=` convention for reproducible comparisons).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from torch import nn

from mole_core.atomic import atomic_path, write_csv
from mole_core.attach import GATE_COLUMNS, MoleConfig, attach
from mole_core.bank import Bank, BankEntry
from mole_core.lora import Lora, pipeline_components, save_lora, validate_lora
from mole_core.merge import merge_loras, merged_weights
from mole_core.mixture import Mixture, apply_mixture, load_mixture, save_mixture
from mole_core.train import DiffusionTask, TrainConfig, TrainResult, examples_from_bank, train_gates

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = str(PACKAGE_ROOT / "assets" / "pixel-world")   # the embedded default pipeline
DEFAULT_BANK = str(PACKAGE_ROOT / "lora_bank")                  # its LoRA bank

METHODS = ("mole", "linear", "svd", "base")                     # plus "single:<bank key>"
MAX_STEPS = 200                                                 # denoising steps accepted
# classifier-free guidance by default, measured on the embedded world (LoRA found in 120 images, alone with
# its trigger): night 0.98 at 2, 0.95 at 2.5, 0.90 at 3; checker 0.99 at 2, 0.80 at 4; face 0.91 at 2,
# 0.93 at 3, 0.89 at 4, 0.84 at 6. SD 1.5 checkpoints usually want about 7.5.
DEFAULT_GUIDANCE = 2.5
MAX_GUIDANCE = 30.0                                             # classifier-free guidance accepted
MAX_SIDE = 2048                                                 # pixels, height and width
MAX_TRAIN_STEPS = 100_000                                       # gate-training steps accepted


@dataclass
class GenerateRequest:
    """What to draw; shared by every method of a comparison."""
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20            # denoising steps
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance scale (<= 1 turns guidance off)
    height: int | None = None  # None -> the model's default resolution
    width: int | None = None


@dataclass
class Result:
    """One rendered image of a comparison."""
    method: str                 # "mole" | "linear" | "svd" | "base" | "single:<bank key>"
    image: PIL.Image.Image
    seconds: float              # wall time of this generation (merge / gate loading included)
    gates: list[dict] | None    # mole only: tidy rows {"group", "step", "sample", "expert", "weight"}
    label: str                  # human label, e.g. "MoLE (block, 3 experts)" / "SVD r=8"


class Engine:
    """A pipeline + a LoRA bank; generates, compares, trains gates and exports merges.

    model: a diffusers folder or hub id (loaded lazily with `StableDiffusionPipeline.from_pretrained`),
    or an already loaded `StableDiffusionPipeline`. bank: a lora_bank folder.
    device: None -> "cuda" when available, else "cpu". dtype: None -> float32 (the gates train in it and
    the equivalences between methods hold to float rounding); torch.float16 is faster on a GPU.
    Expert names are bank keys everywhere (masks, strengths, weights, gate rows, mixtures).
    """

    def __init__(self, model=DEFAULT_MODEL, bank: str | Path = DEFAULT_BANK, device: str | None = None,
                 dtype: torch.dtype | None = None):
        self.model_id = str(model) if isinstance(model, (str, Path)) else None
        self.bank = Bank(bank)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or torch.float32
        self._pipe = None if self.model_id else self._prepare(model)
        self._handle = None                      # the MoLE attachment, or None
        self._handle_keys: tuple[str, ...] = ()  # ... its experts (bank keys, in order)
        self._mole = MoleConfig()                # ... and its MoleConfig (granularity, gate kind)
        self._fits: set[str] = set()             # bank keys already validated against the model
        self._checked_mixtures: set[tuple] = set()
        self._lock = threading.Lock()            # one model call at a time
        self._load_lock = threading.Lock()       # one lazy load

    # ---- the pipeline ---------------------------------------------------------------------------
    @property
    def pipe(self):
        """The shared StableDiffusionPipeline, loaded on first use."""
        with self._load_lock:
            if self._pipe is None:
                from diffusers import StableDiffusionPipeline
                pipe = StableDiffusionPipeline.from_pretrained(self.model_id, dtype=self.dtype)
                self._pipe = self._prepare(pipe)
        return self._pipe

    def _prepare(self, pipe):
        pipe.to(self.device)
        if pipe.unet.dtype != self.dtype:
            pipe.to(dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        for model in (pipe.unet, pipe.text_encoder, pipe.vae):
            model.requires_grad_(False).eval()
        return pipe

    @property
    def components(self) -> nn.ModuleDict:
        """The pipeline's models addressed the way LoRA keys are written ("unet.<path>", ...)."""
        return pipeline_components(self.pipe)

    @property
    def model_name(self) -> str:
        """The model's identity recorded in mixtures: the folder name or hub id."""
        return Path(self.model_id).name if self.model_id else type(self._pipe).__name__

    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at."""
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    # ---- checks ---------------------------------------------------------------------------------
    def check_request(self, keys, request: GenerateRequest, methods=None) -> list[str]:
        """Raise ValueError with a human sentence for bad input; return warnings (prompt cut off).

        keys may be empty only when `methods` is given and needs no selection ("base", "single:<key>").
        """
        keys, methods = list(keys or []), list(methods or [])
        # 1. methods and LoRAs
        for method in methods:
            self._check_method(method)
        singles = [m.split(":", 1)[1] for m in methods if m.startswith("single:")]
        if not keys and (not methods or any(m in ("mole", "linear", "svd") for m in methods)):
            raise ValueError("No LoRA is selected: choose at least one LoRA of the bank.")
        if len(set(keys)) != len(keys):
            raise ValueError(f"A LoRA is selected twice: {', '.join(keys)}.")
        self._check_keys(list(dict.fromkeys(keys + singles)))
        # 2. numbers
        if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
            raise ValueError(f"Steps must be a whole number between 1 and {MAX_STEPS}; got {request.steps!r}.")
        if not 0.0 <= float(request.guidance) <= MAX_GUIDANCE:
            raise ValueError(f"Guidance must be between 0 and {MAX_GUIDANCE:g}; got {request.guidance}.")
        for side_name, side in (("Height", request.height), ("Width", request.width)):
            if side is not None and (not isinstance(side, int) or not 8 <= side <= MAX_SIDE or side % 8):
                raise ValueError(f"{side_name} must be a multiple of 8 between 8 and {MAX_SIDE}; got {side!r}.")
        if not isinstance(request.seed, int) or request.seed < 0:
            raise ValueError(f"The seed must be a non-negative whole number; got {request.seed!r}.")
        # 3. prompts longer than the text encoder reads
        warnings = []
        for what, text in (("prompt", request.prompt), ("negative prompt", request.negative)):
            cut = self.truncated_words(text)
            if cut:
                limit = self.pipe.tokenizer.model_max_length
                warnings.append(f"The {what} is longer than the text encoder reads ({limit} tokens with start "
                                f"and end); these words are cut: \"{cut}\".")
        return warnings

    def truncated_words(self, text: str) -> str:
        """The part of `text` the text encoder never sees ("" when it all fits)."""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(text or "", truncation=False, add_special_tokens=False)["input_ids"]
        room = tokenizer.model_max_length - 2   # start and end tokens
        return tokenizer.decode(ids[room:]).strip() if len(ids) > room else ""

    @staticmethod
    def _check_method(method: str) -> None:
        if method in METHODS or (method.startswith("single:") and len(method) > len("single:")):
            return
        raise ValueError(f"Unknown method {method!r}: expected one of {', '.join(METHODS)} or single:<bank key>.")

    def _check_keys(self, keys) -> None:
        """Every key is a healthy bank entry whose LoRA fits the model."""
        known = {entry.key: entry for entry in self.bank.entries}
        for key in keys:
            if key not in known:
                raise ValueError(f"Unknown LoRA {key!r}: the bank {self.bank.folder} holds "
                                 f"{', '.join(sorted(known)) or 'no LoRAs'}.")
            if known[key].error:
                raise ValueError(f"The LoRA {key!r} of the bank cannot be used: {known[key].error}")
            if key not in self._fits:   # once per key: neither the file nor the model changes
                validate_lora(self.bank.load(key), self.components)
                self._fits.add(key)

    def _check_mixture(self, keys, mixture: Mixture) -> None:
        """The mixture was trained for exactly these LoRA files (names, order, sha256) on this model."""
        if list(mixture.names) != list(keys):
            raise ValueError(f"The mixture was trained for the LoRAs {', '.join(mixture.names)}, "
                             f"but the selection is {', '.join(keys) or 'empty'}.")
        files = [(k, self.bank.get(k).lora_path) for k in keys]
        stamp = (tuple(mixture.sha256s), tuple((str(p), os.stat(p).st_mtime_ns) for _, p in files))
        if stamp not in self._checked_mixtures:   # hashing big LoRA files once, not on every toggle
            mixture.check(files, self.model_name)
            self._checked_mixtures.add(stamp)

    def _weights(self, keys, weights) -> list[float]:
        """Linear / SVD weights in key order (default: each entry's default weight)."""
        weights = dict(weights or {})
        unknown = set(weights) - set(keys)
        if unknown:
            raise ValueError(f"Weights name {', '.join(sorted(unknown))}, which is not in the selection "
                             f"{', '.join(keys)}.")
        return [float(weights.get(k, self.bank.get(k).default_weight)) for k in keys]

    # ---- MoLE attachment and merges -------------------------------------------------------------
    def _attached(self, keys, mole: MoleConfig):
        """The MoLE attachment for these keys and config, re-attaching only when they change."""
        keys = tuple(keys)
        layout = lambda c: (c.granularity, c.gate)          # what decides the gates' shapes
        if self._handle is not None and (keys, layout(mole)) != (self._handle_keys, layout(self._mole)):
            self._detach()
        if self._handle is None:
            self._handle = attach(self.components, [self.bank.load(k) for k in keys], mole)
            self._handle_keys, self._mole = keys, mole
        return self._handle

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.detach()
        self._handle, self._handle_keys = None, ()

    def _experts_off(self):
        """While MoLE stays attached: every expert off, which is the base model exactly."""
        if self._handle is None:
            return contextlib.nullcontext()
        return self._handle.settings(mask={k: False for k in self._handle_keys})

    def _merged(self, lora: Lora):
        """Context: W + ΔW of `lora` on the pristine weights, restored bit-identically on exit."""
        return merged_weights(self.components, lora)

    # ---- gate training --------------------------------------------------------------------------
    def train(self, keys, mole: MoleConfig, train: TrainConfig, on_step=None, should_stop=None,
              out_path=None) -> Mixture:
        """Train the gates of a MoLE over `keys` on the bank's example images; return the Mixture.

        The examples are resized to the model's default resolution (TrainConfig.resolution is not used).
        on_step(step, {"loss", "task", "balance"}, mean_gates) after each step; should_stop() between
        steps. out_path: also write the mixture file there (atomically); the Mixture's path is set to it.
        """
        keys = list(keys)
        with self._lock:
            # 1. check inputs
            if len(keys) < 2 or len(set(keys)) != len(keys):
                raise ValueError(f"Gate training needs at least two different LoRAs; got {', '.join(keys) or 'none'}.")
            if not isinstance(train.steps, int) or not 1 <= train.steps <= MAX_TRAIN_STEPS:
                raise ValueError(f"Training steps must be a whole number between 1 and {MAX_TRAIN_STEPS}; "
                                 f"got {train.steps!r}.")
            if not train.lr > 0:
                raise ValueError(f"The learning rate must be positive; got {train.lr}.")
            self._check_keys(keys)
            # 2. fresh, untrained gates and the training data
            self._detach()
            handle = attach(self.components, [self.bank.load(k) for k in keys], mole)
            self._handle, self._handle_keys, self._mole = handle, tuple(keys), mole
            config = dataclasses.replace(train, resolution=self.default_size()[0])
            task = DiffusionTask(self.pipe, examples_from_bank(self.bank, keys), config.resolution)
            # 3. train (the gates start at zero logits: equal weights)
            try:
                result = train_gates(handle, task, config, on_step=on_step, should_stop=should_stop)
            except BaseException:
                self._detach()   # half-trained gates must not leak into the next untrained MoLE call
                raise
            # 4. the mixture: gates + names and hashes of the LoRA files
            return self._save_mixture(handle, keys, mole, config, result, out_path)

    def _save_mixture(self, handle, keys, mole: MoleConfig, config: TrainConfig, result: TrainResult,
                      out_path) -> Mixture:
        files = [(k, self.bank.get(k).lora_path) for k in keys]
        if out_path is not None:
            save_mixture(out_path, handle, files, [mole, config], result, self.model_name)
            return load_mixture(out_path)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_mixture(Path(tmp) / "mixture.safetensors", handle, files, [mole, config], result,
                                self.model_name)
            return dataclasses.replace(load_mixture(path), path=None)

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, keys, method: str, request: GenerateRequest, mixture: Mixture | None = None,
                 mask=None, strengths=None, weights=None, rank=None, normalize: bool = True) -> Result:
        """Render `request` with one method (see the module docstring)."""
        return self.compare(keys, [method], request, mixture, mask, strengths, weights, rank, normalize)[0]

    def compare(self, keys, methods, request: GenerateRequest, mixture: Mixture | None = None,
                mask=None, strengths=None, weights=None, rank=None, normalize: bool = True) -> list[Result]:
        """Render `request` with each method, all from the same starting latents.

        keys: bank keys (empty + a mixture: the mixture's LoRAs). mask: key -> bool (False = expert off,
        renormalising the rest). strengths: key -> float (MoLE). weights: key -> float for linear / svd
        (default: each entry's default weight), normalised to sum 1 unless normalize=False.
        rank: the SVD rank (default: the largest rank of the LoRAs). mixture: trained gates, or None for
        untrained gates (equal weights).
        """
        keys = list(mixture.names) if mixture is not None and not keys else list(keys or [])
        methods = list(methods)
        with self._lock:
            # 1. check inputs
            if not methods:
                raise ValueError("No method is chosen: pick at least one of mole, linear, svd, base, single.")
            self.check_request(keys, request, methods)
            if mixture is not None:
                self._check_mixture(keys, mixture)
            mask = self._mask(keys, mask)
            if rank is not None and (not isinstance(rank, int) or rank < 1):
                raise ValueError(f"The SVD rank must be a whole number of at least 1; got {rank!r}.")
            # 2. the same starting noise for every method, then each method in turn
            latents = self._latents(request)
            return [self._run(keys, method, request, latents, mixture, mask, strengths, weights, rank, normalize)
                    for method in methods]

    def _latents(self, request: GenerateRequest) -> torch.Tensor:
        """Starting noise for this seed and size (float32, CPU): the same for every method and run."""
        height, width = self._size(request)
        scale = self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, height // scale, width // scale)
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(request.seed))

    def _size(self, request: GenerateRequest) -> tuple[int, int]:
        default_h, default_w = self.default_size()
        return request.height or default_h, request.width or default_w

    @staticmethod
    def _mask(keys, mask) -> dict[str, bool] | None:
        if mask is None:
            return None
        unknown = set(mask) - set(keys)
        if unknown:
            raise ValueError(f"The mask names {', '.join(sorted(unknown))}, which is not in the selection "
                             f"{', '.join(keys)}.")
        return {k: bool(mask.get(k, True)) for k in keys}

    def _run(self, keys, method, request, latents, mixture, mask, strengths, weights, rank, normalize) -> Result:
        """One method, timed; the pipeline is as before when it returns."""
        start = time.perf_counter()
        gates = None
        if method == "mole":
            mole = mixture.mole_config() if mixture is not None else \
                (self._mole if self._handle_keys == tuple(keys) else MoleConfig())
            handle = self._attached(keys, mole)
            if mixture is not None:
                apply_mixture(handle, mixture)
            else:
                handle.reset_gates()          # untrained: zero logits, equal weights
            with handle.settings(mask=mask, strengths=strengths), handle.recording() as rec:
                image = self._call_pipe(request, latents)
            gates = rec.table()
            label = self._mole_label(keys, mole, mixture, mask)
        elif method == "base":
            with self._experts_off():
                image = self._call_pipe(request, latents)
            label = "Base model"
        elif method.startswith("single:"):
            key = method.split(":", 1)[1]
            with self._experts_off(), self._merged(self.bank.load(key)):
                image = self._call_pipe(request, latents)
            label = f"Single: {self.bank.get(key).name}"
        else:  # linear | svd
            loras = [self.bank.load(k) for k in keys]
            merged = merge_loras(loras, self._weights(keys, weights), method=method, rank=rank,
                                 normalize=normalize)
            with self._experts_off(), self._merged(merged):
                image = self._call_pipe(request, latents)
            r = max(w.rank for w in merged.modules.values())
            label = "Linear merge" if method == "linear" else f"SVD r={r}"
        return Result(method, image, time.perf_counter() - start, gates, label)

    @staticmethod
    def _mole_label(keys, mole: MoleConfig, mixture, mask) -> str:
        on = sum(1 for k in keys if (mask or {}).get(k, True))
        experts = f"{len(keys)} experts" if on == len(keys) else f"{on} of {len(keys)} experts on"
        return f"MoLE ({mole.describe}, {experts}{'' if mixture is not None else ', untrained'})"

    def _call_pipe(self, request: GenerateRequest, latents: torch.Tensor) -> PIL.Image.Image:
        height, width = self._size(request)
        with torch.no_grad():
            out = self.pipe(prompt=request.prompt, negative_prompt=request.negative or None,
                            height=height, width=width, num_inference_steps=request.steps,
                            guidance_scale=float(request.guidance), latents=latents.to(self.device, self.dtype),
                            # only stochastic schedulers draw from it; seeded so they repeat too
                            generator=torch.Generator("cpu").manual_seed(request.seed))
        return out.images[0]

    # ---- bank, export, snippet ------------------------------------------------------------------
    def add_to_bank(self, src_path, manifest: dict, images=(), key: str | None = None) -> BankEntry:
        """Validate a LoRA file against the model and add it to the bank (see `Bank.add`)."""
        with self._lock:
            entry = self.bank.add(src_path, manifest, images, self.components, key=key)
            self._fits.discard(entry.key)
            return entry

    def export(self, keys, method: str, out_path, weights=None, rank=None, format: str = "diffusers",
               normalize: bool = True) -> Path:
        """Write the linear or SVD merge of `keys` as one LoRA file (diffusers or kohya keys), atomically."""
        keys = list(keys or [])
        if method not in ("linear", "svd"):
            raise ValueError(f"Only the linear and svd merges can be exported as a LoRA; got {method!r}.")
        with self._lock:
            if not keys:
                raise ValueError("No LoRA is selected: choose at least one LoRA of the bank.")
            self._check_keys(keys)
            merged = merge_loras([self.bank.load(k) for k in keys], self._weights(keys, weights), method=method,
                                 rank=rank, normalize=normalize, name=f"{method}:{'+'.join(keys)}")
            save_lora(merged, out_path, format=format)
        return Path(out_path)

    def snippet(self, keys, methods, request: GenerateRequest, mixture_path=None, mask=None,
                strengths=None, weights=None, rank=None, normalize: bool = True) -> str:
        """Python source that reproduces this comparison with mole_core and saves the images."""
        model = self.model_id or "PATH/TO/DIFFUSERS/MODEL"
        mixture = f"load_mixture({str(mixture_path)!r})" if mixture_path else "None"
        return "\n".join([
            "from mole_core.engine import Engine, GenerateRequest",
            "from mole_core.mixture import load_mixture",
            "",
            f"engine = Engine({model!r}, {str(self.bank.folder)!r})",
            f"request = {request!r}",
            f"mixture = {mixture}",
            f"results = engine.compare({list(keys)!r}, {list(methods)!r}, request, mixture=mixture,",
            f"                         mask={mask!r}, strengths={strengths!r}, weights={weights!r},",
            f"                         rank={rank!r}, normalize={normalize!r})",
            "for result in results:",
            "    result.image.save(result.method.replace(':', '_') + '.png')",
            "    print(f'{result.label}: {result.seconds:.2f} s')",
        ]) + "\n"


def write_gates_csv(rows: list[dict], path) -> Path:
    """Write tidy gate rows (group, step, sample, expert, weight) as CSV, atomically."""
    return write_csv(path, rows, GATE_COLUMNS)


def save_image(image: PIL.Image.Image, path) -> Path:
    """Save an image (format from the suffix), atomically."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        image.save(tmp)
    return Path(path)
