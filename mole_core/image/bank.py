"""The LoRA bank: a folder of `NAME.safetensors` files, each with a manifest `NAME.json` beside it.

Manifest schema (paths relative to the bank folder):

    {"name": "Red circle", "trigger": ["sks"], "description": "…", "base_model": "tiny-sd",
     "kind": "subject" | "style", "default_weight": 1.0,
     "examples": [{"image": "examples/red_circle_0.png", "caption": "a photo of sks"}]}

The example images double as gate-training data. A broken entry (unreadable file, bad manifest, LoRA
that does not fit the model) is listed with its `error` and never stops the rest of the bank.

References: MoLE (Wu et al., ICLR 2024) — the experts; kohya/Civitai practice of a trigger word per LoRA.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch import nn

from mole_core.atomic import atomic_path, write_text
from mole_core.bank import as_trigger, find
from mole_core.lora import Lora
from mole_core.image.lora_files import load_lora, validate_lora

KINDS = ("subject", "style")
MAX_KEY = 64                                    # characters of a bank key (file names stay short)
EXAMPLES_DIR = "examples"


@dataclass
class BankEntry:
    """One LoRA of the bank, as its manifest describes it."""
    key: str                                    # file stem; unique in the bank, used as the expert name
    name: str                                   # display name
    trigger: list[str]                          # trigger word(s) to put in prompts
    description: str
    base_model: str                             # the model it was trained for (free text)
    kind: str                                   # "subject" | "style"
    default_weight: float
    examples: list[tuple[Path, str]] = field(default_factory=list)  # (absolute image path, caption)
    lora_path: Path | None = None
    error: str | None = None                    # why this entry cannot be used; None when fine


def parse_manifest(manifest: dict, folder: Path, key: str) -> dict:
    """Check a manifest dict and return the BankEntry fields it gives; ValueError naming the bad field."""
    where = f"{key}.json"
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: the manifest must be a JSON object, found {type(manifest).__name__}.")
    trigger = as_trigger(manifest.get("trigger", []), where)
    kind = manifest.get("kind", "subject")
    if kind not in KINDS:
        raise ValueError(f"{where}: 'kind' must be one of {KINDS}, found {kind!r}.")
    try:
        default_weight = float(manifest.get("default_weight", 1.0))
        if not math.isfinite(default_weight):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: 'default_weight' must be a number, found {manifest.get('default_weight')!r}.")
    examples = []
    for i, ex in enumerate(manifest.get("examples", [])):
        if not isinstance(ex, dict) or not isinstance(ex.get("image"), str):
            raise ValueError(f"{where}: examples[{i}] must be {{'image': path, 'caption': text}}, found {ex!r}.")
        image = folder / ex["image"]
        if not image.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"{where}: examples[{i}] image '{ex['image']}' lies outside the bank folder.")
        if not image.is_file():
            raise ValueError(f"{where}: examples[{i}] image '{ex['image']}' does not exist in the bank folder.")
        examples.append((image, str(ex.get("caption", ""))))
    return {"name": str(manifest.get("name", key)), "trigger": trigger,
            "description": str(manifest.get("description", "")), "base_model": str(manifest.get("base_model", "")),
            "kind": kind, "default_weight": default_weight, "examples": examples}


def _broken(key: str, lora_path: Path | None, error: str) -> BankEntry:
    return BankEntry(key=key, name=key, trigger=[], description="", base_model="", kind="subject",
                     default_weight=1.0, examples=[], lora_path=lora_path, error=error)


class Bank:
    """A folder of LoRAs with manifests; the bank contract of mole_core.bank (`entries` lists all of them,
    broken ones with `error` set).

    A bank may sit on top of another (`shared.overlay(folder)`): it lists the shared entries first, then
    its own, and `add` writes only into its own folder. That is how a visitor of a public app gets
    uploads of their own without writing into the bank every visitor shares.
    """

    def __init__(self, folder: str | Path, base: "Bank | None" = None):
        self.folder = Path(folder)
        self.base = base                       # the shared bank under this one, or None
        self._cache: dict[str, Lora] = {}
        self.own: list[BankEntry] = []         # the entries of this folder
        self.rescan()

    def overlay(self, folder: str | Path) -> "Bank":
        """A bank over this one whose own entries (and uploads) live in `folder`."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Bank(folder, base=self)

    @property
    def entries(self) -> list[BankEntry]:
        """Every entry: the shared bank's first (an overlay), then this folder's, each in key order."""
        return (self.base.entries if self.base is not None else []) + self.own

    def rescan(self) -> None:
        """Read the folder again (manifests only; LoRA weights load lazily in `load`)."""
        self._cache.clear()
        stems = sorted({p.stem for p in self.folder.glob("*.safetensors") if not p.name.startswith(".")} |
                       {p.stem for p in self.folder.glob("*.json") if not p.name.startswith(".")})
        self.own = [self._read_entry(stem) for stem in stems]

    def clean(self) -> list[Path]:
        """Remove what an interrupted write left behind: atomic-write temp files (`.NAME.*.tmp`) and
        example images of uploads that never got their manifest. Call it at start-up, not while writing."""
        removed = [p for p in (*self.folder.glob(".*.tmp"), *(self.folder / EXAMPLES_DIR).glob(".*"))
                   if p.is_file()]
        used = {ex[0].resolve() for entry in self.own for ex in entry.examples}
        keys = {entry.key for entry in self.own}
        for image in (self.folder / EXAMPLES_DIR).glob("*_*.*"):
            key, _, index = image.stem.rpartition("_")
            if image.resolve() not in used and index.isdigit() and key not in keys:
                removed.append(image)
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def _read_entry(self, key: str) -> BankEntry:
        lora_path, manifest_path = self.folder / f"{key}.safetensors", self.folder / f"{key}.json"
        if not lora_path.is_file():
            return _broken(key, None, f"{manifest_path.name}: manifest without its LoRA file {lora_path.name}.")
        if not manifest_path.is_file():
            return _broken(key, lora_path, f"{lora_path.name}: no manifest {manifest_path.name} beside it.")
        try:
            manifest = json.loads(manifest_path.read_text())
            fields = parse_manifest(manifest, self.folder, key)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _broken(key, lora_path, f"{manifest_path.name}: not valid JSON: {e}")
        except ValueError as e:
            return _broken(key, lora_path, str(e))
        return BankEntry(key=key, lora_path=lora_path, **fields)

    def get(self, key: str) -> BankEntry:
        """The entry, broken or not; mole_core.bank.UnknownLora (a KeyError) for a key the bank does not hold."""
        return find(self.entries, key)

    def keys(self) -> list[str]:
        """Every entry's key (broken ones too)."""
        return [e.key for e in self.entries]

    def usable_keys(self) -> list[str]:
        """The keys of the entries without an error."""
        return [e.key for e in self.entries if e.error is None]

    def load(self, key: str) -> Lora:
        """The entry's LoRA in canonical form (named by its key), read once and cached."""
        if self.base is not None and key in self.base.keys() and key not in {e.key for e in self.own}:
            return self.base.load(key)
        if key not in self._cache:
            entry = self.get(key)
            if entry.error:
                raise ValueError(entry.error)
            try:
                self._cache[key] = load_lora(entry.lora_path, name=key)
            except ValueError as e:    # name the file, not the folder it lies in
                raise ValueError(str(e).replace(str(entry.lora_path), entry.lora_path.name)) from e
        return self._cache[key]

    def validate(self, components: nn.Module) -> dict[str, str | None]:
        """key -> error sentence (or None) for every entry against a model; records it on the entry."""
        report = {}
        for entry in self.entries:
            if entry.error is None:
                try:
                    validate_lora(self.load(entry.key), components)
                except ValueError as e:
                    entry.error = str(e).replace(str(entry.lora_path), entry.lora_path.name)
            report[entry.key] = entry.error
        return report

    def add(self, src_path: str | Path, manifest: dict, images=(), components: nn.Module | None = None,
            key: str | None = None, display: str | None = None, max_pixels: int = 4096 * 4096) -> BankEntry:
        """Copy a LoRA file into the bank with its manifest and example images.

        images: paths, or (path, caption) pairs; they are copied to examples/<key>_<i><suffix> and listed
        in the manifest after any examples it already names. Everything is checked first (the LoRA reads
        and fits `components`, the manifest is valid, the images exist); nothing is written unless all of it
        is fine, each file lands by an atomic rename, and a failure while writing removes what was written.
        display: what to call the uploaded file in messages (its own name, never a server path).
        max_pixels: an example image larger than this is refused before it is decoded.
        """
        # 1. check everything before touching the folder
        src_path = Path(src_path)
        key = key or src_path.stem
        display = display or src_path.name
        if not key or "." in key or "/" in key or len(key) > MAX_KEY:
            raise ValueError(f"{display}: the name must give a bank key of 1 to {MAX_KEY} letters, digits, "
                             f"'_' or '-' (got '{key[:40]}{'…' if len(key) > 40 else ''}').")
        if key in self.keys() or (self.folder / f"{key}.safetensors").exists() or \
                (self.folder / f"{key}.json").exists():
            raise ValueError(f"The bank already has an entry '{key}': choose another name.")
        try:
            lora = load_lora(src_path, name=key)
            if components is not None:
                validate_lora(lora, components)
        except ValueError as e:    # the user's own name for the file, never the folder it was uploaded to
            message = str(e).replace(str(src_path), display)
            if message.startswith(src_path.name + ":"):
                message = display + message[len(src_path.name):]
            raise ValueError(message) from e
        pairs = [(Path(i), "") if isinstance(i, (str, Path)) else (Path(i[0]), str(i[1])) for i in images]
        for image, _ in pairs:
            try:
                with Image.open(image) as im:
                    if im.width * im.height > max_pixels:
                        raise ValueError(f"{image.name}: the example image is {im.width}×{im.height} pixels; "
                                         f"the limit is {max_pixels:,} pixels.")
                    im.verify()
            except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways to say "unreadable"
                raise ValueError(f"{image.name}: example image cannot be read as an image: {e}") from e
        copies = [(image, f"{EXAMPLES_DIR}/{key}_{i}{image.suffix.lower()}") for i, (image, _) in enumerate(pairs)]
        manifest = dict(manifest)
        manifest["examples"] = list(manifest.get("examples", [])) + [
            {"image": rel, "caption": caption} for (_, rel), (_, caption) in zip(copies, pairs)]
        for _, rel in copies:
            if (self.folder / rel).exists():
                raise ValueError(f"{rel}: an example image of that name already exists in the bank.")
        self._check_manifest_with_copies(manifest, key, {rel for _, rel in copies})
        twin = self._holding(src_path)
        if twin is not None:
            raise ValueError(f"{display} is already in the bank as '{twin.name}' ({twin.key}): the same file, byte "
                             f"for byte. Pick that entry instead.")

        # 2. write: images, then the LoRA, then the manifest (the entry exists only once its manifest does)
        written: list[Path] = []
        try:
            for image, rel in copies:
                written.append(_atomic_copy(image, self.folder / rel))
            written.append(_atomic_copy(src_path, self.folder / f"{key}.safetensors"))
            written.append(write_text(self.folder / f"{key}.json", json.dumps(manifest, indent=2)))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        self.rescan()
        return self.get(key)

    def _holding(self, src: Path) -> BankEntry | None:
        """The entry whose LoRA file has exactly the bytes of `src` (size first, then sha256), or None."""
        size = src.stat().st_size
        digest = None
        for entry in self.entries:
            path = entry.lora_path
            if path is None or not path.is_file() or path.stat().st_size != size:
                continue
            digest = digest or _sha256(src)
            if _sha256(path) == digest:
                return entry
        return None

    def _check_manifest_with_copies(self, manifest: dict, key: str, pending: set[str]) -> None:
        """parse_manifest, counting the images about to be copied as present."""
        existing = {"examples": [ex for ex in manifest["examples"]
                                 if not (isinstance(ex, dict) and ex.get("image") in pending)]}
        parse_manifest({**manifest, **existing}, self.folder, key)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_copy(src: Path, dst: Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst
