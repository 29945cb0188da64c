"""A trained mixture: the gate tensors of a MoLE attachment in one .safetensors file, plus JSON metadata.

Metadata key "mole.mixture" holds: format version, model id, the LoRA names and the sha256 of their
files (in expert order), granularity, the MoleConfig and TrainConfig, steps, final losses, mean gates,
and per group its leader and d_out (so gates are rebuilt with the right shapes before any forward).
A mixture only makes sense with the very same LoRA files on the same model: `Mixture.check` and
`apply_mixture` refuse anything else with a sentence saying what differs. Saves are atomic.

References: MoLE (Wu et al., ICLR 2024); safetensors metadata as used by diffusers LoRA files.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mole_core.atomic import atomic_path
from mole_core.attach import GATE_KINDS, GRANULARITIES, MoleConfig, MoleHandle
from mole_core.lora import sha256_file
from mole_core.regions import Region, parse_regions

FORMAT = "mole-mixture/1"
META_KEY = "mole.mixture"
MAX_GATE_ABS = 1e4     # a gate weight above this is not something training produces: refused at load


class MixtureError(ValueError):
    """A mixture file that is unreadable or does not belong to these LoRAs / this model."""


@dataclass
class Mixture:
    names: list[str]                       # expert (LoRA) names, in gate order
    sha256s: list[str]                     # sha256 of each LoRA file, same order
    granularity: str                       # "matrix" | "layer" | "block" | "network"
    gate_state: dict[str, torch.Tensor]    # MoleHandle.gate_state_dict()
    meta: dict = field(default_factory=dict)   # everything else in the file's metadata
    path: str | None = None
    region_masks: dict[str, torch.Tensor] = field(default_factory=dict)   # expert -> its mask image (H, W)

    @property
    def layout(self) -> dict[str, dict]:
        return self.meta.get("layout", {})

    @property
    def regions(self) -> dict[str, Region] | None:
        """{expert: Region} saved with the gates (save_mixture's `regions`), or None."""
        saved = self.meta.get("regions") or {}
        out = {}
        for key, r in saved.items():
            mask = self.region_masks.get(key)
            out[key] = Region(r["spec"], box=tuple(r["box"]) if r.get("box") else None,
                              mask=None if mask is None else mask.float().numpy())
        return out or None

    @property
    def gate(self) -> str:
        """"sample" (the paper's per-sample gates) or "token" (per-token gates)."""
        return self.meta.get("mole_config", {}).get("gate", "sample")

    def mole_config(self) -> MoleConfig:
        """The MoleConfig to attach with so these gates fit: every field the file records (older files
        lack the newer ones: their defaults)."""
        saved = self.meta.get("mole_config", {})
        known = {f.name for f in dataclasses.fields(MoleConfig)}
        fields = {k: v for k, v in saved.items() if k in known} if isinstance(saved, dict) else {}
        fields.update(granularity=self.granularity, gate=self.gate)
        return MoleConfig(**fields)

    def check(self, lora_files: list[tuple[str, str | Path]], model_id: str | None = None) -> None:
        """MixtureError unless `lora_files` [(name, path)] are the mixture's files (names, order, sha256)
        and, when both are known, the model id matches."""
        where = Path(self.path).name if self.path else "the mixture"
        names = [name for name, _ in lora_files]
        if names != list(self.names):
            raise MixtureError(f"{where} was trained for the LoRAs {', '.join(self.names)} (in this order); "
                               f"found {', '.join(names)}.")
        for (name, path), expected in zip(lora_files, self.sha256s):
            found = sha256_file(path)
            if found != expected:
                raise MixtureError(f"{where}: the LoRA file of '{name}' ({Path(path).name}) is not the one the gates were "
                                   f"trained with (sha256 {found[:12]}…, expected {expected[:12]}…).")
        trained_on = self.meta.get("model_id")
        if model_id and trained_on and model_id != trained_on:
            raise MixtureError(f"{where} was trained on the model '{trained_on}', not '{model_id}'.")


def _jsonable(obj):
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def save_mixture(path, handle: MoleHandle, lora_files: list[tuple[str, str | Path]], config=None,
                 train_result=None, model_id: str = "", regions: dict | None = None) -> Path:
    """Write the gates of `handle` and their provenance to `path` (.safetensors), atomically.

    config: the MoleConfig and/or TrainConfig used (a dataclass, or a list of them); train_result: the
    TrainResult (steps, final losses, mean gates are recorded). regions: {expert: where} (mole_core.regions:
    presets and boxes in the metadata, mask images as tensors "regions.<expert>"), rendered with these gates
    unless a Mix gives its own.
    """
    path = Path(path)
    names = [name for name, _ in lora_files]
    if names != handle.expert_names:
        raise MixtureError(f"{path}: the LoRA files name {', '.join(names)}, but the attachment's experts are "
                           f"{', '.join(handle.expert_names)}.")
    configs = config if isinstance(config, (list, tuple)) else [config]
    meta = {
        "format": FORMAT,
        "model_id": model_id,
        "names": names,
        "sha256": [sha256_file(p) for _, p in lora_files],
        "files": [Path(p).name for _, p in lora_files],
        "granularity": handle.config.granularity,
        "mole_config": dataclasses.asdict(handle.config),
        "configs": {type(c).__name__: _jsonable(c) for c in configs if c is not None},
        "layout": handle.gate_layout(),
    }
    if train_result is not None:
        meta.update(steps=train_result.steps, final_losses=train_result.final,
                    mean_gates=train_result.mean_gates, seconds=train_result.seconds)
        if getattr(train_result, "held_out", None):
            meta.update(held_out=train_result.held_out)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in handle.gate_state_dict().items()}
    placed = parse_regions(regions, names) or {}
    if placed:
        meta["regions"] = {k: {"spec": r.spec, "box": r.box} for k, r in placed.items()}
        tensors.update({f"regions.{k}": torch.from_numpy(r.mask) for k, r in placed.items() if r.mask is not None})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", META_KEY: json.dumps(meta)})
    return path


def load_mixture(path, display: str | None = None) -> Mixture:
    """Read a mixture file written by `save_mixture`, checking all of it before anything uses it.

    display: what to call the file in messages (default: its file name). Refused with a MixtureError
    naming the field: unreadable files, metadata that is not this format's (names, hashes, granularity,
    gate kind, layout), and gate tensors that are not finite or implausibly large.
    """
    path = Path(path)
    where = display or path.name
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # safetensors raises its own error types for unreadable files
        raise MixtureError(f"{where}: not a readable .safetensors file ({e}).") from e
    if raw is None:
        raise MixtureError(f"{where}: a .safetensors file without MoLE mixture metadata (a LoRA file?).")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise MixtureError(f"{where}: its '{META_KEY}' metadata is not valid JSON ({e}).") from e
    _check_meta(meta, where)
    for key, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0 or not torch.isfinite(t).all() or t.abs().max() > MAX_GATE_ABS:
            raise MixtureError(f"{where}: gate tensor '{key}' is empty, not finite or holds values above "
                               f"{MAX_GATE_ABS:g}; the file is refused.")
    masks = {k[len("regions."):]: tensors.pop(k) for k in [k for k in tensors if k.startswith("regions.")]}
    if any(m.dim() != 2 or m.min() < 0 or m.max() > 1 for m in masks.values()):
        raise MixtureError(f"{where}: a region mask is not a 2-D map of values between 0 and 1; the file is refused.")
    return Mixture(names=list(meta["names"]), sha256s=list(meta["sha256"]), granularity=meta["granularity"],
                   gate_state=tensors, meta=meta, path=str(path), region_masks=masks)


def _check_meta(meta, where: str) -> None:
    """MixtureError naming the first metadata field that is not what save_mixture writes."""
    def bad(field, expected):
        raise MixtureError(f"{where}: metadata '{field}' must be {expected}; found {meta.get(field)!r:.80}.")

    if not isinstance(meta, dict):
        raise MixtureError(f"{where}: the mixture metadata must be a JSON object; found {type(meta).__name__}.")
    if meta.get("format") != FORMAT:
        raise MixtureError(f"{where}: mixture format '{meta.get('format')}', expected '{FORMAT}'.")
    names, hashes = meta.get("names"), meta.get("sha256")
    if not isinstance(names, list) or len(names) < 1 or not all(isinstance(n, str) and n for n in names):
        bad("names", "a list of LoRA names")
    if len(set(names)) != len(names):
        bad("names", "a list of different LoRA names")
    if not isinstance(hashes, list) or len(hashes) != len(names) or not all(isinstance(h, str) for h in hashes):
        bad("sha256", f"a list of {len(names)} file hashes")
    if meta.get("granularity") not in GRANULARITIES:
        bad("granularity", f"one of {', '.join(GRANULARITIES)}")
    config = meta.get("mole_config", {})
    if not isinstance(config, dict) or config.get("gate", "sample") not in GATE_KINDS:
        bad("mole_config", f"an object whose 'gate' is one of {', '.join(GATE_KINDS)}")
    layout = meta.get("layout", {})
    if not isinstance(layout, dict) or not all(isinstance(v, dict) for v in layout.values()):
        bad("layout", "an object of group -> {leader, d_out}")
    if not isinstance(meta.get("model_id", ""), str):
        bad("model_id", "a string")


def apply_mixture(handle: MoleHandle, mixture: Mixture, lora_files: list[tuple[str, str | Path]] | None = None) -> None:
    """Load the mixture's gates into `handle` (after checking `lora_files` if given).

    Fails with MixtureError when the experts, the granularity or the model's groups differ.
    """
    where = Path(mixture.path).name if mixture.path else "the mixture"
    if lora_files is not None:
        mixture.check(lora_files)
    if list(mixture.names) != handle.expert_names:
        raise MixtureError(f"{where} was trained for the experts {', '.join(mixture.names)}; the attachment has "
                           f"{', '.join(handle.expert_names)}.")
    if mixture.granularity != handle.config.granularity:
        raise MixtureError(f"{where} has '{mixture.granularity}' gates; the attachment was made with granularity "
                           f"'{handle.config.granularity}'.")
    if mixture.gate != handle.config.gate:
        raise MixtureError(f"{where} has per-{mixture.gate} gates; the attachment was made with per-"
                           f"{handle.config.gate} gates.")
    groups = list(mixture.layout)
    if groups and groups != handle.groups:
        theirs, ours = set(groups), set(handle.groups)
        diff = sorted(theirs - ours) or sorted(ours - theirs)
        raise MixtureError(f"{where} was trained on a model with other gated groups (a different model?): "
                           f"{len(groups)} groups in the file, {len(handle.groups)} here; e.g. '{diff[0] if diff else groups[0]}'.")
    try:
        handle.load_gate_state_dict(mixture.gate_state, mixture.layout)
    except ValueError as e:
        raise MixtureError(f"{where}: {e}") from e
