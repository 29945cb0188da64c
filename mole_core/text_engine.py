"""The text engine: the text world's model, its text-LoRA bank, and every way of combining text LoRAs.

`TextEngine` is the image `Engine`'s twin for a transformers text-to-text model (the embedded text world: a
tiny BartForConditionalGeneration, mole_core.textworld). It answers a prompt with a `Mix` (mole_core.mix:
the method and all its parameters, passed whole), greedily:

    engine = TextEngine()                                   # assets/text-world + text_bank
    engine.generate(Mix("svd", ("reverse", "upper"), rank=8), "reverse upper: abc")
    engine.compare([Mix("mole", keys, mixture=m), Mix("linear", keys), Mix("base")], "reverse upper: abc")
    mixture = engine.train(("reverse", "upper"), MoleConfig(gate="token"), TrainConfig(steps=100, lr=1e-2))

Methods: mole, linear, svd, ties, dare, base, single:KEY (switch and composite are denoising-step methods:
refused). A LoRA key is a bank entry: text_bank/<key>.safetensors (mole_core.textworld.lora_io) + <key>.json.

Contract (as the image engine's):
- Greedy decoding: the same prompt and Mix give the same text on every run.
- Every call leaves the model as it found it: merges go through `merged_weights` (pristine weights restored),
  MoLE through one kept attachment (keyed by keys, granularity, gate kind) whose experts are all masked off
  while another method runs, which is the base model exactly.
- A lock serialises every call that uses the model.
- Per-sample gates pool over each sample's tokens in each forward pass; decoding (mole_core.textworld.decode)
  runs one full pass per generated token and never pads a batch, so a batched answer == the answer alone.

References: MoLE (Wu et al., ICLR 2024) §4.2 (Flan-T5 LoRAs, NLP); mole_core.engine (the image engine).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mole_core.attach import MoleConfig, attach
from mole_core.defaults import PACKAGE_ROOT
from mole_core.lora import Lora
from mole_core.merge import merge_loras, merged_weights
from mole_core.mix import MERGES, Mix
from mole_core.mixture import Mixture, apply_mixture, load_mixture, save_mixture
from mole_core.textworld.config import load_model
from mole_core.textworld.decode import greedy
from mole_core.textworld.lora_io import load_text_lora, validate_text_lora
from mole_core.train import TokenTask, TrainConfig, TrainResult, train_gates

DEFAULT_TEXT_MODEL = str(PACKAGE_ROOT / "assets" / "text-world")   # the embedded text default
DEFAULT_TEXT_BANK = str(PACKAGE_ROOT / "text_bank")                 # its LoRA bank
TEXT_METHODS = ("mole", *MERGES, "base")                            # + "single:<key>"


@dataclass
class TextResult:
    """One answer of a comparison."""
    method: str                 # the Mix's method
    text: str                   # the greedy answer
    seconds: float              # wall time (merge / gate loading included)
    gates: list[dict] | None    # mole only: tidy rows {"group", "step", "sample", "expert", "weight"}
    label: str                  # e.g. "MoLE (block, 2 experts)" / "SVD r=8"
    mix: Mix | None = None


@dataclass
class TextEntry:
    """One LoRA of the text bank, as its manifest describes it."""
    key: str                                    # file stem, the expert name
    name: str
    task: str                                   # the task family it was trained on
    trigger: str                                # the instruction word that asks for it
    description: str
    examples: list[tuple[str, str]] = field(default_factory=list)   # (input, output): gate-training data
    default_weight: float = 1.0
    lora_path: Path | None = None
    error: str | None = None                    # why the entry cannot be used; None when fine


def parse_text_manifest(manifest: dict, key: str) -> dict:
    """The TextEntry fields a manifest gives; ValueError naming the bad field."""
    where = f"{key}.json"
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: the manifest must be a JSON object, found {type(manifest).__name__}.")
    if manifest.get("kind", "text") != "text":
        raise ValueError(f"{where}: 'kind' must be 'text', found {manifest.get('kind')!r}.")
    for name in ("name", "task", "trigger", "description"):
        if not isinstance(manifest.get(name, ""), str):
            raise ValueError(f"{where}: '{name}' must be a string, found {manifest.get(name)!r}.")
    examples = manifest.get("examples", [])
    if not isinstance(examples, list) or not all(
            isinstance(e, dict) and isinstance(e.get("input"), str) and isinstance(e.get("output"), str)
            for e in examples):
        raise ValueError(f"{where}: 'examples' must be a list of {{\"input\": str, \"output\": str}}.")
    weight = manifest.get("default_weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise ValueError(f"{where}: 'default_weight' must be a number, found {weight!r}.")
    return {"name": manifest.get("name") or key, "task": manifest.get("task", key),
            "trigger": manifest.get("trigger", key), "description": manifest.get("description", ""),
            "examples": [(e["input"], e["output"]) for e in examples], "default_weight": float(weight)}


class TextBank:
    """A folder of `<key>.safetensors` text LoRAs, each with its manifest `<key>.json`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._cache: dict[str, tuple[tuple, Lora]] = {}

    def entries(self) -> list[TextEntry]:
        """Every entry, usable or not (an unusable one carries its `error`)."""
        if not self.folder.is_dir():
            return []
        stems = sorted({p.stem for p in self.folder.glob("*.json")} | {p.stem for p in self.folder.glob("*.safetensors")})
        out = []
        for key in stems:
            lora_path, manifest = self.folder / f"{key}.safetensors", self.folder / f"{key}.json"
            try:
                if not manifest.exists():
                    raise ValueError(f"{key}.safetensors has no manifest {key}.json.")
                if not lora_path.exists():
                    raise ValueError(f"{key}.json has no LoRA file {key}.safetensors.")
                out.append(TextEntry(key=key, lora_path=lora_path,
                                     **parse_text_manifest(json.loads(manifest.read_text()), key)))
            except (ValueError, OSError) as e:
                out.append(TextEntry(key=key, name=key, task="", trigger="", description="", error=str(e)))
        return out

    def keys(self) -> list[str]:
        return [e.key for e in self.entries() if e.error is None]

    def get(self, key: str) -> TextEntry:
        for entry in self.entries():
            if entry.key == key:
                if entry.error:
                    raise ValueError(f"Text LoRA '{key}' cannot be used: {entry.error}")
                return entry
        raise ValueError(f"No text LoRA '{key}' in {self.folder}; the bank has {', '.join(self.keys()) or 'none'}.")

    def load(self, key: str) -> Lora:
        """The entry's LoRA in canonical form (cached while the file is unchanged), named by its key."""
        path = self.get(key).lora_path
        stamp = (path.stat().st_mtime_ns, path.stat().st_size)
        if key not in self._cache or self._cache[key][0] != stamp:
            self._cache[key] = (stamp, load_text_lora(path, name=key))
        return self._cache[key][1]


def attach_text(model: nn.Module, loras: list[Lora], config: MoleConfig | None = None):
    """`mole_core.attach.attach` for a transformers text model, plus `.weight` on every wrapped Linear.

    transformers' T5 (T5DenseActDense / T5DenseGatedActDense.forward) reads `self.wo.weight.dtype`; a
    MoleLinear has no `weight` (peft's LoRA layers forward it to their base layer). Until mole_core.layers
    gives `_MoleBase` that property, each wrapped layer gets a plain (unregistered) reference to its base
    layer's weight: nothing is added to parameters() or state_dict(), and `merged_weights` (which swaps
    `weight.data`) still reaches the very same tensor. Detach hands back the base modules as always.
    """
    handle = attach(model, loras, config)
    for layer in handle.layers.values():
        if "weight" not in dir(layer):
            object.__setattr__(layer, "weight", layer.base.weight)
    return handle


class TextEngine:
    """A transformers text-to-text model + a text-LoRA bank; answers, compares, trains gates, merges.

    model_dir: a folder `load_model` reads (any seq2seq LM + tokenizer), loaded lazily; or a
    (model, tokenizer) pair already loaded (tests). bank_dir: a text_bank folder (or a TextBank).
    """

    def __init__(self, model_dir=DEFAULT_TEXT_MODEL, bank_dir: str | Path | TextBank = DEFAULT_TEXT_BANK,
                 device: str = "cpu", max_new_tokens: int = 24):
        self.model_id = str(model_dir) if isinstance(model_dir, (str, Path)) else None
        self._loaded = None if self.model_id else tuple(model_dir)
        self.bank = bank_dir if isinstance(bank_dir, TextBank) else TextBank(bank_dir)
        self.device = device
        self.max_new_tokens = max_new_tokens
        self._handle = None
        self._handle_key: tuple = ()
        self._fits: set[tuple] = set()
        self._lock = threading.RLock()

    # ---- the model ------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._pair()[0]

    @property
    def tokenizer(self):
        return self._pair()[1]

    def _pair(self):
        if self._loaded is None:
            self._loaded = load_model(self.model_id, self.device)
        return self._loaded

    @property
    def model_name(self) -> str:
        return Path(self.model_id).name if self.model_id else type(self.model).__name__

    # ---- checks and LoRAs -----------------------------------------------------------------------
    def check(self, mix: Mix) -> None:
        """ValueError with a human sentence for a Mix the text engine cannot answer."""
        mix.check()
        if mix.method in ("switch", "composite"):
            raise ValueError(f"'{mix.method}' works per denoising step; a text model has none. Choose one of "
                             f"{', '.join(TEXT_METHODS)} or single:<key>.")
        for key in [*mix.keys, *([mix.single] if mix.single else [])]:
            self.lora(key)

    def lora(self, key: str) -> Lora:
        """The bank's LoRA `key`, checked once (per file state) against the model."""
        lora = self.bank.load(key)
        stamp = (lora.path, Path(lora.path).stat().st_mtime_ns)
        if stamp not in self._fits:
            validate_text_lora(lora, self.model)
            self._fits.add(stamp)
        return lora

    def merge(self, mix: Mix, name: str | None = None) -> Lora:
        """The weight-space merge a Mix asks for (linear / svd / ties / dare), as one LoRA."""
        if mix.method not in MERGES:
            raise ValueError(f"Only the merges ({', '.join(MERGES)}) give one LoRA; got {mix.method!r}.")
        loras = [self.lora(k) for k in mix.keys]
        weights = [float((mix.weights or {}).get(k, self.bank.get(k).default_weight)) for k in mix.keys]
        extra = {"density": mix.density} if mix.method in ("ties", "dare") else {}
        return merge_loras(loras, weights, method=mix.method, rank=mix.rank, normalize=mix.normalize,
                           name=name or f"{mix.method}:{'+'.join(mix.keys)}", **extra)

    def _attached(self, keys, mole: MoleConfig):
        """The MoLE attachment for exactly these LoRA files and gate layout, re-attaching when they change."""
        loras = [self.lora(k) for k in keys]
        wanted = (tuple((k, l.path, Path(l.path).stat().st_mtime_ns) for k, l in zip(keys, loras)),
                  mole.granularity, mole.gate)
        if self._handle is not None and wanted != self._handle_key:
            self._detach()
        if self._handle is None:
            self._handle = attach_text(self.model, loras, mole)
            self._handle_key = wanted
        return self._handle

    def release(self) -> None:
        """Detach the kept MoLE attachment (if any): the model is the bare base model again."""
        with self._lock:
            self._detach()

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.detach()
        self._handle, self._handle_key = None, ()

    def _experts_off(self):
        """While MoLE stays attached: every expert off, which is the base model exactly."""
        if self._handle is None:
            return contextlib.nullcontext()
        return self._handle.settings(mask=[False] * len(self._handle.expert_names))

    # ---- answering ------------------------------------------------------------------------------
    def generate(self, mix: Mix, prompt: str) -> TextResult:
        """Answer `prompt` with one Mix."""
        return self.compare([mix], prompt)[0]

    def compare(self, mixes, prompt: str) -> list[TextResult]:
        """Answer `prompt` with each Mix."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt must be non-empty text, e.g. 'reverse: abc'.")
        results = []
        for mix in mixes:
            start = time.perf_counter()
            texts, gates, label = self.answer(mix, [prompt])
            results.append(TextResult(mix.method, texts[0], time.perf_counter() - start, gates, label, mix))
        return results

    def answer(self, mix: Mix, prompts: list[str]) -> tuple[list[str], list[dict] | None, str]:
        """(answers, gate rows (mole) or None, label) for many prompts at once (evaluations)."""
        with self._lock:
            # 1. check inputs
            self.check(mix)
            model, tok = self.model, self.tokenizer

            def run():
                return greedy(model, tok, list(prompts), self.max_new_tokens)

            # 2. the method
            if mix.method == "mole":
                mole = mix.mole_config
                handle = self._attached(mix.keys, mole)
                if mix.mixture is not None:
                    apply_mixture(handle, mix.mixture, [(k, self.bank.get(k).lora_path) for k in mix.keys])
                else:
                    handle.reset_gates()                 # untrained: equal weights
                mask = {k: bool(v) for k, v in mix.mask.items()} if mix.mask else None
                with handle.settings(mask=mask, strengths=mix.strengths), handle.recording() as rec:
                    texts = run()
                untrained = "" if mix.mixture is not None else ", untrained"
                return texts, rec.table(), f"MoLE ({mole.describe}, {len(mix.keys)} experts{untrained})"
            if mix.method == "base":
                with self._experts_off():
                    return run(), None, "Base model"
            if mix.single:
                with self._experts_off(), merged_weights(model, self.lora(mix.single)):
                    return run(), None, f"Single: {self.bank.get(mix.single).name}"
            merged = self.merge(mix)
            with self._experts_off(), merged_weights(model, merged):
                texts = run()
            r = max(w.rank for w in merged.modules.values())
            label = {"linear": "Linear merge", "svd": f"SVD r={r}", "ties": f"TIES d={mix.density:g} r={r}",
                     "dare": f"DARE d={mix.density:g} r={r}"}[mix.method]
            return texts, None, label

    # ---- gate training --------------------------------------------------------------------------
    def train(self, keys, mole: MoleConfig, train: TrainConfig, pairs: list[tuple[str, str]] | None = None,
              on_step=None, should_stop=None, out_path=None) -> Mixture:
        """Train the gates of a MoLE over `keys` with mole_core.train.TokenTask (the seq2seq token loss) on
        `pairs` (default: every example pair of the keys' manifests); return the Mixture (also written to
        `out_path` when given). on_step / should_stop as in `train_gates`."""
        keys = list(keys)
        if not keys:
            raise ValueError("Choose at least one text LoRA to train gates for.")
        pairs = list(pairs) if pairs is not None else [p for k in keys for p in self.bank.get(k).examples]
        if not pairs:
            raise ValueError(f"No training pairs: the manifests of {', '.join(keys)} have no examples.")
        with self._lock:
            self._detach()                                # fresh, untrained gates
            handle = self._attached(keys, mole)
            task = TokenTask(self.model, self.tokenizer, pairs)
            try:
                result = train_gates(handle, task, train, on_step=on_step, should_stop=should_stop)
            except BaseException:
                self._detach()
                raise
            if not all(torch.isfinite(p).all() for p in handle.gate_parameters()):
                self._detach()
                raise ValueError("Gate training diverged (the gates are not finite): lower the learning rate or α.")
            return self._save_mixture(handle, keys, mole, train, result, out_path)

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
