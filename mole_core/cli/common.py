"""What the image and text commands share: defaults shown by --help without importing torch, lazy choices,
argument parsing of LoRA weights, the merge checks, the training bar and the library-noise filters.

Imports run one way: `mole_core.cli` (parser, dispatch) -> `cli.image` / `cli.text` -> `cli.common`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import sys


# Defaults of TrainConfig / MoleConfig / Mix, repeated here so that --help shows numbers without importing
# torch; tests/test_cli.py checks that they are still the dataclasses' own.
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


def quiet_libraries() -> None:
    """No loading bars from diffusers / transformers: a command prints results."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


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
    """A tqdm bar of gate-training steps on stderr (loss and mean gates after each); yields the on_step
    callback `train_gates` takes."""
    from tqdm import tqdm
    bar_format = "{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed}<{remaining}, {rate_inv_fmt}{postfix}"
    with tqdm(total=steps, desc="train-gates", unit="step", bar_format=bar_format, file=sys.stderr,
              dynamic_ncols=True) as bar:
        def on_step(step, losses, gates):
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", gates="/".join(f"{float(g):.2f}" for g in gates))
        yield on_step
