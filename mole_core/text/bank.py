"""The text bank: a folder of text LoRAs, each `<key>.safetensors` + its manifest `<key>.json`, or a PEFT adapter
folder `<key>/` (adapter_config.json + adapter_model.safetensors; its manifest `<key>.json` is optional).

The bank contract of mole_core.bank, as the image bank (mole_core.image.bank.Bank) keeps it: `entries` (every
entry, a broken one carrying its `error`), `keys()` / `usable_keys()`, `get(key)` (the entry; UnknownLora, a
KeyError, for an unknown key), `load(key)` (the LoRA in canonical form; ValueError for a broken entry),
`rescan()`; an entry's `trigger` is a list of words (a manifest may give one string).

References: peft `PeftModel.from_pretrained` (adapter folders).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from mole_core.bank import as_trigger, find
from mole_core.lora import Lora
from mole_core.text.lora_io import ADAPTER_FILES, adapter_folder, read_text_lora


@dataclass
class TextEntry:
    """One LoRA of the text bank, as its manifest describes it."""
    key: str                                    # file stem, the expert name
    name: str
    task: str                                   # the task family it was trained on
    trigger: list[str]                          # the instruction word(s) that ask for it
    description: str
    examples: list[tuple[str, str]] = field(default_factory=list)   # (input, output): gate-training data
    default_weight: float = 1.0
    lora_path: Path | None = None
    error: str | None = None                    # why the entry cannot be used; None when fine
    role: str = "main"                          # "main" or "distractor" (the text world's study pools)


def parse_text_manifest(manifest: dict, key: str) -> dict:
    """The TextEntry fields a manifest gives; ValueError naming the bad field."""
    where = f"{key}.json"
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: the manifest must be a JSON object, found {type(manifest).__name__}.")
    if manifest.get("kind", "text") != "text":
        raise ValueError(f"{where}: 'kind' must be 'text', found {manifest.get('kind')!r}.")
    for name in ("name", "task", "description"):
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
            "trigger": as_trigger(manifest.get("trigger", key), where), "description": manifest.get("description", ""),
            "examples": [(e["input"], e["output"]) for e in examples], "default_weight": float(weight),
            "role": str(manifest.get("role", "main"))}


class TextBank:
    """A folder of text LoRAs: `<key>.safetensors` + its manifest `<key>.json`, or a PEFT adapter folder
    `<key>/` (adapter_config.json + adapter_model.safetensors; its manifest `<key>.json` is optional); the bank
    contract of mole_core.bank."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._cache: dict[str, tuple[tuple, Lora]] = {}
        self._entries: list[TextEntry] | None = None      # read once (`rescan` reads the folder again)

    def rescan(self) -> None:
        """Read the folder again (on the next use)."""
        self._entries = None

    @property
    def entries(self) -> list[TextEntry]:
        """Every entry, usable or not (an unusable one carries its `error`)."""
        if self._entries is None:
            self._entries = self._scan()
        return self._entries

    def _scan(self) -> list[TextEntry]:
        if not self.folder.is_dir():
            return []
        adapters = {p.name for p in self.folder.iterdir() if p.is_dir() and adapter_folder(p) is not None}
        stems = sorted({p.stem for p in self.folder.glob("*.json")} | {p.stem for p in self.folder.glob("*.safetensors")}
                       | adapters)
        out = []
        for key in stems:
            manifest = self.folder / f"{key}.json"
            lora_path = (self.folder / key / ADAPTER_FILES[1]) if key in adapters else self.folder / f"{key}.safetensors"
            try:
                if not manifest.exists() and key not in adapters:
                    raise ValueError(f"{key}.safetensors has no manifest {key}.json.")
                if not lora_path.exists():
                    raise ValueError(f"{key}.json has no LoRA file {key}.safetensors (or adapter folder {key}/).")
                fields = (parse_text_manifest(json.loads(manifest.read_text()), key) if manifest.exists()
                          else parse_text_manifest({"name": key, "description": "a PEFT adapter"}, key))
                out.append(TextEntry(key=key, lora_path=lora_path, **fields))
            except (ValueError, OSError) as e:
                out.append(TextEntry(key=key, name=key, task="", trigger=[], description="", error=str(e)))
        return out

    def keys(self) -> list[str]:
        """Every entry's key (broken ones too)."""
        return [e.key for e in self.entries]

    def usable_keys(self) -> list[str]:
        """The keys of the entries without an error."""
        return [e.key for e in self.entries if e.error is None]

    def get(self, key: str) -> TextEntry:
        """The entry, broken or not; mole_core.bank.UnknownLora (a KeyError) for a key the bank does not hold,
        ValueError when the bank folder is missing or not a folder (said as such, not "it holds none")."""
        if not self.folder.is_dir():
            raise ValueError(f"The bank folder '{self.folder}' "
                             f"{'is not a folder' if self.folder.exists() else 'does not exist'}.")
        return find(self.entries, key)

    def _usable(self, key: str) -> TextEntry:
        entry = self.get(key)
        if entry.error:
            raise ValueError(entry.error)
        return entry

    @staticmethod
    def _stamp(path: Path) -> tuple:
        return path.stat().st_mtime_ns, path.stat().st_size

    def needs_model(self, key: str) -> bool:
        """True when `load(key)` will read a PEFT adapter onto the model (not yet cached)."""
        path = self._usable(key).lora_path
        return adapter_folder(path) is not None and (key not in self._cache or self._cache[key][0] != self._stamp(path))

    def load(self, key: str, model: nn.Module | None = None) -> Lora:
        """The entry's LoRA in canonical form (cached while the file is unchanged), named by its key
        (`read_text_lora`: a PEFT adapter folder is read onto `model`); ValueError for a broken entry."""
        path = self._usable(key).lora_path
        stamp = self._stamp(path)
        if key not in self._cache or self._cache[key][0] != stamp:
            self._cache[key] = (stamp, read_text_lora(path, model, name=key))
        return self._cache[key][1]
