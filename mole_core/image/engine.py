"""The engine: one loaded pipeline, a LoRA bank, and every way of combining LoRAs side by side.

`Engine` is what the app, the CLI and the evaluation talk to. It owns one diffusers pipeline (SD 1.x, SDXL, SD3 or FLUX)
(loaded lazily) and a `Bank`, and renders a `GenerateRequest` (prompt, seed, steps, guidance) with a
`Mix` (mole_core.mix: the method and all its parameters, passed whole):

    engine.generate(Mix("svd", ("face", "ring"), rank=8), GenerateRequest("a zwx on the left", seed=1))
    engine.compare([Mix("mole", keys, mixture=m), Mix("linear", keys)], request)   # same latents for all

A method is one `_run_<method>` function and one entry in `Engine._RUNNERS` (mix.METHODS names them).

Contract (what the callers rely on):
- Same seed -> same starting latents for every method (drawn with a seeded CPU generator and passed
  as `latents=`), and the same image on every run.
- Every call leaves the shared pipeline as it found it: MoLE settings are context managers of the
  attachment, merges go through `merged_weights`, which restores the pristine weights; nothing is added
  into a weight twice. One MoLE attachment is kept, keyed by exactly what the Mix asks for (keys,
  granularity, gate kind), and re-attached when another Mix asks for something else; while it stays
  attached, the other methods run with every expert masked off, which is the base model exactly.
- A `threading.Lock` serialises every call that uses the model or the engine's caches, so two users of
  one engine take turns. Long calls (training) check `should_stop` between steps.
- A non-finite image (NaN/Inf from a LoRA or gates) is an error, never a black picture.

References: MoLE (Wu et al., ICLR 2024, arXiv 2404.13628); diffusers `StableDiffusionPipeline.__call__`
(the `latents=` convention for reproducible comparisons).
"""
from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn

from mole_core.atomic import atomic_path
from mole_core.attach import KeptAttachment, MoleConfig, attach, file_stamp, write_gates_csv
from mole_core.bank import usable_entry
from mole_core.image.bank import Bank, BankEntry
from mole_core.locks import FairLock
from mole_core.image.costs import CALIBRATION_STEPS, Costs, expert_factor, image_kind, train_kind
from mole_core.defaults import (DEFAULT_BANK, DEFAULT_DENOISE_STEPS, DEFAULT_GUIDANCE, DEFAULT_MODEL,
                                Limits)
from mole_core.image.families import components as components_of
from mole_core.image.families import (default_size, family_of, latent_shape, latents_for, load_pipeline,
                                      pipeline_encoders)
from mole_core.lora import Lora
from mole_core.image.lora_files import save_lora, validate_lora
from mole_core.graphs import Graphs, graphs_default
from mole_core.merge import merge_loras, merged_weights
from mole_core.mix import MERGES, METHODS, Mix, check_training, mole_config_for
from mole_core.mixture import Mixture, apply_mixture, load_mixture, save_mixture
from mole_core.image.regional import Pass, conditioning, regional
from mole_core.regions import RegionMaps, parse_regions, region_phrases, stack
from mole_core.routing import route_problem
from mole_core.train import TrainConfig, TrainResult, train_gates
from mole_core.image.task import DiffusionTask, examples_from_bank

FIXED_LOSS_FROM = 20      # trainings of this many steps or more report the task loss on one fixed batch

# The dtypes a model may run in, by the names the CLI and the app take (--dtype).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["DEFAULT_BANK", "DTYPES", "DEFAULT_GUIDANCE", "DEFAULT_MODEL", "Engine", "GenerateRequest", "METHODS", "Mix",
           "Result", "save_image", "write_gates_csv"]


@dataclass
class GenerateRequest:
    """What to draw; shared by every method of a comparison."""
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = DEFAULT_DENOISE_STEPS  # denoising steps
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance scale (<= 1 turns guidance off)
    height: int | None = None  # None -> the model's default resolution
    width: int | None = None
    true_cfg: float = 1.0      # FLUX only: true classifier-free guidance on the negative prompt when > 1 (two
                               # transformer calls per step); FLUX's `guidance` is its distilled guidance embedding


@dataclass
class Result:
    """One rendered image of a comparison."""
    method: str                 # the Mix's method
    image: PIL.Image.Image
    seconds: float              # wall time of this generation (merge / gate loading included)
    gates: list[dict] | None    # mole only: tidy rows {"group", "step", "sample", "expert", "weight"}
    label: str                  # human label, e.g. "MoLE (block, 3 experts)" / "SVD r=8"
    mix: Mix | None = None      # what was rendered
    warnings: list[str] = field(default_factory=list)   # what the user should know (a prompt cut short, …)


class Engine:
    """A pipeline + a LoRA bank; generates, compares, trains gates and exports merges.

    model: a diffusers folder or hub id (loaded lazily with `StableDiffusionPipeline.from_pretrained`),
    or an already loaded `StableDiffusionPipeline`. bank: a lora_bank folder (or a `Bank`).
    device: None -> "cuda" when available, else "cpu". dtype: None -> float32 (the equivalences between
    methods hold to float rounding); torch.float16 / torch.bfloat16 halve the memory and are faster on a GPU
    (the gates stay float32 whatever the model's dtype). cpu_offload: diffusers' `enable_model_cpu_offload`
    (each model on the GPU only while it runs), for models bigger than the GPU; needs a CUDA GPU.
    limits: the largest counts a request may ask for (mole_core.defaults.Limits; the CLI uses the local ones).
    graphs: run the denoiser's steps under CUDA graphs (mole_core.graphs; None: on a CUDA device); when capture
    fails, one warning says so (`engine.graphs.failure`) and the steps run eagerly.
    Expert names are bank keys everywhere (masks, strengths, weights, gate rows, mixtures). Every verb takes
    an optional `bank=` (a session's own bank, see `Bank.overlay`); the default is the engine's bank.
    """

    def __init__(self, model=DEFAULT_MODEL, bank: str | Path | Bank = DEFAULT_BANK, device: str | None = None,
                 dtype: torch.dtype | None = None, limits: Limits | None = None, cpu_offload: bool = False,
                 graphs: bool | None = None):
        self.model_id = str(model) if isinstance(model, (str, Path)) else None
        self._family = None                      # mole_core.image.families.Family (the `family` property loads it)
        self.bank = bank if isinstance(bank, Bank) else Bank(bank)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or torch.float32
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
        self.cpu_offload = bool(cpu_offload)
        if self.cpu_offload and (torch.device(self.device).type != "cuda" or not torch.cuda.is_available()):
            raise ValueError(f"CPU offload (--cpu-offload) moves each model to a CUDA GPU while it runs; there is "
                             f"none here (device {self.device}). Leave it off on this machine.")
        self.limits = limits or Limits()
        self.graphs = Graphs(graphs_default(self.device) if graphs is None else graphs)   # CUDA graphs of each step
        self._pipe = None if self.model_id else self._prepare(model)
        self._kept = KeptAttachment()            # the MoLE attachment kept between calls
        self._fits: set[str] = set()             # LoRA files (path, mtime) already validated against the model
        self._merges: dict[tuple, Lora] = {}       # the last merges computed (Engine.merge), by mix and file state
        self._lock = FairLock()                  # one model call at a time, in arrival order
        self.costs = Costs()                     # seconds per denoising / training step, timed on this machine
        self._load_lock = threading.Lock()       # one lazy load

    # ---- the pipeline ---------------------------------------------------------------------------
    @property
    def pipe(self):
        """The shared pipeline (any supported family: mole_core.image.families), loaded on first use."""
        with self._load_lock:
            if self._pipe is None:
                self._pipe = self._prepare(self.model_id)
        return self._pipe

    @property
    def family(self):
        """The pipeline's mole_core.image.families.Family (loads the pipeline on first use)."""
        if self._family is None:
            self.pipe
        return self._family

    def _prepare(self, model):
        pipe = load_pipeline(model, self.device, self.dtype, self.cpu_offload)
        self._family = family_of(pipe)
        return pipe

    @property
    def components(self) -> nn.ModuleDict:
        """The pipeline's models addressed the way LoRA keys are written ("unet.<path>", "transformer.<path>", ...)."""
        return components_of(self.pipe)

    @property
    def model_name(self) -> str:
        """The model's identity recorded in mixtures and manifests: the folder name or hub id."""
        return Path(self.model_id).name if self.model_id else type(self._pipe).__name__

    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at."""
        return default_size(self.pipe)

    def expected_seconds(self, train_steps: int = 0, images: int = 0, denoise_steps: int = DEFAULT_DENOISE_STEPS,
                         gate: str = "sample", batch_size: int = 4, experts: int = 2, mixes=()) -> float:
        """What a job will take here: one image per Mix of `mixes` at its method's cost, `images` more at
        the base model's, `train_steps` of gate training over `experts` LoRAs (mole_core.costs: timed on this
        machine once `calibrate` or a real run has, reference timings before; `costs.source` says which)."""
        return self.costs.seconds(mixes, denoise_steps, train_steps, gate, experts, batch_size, images)

    def calibrate(self, keys=None) -> float:
        """Time every kind of image and gate-training step here, over two bank LoRAs (`keys` or the bank's
        first two), and make those the costs (`costs.calibrated`); -> the seconds it took (a few)."""
        start = time.perf_counter()
        keys = list(keys or [e.key for e in self.bank.entries if not e.error][:2])
        steps = CALIBRATION_STEPS
        request = GenerateRequest(prompt=" and ".join(f"a {self.bank.get(k).trigger[0]}" for k in keys), seed=0,
                                  steps=steps)
        mixes = [Mix("base")] + ([Mix("linear", keys), Mix("switch", keys, switch_every=1),
                                  Mix("mole", keys, gate="sample"), Mix("mole", keys, gate="routed")]
                                 if len(keys) >= 2 else [])
        measured = {}
        for mix in mixes:
            self.generate(mix, dataclasses.replace(request, steps=1))       # the first call of a kind warms up
            factor = expert_factor(len(keys)) if mix.method == "mole" else 1
            measured[image_kind(mix)] = self.generate(mix, request).seconds / steps / factor
        for gate in (("sample", "routed") if len(keys) >= 2 else ()):
            stamps = [time.perf_counter()]
            self.train(keys, mole_config_for("block", gate), TrainConfig(steps=steps + 1, batch_size=4, seed=0),
                       on_step=lambda *_: stamps.append(time.perf_counter()))
            per_step = [b - a for a, b in zip(stamps[1:], stamps[2:])]     # the first step warms up
            measured[train_kind(gate)] = float(np.median(per_step)) / expert_factor(len(keys))
        self.costs.calibrated(measured)
        return time.perf_counter() - start

    # ---- checks ---------------------------------------------------------------------------------
    def check(self, mixes, request: GenerateRequest, bank: Bank | None = None) -> list[str]:
        """Raise ValueError with a human sentence for input no method can run; return warnings (prompt cut).

        Mixtures are checked here too (their LoRA files and model), once per file state.
        """
        bank = bank or self.bank
        mixes = list(mixes)
        if not mixes:
            raise ValueError("No method is chosen: pick at least one of " + ", ".join(METHODS) + " or single.")
        with self._lock:
            keys = []
            for mix in mixes:
                mix.check()
                if mix.method == "arrow":
                    raise ValueError("Arrow routes a text model's layers (the text engine); an image pipeline takes "
                                     "mole, the merges, switch, composite, base or single.")
                keys += [*mix.keys, *([mix.single] if mix.single else [])]
            if len(set(keys)) > self.limits.experts:
                raise ValueError(f"At most {self.limits.experts} LoRAs can be combined here; "
                                 f"{len(set(keys))} are selected.")
            self._check_keys(list(dict.fromkeys(keys)), bank)
            for mix in mixes:
                if mix.method == "freefuse":
                    self._check_freefuse(mix, bank)
            for mix in mixes:
                if mix.mixture is not None:
                    self._check_mixture(mix.mixture, bank)
            self._check_request(request)
            return self._prompt_warnings(request) + self._routing_warnings(mixes, bank)

    def _check_freefuse(self, mix: Mix, bank: Bank) -> None:
        """FreeFuse finds each LoRA by its trigger words' attention: every LoRA needs one."""
        from mole_core.routing import untriggered
        missing = untriggered({k: bank.get(k).trigger for k in mix.keys})
        if missing:
            raise ValueError(f"FreeFuse places each LoRA where its trigger word is attended; "
                             f"{', '.join(repr(k) for k in missing)} has no trigger word (the manifest's "
                             f"\"trigger\"). Give one, or choose another method.")
        problem = route_problem(self.components)
        if problem:
            raise ValueError(f"FreeFuse cannot run on this model: {problem}")

    def _check_request(self, request: GenerateRequest) -> None:
        limits = self.limits
        if not _whole(request.steps) or not 1 <= request.steps <= limits.denoise_steps:
            raise ValueError(f"Steps must be a whole number between 1 and {limits.denoise_steps}; "
                             f"got {request.steps!r}.")
        if not _finite(request.guidance) or not 0.0 <= float(request.guidance) <= limits.guidance:
            raise ValueError(f"Guidance must be between 0 and {limits.guidance:g}; got {request.guidance}.")
        if not _finite(request.true_cfg) or not 0.0 <= float(request.true_cfg) <= limits.guidance:
            raise ValueError(f"True CFG must be between 0 and {limits.guidance:g}; got {request.true_cfg}.")
        max_side = limits.side_factor * max(self.default_size())
        for side_name, side in (("Height", request.height), ("Width", request.width)):
            if side is not None and (not _whole(side) or not 8 <= side <= max_side or side % 8):
                raise ValueError(f"{side_name} must be a multiple of 8 between 8 and {max_side} "
                                 f"({limits.side_factor}× this model's side); got {side!r}.")
        latent_shape(self.pipe, *self._size(request))     # the family's own multiple (FLUX: 16)
        if not _whole(request.seed) or not 0 <= request.seed < 2**63:
            raise ValueError(f"The seed must be a whole number from 0 to 2^63 − 1; got {request.seed!r}.")
        for what, text in (("prompt", request.prompt), ("negative prompt", request.negative)):
            if not isinstance(text, str):
                raise ValueError(f"The {what} must be text; got {type(text).__name__}.")

    def _prompt_warnings(self, request: GenerateRequest) -> list[str]:
        warnings = []
        if self.family.packed and (request.negative or "").strip() and float(request.true_cfg) <= 1:
            warnings.append(f"{self.family.title} is guidance-distilled: it reads the negative prompt only with "
                            f"true CFG above 1 (e.g. 4; twice the cost per step), so it is ignored here.")
        for what, text in (("prompt", request.prompt), ("negative prompt", request.negative)):
            cut = self.truncated_words(text)
            if cut:
                limit = self.pipe.tokenizer.model_max_length
                warnings.append(f"The {what} is longer than the text encoder reads ({limit} tokens with start "
                                f"and end); these words are cut: \"{cut}\".")
        return warnings

    def routing_note(self, mix: Mix, bank: Bank | None = None) -> str | None:
        """Why the routed gate cannot run for `mix` (one sentence), or None: routed MoLE needs a trigger word for
        every LoRA. Untrained, such a Mix runs the per-token gate instead (`_routable`); a trained routed mixture
        runs as trained, its LoRA without a trigger never routed to."""
        if mix.method != "mole" or mix.mole_config.route != "trigger":
            return None
        bank = bank or self.bank
        problem = route_problem(self.components, {k: bank.get(k).trigger for k in mix.keys})
        if problem and mix.mixture is not None:
            return problem.split(": this MoLE runs")[0] + ": the trained routed gates run, and it is never routed to."
        return problem

    def _routing_warnings(self, mixes, bank: Bank) -> list[str]:
        return list(dict.fromkeys(note for mix in mixes if (note := self.routing_note(mix, bank))))

    def _routable(self, mix: Mix, bank: Bank) -> tuple[MoleConfig, str]:
        """The MoleConfig a MoLE Mix runs with, and "" or a label note when the routed gate fell back."""
        mole = mix.mole_config
        if mix.mixture is None and self.routing_note(mix, bank):
            return dataclasses.replace(mole, route="none"), "; routing off: a LoRA has no trigger"
        return mole, ""

    def truncated_words(self, text: str) -> str:
        """The part of `text` the text encoder never sees ("" when it all fits)."""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(text or "", truncation=False, add_special_tokens=False)["input_ids"]
        room = tokenizer.model_max_length - 2   # start and end tokens
        return tokenizer.decode(ids[room:]).strip() if len(ids) > room else ""

    def _check_keys(self, keys, bank: Bank) -> None:
        """Every key is a healthy bank entry whose LoRA fits the model."""
        for key in keys:
            stamp = file_stamp(usable_entry(bank, key).lora_path)
            if stamp not in self._fits:   # once per file: neither the file nor the model changes
                validate_lora(bank.load(key), self.components, self.family.name)
                self._fits.add(stamp)

    def _check_mixture(self, mixture: Mixture, bank: Bank) -> None:
        """The mixture was trained for exactly these LoRA files (names, order, sha256) on this model."""
        self._kept.check_mixture(mixture, [(k, bank.get(k).lora_path) for k in mixture.names], self.model_name)

    def check_train(self, keys, mole: MoleConfig, train: TrainConfig, bank: Bank | None = None) -> list[str]:
        """ValueError naming the field for gate-training input that cannot run (the app calls this first); returns
        warnings (routed gates asked for LoRAs without a trigger: the per-token gate trains instead)."""
        keys = list(keys or [])
        check_training(keys, mole, train, self.limits)
        with self._lock:
            self._check_keys(keys, bank or self.bank)
            return [note] if (note := self._train_route_note(keys, mole, bank or self.bank)) else []

    def _train_route_note(self, keys, mole: MoleConfig, bank: Bank) -> str | None:
        if mole.route != "trigger":
            return None
        return route_problem(self.components, {k: bank.get(k).trigger for k in keys})


    # ---- MoLE attachment and merges -------------------------------------------------------------
    def _attached(self, keys, mole: MoleConfig, bank: Bank):
        """The MoLE attachment for exactly these LoRA files and gate layout, re-attaching when they change."""
        return self._kept.get({k: bank.get(k).lora_path for k in keys}, mole, lambda: self._attach(keys, mole, bank))

    def _attach(self, keys, mole: MoleConfig, bank: Bank):
        handle = attach(self.components, [bank.load(k) for k in keys], mole)
        handle.set_triggers(pipeline_encoders(self.pipe), {k: bank.get(k).trigger for k in keys})
        return handle

    def _merged(self, lora: Lora):
        """Context: W + ΔW of `lora` on the pristine weights, restored bit-identically on exit."""
        return merged_weights(self.components, lora)

    def merge(self, mix: Mix, bank: Bank | None = None, name: str | None = None) -> Lora:
        """The weight-space merge a Mix asks for (linear / svd / ties / dare), as one LoRA."""
        bank = bank or self.bank
        if mix.method not in MERGES:
            raise ValueError(f"Only the merges ({', '.join(MERGES)}) give one LoRA; got {mix.method!r}.")
        weights = [float((mix.weights or {}).get(k, bank.get(k).default_weight)) for k in mix.keys]
        extra = {"density": mix.density} if mix.method in ("ties", "dare") else {}
        name = name or f"{mix.method}:{'+'.join(mix.keys)}"
        # once per mix and file state: a TIES / DARE / SVD merge is seconds of dense SVDs, the same every time
        key = (mix.method, tuple(mix.keys), tuple(weights), mix.rank, mix.normalize, tuple(sorted(extra.items())),
               name, tuple(file_stamp(bank.get(k).lora_path) for k in mix.keys))
        if key not in self._merges:
            loras = [bank.load(k) for k in mix.keys]
            merged = merge_loras(loras, weights, method=mix.method, rank=mix.rank, normalize=mix.normalize,
                                 name=name, **extra)
            self._merges = {**dict(list(self._merges.items())[-(_MERGES_KEPT - 1):]), key: merged}
        return self._merges[key]

    # ---- gate training --------------------------------------------------------------------------
    def train(self, keys, mole: MoleConfig, train: TrainConfig, on_step=None, should_stop=None,
              out_path=None, bank: Bank | None = None) -> Mixture:
        """Train the gates of a MoLE over `keys` on the bank's example images; return the Mixture.

        The examples are resized to the model's default resolution. on_step(step, {"loss", "task",
        "balance"}, mean_gates) after each step; should_stop() between steps. out_path: also write the
        mixture file there (atomically); the Mixture's path is set to it.
        """
        keys, bank = list(keys), bank or self.bank
        if self.check_train(keys, mole, train, bank):              # routed gates, a LoRA without a trigger:
            mole = dataclasses.replace(mole, route="none")          # the per-token gate (check_train says so)
        files = {k: bank.get(k).lora_path for k in keys}
        if torch.device(self.device).type == "cpu" and not train.cpu:
            train = dataclasses.replace(train, cpu=True)   # train where the model is (several processes: gloo)
        with self._lock, self._kept.training(files, mole, lambda: self._attach(keys, mole, bank), self._lock,
                                             should_stop) as (handle, between_steps):
            # 1. fresh, untrained gates (zero logits: equal weights) and the training data
            task = DiffusionTask(self.pipe, examples_from_bank(bank, keys), self.default_size()[0])
            # 2. train; between steps, whoever waits for the model goes first. The task loss on one fixed
            # batch before and after (each step's own loss swings with the noise level drawn for it)
            before = task.fixed_loss() if train.steps >= FIXED_LOSS_FROM else None
            result = train_gates(handle, task, train, on_step=on_step, should_stop=between_steps)
            if before is not None and result.steps:
                result.held_out = {"before": before, "after": task.fixed_loss()}
            if result.steps:
                self.costs.measured_training(mole.gate, result.seconds / result.steps, len(keys), train.batch_size)
            self._kept.check_finite(handle)
            # 3. the mixture: gates + names and hashes of the LoRA files (+ the α it trained with)
            train = dataclasses.replace(train, balance_alpha=train.alpha_for(mole))
            return self._save_mixture(handle, keys, mole, train, result, out_path, bank)

    def _save_mixture(self, handle, keys, mole: MoleConfig, config: TrainConfig, result: TrainResult,
                      out_path, bank: Bank) -> Mixture:
        files = [(k, bank.get(k).lora_path) for k in keys]
        if out_path is not None:
            from accelerate import PartialState
            state = PartialState()               # `accelerate launch`: every process holds the same gates;
            if state.is_main_process:            # the first writes the file (with its own batch's losses)
                save_mixture(out_path, handle, files, [mole, config], result, self.model_name)
            state.wait_for_everyone()
            return load_mixture(out_path)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_mixture(Path(tmp) / "mixture.safetensors", handle, files, [mole, config], result,
                                self.model_name)
            return dataclasses.replace(load_mixture(path), path=None)

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, mix: Mix, request: GenerateRequest, bank: Bank | None = None) -> Result:
        """Render `request` with one Mix."""
        return self.compare([mix], request, bank)[0]

    def compare(self, mixes, request: GenerateRequest, bank: Bank | None = None) -> list[Result]:
        """Render `request` with each Mix, all from the same starting latents. The request is checked once
        (ValueError naming the field); what the user should know comes back in each Result's `warnings`."""
        bank, mixes = bank or self.bank, list(mixes)
        with self._lock:
            warnings = self.check(mixes, request, bank)
            latents = self._latents(request)
            results = [self._run(mix, request, latents, bank) for mix in mixes]
        for result in results:
            result.warnings = [*warnings, *result.warnings]
        return results

    def _latents(self, request: GenerateRequest) -> torch.Tensor:
        """Starting noise for this seed and size (float32, CPU, in the family's layout): the same for every
        method and run."""
        return latents_for(self.pipe, request.seed, *self._size(request))

    def _size(self, request: GenerateRequest) -> tuple[int, int]:
        default_h, default_w = self.default_size()
        return request.height or default_h, request.width or default_w

    def _run(self, mix: Mix, request, latents, bank: Bank) -> Result:
        """One Mix, timed; the pipeline is as before when it returns."""
        start = time.perf_counter()
        runner = self._RUNNERS["single" if mix.single else mix.method]
        image, gates, label = runner(self, mix, request, latents, bank)
        seconds = time.perf_counter() - start
        if not (request.height or request.width):
            self.costs.measured_image(mix, seconds, request.steps)
        return Result(mix.method, image, seconds, gates, label, mix)

    def _run_mole(self, mix: Mix, request, latents, bank: Bank):
        mole, fallback = self._routable(mix, bank)
        handle = self._attached(mix.keys, mole, bank)
        if mix.mixture is not None:
            apply_mixture(handle, mix.mixture)
        else:
            handle.reset_gates()          # untrained: zero logits, equal weights
        if handle.router is not None:     # each image from its own text: no attention maps left by the previous
            handle.router.reset()         # call (its first step would read them: the result depended on it)
        placed = parse_regions(mix.placement, mix.keys)
        regions = self._region_maps(stack(placed, mix.keys, *self._latent_grid(request)))
        with handle.settings(mask=_mask(mix), strengths=mix.strengths, regions=regions):
            passes = [] if regions is None else self._regional_passes(mix, request, latents, handle, placed, bank)
            with handle.recording() as rec, regional(getattr(self.pipe, self.family.denoiser), handle, passes,
                                                     self._patch()):
                image = self._call_pipe(request, latents)
        on = sum(1 for k in mix.keys if (mix.mask or {}).get(k, True))
        experts = f"{len(mix.keys)} experts" if on == len(mix.keys) else f"{on} of {len(mix.keys)} experts on"
        untrained = "" if mix.mixture is not None else ", untrained"
        placed = ", regions" if regions is not None else ""
        return image, rec.table(), f"MoLE ({mole.describe}, {experts}{untrained}{placed}{fallback})"

    def _regional_passes(self, mix: Mix, request, latents, handle, placed: dict, bank: Bank) -> list[Pass]:
        """One regional pass per placed expert that is on (mole_core/image/regional.py): that expert and the
        experts placed nowhere, reading the clauses of the prompt that name it."""
        on = [k for k in mix.keys if (mix.mask or {}).get(k, True)]
        mine = [k for k in on if k in placed]
        phrases = region_phrases(request.prompt, {k: bank.get(k).trigger for k in mix.keys}, mine)
        grid = self._latent_grid(request)
        passes = []
        for key in mine:
            mask = [k == key or (k in on and k not in placed) for k in mix.keys]
            with handle.apart(mask):
                texts = conditioning(self.pipe, getattr(self.pipe, self.family.denoiser),
                                     self._pipe_call(dataclasses.replace(request, prompt=phrases[key]), latents))
            passes.append(Pass(mask, texts, placed[key].grid(*grid)))
        return passes

    def _latent_grid(self, request) -> tuple[int, int]:
        """(h, w) of the latent grid of this request's image (the regions' and FreeFuse's masks live there)."""
        f = self.pipe.vae_scale_factor
        height, width = self._size(request)
        return height // f, width // f

    def _region_maps(self, weights):
        """A regions.RegionMaps for (N, h, w) weights on the latent grid (None: no regions)."""
        if weights is None:
            return None
        return RegionMaps(weights, self.family.denoiser, self._patch())

    def _patch(self) -> int:
        """Image tokens per latent side of a transformer (FLUX: its 2×2 packing; SD3: its patch size); UNet: 1."""
        family = self.family
        if family.denoiser != "transformer":
            return 1
        return 2 if family.packed else int(getattr(getattr(self.pipe, family.denoiser).config, "patch_size", 1) or 1)

    def _run_freefuse(self, mix: Mix, request, latents, bank: Bank):
        from mole_core.image.freefuse import FREEFUSE_MOLE, collect_steps, masks_from_masses, record_masses
        # 1. the masks: the base model's early attention on each LoRA's trigger tokens (phase 1)
        handle = self._attached(mix.keys, FREEFUSE_MOLE, bank)
        call = self._pipe_call(request, latents)
        masses = record_masses(self.pipe, handle, call, collect_steps(request.steps))
        present = handle.router.present.get(self.family.denoiser)
        present = torch.zeros(len(mix.keys), dtype=torch.bool) if present is None or not masses else present.cpu()
        masks = masks_from_masses(masses, present, self._latent_grid(request), self.family.denoiser, self._patch())
        # 2. the image: each LoRA at full strength inside its mask only (phase 2); no trigger: the base model
        equal = [1.0 / len(mix.keys)] * len(mix.keys)
        with handle.settings(gates=equal, mask=present.tolist(), regions=self._region_maps(masks)):
            image = self._call_pipe(request, latents)
        shares = ", ".join(f"{k} {float(m.mean()):.0%}" for k, m in zip(mix.keys, masks))
        return image, None, f"FreeFuse ({shares})"

    def _run_base(self, mix: Mix, request, latents, bank: Bank):
        with self._kept.experts_off():
            return self._call_pipe(request, latents), None, "Base model"

    def _run_single(self, mix: Mix, request, latents, bank: Bank):
        with self._kept.experts_off(), self._merged(bank.load(mix.single)):
            return self._call_pipe(request, latents), None, f"Single: {bank.get(mix.single).name}"

    def _run_merge(self, mix: Mix, request, latents, bank: Bank):
        merged = self.merge(mix, bank)
        with self._kept.experts_off(), self._merged(merged):
            image = self._call_pipe(request, latents)
        r = max(w.rank for w in merged.modules.values())
        label = mix.merge_label(r)
        return image, None, label

    def _run_switch(self, mix: Mix, request, latents, bank: Bank):
        from mole_core.image.peers import switching
        handle = self._attached(mix.keys, MoleConfig(), bank)
        with switching(self.pipe, handle, every=mix.switch_every):
            image = self._call_pipe(request, latents)
        return image, None, f"LoRA Switch (every {mix.switch_every} steps)"

    def _run_composite(self, mix: Mix, request, latents, bank: Bank):
        from mole_core.image.peers import compositing
        handle = self._attached(mix.keys, MoleConfig(), bank)
        with compositing(self.pipe, handle):
            image = self._call_pipe(request, latents)
        return image, None, f"LoRA Composite ({len(mix.keys)}× cost)"

    _RUNNERS = {"mole": _run_mole, "base": _run_base, "single": _run_single, "linear": _run_merge,
                "svd": _run_merge, "ties": _run_merge, "dare": _run_merge, "switch": _run_switch,
                "composite": _run_composite, "freefuse": _run_freefuse}

    def _pipe_call(self, request: GenerateRequest, latents: torch.Tensor) -> dict:
        """The pipeline's keyword arguments for this request (output_type left to the caller)."""
        height, width = self._size(request)
        # FLUX is guidance-distilled: its negative prompt acts only through true CFG (FluxPipeline's
        # true_cfg_scale > 1: a second transformer call per step); the other families take one as CFG's
        negative = {"negative_prompt": request.negative or None}
        if self.family.packed:
            negative = {**negative, "true_cfg_scale": float(request.true_cfg)} if request.negative and \
                float(request.true_cfg) > 1 else {}
        return dict(prompt=request.prompt, **negative, height=height, width=width, num_inference_steps=request.steps,
                    guidance_scale=float(request.guidance), latents=latents.to(self.device, self.dtype),
                    # only stochastic schedulers draw from it; seeded so they repeat too
                    generator=torch.Generator("cpu").manual_seed(request.seed))

    def _call_pipe(self, request: GenerateRequest, latents: torch.Tensor) -> PIL.Image.Image:
        with torch.no_grad(), self.graphs.on(getattr(self.pipe, self.family.denoiser)):
            out = self.pipe(**self._pipe_call(request, latents), output_type="np")
        pixels = out.images[0]
        if not np.isfinite(pixels).all():
            raise ValueError("The image came out as NaN/Inf (not a picture): a LoRA's weights, a gate or a "
                             "strength is too large for this model.")
        return self.pipe.numpy_to_pil(pixels[None])[0]

    # ---- bank, export, snippet ------------------------------------------------------------------
    def add_to_bank(self, src_path, manifest: dict, images=(), key: str | None = None,
                    bank: Bank | None = None, display: str | None = None) -> BankEntry:
        """Validate a LoRA file against the model and add it to the bank (see `Bank.add`)."""
        with self._lock:
            return (bank or self.bank).add(src_path, manifest, images, self.components, key=key,
                                           display=display, max_pixels=self.limits.upload_pixels)

    def export(self, mix: Mix, out_path, format: str = "diffusers", bank: Bank | None = None) -> Path:
        """Write a merge (linear / svd / ties / dare) of the Mix's LoRAs as one LoRA file, atomically."""
        bank = bank or self.bank
        if mix.method not in MERGES:
            raise ValueError(f"Only the merges ({', '.join(MERGES)}) can be exported as a LoRA; got {mix.method!r}.")
        with self._lock:
            mix.check()
            self._check_keys(list(mix.keys), bank)
            merged = self.merge(mix, bank, name=f"{mix.method}:{'+'.join(mix.keys)}")
            save_lora(merged, out_path, format=format)
        return Path(out_path)

    def snippet(self, mixes, request: GenerateRequest, mixture_file: str | None = None) -> str:
        """Python source that reproduces this comparison with mole_core and saves the images.

        The model and bank are named as a user has them: the embedded default by `Engine()`'s defaults,
        anything else by the folder's name (edit it to where your copy lies).
        """
        embedded = self.model_id == DEFAULT_MODEL and str(self.bank.folder) == DEFAULT_BANK
        engine = "Engine()" if embedded else \
            f"Engine({Path(self.model_id or 'PATH/TO/MODEL').name!r}, {self.bank.folder.name!r})"
        lines = ["# pip install -e <the MoLE Studio repository>   (or run from its folder)",
                 "from mole_core.image.engine import Engine, GenerateRequest, Mix",
                 "from mole_core.mixture import load_mixture",
                 "", f"engine = {engine}", f"request = {request!r}", "mixes = ["]
        lines += [f"    {mix.to_python(mixture_file)}," for mix in mixes]
        lines += ["]", "for result in engine.compare(mixes, request):",
                  "    result.image.save(result.method.replace(':', '_') + '.png')",
                  "    print(f'{result.label}: {result.seconds:.2f} s')"]
        return "\n".join(lines) + "\n"


_MERGES_KEPT = 4                                 # merges an engine keeps for reuse


def _mask(mix: Mix) -> dict[str, bool] | None:
    return None if mix.mask is None else {k: bool(mix.mask.get(k, True)) for k in mix.keys}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError, OverflowError):
        return False


def save_image(image: PIL.Image.Image, path) -> Path:
    """Save an image (format from the suffix), atomically."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        image.save(tmp)
    return Path(path)
