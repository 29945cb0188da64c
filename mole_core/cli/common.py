"""What the image and text commands share: defaults shown by --help without importing torch, lazy choices,
argument parsing of LoRA weights, the merge checks, the training bar and the library-noise filters.

Imports run one way: `mole_core.cli` (parser, dispatch) -> `cli.image` / `cli.text` -> `cli.common`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math


# Defaults of TrainConfig (train.BALANCE_ALPHA) / Mix, repeated here so that --help shows numbers without
# importing torch; tests/cli/test_cli.py checks that they are still the dataclasses' own.
TRAIN_ALPHA, TRAIN_SEED = 0.5, 0


DTYPE_NAMES = ("float32", "float16", "bfloat16")     # mole_core.image.engine.DTYPES' keys


MIX_DENSITY, MIX_SWITCH_EVERY = 0.5, 5


class Choices:
    """argparse `choices` read from a package module when argparse first shows or checks them.

    `python -m mole_core --help` and usage errors never touch them (each option has a metavar), so they
    do not import torch; `generate --help` or a given value does, once. `open_prefix` admits any value
    that starts with it (generate's "single:KEY").
    """

    def __init__(self, module: str, name: str, open_prefix: str | None = None):
        self.module, self.name, self.open_prefix = module, name, open_prefix

    def _values(self) -> tuple[str, ...]:
        values = tuple(getattr(importlib.import_module(self.module), self.name))
        return values + ((f"{self.open_prefix}KEY",) if self.open_prefix else ())

    def __iter__(self):
        return iter(self._values())

    def __contains__(self, value) -> bool:
        if self.open_prefix and isinstance(value, str) and value.startswith(self.open_prefix):
            return bool(value[len(self.open_prefix):].strip())
        return value in self._values()


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser. `arguments(parser)`, when given, adds its flags on first use: evaluate's
    flags live in mole_core.studies.evaluate, which imports torch, and `python -m mole_core --help` must not."""

    def __init__(self, *args, arguments=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending = arguments

    def _add_pending(self) -> None:
        if self._pending is not None:
            add, self._pending = self._pending, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_pending()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_pending()
        return super().format_help()


class _NoTorchvisionNotice(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision … falling back" notices: diffusers
    imports the image processors for the safety checker, which a command line never uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_NO_TORCHVISION_NOTICE = _NoTorchvisionNotice()


def hush_torchvision_notice() -> None:
    """Before anything loads a pipeline (the CLI's main and app.py's): stdlib logging, idempotent."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_NO_TORCHVISION_NOTICE)


def quiet_libraries() -> None:
    """No loading bars from diffusers / transformers: a command prints results."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def check_model(model: str | None, bank: str | None = None, flag: str = "--model") -> None:
    """ValueError naming `flag` for a model that cannot be opened, before any bank or LoRA is read: a file,
    a folder that is neither a diffusers pipeline (model_index.json) nor a transformers model (config.json),
    a broken model_index.json, a path that does not exist; or an image model given a bank of text LoRAs.
    A name that is no local path (`org/name`) is a hub id and passes."""
    import re
    from pathlib import Path
    if not model:
        return
    path, shown = Path(model).expanduser(), f"{flag} '{model}'"
    if path.is_file():
        raise ValueError(f"{shown} is a file; give a model folder (a diffusers pipeline with model_index.json, or "
                         f"a transformers model with config.json) or a hub id.")
    if path.is_dir():
        index = path / "model_index.json"
        if index.is_file():
            try:
                if not isinstance(json.loads(index.read_text()), dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{shown}: its model_index.json is not readable ({e}).") from e
        elif not (path / "config.json").is_file():
            raise ValueError(f"{shown} is neither a diffusers pipeline folder (model_index.json) nor a "
                             f"transformers model folder (config.json).")
    elif not (re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", model) and not path.parent.exists()):
        raise ValueError(f"{shown}: no such folder (nor a hub id such as 'org/name').")
    if bank and not (path / "config.json").is_file() and _holds_text_loras(Path(bank)):
        raise ValueError(f"{shown} is not a transformers text model folder (config.json), but the bank "
                         f"'{Path(bank).name}' holds text LoRAs: give the text model's folder, e.g. "
                         f"--model assets/text-world.")


def _holds_text_loras(bank) -> bool:
    """True when a manifest in the bank folder says kind 'text'."""
    for manifest in sorted(bank.glob("*.json"))[:64] if bank.is_dir() else ():
        try:
            if json.loads(manifest.read_text()).get("kind") == "text":
                return True
        except (ValueError, OSError, AttributeError, UnicodeDecodeError):
            continue
    return False


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'FILE[:WEIGHT]' -> (FILE, WEIGHT); weight 1.0 when absent (a ':' not followed by a number is part of FILE)."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def parse_key_values(items, flag: str) -> dict[str, float] | None:
    """['KEY=VALUE', ...] -> {KEY: VALUE}; None when no item is given. The values are checked by Mix.check."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not (key and sep):
            raise ValueError(f"{flag} '{item}' must look like KEY=NUMBER.")
    return out


def check_merge(args, weights, max_weight: float) -> None:
    """merge's numbers, before any file is read: ValueError naming the flag. max_weight: mix.MAX_WEIGHT,
    the bound generate's --weight has too."""
    for item, weight in zip(args.lora, weights):
        if not math.isfinite(weight):
            raise ValueError(f"--lora {item}: the weight must be a finite number; got {weight}.")
        if abs(weight) > max_weight:
            raise ValueError(f"--lora {item}: the weight must be between -{max_weight:g} and {max_weight:g}; "
                             f"got {weight:g}.")
    if not args.raw_weights and abs(sum(weights)) < 1e-8:
        raise ValueError("--lora: the weights sum to 0, so they cannot be normalised to sum 1; change a weight "
                         "or pass --raw-weights.")
    if args.rank is not None and not 1 <= args.rank <= 4096:
        raise ValueError(f"--rank must be a whole number between 1 and 4096; got {args.rank}.")
    if not (math.isfinite(args.density) and 0 < args.density <= 1):
        raise ValueError(f"--density must be above 0 and at most 1; got {args.density}.")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be a whole number from 0 to 2^63 − 1; got {args.seed}.")


@contextlib.contextmanager
def step_bar(steps: int):
    """A bar of gate-training steps on stderr (loss and mean gates after each); yields the on_step
    callback `train_gates` takes."""
    from mole_core.bars import progress_bar
    bar_format = "{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed}<{remaining}, {rate_inv_fmt}{postfix}"
    with progress_bar(steps, "train-gates", "steps", bar_format) as bar:
        def on_step(step, losses, gates):
            bar.set_postfix(loss=f"{losses['loss']:.4f}", gates="/".join(f"{float(g):.2f}" for g in gates),
                            refresh=False)
            bar.update(1)
        yield on_step
