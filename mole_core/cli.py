"""Command line: `python -m mole_core <command> …`.

One small function per subcommand (`cmd_<name>(args) -> exit code`), registered in `build_parser`.
To add a command: write `cmd_x(args)`, add its parser in `build_parser` with `set_defaults(func=cmd_x)`.
Errors in the user's input (a bad file, a LoRA that does not fit) print one sentence and exit 1.

References: diffusers `commands/diffusers_cli.py` (argparse subcommands).
"""
from __future__ import annotations

import argparse
import json
import sys


def load_components(model_dir: str):
    """A diffusers Stable Diffusion folder, offline, as (pipeline, components ModuleDict)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from mole_core.lora import pipeline_components

    diffusers_logging.disable_progress_bar()  # a command line prints results, not loading bars
    transformers_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    return pipe, pipeline_components(pipe)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'FILE[:WEIGHT]' -> (FILE, WEIGHT); weight 1.0 when absent (a ':' not followed by a number is part of FILE)."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def cmd_inspect(args) -> int:
    """Print what a LoRA file holds and whether it fits the model."""
    from mole_core.lora import inspect_lora

    components = load_components(args.model)[1] if args.model else None
    info = inspect_lora(args.file, components)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for field in ("file", "format", "targets", "modules", "linear", "conv", "ranks", "alphas", "size_bytes",
                      "verdict"):
            print(f"{field:>10}: {info[field]}")
    return 0 if info["ok"] else 1


def cmd_merge(args) -> int:
    """Merge LoRA files (linear or svd) and write one LoRA file that diffusers loads."""
    from mole_core.lora import load_lora, save_lora, validate_lora
    from mole_core.merge import merge_loras

    # 1. read and check every input against the model
    _, components = load_components(args.model)
    files, weights = zip(*(parse_lora_arg(t) for t in args.lora))
    loras = [load_lora(f) for f in files]
    for lora in loras:
        validate_lora(lora, components)
    # 2. merge and write
    merged = merge_loras(loras, list(weights), method=args.method, rank=args.rank,
                         normalize=not args.raw_weights, name=args.name)
    save_lora(merged, args.out, format=args.format)
    ranks = sorted({w.rank for w in merged.modules.values()})
    print(f"wrote {args.out}: {args.method} merge of {len(loras)} LoRA(s), {len(merged.modules)} modules, "
          f"rank {ranks[0] if len(ranks) == 1 else ranks}, {args.format} format")
    return 0


def cmd_evaluate(args) -> int:
    """Train (or load) the mixture and score MoLE, linear, SVD, each LoRA and the base on the same prompts."""
    from mole_core.evaluate import cli_evaluate

    return cli_evaluate(args)


def parse_key_values(items, what: str) -> dict[str, float] | None:
    """['KEY=VALUE', ...] -> {KEY: VALUE}; None when no item is given."""
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
            raise ValueError(f"{what} '{item}' must look like KEY=NUMBER.")
    return out


def cmd_train_gates(args) -> int:
    """Train the MoLE gates over bank LoRAs on their example images; write the mixture file."""
    from tqdm import tqdm

    from mole_core.attach import MoleConfig
    from mole_core.engine import Engine
    from mole_core.train import TrainConfig

    # 1. the engine and the training settings given on the command line (the rest: TrainConfig defaults)
    engine = Engine(args.model, args.bank)
    given = {"steps": args.steps, "lr": args.lr, "balance_alpha": args.alpha, "seed": args.seed,
             "batch_size": args.batch_size}
    config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    # 2. train with a progress bar on stderr, then report
    with tqdm(total=config.steps, desc="train-gates", unit="step", file=sys.stderr) as bar:
        def on_step(step, losses, gates):
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", gates="/".join(f"{g:.2f}" for g in gates))

        mixture = engine.train(args.lora, MoleConfig(granularity=args.granularity, gate=args.gate), config,
                               on_step=on_step, out_path=args.out)
    final = mixture.meta.get("final_losses", {})
    print(f"wrote {args.out}: {mixture.granularity} per-{mixture.gate} gates for {', '.join(mixture.names)}, "
          f"{mixture.meta.get('steps')} steps, final loss {final.get('loss', float('nan')):.4f}, "
          f"mean gates {', '.join(f'{g:.3f}' for g in mixture.meta.get('mean_gates', []))}")
    return 0


def cmd_generate(args) -> int:
    """Render one image with one method (MoLE, a merge, the base or a single LoRA)."""
    from mole_core.engine import Engine, GenerateRequest, save_image, write_gates_csv
    from mole_core.mixture import load_mixture

    # 1. inputs: the LoRAs are --lora, else those of --mixture
    engine = Engine(args.model, args.bank)
    mixture = load_mixture(args.mixture) if args.mixture else None
    keys = args.lora or (list(mixture.names) if mixture is not None else [])
    off = [k for item in args.mask or [] for k in item.split(",") if k]
    request = GenerateRequest(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps,
                              guidance=args.guidance, height=args.height, width=args.width)
    if args.gates_out and args.method != "mole":
        raise ValueError("--gates-out writes the MoLE gates: use it with --method mole.")
    for warning in engine.check_request(keys, request, [args.method]):
        print(f"warning: {warning}", file=sys.stderr)
    # 2. render and write
    result = engine.generate(keys, args.method, request, mixture=mixture,
                             mask={k: False for k in off} or None,
                             strengths=parse_key_values(args.strength, "--strength"),
                             weights=parse_key_values(args.weight, "--weight"), rank=args.rank,
                             normalize=not args.raw_weights)
    save_image(result.image, args.out)
    if args.gates_out:
        write_gates_csv(result.gates, args.gates_out)
    print(f"wrote {args.out}: {result.label}, seed {request.seed}, {result.seconds:.2f} s"
          + (f"; gates in {args.gates_out}" if args.gates_out else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mole_core", description="MoLE Studio engine tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show a LoRA file's format, targets, ranks, alphas and validity")
    p.add_argument("file", help="a .safetensors LoRA file")
    p.add_argument("--model", help="a diffusers Stable Diffusion folder to validate against")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="merge LoRAs into one LoRA file (linear: exact; svd: rank r)")
    p.add_argument("--model", required=True, help="the diffusers Stable Diffusion folder the LoRAs are for")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="a LoRA file and its weight (default 1); repeat for each LoRA")
    p.add_argument("--method", choices=["linear", "svd"], default="linear")
    p.add_argument("--rank", type=int, default=None, help="svd rank (default: the largest input rank)")
    p.add_argument("--raw-weights", action="store_true", help="use the weights as given, not normalised to sum 1")
    p.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    p.add_argument("--name", default="merged", help="name stored in the file's metadata")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_merge)

    from mole_core.evaluate import add_arguments as add_evaluate_arguments
    p = sub.add_parser("evaluate", help="score MoLE vs linear vs SVD vs each LoRA vs base on the same prompts and seeds")
    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    from mole_core.attach import GATE_KINDS, GRANULARITIES
    from mole_core.engine import DEFAULT_BANK, DEFAULT_GUIDANCE, DEFAULT_MODEL, METHODS
    p = sub.add_parser("train-gates", help="train MoLE gates over bank LoRAs and write a mixture file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument("--bank", default=DEFAULT_BANK, help="LoRA bank folder (default: the embedded bank)")
    p.add_argument("--lora", action="append", required=True, metavar="KEY", help="a bank key; repeat (2 or more)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="block")
    p.add_argument("--gate", choices=GATE_KINDS, default="sample",
                   help="one gate decision per sample (the paper) or per token / pixel")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: TrainConfig's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: TrainConfig's)")
    p.add_argument("--alpha", type=float, default=None, help="balance-loss weight α (default 0.5)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: TrainConfig's)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: TrainConfig's)")
    p.add_argument("--out", required=True, help="output mixture .safetensors file")
    p.set_defaults(func=cmd_train_gates)

    p = sub.add_parser("generate", help="render one image with MoLE, a merge, the base model or a single LoRA")
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument("--bank", default=DEFAULT_BANK, help="LoRA bank folder (default: the embedded bank)")
    p.add_argument("--method", required=True, metavar="|".join(METHODS) + "|single:KEY")
    p.add_argument("--mixture", help="trained gates (from train-gates); its LoRAs are used unless --lora is given")
    p.add_argument("--lora", action="append", metavar="KEY", help="a bank key; repeat for each LoRA")
    p.add_argument("--mask", action="append", metavar="KEY,...", help="MoLE experts to switch off (the rest renormalised)")
    p.add_argument("--strength", action="append", metavar="KEY=S", help="MoLE strength of one expert (default 1)")
    p.add_argument("--weight", action="append", metavar="KEY=W", help="linear/svd weight of one LoRA")
    p.add_argument("--raw-weights", action="store_true", help="use linear/svd weights as given, not normalised to sum 1")
    p.add_argument("--rank", type=int, default=None, help="svd rank (default: the largest LoRA rank)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None, help="default: the model's resolution")
    p.add_argument("--width", type=int, default=None, help="default: the model's resolution")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--gates-out", help="write the recorded MoLE gates as CSV (group, step, sample, expert, weight)")
    p.set_defaults(func=cmd_generate)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear sentence, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
