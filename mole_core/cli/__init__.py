"""Command line: `python -m mole_core <command> …`.

This module is the parser and the dispatch. One small function per subcommand (`cmd_<name>(args) -> exit
code`) in `cli/image.py`, registered in `build_parser`; when --model is a transformers text model the same
verbs run on text (`cli/text.py`). What both share is in `cli/common.py`. Imports run one way: this module
-> image / text -> common. To add a command: write `cmd_x(args)`, add its parser in `build_parser` with
`set_defaults(func=cmd_x)`.
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
import importlib
import sys

from mole_core.cli.common import (DTYPE_NAMES, MIX_DENSITY, MIX_SWITCH_EVERY, TRAIN_ALPHA, TRAIN_SEED, Choices,
                                  CommandParser, check_model, hush_torchvision_notice, quiet_libraries)
from mole_core.cli.image import cmd_evaluate, cmd_generate, cmd_inspect, cmd_merge, cmd_train_gates, engine_precision
from mole_core.cli.text import run as run_text, wants_text
from mole_core.defaults import (DEFAULT_BANK, DEFAULT_DENOISE_STEPS, DEFAULT_GATE, DEFAULT_GUIDANCE, DEFAULT_MODEL,
                                TRAIN_BATCH, TRAIN_LR, TRAIN_STEPS)

__all__ = ["main", "build_parser", "add_precision_arguments", "engine_precision", "check_model", "hush_torchvision_notice", "quiet_libraries", "TRAIN_ALPHA", "DTYPE_NAMES",
           "MIX_DENSITY", "MIX_SWITCH_EVERY"]


# ---- parsing helpers ------------------------------------------------------------------------------


# ---- commands -------------------------------------------------------------------------------------


# ---- the parser -----------------------------------------------------------------------------------

def add_model_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument("--bank", default=DEFAULT_BANK,
                   help="LoRA bank folder (default: the embedded bank; text_bank with a text --model)")
    add_precision_arguments(p)


def add_precision_arguments(p) -> None:
    """--dtype and --cpu-offload (the CLI's image commands and app.py)."""
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
    p.add_argument("--model", help="a diffusers pipeline folder (SD 1.x, SDXL, SD3, FLUX) or text model folder to validate against")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="merge LoRA files into one LoRA file (linear: exact; svd/ties/dare: rank r)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="the diffusers pipeline folder the LoRAs are for (default: the embedded model)")
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
                       arguments=lambda p: importlib.import_module("mole_core.studies.evaluate").add_arguments(p))
    p.set_defaults(func=cmd_evaluate)

    _add_train_gates(sub, granularities, gate_kinds)
    _add_generate(sub, granularities, gate_kinds)
    return parser


def _add_train_gates(sub, granularities, gate_kinds) -> None:
    p = sub.add_parser("train-gates", help="train MoLE gates over bank LoRAs and write a mixture file")
    add_model_arguments(p)
    p.add_argument("--lora", action="append", required=True, metavar="KEY", help="a bank key; repeat (2 or more)")
    p.add_argument("--granularity", choices=granularities, default="block", metavar="G",
                   help="which modules share one gate: %(choices)s (default: %(default)s)")
    p.add_argument("--gate", choices=gate_kinds, default=None, metavar="KIND",
                   help=f"%(choices)s (default: {DEFAULT_GATE}; text models: prompt, one decision per answer read from the instruction). sample: one gate decision per image (the paper); "
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


def _add_generate(sub, granularities, gate_kinds) -> None:
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
    p.add_argument("--region", action="append", metavar="KEY=WHERE",
                   help="MoLE: where one expert acts: left, right, top, bottom, centre, whole, a box x0,y0,x1,y1 "
                        "(fractions) or a mask image file (white = inside); repeat per expert (default: everywhere)")
    p.add_argument("--granularity", choices=granularities, default="block", metavar="G",
                   help="MoLE without --mixture: which modules share a gate, %(choices)s (default: %(default)s)")
    p.add_argument("--gate", choices=gate_kinds, default=None, metavar="KIND",
                   help=f"MoLE without --mixture: gate kind, %(choices)s (default: {DEFAULT_GATE}; text models: prompt, one decision per answer read from the instruction)")
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


def main(argv: list[str] | None = None) -> int:
    hush_torchvision_notice()          # before anything imports diffusers (argparse's choices may)
    args = build_parser().parse_args(argv)
    try:
        check_model(getattr(args, "model", None), getattr(args, "bank", None))   # named, before any bank is read
        if wants_text(args):              # a transformers text model: the same verbs on text (text_cli.py)
            return run_text(args)
        if args.command in ("train-gates", "generate") and args.gate is None:
            args.gate = DEFAULT_GATE      # evaluate's --gate is a list: EvalConfig's default applies there
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input (the engine's errors are ValueErrors), unreadable paths
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:            # outputs are written atomically: nothing half-written is left
        print("interrupted", file=sys.stderr)
        return 130
