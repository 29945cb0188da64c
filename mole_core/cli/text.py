"""The CLI's verbs on a text model: `python -m mole_core VERB --model TEXT_MODEL_FOLDER --bank TEXT_BANK ...`.

mole_core.cli hands a command here when its --model is a transformers folder (`is_text_model`): the same
flags, text in place of images — `generate ... --out ANSWER.txt` writes the method's answer, `train-gates`
trains on the manifests' example pairs, `merge` writes a text LoRA (PEFT keys), `inspect` reads a text LoRA
file or PEFT adapter folder, `evaluate` scores every method on held-out items of the text world's tasks.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

TEXT_COMMANDS = ("inspect", "merge", "train-gates", "generate", "evaluate")
TEXT_GATE = "prompt"       # the text default (no --gate): one decision per sample read from the prompt (mole_core.text.gate)


def wants_text(args) -> bool:
    """True when the command's --model is a transformers text model folder."""
    from mole_core.text.engine import is_text_model
    model = getattr(args, "model", None)
    return args.command in TEXT_COMMANDS and bool(model) and is_text_model(model)


IMAGE_ONLY = {"generate": (("height", None), ("width", None), ("guidance", None), ("negative", ""), ("true_cfg", 1.0),
                            ("cpu_offload", False), ("dtype", None), ("region", None)),
              "train-gates": (("cpu_offload", False), ("dtype", None))}                # (flag, the value it has when not given)


def refuse_image_flags(args) -> None:
    """ValueError naming every image-only flag given to a text command (a text model would ignore it).
    generate's --steps counts denoising steps: refused when it differs from its default."""
    from mole_core.defaults import DEFAULT_DENOISE_STEPS
    given = [name for name, unset in IMAGE_ONLY.get(args.command, ()) if getattr(args, name, unset) != unset]
    if args.command == "generate" and getattr(args, "steps", DEFAULT_DENOISE_STEPS) != DEFAULT_DENOISE_STEPS:
        given.append("steps")
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: for image pipelines only; the text model '{Path(args.model).name}' takes no such "
                         f"setting (leave {'them' if len(given) > 1 else 'it'} out).")


def _engine(args):
    import torch

    from mole_core.cli.common import quiet_libraries
    from mole_core.text.engine import TextEngine
    quiet_libraries()
    torch.set_num_threads(max(1, int(getattr(args, "threads", None) or 1)))
    from mole_core.defaults import DEFAULT_BANK
    bank = getattr(args, "bank", None)
    if bank == DEFAULT_BANK:           # --bank not given: the image bank is no text model's; the text world's
        bank = None
    return TextEngine(args.model, bank) if bank else TextEngine(args.model)


def _read_lora(path: str, engine):
    """A text LoRA from a .safetensors file or a PEFT adapter folder, checked against the engine's model."""
    from mole_core.text.lora_io import read_text_lora
    from mole_core.text.lora_io import validate_text_lora
    lora = read_text_lora(path, engine.model)
    validate_text_lora(lora, engine.model)
    return lora


def cmd_inspect(args) -> int:
    engine = _engine(args)
    lora = _read_lora(args.file, engine)
    ranks = sorted({w.rank for w in lora.modules.values()})
    kinds = sorted({k.rsplit(".", 1)[-1] for k in lora.modules})
    info = {"file": Path(args.file).name, "format": "text LoRA (PEFT keys)", "family": "text",
            "targets": ", ".join(kinds), "modules": len(lora.modules), "ranks": ranks,
            "size_bytes": sum(f.stat().st_size for f in Path(args.file).rglob("*")) if Path(args.file).is_dir()
            else Path(args.file).stat().st_size, "verdict": "ok", "ok": True}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for field in ("file", "format", "family", "targets", "modules", "ranks", "size_bytes", "verdict"):
            print(f"{field:>10}: {info[field]}")
    return 0


def cmd_merge(args) -> int:
    from mole_core.cli.common import check_merge, parse_lora_arg
    from mole_core.merge import merge_loras
    from mole_core.mix import MAX_WEIGHT
    from mole_core.text.lora_io import save_text_lora

    if args.format != "diffusers":
        raise ValueError("--format: text LoRAs are written with PEFT keys; 'kohya' is an image-LoRA layout.")
    files, weights = zip(*(parse_lora_arg(t) for t in args.lora))
    check_merge(args, weights, MAX_WEIGHT)
    engine = _engine(args)
    loras = [_read_lora(f, engine) for f in files]
    extra = {"density": args.density, "seed": args.seed} if args.method in ("ties", "dare") else {}
    merged = merge_loras(loras, list(weights), method=args.method, rank=args.rank, normalize=not args.raw_weights,
                         name=args.name, **extra)
    save_text_lora(merged, args.out, {"mole.merge": args.method})      # refuses values a load would refuse
    ranks = sorted({w.rank for w in merged.modules.values()})
    print(f"wrote {args.out}: {args.method} merge of {len(loras)} text LoRA(s), {len(merged.modules)} modules, "
          f"rank {ranks[0] if len(ranks) == 1 else ranks}")
    return 0


def cmd_train_gates(args) -> int:
    from mole_core.cli.common import step_bar
    from mole_core.mix import mole_config_for
    from mole_core.train import TrainConfig, divergence_note

    engine = _engine(args)
    mole = mole_config_for(args.granularity, args.gate or TEXT_GATE)
    config = TrainConfig(steps=args.steps, lr=args.lr, balance_alpha=args.alpha,
                         batch_size=args.batch_size, seed=args.seed)
    engine.check_train(args.lora, mole, config)          # a routed gate is refused there, as a Mix's is
    start, losses = time.perf_counter(), []
    with step_bar(config.steps) as on_step:
        def record(step, loss, gates):
            losses.append(float(loss["task"]))
            on_step(step, loss, gates)
        mixture = engine.train(args.lora, mole, config, on_step=record, out_path=args.out)
    seconds = time.perf_counter() - start
    final = mixture.meta.get("final_losses", {})
    if note := divergence_note(losses, config.lr):
        print(f"warning: {note}", file=sys.stderr)
    print(f"wrote {args.out}: {mole.describe} gates for {', '.join(mixture.names)}, {config.steps} steps in "
          f"{seconds:.1f} s, final loss {final.get('loss', float('nan')):.4f}, "
          f"mean gates {', '.join(f'{g:.3f}' for g in mixture.meta.get('mean_gates', []))}")
    return 0


def cmd_generate(args) -> int:
    from mole_core.atomic import write_text
    from mole_core.attach import write_gates_csv
    from mole_core.cli.common import parse_key_values
    from mole_core.mix import Mix
    from mole_core.mixture import load_mixture

    engine = _engine(args)
    engine.check_prompt(args.prompt, "--prompt")            # before a mixture or a LoRA is read
    mixture = load_mixture(args.mixture) if args.mixture else None
    keys = tuple(args.lora or (mixture.names if mixture is not None else ()))
    off = [k.strip() for item in args.mask or [] for k in item.split(",") if k.strip()]
    mix = Mix(args.method, keys, weights=parse_key_values(args.weight, "--weight"), normalize=not args.raw_weights,
              rank=args.rank, density=args.density, granularity=mixture.granularity if mixture else args.granularity,
              gate=(mixture.mole_config().gate if mixture else args.gate or TEXT_GATE), mixture=mixture,
              mask={k: False for k in off} or None, strengths=parse_key_values(args.strength, "--strength"))
    if args.gates_out and mix.method != "mole":
        raise ValueError("--gates-out writes the MoLE gates: use it with --method mole.")
    result = engine.generate(mix, args.prompt)              # a routed gate is refused by the engine's check
    write_text(args.out, result.text + "\n")
    if args.gates_out:
        write_gates_csv(result.gates, args.gates_out)
    print(f"wrote {args.out}: {result.label}: {result.text!r} ({result.seconds:.2f} s)"
          + (f"; gates in {args.gates_out}" if args.gates_out else ""))
    return 0


def cmd_evaluate(args) -> int:
    """Part A (multi-task) over the chosen LoRAs and Part B for the composed pairs among them, into --out."""
    from mole_core.studies.text import TextStudyConfig, config_dict, markdown, part_a, part_b, save
    from mole_core.world.text.tasks import COMPOSED_PAIRS
    from mole_core.train import TrainConfig

    engine = _engine(args)
    keys = list(args.lora) or engine.bank.usable_keys()[:5]
    if not 1 <= args.items <= 10_000:
        raise ValueError(f"--items must be between 1 and 10000; got {args.items}.")
    granularities = tuple(args.granularity or ("block",))
    chosen = args.gate or (TEXT_GATE, "sample", "token")
    gates = tuple(g for g in chosen if g not in ("routed", "prompt"))
    cfg = TextStudyConfig(items=args.items, granularities=granularities, gates=gates, prompt_gate="prompt" in chosen,
                          train=TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                                            balance_alpha=args.alpha))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": config_dict(cfg), "A": part_a(engine, keys, cfg, log=lambda m: print(m, file=sys.stderr))}
    pairs = [p for p in COMPOSED_PAIRS if set(p) <= set(keys)]
    if pairs:
        report["B"] = {" ".join(p): part_b(engine, p, keys, cfg, log=lambda m: print(m, file=sys.stderr))
                       for p in pairs}
    save(report, out / "results.json")
    from mole_core.atomic import write_text
    write_text(out / "results.md", markdown(report))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def run(args) -> int:
    refuse_image_flags(args)
    return {"inspect": cmd_inspect, "merge": cmd_merge, "train-gates": cmd_train_gates, "generate": cmd_generate,
            "evaluate": cmd_evaluate}[args.command](args)
