"""The image commands of `python -m mole_core` (a diffusers pipeline folder as --model): inspect, merge, evaluate,
train-gates, generate. One small function per command, `cmd_<name>(args) -> exit code`; torch, diffusers and
the engine are imported inside them, so `--help` answers at once.
"""
from __future__ import annotations

import json
import sys
import time

from mole_core.cli.common import check_merge, parse_key_values, parse_lora_arg, quiet_libraries, step_bar
from mole_core.defaults import Limits


def local_engine(args):
    """The engine for --model/--bank with the limits of a private machine."""
    from mole_core.image.engine import Engine

    return Engine(args.model, args.bank, limits=Limits.local(), **engine_precision(args))


def engine_precision(args) -> dict:
    """Engine keyword arguments from --dtype / --cpu-offload (absent flags: the engine's defaults)."""
    from mole_core.image.engine import DTYPES

    dtype = getattr(args, "dtype", None)
    return {"dtype": DTYPES[dtype] if dtype else None, "cpu_offload": bool(getattr(args, "cpu_offload", False)),
            **({"graphs": False} if getattr(args, "no_graphs", False) else {})}


def load_components(model_dir: str):
    """A diffusers pipeline folder of any supported family, offline, as (pipeline, components ModuleDict)."""
    quiet_libraries()
    from mole_core.image.families import components, load_pipeline

    pipe = load_pipeline(model_dir)
    return pipe, components(pipe)


def cmd_inspect(args) -> int:
    """Print what a LoRA file holds and whether it fits the model."""
    from mole_core.image.families import family_of
    from mole_core.image.lora_files import inspect_lora

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
    from mole_core.lora import MAX_ABS
    from mole_core.image.lora_files import load_lora, save_lora, validate_lora
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
    from mole_core.studies.evaluate import cli_evaluate

    return cli_evaluate(args)


def cmd_train_gates(args) -> int:
    """Train the MoLE gates over bank LoRAs on their example images; write the mixture file."""
    quiet_libraries()
    from mole_core.mix import mole_config_for
    from mole_core.train import TrainConfig

    # 1. the engine and the settings, checked before the bar opens (a refused number writes nothing)
    engine = local_engine(args)
    mole = mole_config_for(args.granularity, args.gate)
    config = TrainConfig(steps=args.steps, lr=args.lr, balance_alpha=args.alpha, batch_size=args.batch_size,
                         seed=args.seed)
    for warning in engine.check_train(args.lora, mole, config):
        print(f"warning: {warning}", file=sys.stderr)
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


def parse_regions_flag(items) -> dict | None:
    """['KEY=WHERE', ...] -> {KEY: Region} (mole_core.regions); ValueError naming --region for a bad item."""
    from mole_core.regions import parse_region
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, where = item.partition("=")
        if not (key.strip() and sep and where.strip()):
            raise ValueError(f"--region '{item}' must look like KEY=WHERE (WHERE: left, right, top, bottom, centre, "
                             f"whole, x0,y0,x1,y1 or a mask image file).")
        if key.strip() in out:
            raise ValueError(f"--region gives {key.strip()!r} twice; give one region per LoRA.")
        out[key.strip()] = parse_region(where.strip(), f"--region {key.strip()}")
    return out


def cmd_generate(args) -> int:
    """Render one image with one Mix (MoLE, a merge, a peer, the base or a single LoRA)."""
    quiet_libraries()
    from mole_core.image.engine import GenerateRequest, save_image, write_gates_csv
    from mole_core.image.families import default_guidance
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
              mask={k: False for k in off} or None, strengths=parse_key_values(args.strength, "--strength"),
              regions=parse_regions_flag(args.region))
    guidance = args.guidance if args.guidance is not None else default_guidance(args.model)
    request = GenerateRequest(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps,
                              guidance=guidance, height=args.height, width=args.width, true_cfg=args.true_cfg)
    if args.gates_out and mix.method != "mole":
        raise ValueError("--gates-out writes the MoLE gates: use it with --method mole.")
    # 2. render (the engine checks the request once) and write
    result = engine.generate(mix, request)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    save_image(result.image, args.out)
    if args.gates_out:
        write_gates_csv(result.gates, args.gates_out)
    print(f"wrote {args.out}: {result.label}, seed {request.seed}, {result.seconds:.2f} s"
          + (f"; gates in {args.gates_out}" if args.gates_out else ""))
    return 0
