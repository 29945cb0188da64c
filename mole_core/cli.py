"""Command line: `python -m mole_core <command> …`.

One small function per subcommand (`cmd_<name>(args) -> exit code`), registered in `build_parser`.
To add a command: write `cmd_x(args)`, add its parser in `build_parser` with `set_defaults(func=cmd_x)`.
`generate` builds one `Mix` (mole_core.mix) from its flags and hands it to the engine whole; the engine
runs with `Limits.local()`.

Errors in the user's input (a bad file, a LoRA that does not fit, a number out of range) print one
sentence and exit 1: every number is checked where it enters (`Mix.check`, `Engine.check`,
`Engine.check_train`, `check_merge` here) before anything is computed or written.

Startup stays short: torch, diffusers and the engine are imported inside the command functions, so
`--help` and usage errors answer at once; the lists of methods and gate kinds are read from the package
only when argparse shows or checks them (`Choices`).

References: diffusers `commands/diffusers_cli.py` (argparse subcommands).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import sys
import time

from mole_core.defaults import (DEFAULT_BANK, DEFAULT_DENOISE_STEPS, DEFAULT_GATE, DEFAULT_GUIDANCE, DEFAULT_MODEL,
                                TRAIN_BATCH, TRAIN_LR, TRAIN_STEPS, Limits)

# Defaults of TrainConfig / MoleConfig / Mix, repeated here so that --help shows numbers without importing
# torch; tests/test_cli.py checks that they are still the dataclasses' own.
TRAIN_ALPHA, TRAIN_SEED = 0.5, 0
DTYPE_NAMES = ("float32", "float16", "bfloat16")     # mole_core.engine.DTYPES' keys
MIX_DENSITY, MIX_SWITCH_EVERY = 0.5, 5


# ---- startup --------------------------------------------------------------------------------------

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
    flags live in mole_core.evaluate, which imports torch, and `python -m mole_core --help` must not."""

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


def local_engine(args):
    """The engine for --model/--bank with the limits of a private machine."""
    from mole_core.engine import Engine

    return Engine(args.model, args.bank, limits=Limits.local(), **engine_precision(args))


def engine_precision(args) -> dict:
    """Engine keyword arguments from --dtype / --cpu-offload / --no-graphs (absent flags: the engine's defaults)."""
    from mole_core.engine import DTYPES

    dtype = getattr(args, "dtype", None)
    return {"dtype": DTYPES[dtype] if dtype else None, "cpu_offload": bool(getattr(args, "cpu_offload", False)),
            **({"graphs": False} if getattr(args, "no_graphs", False) else {})}


# ---- parsing helpers ------------------------------------------------------------------------------

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


# ---- commands -------------------------------------------------------------------------------------

def load_components(model_dir: str):
    """A diffusers pipeline folder of any supported family, offline, as (pipeline, components ModuleDict)."""
    quiet_libraries()
    from mole_core.families import components, load_pipeline

    pipe = load_pipeline(model_dir)
    return pipe, components(pipe)


def cmd_inspect(args) -> int:
    """Print what a LoRA file holds and whether it fits the model."""
    from mole_core.families import family_of
    from mole_core.lora import inspect_lora

    pipe, components = load_components(args.model) if args.model else (None, None)
    info = inspect_lora(args.file, components, family=family_of(pipe).name if pipe is not None else None)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for field in ("file", "format", "family", "targets", "modules", "linear", "conv", "ranks", "alphas",
                      "size_bytes", "verdict"):
            print(f"{field:>10}: {info[field]}")
    return 0 if info["ok"] else 1


def cmd_merge(args) -> int:
    """Merge LoRA files (linear / svd / ties / dare) and write one LoRA file that diffusers loads."""
    # 1. the numbers, then every input file against the model
    from mole_core.lora import MAX_ABS, load_lora, save_lora, validate_lora
    from mole_core.merge import merge_loras
    from mole_core.mix import MAX_WEIGHT

    files, weights = zip(*(parse_lora_arg(t) for t in args.lora))
    check_merge(args, weights, MAX_WEIGHT)
    _, components = load_components(args.model)
    loras = [load_lora(f) for f in files]
    for lora in loras:
        validate_lora(lora, components)
    # 2. merge, check, write
    extra = {"density": args.density, "seed": args.seed} if args.method in ("ties", "dare") else {}
    merged = merge_loras(loras, list(weights), method=args.method, rank=args.rank,
                         normalize=not args.raw_weights, name=args.name, **extra)
    for key, w in merged.modules.items():   # what load_lora would refuse is never written
        largest = max(w.A.abs().max().item(), w.B.abs().max().item())
        if not largest <= MAX_ABS:
            raise ValueError(f"The merged module '{key}' holds values up to {largest:.3g} (LoRA files above "
                             f"{MAX_ABS:g} are refused when loaded): lower the --lora weights.")
    save_lora(merged, args.out, format=args.format)
    ranks = sorted({w.rank for w in merged.modules.values()})
    print(f"wrote {args.out}: {args.method} merge of {len(loras)} LoRA(s), {len(merged.modules)} modules, "
          f"rank {ranks[0] if len(ranks) == 1 else ranks}, {args.format} format")
    return 0


def cmd_evaluate(args) -> int:
    """Train (or load) the mixture and score MoLE, linear, SVD, each LoRA and the base on the same prompts."""
    quiet_libraries()
    from mole_core.evaluate import cli_evaluate

    return cli_evaluate(args)


def cmd_train_gates(args) -> int:
    """Train the MoLE gates over bank LoRAs on their example images; write the mixture file."""
    quiet_libraries()
    from mole_core.mix import mole_config_for
    from mole_core.train import TrainConfig

    # 1. the engine and the settings, checked before the bar opens (a refused number writes nothing)
    engine = local_engine(args)
    mole = mole_config_for(args.granularity, args.gate)
    if args.alpha is None:                # trigger routing trains without the balance term (mix.ROUTED)
        args.alpha = 0.0 if args.gate == "routed" else TRAIN_ALPHA
    config = TrainConfig(steps=args.steps, lr=args.lr, balance_alpha=args.alpha, batch_size=args.batch_size,
                         seed=args.seed)
    engine.check_train(args.lora, mole, config)
    # 2. train with a bar of training steps on stderr (tqdm's measured seconds per step), then report
    start = time.perf_counter()
    with step_bar(config.steps) as on_step:
        mixture = engine.train(args.lora, mole, config, on_step=on_step, out_path=args.out)
    seconds = time.perf_counter() - start
    steps = mixture.meta.get("steps") or config.steps
    final = mixture.meta.get("final_losses", {})
    print(f"wrote {args.out}: {mixture.mole_config().describe} gates for {', '.join(mixture.names)}, "
          f"{steps} steps in {seconds:.1f} s ({seconds / steps:.2f} s/step), "
          f"final loss {final.get('loss', float('nan')):.4f}, "
          f"mean gates {', '.join(f'{g:.3f}' for g in mixture.meta.get('mean_gates', []))}")
    return 0


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


def cmd_generate(args) -> int:
    """Render one image with one Mix (MoLE, a merge, a peer, the base or a single LoRA)."""
    quiet_libraries()
    from mole_core.engine import GenerateRequest, save_image, write_gates_csv
    from mole_core.families import default_guidance
    from mole_core.mix import Mix
    from mole_core.mixture import load_mixture

    # 1. the Mix and the request, checked whole (numbers, names, mixture, sizes) before anything renders
    engine = local_engine(args)
    off = [k.strip() for item in args.mask or [] for k in item.split(",") if k.strip()]
    mix = Mix(args.method, tuple(args.lora or ()),
              weights=parse_key_values(args.weight, "--weight"), normalize=not args.raw_weights,
              rank=args.rank, density=args.density, switch_every=args.switch_every,
              granularity=args.granularity, gate=args.gate,
              mixture=load_mixture(args.mixture) if args.mixture else None,
              mask={k: False for k in off} or None, strengths=parse_key_values(args.strength, "--strength"))
    guidance = args.guidance if args.guidance is not None else default_guidance(args.model)
    request = GenerateRequest(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps,
                              guidance=guidance, height=args.height, width=args.width, true_cfg=args.true_cfg)
    if args.gates_out and mix.method != "mole":
        raise ValueError("--gates-out writes the MoLE gates: use it with --method mole.")
    for warning in engine.check([mix], request):
        print(f"warning: {warning}", file=sys.stderr)
    # 2. render and write
    result = engine.generate(mix, request)
    save_image(result.image, args.out)
    if args.gates_out:
        write_gates_csv(result.gates, args.gates_out)
    print(f"wrote {args.out}: {result.label}, seed {request.seed}, {result.seconds:.2f} s"
          + (f"; gates in {args.gates_out}" if args.gates_out else ""))
    return 0


# ---- the parser -----------------------------------------------------------------------------------

def add_model_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument("--bank", default=DEFAULT_BANK, help="LoRA bank folder (default: the embedded bank)")
    add_precision_arguments(p)


def add_precision_arguments(p) -> None:
    """--dtype, --cpu-offload and --no-graphs (the CLI's image commands and app.py)."""
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="the model's precision (default: float32); float16 / bfloat16 halve its memory on a GPU, "
                        "the gates stay float32")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep the models in CPU memory and move each to the GPU only while it runs (diffusers' "
                        "enable_model_cpu_offload; needs a CUDA GPU): for models bigger than the GPU")
    p.add_argument("--no-graphs", action="store_true",
                   help="run the denoiser eagerly on a GPU (default there: each step replayed as a CUDA graph, "
                        "torch.compile mode reduce-overhead; the first image at a new size compiles)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mole_core", description="MoLE Studio engine tools.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    granularities = Choices("mole_core.attach", "GRANULARITIES")
    gate_kinds = Choices("mole_core.mix", "GATES")

    p = sub.add_parser("inspect", help="show a LoRA file's format, targets, ranks, alphas and validity")
    p.add_argument("file", help="a .safetensors LoRA file")
    p.add_argument("--model", help="a diffusers Stable Diffusion folder to validate against")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="merge LoRA files into one LoRA file (linear: exact; svd/ties/dare: rank r)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="the diffusers Stable Diffusion folder the LoRAs are for (default: the embedded model)")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="a LoRA file and its weight (default 1); repeat for each LoRA")
    p.add_argument("--method", choices=Choices("mole_core.mix", "MERGES"), default="linear", metavar="METHOD",
                   help="%(choices)s (default: %(default)s)")
    p.add_argument("--rank", type=int, default=None, help="svd/ties/dare rank (default: the largest input rank)")
    p.add_argument("--density", type=float, default=MIX_DENSITY,
                   help="ties/dare: fraction of each ΔW's entries kept, in (0, 1] (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the dropped entries (default: %(default)s)")
    p.add_argument("--raw-weights", action="store_true", help="use the weights as given, not normalised to sum 1")
    p.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    p.add_argument("--name", default="merged", help="name stored in the file's metadata")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("evaluate", help="score MoLE vs the merges vs each LoRA vs base on the same prompts and seeds",
                       arguments=lambda p: importlib.import_module("mole_core.evaluate").add_arguments(p))
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train-gates", help="train MoLE gates over bank LoRAs and write a mixture file")
    add_model_arguments(p)
    p.add_argument("--lora", action="append", required=True, metavar="KEY", help="a bank key; repeat (2 or more)")
    p.add_argument("--granularity", choices=granularities, default="block", metavar="G",
                   help="which modules share one gate: %(choices)s (default: %(default)s)")
    p.add_argument("--gate", choices=gate_kinds, default=None, metavar="KIND",
                   help=f"%(choices)s (default: {DEFAULT_GATE}; text models: sample). sample: one gate decision per image (the paper); "
                        "token: per token / pixel; static: one learned weight per expert for every input; routed: per "
                        "token, each LoRA's trigger phrase routing its text tokens and pixels")
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=TRAIN_LR, help="learning rate (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"balance-loss weight α (default: {TRAIN_ALPHA}; 0 with --gate routed)")
    p.add_argument("--batch-size", type=int, default=TRAIN_BATCH,
                   help="example images per step (default: %(default)s)")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help="training seed (default: %(default)s)")
    p.add_argument("--out", required=True, help="output mixture .safetensors file")
    p.set_defaults(func=cmd_train_gates)

    p = sub.add_parser("generate", help="render one image with MoLE, a merge, a peer, the base model or one LoRA")
    add_model_arguments(p)
    p.add_argument("--method", required=True, metavar="METHOD",
                   choices=Choices("mole_core.mix", "METHODS", open_prefix="single:"),
                   help="%(choices)s (single:KEY = that bank LoRA alone)")
    p.add_argument("--mixture", help="trained gates (from train-gates); its LoRAs are used unless --lora is given")
    p.add_argument("--lora", action="append", metavar="KEY", help="a bank key; repeat for each LoRA")
    p.add_argument("--mask", action="append", metavar="KEY[,KEY]",
                   help="MoLE experts to switch off (the rest renormalised)")
    p.add_argument("--strength", action="append", metavar="KEY=S",
                   help="MoLE strength of one expert, 0 to 10 (default 1)")
    p.add_argument("--granularity", choices=granularities, default="block", metavar="G",
                   help="MoLE without --mixture: which modules share a gate, %(choices)s (default: %(default)s)")
    p.add_argument("--gate", choices=gate_kinds, default=None, metavar="KIND",
                   help=f"MoLE without --mixture: gate kind, %(choices)s (default: {DEFAULT_GATE}; text models: sample)")
    p.add_argument("--weight", action="append", metavar="KEY=W",
                   help="merge weight of one LoRA (default: its manifest's default_weight)")
    p.add_argument("--raw-weights", action="store_true", help="use merge weights as given, not normalised to sum 1")
    p.add_argument("--rank", type=int, default=None, help="svd/ties/dare rank (default: the LoRAs' own)")
    p.add_argument("--density", type=float, default=MIX_DENSITY,
                   help="ties/dare: fraction of each ΔW's entries kept, in (0, 1] (default: %(default)s)")
    p.add_argument("--switch-every", type=int, default=MIX_SWITCH_EVERY, metavar="K",
                   help="switch: denoising steps per LoRA (default: %(default)s)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--true-cfg", type=float, default=1.0, metavar="S",
                   help="FLUX only: true classifier-free guidance on --negative when above 1 (e.g. 4; twice the "
                        "cost per step); FLUX ignores a negative prompt without it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="starting-noise seed (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_DENOISE_STEPS, help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale (default: {DEFAULT_GUIDANCE:g} on the embedded world, else "
                        "the pipeline's own default: SD 7.5, SDXL 5, SD3 7, FLUX 3.5)")
    p.add_argument("--height", type=int, default=None, help="default: the model's resolution")
    p.add_argument("--width", type=int, default=None, help="default: the model's resolution")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--gates-out", help="write the recorded MoLE gates as CSV (group, step, sample, expert, weight)")
    p.set_defaults(func=cmd_generate)

    return parser


def main(argv: list[str] | None = None) -> int:
    # before anything imports diffusers (argparse's choices may): stdlib logging, idempotent
    logging.getLogger("transformers.utils.import_utils").addFilter(_NO_TORCHVISION_NOTICE)
    args = build_parser().parse_args(argv)
    try:
        from mole_core.text_cli import run as run_text, wants_text
        if wants_text(args):              # a transformers text model: the same verbs on text (text_cli.py)
            return run_text(args)
        if getattr(args, "gate", False) is None:
            args.gate = DEFAULT_GATE
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input (the engine's errors are ValueErrors), unreadable paths
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:            # outputs are written atomically: nothing half-written is left
        print("interrupted", file=sys.stderr)
        return 130
