"""The text engine: the text world's model, its text-LoRA bank, and every way of combining text LoRAs.

`TextEngine` is the image `Engine`'s twin for a transformers language model: any seq2seq or causal LM folder
(`load_text_model`; the embedded text world is a tiny BartForConditionalGeneration, mole_core.world.text), with
a bank of text LoRAs (`TextBank`: bare .safetensors with PEFT keys, or PEFT adapter folders read by PEFT itself,
`load_peft_adapter`). It answers a prompt with a `Mix` (mole_core.mix: the method and all its parameters,
passed whole), greedily:

    engine = TextEngine()                                   # assets/text-world + text_bank
    engine.generate(Mix("svd", ("reverse", "upper"), rank=8), "reverse upper: abc")
    engine.compare([Mix("mole", keys, mixture=m), Mix("linear", keys), Mix("base")], "reverse upper: abc")
    mixture = engine.train(("reverse", "upper"), MoleConfig(gate="token"), TrainConfig(steps=100, lr=1e-2))

Methods: mole, linear, svd, ties, dare, arrow (PEFT's, mole_core.text.arrow), base, single:KEY (switch and composite are denoising-step methods:
refused). A LoRA key is a bank entry: text_bank/<key>.safetensors (mole_core.text.lora_io) + <key>.json.

Contract (as the image engine's):
- Greedy decoding: the same prompt and Mix give the same text on every run.
- Every call leaves the model as it found it: merges go through `merged_weights` (pristine weights restored),
  MoLE through one kept attachment (keyed by keys, granularity, gate kind) whose experts are all masked off
  while another method runs, which is the base model exactly.
- A lock serialises every call that uses the model, in arrival order (mole_core.locks.FairLock); gate
  training steps aside between its steps, so another caller waits at most one training step.
- A prompt longer than the model's positions is refused with a sentence (`check_prompt`), never indexed past
  the position table.
- Per-sample gates pool over each sample's tokens in each forward pass; decoding (mole_core.text.decode)
  runs one full pass per generated token and never pads a batch, so a batched answer == the answer alone;
  gate training (TokenTask) batches prompts of one length for the same reason.
- Prompt gates (gate="prompt", the text default; mole_core.text.gate): one decision per prompt from the base
  model's prompt states, taken before decoding and kept for every answer token; trained as an answer-level
  mixture of experts on the pairs (`train_prompt_gate`), its tensors in the mixture as 'prompt.*'.

References: MoLE (Wu et al., ICLR 2024) §4.2 (Flan-T5 LoRAs, NLP); mole_core.image.engine (the image engine).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mole_core.attach import KeptAttachment, MoleConfig, attach
from mole_core.bank import usable_entry
from mole_core.defaults import PACKAGE_ROOT, Limits
from mole_core.locks import FairLock
from mole_core.lora import Lora
from mole_core.merge import merge_loras, merged_weights
from mole_core.mix import MERGES, Mix, check_training
from mole_core.mixture import Mixture, apply_mixture, load_mixture, save_mixture
from mole_core.text.arrow import arrow_attached
from mole_core.text.gate import (attach_prompt_gate, decode_with_weights, load_prompt_state, prompt_weights,
                                 split_state, train_prompt_gate)
from mole_core.text.models import load_model as load_text_model
from mole_core.text.decode import decode
from mole_core.text.bank import TextBank
from mole_core.text.lora_io import validate_text_lora
from mole_core.train import TrainConfig, TrainResult, train_gates
from mole_core.text.task import TokenTask

DEFAULT_TEXT_MODEL = str(PACKAGE_ROOT / "assets" / "text-world")   # the embedded text default
DEFAULT_TEXT_BANK = str(PACKAGE_ROOT / "text_bank")                 # its LoRA bank
TEXT_METHODS = ("mole", *MERGES, "arrow", "base")                            # + "single:<key>"


def _refuse_routing(mole: MoleConfig) -> None:
    if mole.route != "none":
        raise ValueError("Trigger routing works on a pipeline's cross-attention; a text model takes the gate "
                         "kinds prompt, sample, token or static.")


def is_text_model(folder: str | Path) -> bool:
    """True for a transformers model folder (config.json, no diffusers model_index.json)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "model_index.json").exists()


@dataclass
class TextResult:
    """One answer of a comparison."""
    method: str                 # the Mix's method
    text: str                   # the greedy answer
    seconds: float              # wall time (merge / gate loading included)
    gates: list[dict] | None    # mole only: tidy rows {"group", "step", "sample", "expert", "weight"}
    label: str                  # e.g. "MoLE (block, 2 experts)" / "SVD r=8"
    mix: Mix | None = None
    tokens: list[str] = field(default_factory=list)        # the answer's tokens, as text
    token_gates: list[list[float]] | None = None           # mole: per answer token, the expert weights (N)
    prompt_tokens: list[str] = field(default_factory=list)  # the prompt's tokens (special tokens dropped)
    prompt_gates: list[list[float]] | None = None          # mole: per prompt token, the expert weights
    experts: list[str] = field(default_factory=list)       # the order of the weights above


class TextEngine:
    """A transformers text-to-text model + a text-LoRA bank; answers, compares, trains gates, merges.

    model_dir: a folder `load_model` reads (any seq2seq LM + tokenizer), loaded lazily; or a
    (model, tokenizer) pair already loaded (tests). bank_dir: a text_bank folder (or a TextBank).
    """

    def __init__(self, model_dir=DEFAULT_TEXT_MODEL, bank_dir: str | Path | TextBank = DEFAULT_TEXT_BANK,
                 device: str = "cpu", max_new_tokens: int = 24, limits: Limits | None = None):
        self.model_id = str(model_dir) if isinstance(model_dir, (str, Path)) else None
        self._loaded = None if self.model_id else tuple(model_dir)
        self.bank = bank_dir if isinstance(bank_dir, TextBank) else TextBank(bank_dir)
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.limits = limits or Limits.local()
        self._kept = KeptAttachment()            # the MoLE attachment kept between calls
        self._fits: set[tuple] = set()
        self._lock = FairLock()                  # one model call at a time, in arrival order

    # ---- the model ------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._pair()[0]

    @property
    def tokenizer(self):
        return self._pair()[1]

    def _pair(self):
        if self._loaded is None:
            self._loaded = load_text_model(self.model_id, self.device)
        return self._loaded

    @property
    def model_name(self) -> str:
        return Path(self.model_id).name if self.model_id else type(self.model).__name__

    # ---- checks and LoRAs -----------------------------------------------------------------------
    def check(self, mix: Mix) -> None:
        """ValueError with a human sentence for a Mix the text engine cannot answer."""
        mix.check()
        if mix.method in ("switch", "composite", "freefuse"):
            raise ValueError(f"'{mix.method}' works per denoising step; a text model has none. Choose one of "
                             f"{', '.join(TEXT_METHODS)} or single:<key>.")
        if mix.regions:
            raise ValueError("Regions place experts in an image; a text model has none (leave regions empty).")
        if mix.method == "mole":
            _refuse_routing(mix.mole_config)
        if len(mix.keys) > self.limits.experts:
            raise ValueError(f"At most {self.limits.experts} LoRAs can be mixed here; {len(mix.keys)} are selected.")
        for key in [*mix.keys, *([mix.single] if mix.single else [])]:
            self.lora(key)

    def lora(self, key: str) -> Lora:
        """The bank's LoRA `key`, checked once (per file state) against the model; ValueError for a key the bank
        does not hold or a broken entry."""
        usable_entry(self.bank, key)
        with self._lock:
            if self._kept.handle is not None and self.bank.needs_model(key):
                self._kept.detach()                       # PEFT reads an adapter onto the bare model
            lora = self.bank.load(key, self.model)
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
        return self._kept.get({k: self.bank.get(k).lora_path for k in keys}, mole, lambda: self._attach(keys, mole))

    def _attach(self, keys, mole: MoleConfig):
        loras = [self.lora(k) for k in keys]
        return attach(self.model, loras, mole)

    def release(self) -> None:
        """Detach the kept MoLE attachment (if any): the model is the bare base model again."""
        with self._lock:
            self._kept.detach()

    def experts_off(self):
        """While MoLE stays attached: every expert off, which is the base model exactly (a context)."""
        return self._kept.experts_off()

    # ---- answering ------------------------------------------------------------------------------
    def prompt_limit(self) -> int | None:
        """The most prompt tokens the model can read and still write `max_new_tokens` (from its own config:
        max_position_embeddings / n_positions); None for a model without a position table (T5: relative)."""
        config = self.model.config
        positions = next((getattr(config, name) for name in ("max_position_embeddings", "n_positions")
                          if isinstance(getattr(config, name, None), int)), None)
        if positions is None:
            return None
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        return positions if seq2seq else positions - self.max_new_tokens

    def check_prompt(self, prompt: str, field: str = "The prompt") -> None:
        """ValueError naming `field` for a prompt that is empty or longer than the model's positions."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{field} must be non-empty text, e.g. 'reverse: abc'.")
        limit = self.prompt_limit()
        if limit is None:
            return
        if len(prompt) > 64 * limit:                  # no tokenizer writes fewer than one token per 64 characters
            raise ValueError(f"{field} is {len(prompt)} characters long; {self.model_name} reads at most {limit} "
                             f"tokens.")
        with self._lock:                              # a fast tokenizer is not to be shared between threads
            n = len(self.tokenizer(prompt, verbose=False).input_ids)
        if n > limit:
            after = "" if getattr(self.model.config, "is_encoder_decoder", False) else \
                f" and writes {self.max_new_tokens} more"
            raise ValueError(f"{field} is {n} tokens long ({len(prompt)} characters); {self.model_name} reads at "
                             f"most {limit} tokens{after} (its position table).")

    def generate(self, mix: Mix, prompt: str) -> TextResult:
        """Answer `prompt` with one Mix."""
        return self.compare([mix], prompt)[0]

    def compare(self, mixes, prompt: str) -> list[TextResult]:
        """Answer `prompt` with each Mix; MoLE results carry the expert weights of every prompt and answer token."""
        self.check_prompt(prompt)
        results = []
        for mix in mixes:
            start = time.perf_counter()
            ids, rec, label = self._answer(mix, [prompt], tokens=True)
            result = TextResult(mix.method, self._text(ids[0]), time.perf_counter() - start,
                                rec.table() if rec else None, label, mix, tokens=self._pieces(ids[0]))
            if rec is not None:
                self._colour(result, rec, prompt)
            results.append(result)
        return results

    def answer(self, mix: Mix, prompts: list[str]) -> tuple[list[str], list[dict] | None, str]:
        """(answers, gate rows (mole) or None, label) for many prompts at once (evaluations)."""
        for prompt in prompts:
            self.check_prompt(prompt)
        ids, rec, label = self._answer(mix, prompts)
        return [self._text(row) for row in ids], (rec.table() if rec else None), label

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _pieces(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def _colour(self, result: TextResult, rec, prompt: str) -> None:
        """Per prompt token and per answer token, the mean expert weights of the gates that saw it: the
        encoder's (seq2seq) or every group's (causal) at the first pass for the prompt; for answer token k,
        the decoder's (every group's) at the last position of pass k — the pass that chose it."""
        seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))
        names = {g for g, _, _, _ in rec.token_entries}
        enc = {g for g in names if "encoder" in g} if seq2seq else names
        dec = {g for g in names if "decoder" in g} if seq2seq else names
        enc, dec = enc or names, dec or names

        def mean(rows):
            return torch.stack(rows).mean(0).tolist() if rows else None

        ids = self.tokenizer(prompt).input_ids
        special = set(self.tokenizer.all_special_ids)
        keep = [i for i, t in enumerate(ids) if t not in special]
        first = [w[0] for g, _, step, w in rec.token_entries if step == 0 and g in enc]
        per_token = [w for w in first if w.dim() == 2 and w.shape[0] >= len(ids)]
        result.prompt_tokens = [self.tokenizer.decode([ids[i]]) for i in keep]
        if per_token:
            result.prompt_gates = [mean([w[i] for w in per_token]) for i in keep]
        elif first:
            result.prompt_gates = [mean([w if w.dim() == 1 else w.mean(0) for w in first])] * len(keep)
        result.token_gates = [mean([w[0, -1] if w.dim() == 3 else w[0] for g, _, step, w in rec.token_entries
                                    if step == k and g in dec]) for k in range(len(result.tokens))]
        result.experts = list(rec.expert_names)

    def _answer(self, mix: Mix, prompts: list[str], tokens: bool = False):
        """(answer token ids per prompt, the gate Recording (mole) or None, label)."""
        with self._lock:
            # 1. check inputs
            self.check(mix)
            model, tok = self.model, self.tokenizer

            def run():
                return decode(model, tok, list(prompts), self.max_new_tokens)

            # 2. the method
            if mix.method == "mole":
                mole = mix.mole_config
                handle = self._attached(mix.keys, mole)
                prompt_gate = self._load_gates(handle, mix)
                mask = {k: bool(v) for k, v in mix.mask.items()} if mix.mask else None
                G = None                                  # the prompt gate decides before the recording
                if prompt_gate is not None:               # (its adapter-free pass is no recorded step)
                    G = prompt_weights(handle, prompt_gate, model, tok, list(prompts))        # (B, N)
                with handle.settings(mask=mask, strengths=mix.strengths), handle.recording(tokens) as rec:
                    ids = run() if G is None else decode_with_weights(handle, G, model, tok, list(prompts),
                                                                      self.max_new_tokens)
                untrained = "" if mix.mixture is not None else ", untrained"
                return ids, rec, f"MoLE ({mole.describe}, {len(mix.keys)} experts{untrained})"
            if mix.method == "base":
                with self.experts_off():
                    return run(), None, "Base model"
            if mix.method == "arrow":                     # PEFT wraps the bare Linears: MoLE steps aside
                loras = [self.lora(k) for k in mix.keys]
                self._kept.detach()
                with arrow_attached(model, loras):
                    return run(), None, f"Arrow ({len(mix.keys)} LoRAs, training-free)"
            if mix.single:
                with self.experts_off(), merged_weights(model, self.lora(mix.single)):
                    return run(), None, f"Single: {self.bank.get(mix.single).name}"
            merged = self.merge(mix)
            with self.experts_off(), merged_weights(model, merged):
                ids = run()
            r = max(w.rank for w in merged.modules.values())
            label = mix.merge_label(r)
            return ids, None, label

    def _load_gates(self, handle, mix: Mix):
        """The mixture's gates into `handle` (none: untrained, equal weights); the prompt gate when the
        attachment has one (gate="prompt", mole_core.text.gate), else None."""
        prompt_gate = attach_prompt_gate(handle) if handle.config.gate == "prompt" else None
        if mix.mixture is None:
            handle.reset_gates()                          # untrained: equal weights
            if prompt_gate is not None:
                prompt_gate.reset()
            return prompt_gate
        self._kept.check_mixture(mix.mixture, [(k, self.bank.get(k).lora_path) for k in mix.keys])
        groups, prompt = split_state(mix.mixture.gate_state)
        apply_mixture(handle, dataclasses.replace(mix.mixture, gate_state=groups))
        if prompt_gate is not None:
            where = Path(mix.mixture.path).name if mix.mixture.path else "the mixture"
            load_prompt_state(prompt_gate, prompt, where)
        return prompt_gate

    # ---- gate training --------------------------------------------------------------------------
    def check_train(self, keys, mole: MoleConfig, train: TrainConfig) -> None:
        """ValueError naming the field for gate-training input that cannot run."""
        check_training(keys, mole, train, self.limits)
        _refuse_routing(mole)
        self.check(Mix("mole", tuple(keys), granularity=mole.granularity, gate=mole.gate))

    def train(self, keys, mole: MoleConfig, train: TrainConfig, pairs: list[tuple[str, str]] | None = None,
              on_step=None, should_stop=None, out_path=None) -> Mixture:
        """Train the gates of a MoLE over `keys` with mole_core.train.TokenTask (the seq2seq token loss) on
        `pairs` (default: every example pair of the keys' manifests); return the Mixture (also written to
        `out_path` when given). on_step / should_stop as in `train_gates`."""
        keys = list(keys)
        self.check_train(keys, mole, train)
        pairs = list(pairs) if pairs is not None else [p for k in keys for p in self.bank.get(k).examples]
        if not pairs:
            raise ValueError(f"No training pairs: the manifests of {', '.join(keys)} have no examples.")
        files = {k: self.bank.get(k).lora_path for k in keys}
        with self._lock, self._kept.training(files, mole, lambda: self._attach(keys, mole), self._lock,
                                             should_stop) as (handle, between_steps):
            # fresh, untrained gates; between steps, whoever waits for the model goes first
            if mole.gate == "prompt":                     # one decision per sample from the prompt (text.gate)
                alpha = train.alpha_for(mole)
                gate = attach_prompt_gate(handle)
                result = train_prompt_gate(handle, gate, self.model, self.tokenizer, pairs, train, alpha,
                                           on_step=on_step, should_stop=between_steps)
                if not all(torch.isfinite(p).all() for p in gate.parameters()):
                    raise ValueError("Gate training diverged (the gates are not finite numbers): lower the "
                                     "learning rate.")
            else:
                task = TokenTask(self.model, self.tokenizer, pairs)
                result = train_gates(handle, task, train, on_step=on_step, should_stop=between_steps)
            self._kept.check_finite(handle)
            train = dataclasses.replace(train, balance_alpha=train.alpha_for(mole))   # the mixture records it
            return self._save_mixture(handle, keys, mole, train, result, out_path)

    def train_estimate(self, keys, mole: MoleConfig, train: TrainConfig) -> float:
        """Seconds `train` is expected to take here, from one measured forward pass of the model on the keys'
        example pairs: the prompt gate runs N passes over the pairs once (text.gate.expert_losses), then steps
        that never run the model; the other kinds run a forward and a backward (about 3 passes, the experts
        included) per step."""
        keys = list(keys)
        self.check_train(keys, mole, train)
        pairs = [p for k in keys for p in self.bank.get(k).examples]
        if not pairs:
            raise ValueError(f"No training pairs: the manifests of {', '.join(keys)} have no examples.")
        with self._lock, self.experts_off(), torch.no_grad():
            task = TokenTask(self.model, self.tokenizer, pairs)
            batch = task.buckets[max(task.buckets, key=lambda n: len(task.buckets[n]))][:16]
            ids, labels = zip(*(task.items[i] for i in batch))
            start = time.perf_counter()
            self.model(input_ids=torch.tensor(ids, device=self.model.device),
                       labels=torch.tensor([list(y) + [-100] * (max(map(len, labels)) - len(y)) for y in labels],
                                           device=self.model.device))
            per_pass = (time.perf_counter() - start) / len(batch)          # seconds per pair and forward pass
        if mole.gate == "prompt":
            return len(pairs) * (len(keys) + 1) * per_pass * 2.5 + train.steps * 0.002
        return train.steps * train.batch_size * per_pass * 3 * 2.0

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
