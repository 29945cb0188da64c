"""The evaluation as the CLI and the app run it: `python -m mole_core evaluate` and the app's small study.

Both hand an `EvalConfig` and a `Suite` to the generic harness (mole_core.studies.image) and show what comes back
with mole_core.studies.report. This module decides what a model is scored with (`suite_for`): the pixel world's
oracle and captions (mole_core.world.pixel.scoring) when the model ships an oracle and the LoRAs are the
world's, CLIP when a local CLIP model is given.

    python -m mole_core evaluate --lora face --lora ring --gate sample --gate token --out results/
    run_small_study(engine, ["face", "ring"])        # -> (markdown, tidy table, bar chart)
    small_study_seconds(engine, ["face", "ring"])    # what it will take, before it starts

References: MoLE (Wu et al., ICLR 2024), Tables 1, 7, 9 and Fig. 8 (what is compared);
Custom Diffusion (Kumari et al., 2023) for the text-/image-alignment protocol.
"""
from __future__ import annotations

import dataclasses
import sys

from mole_core.attach import GRANULARITIES
from mole_core.mix import GATES
from mole_core.defaults import DEFAULT_BANK, DEFAULT_MODEL, TRAIN_LR, TRAIN_STEPS, Limits
from mole_core.image.engine import Engine, GenerateRequest
from mole_core.metrics import ClipScorer
from mole_core.mix import METHODS, Mix
from mole_core.mixture import load_mixture
from mole_core.studies.report import plot, tidy_table, to_markdown, write_outputs
from mole_core.studies.image import (SINGLES, EvalConfig, Stopped, Suite, engine_costs, estimate_seconds, evaluate,
                             plan_evaluation, read_templates, targets_from_bank)
from mole_core.world.pixel.scoring import WorldScorer, shipped_oracle, speaks_world, world_plain_prompts, world_prompts

NO_SCORER = ("No scores: this model has no oracle and no CLIP model was given "
             "(pass --clip PATH to a local CLIP model folder). Only timings are shown.")

# The app's small study: MoLE per sample (the paper) and per token (ours), trained here; the merges; each
# LoRA alone; the base model. 4 captions × 4 seeds per row, plus 2 trigger-free captions × 4 seeds for base
# preservation, and 2 × 60 gate-training steps. Measured with these defaults on the embedded world (32×32,
# 20 denoising steps), one torch thread, on this project's 2-core machine at load average < 1.5: two LoRAs
# (face, checker) 168 images and 120 steps in 85 s (0.44 s per image over these rows, scoring included;
# 0.079 s per gate-training step at batch 2), three LoRAs 192 images in 96 s; four LoRAs draw 216 images.
# With other jobs on the machine the two-LoRA study took 134 s (load average 2.5) and 195 s (load 5).
SMALL_STUDY = EvalConfig(methods=("mole", "linear", "svd", SINGLES, "base"), gates=("sample", "token"),
                         n_prompts=4, seeds=4, train_steps=TRAIN_STEPS, lr=TRAIN_LR)


def suite_for(engine, keys, clip=None, bank=None) -> Suite:
    """What `engine`'s model is scored with: the world's oracle when the model folder ships one, CLIP when
    `clip` names a local CLIP folder; world captions when every LoRA (of `bank`, default the engine's) is
    a subject or style of the world."""
    scorers = []
    oracle = shipped_oracle(engine.model_id)
    if oracle is not None:
        scorers.append(WorldScorer.load(oracle))
    if clip:
        scorers.append(ClipScorer.load(clip))
    world = speaks_world(targets_from_bank(bank or engine.bank, keys))
    return Suite(scorers, world_prompts if world else None, world_plain_prompts if world else None,
                 [] if scorers else [NO_SCORER])


# ---------------------------------------------------------------------------------------------
# The app's small study

def small_study_config(seeds: int = SMALL_STUDY.seeds, n_prompts: int = SMALL_STUDY.n_prompts,
                       train_steps: int = SMALL_STUDY.train_steps) -> EvalConfig:
    """SMALL_STUDY with the three numbers the app lets a visitor change."""
    return dataclasses.replace(SMALL_STUDY, seeds=seeds, n_prompts=n_prompts, train_steps=train_steps)


def small_study_seconds(engine, keys, *, seeds: int = SMALL_STUDY.seeds, n_prompts: int = SMALL_STUDY.n_prompts,
                        train_steps: int = SMALL_STUDY.train_steps, mixture=None, bank=None) -> float:
    """Expected seconds of `run_small_study` with these arguments, before it starts: its images and
    gate-training steps (`plan_evaluation`) at the engine's expected costs (`Engine.expected_seconds`).
    Nothing is drawn or loaded but the scorer."""
    config = small_study_config(seeds, n_prompts, train_steps)
    plan = plan_evaluation(bank or engine.bank, list(keys), config, suite_for(engine, keys, bank=bank), mixture)
    return estimate_seconds(plan.work, *engine_costs(engine, config, plan))


def run_small_study(engine, keys, *, seeds: int = SMALL_STUDY.seeds, n_prompts: int = SMALL_STUDY.n_prompts,
                    train_steps: int = SMALL_STUDY.train_steps, mixture=None, clip=None, suite: Suite | None = None,
                    on_progress=None, should_stop=None, bank=None):
    """The app's quick study (SMALL_STUDY) -> (markdown, tidy pandas table, bar chart as a PIL image).

    MoLE's gates are trained per sample and per token unless `mixture` (trained for `keys`) is given.
    Scored with `suite` (default: `suite_for(engine, keys, clip)`); with no scorer the markdown says so and
    only timings are shown. on_progress(Tally) after every image and gate-training step. When
    should_stop() turns true the study ends at the next image or step and returns (a markdown line saying
    how far it got, None, None). bank: the bank the keys name (None: the engine's own).
    """
    suite = suite_for(engine, keys, clip, bank) if suite is None else suite
    try:
        result = evaluate(engine, list(keys), small_study_config(seeds, n_prompts, train_steps), suite, mixture,
                          on_progress, should_stop, bank)
    except Stopped as stop:
        return f"**Stopped.** {stop}", None, None
    return to_markdown(result), tidy_table(result.rows), plot(result)


# ---------------------------------------------------------------------------------------------
# Command line: python -m mole_core evaluate ...

def add_arguments(parser) -> None:
    """The flags of `python -m mole_core evaluate` (cli.py registers the subcommand)."""
    d = EvalConfig()
    parser.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder (default: the pixel world)")
    parser.add_argument("--bank", default=DEFAULT_BANK, help="LoRA bank folder (default: the shipped bank)")
    parser.add_argument("--lora", action="append", default=[], metavar="KEY",
                        help="a bank key to compose (repeat; default: the mixture's LoRAs, else the bank's "
                             "first two)")
    parser.add_argument("--mixture", help="a trained mixture (.safetensors) to score instead of training")
    parser.add_argument("--granularity", action="append", choices=GRANULARITIES,
                        help=f"train and score MoLE at this granularity (repeat; default: {d.granularities[0]})")
    parser.add_argument("--gate", action="append", choices=GATES,
                        help="gate kind: sample (the paper: one decision per image), token (per pixel / token), "
                             f"static (one weight per LoRA) or routed (per token, trigger-routed); repeat for "
                             f"several (default: {d.gates[0]})")
    parser.add_argument("--methods", default=",".join(d.methods),
                        help=f"comma-separated rows, in order: {', '.join(METHODS)}, single:KEY, or {SINGLES} "
                             f"(each LoRA alone)")
    parser.add_argument("--steps", type=int, default=d.train_steps, help="gate-training steps")
    parser.add_argument("--lr", type=float, default=d.lr, help="gate learning rate (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=d.alpha,
                        help="balance-loss weight α (default: 0.5; 0 for routed rows)")
    parser.add_argument("--seed", type=int, default=d.train_seed, help="gate-training seed")
    parser.add_argument("--seeds", type=int, default=d.seeds, help="image seeds per prompt (START..START+N-1)")
    parser.add_argument("--seed-start", type=int, default=d.seed_start, help="first image seed (the study uses 1000)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="gate-training batch (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=d.n_prompts, help="prompts drawn from the world's captions")
    parser.add_argument("--items", type=int, default=50,
                        help="text models: held-out items per task (default: %(default)s)")
    parser.add_argument("--templates", help="file of caption templates, one per line; {0}, {1}, ... = the "
                        "LoRAs' triggers in --lora order")
    parser.add_argument("--denoise-steps", type=int, default=d.denoise_steps, help="denoising steps per image")
    parser.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale")
    parser.add_argument("--rank", type=int, default=d.mix.rank,
                        help="rank of the SVD / TIES / DARE merges (default: the largest LoRA rank)")
    parser.add_argument("--density", type=float, default=d.mix.density, help="TIES / DARE: fraction of entries kept")
    parser.add_argument("--switch-every", type=int, default=d.mix.switch_every,
                        help="LoRA Switch: denoising steps per LoRA")
    parser.add_argument("--regions", choices=("caption",),
                        help="caption: also draw each MoLE row with each LoRA placed in the region its caption's "
                             "position words name (left / center / right: a third of the width each)")
    parser.add_argument("--clip", help="a local CLIP model folder for CLIP text-/image-alignment")
    # How this process runs, not what the evaluation asks for, so not a field of the EvalConfig.
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a busy shared machine 1 can be many times faster than 2)")
    parser.add_argument("--out", required=True, help="folder for results.md, results.json, results.png")


def config_from_args(args) -> EvalConfig:
    """The EvalConfig that the flags of `add_arguments` describe."""
    d = EvalConfig()
    return EvalConfig(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        granularities=_listed(args.granularity, d.granularities), gates=_listed(args.gate, d.gates),
        mix=Mix(rank=args.rank, density=args.density, switch_every=args.switch_every),
        n_prompts=args.prompts, templates=tuple(read_templates(args.templates)) if args.templates else (),
        seeds=args.seeds, seed_start=args.seed_start, denoise_steps=args.denoise_steps, guidance=args.guidance,
        train_steps=args.steps, lr=args.lr, batch_size=args.batch_size, alpha=args.alpha, train_seed=args.seed,
        regions=getattr(args, "regions", None))


def default_keys(bank) -> list[str]:
    """What `evaluate` composes with neither --lora nor --mixture: the bank's first two usable LoRAs (the
    app's first selection too)."""
    keys = [entry.key for entry in bank.entries if not entry.error][:2]
    print(f"--lora not given: composing {', '.join(keys)} (the bank's first two).", file=sys.stderr)
    return keys


def _listed(value, default: tuple[str, ...]) -> tuple[str, ...]:
    """A repeatable flag's values as a tuple: a single string stays one value (never its letters)."""
    if not value:
        return tuple(default)
    return (value,) if isinstance(value, str) else tuple(value)


def cli_evaluate(args) -> int:
    """Body of `python -m mole_core evaluate`: time this machine (a few seconds), say what the run will
    take, run with a progress bar, write the outputs (results.md, .json, .png and the sample grid)."""
    from mole_core.bars import progress_bar
    # 1. inputs, and the costs of this machine
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    engine = Engine(args.model, args.bank, limits=Limits.local())
    mixture = load_mixture(args.mixture) if args.mixture else None
    keys = list(args.lora) or (list(mixture.names) if mixture is not None else default_keys(engine.bank))
    config = config_from_args(args)
    suite = suite_for(engine, keys, args.clip)
    plan = plan_evaluation(engine.bank, keys, config, suite, mixture)
    engine.check([c.mix for c in plan.cells], GenerateRequest(prompt=plan.prompts[0], steps=config.denoise_steps,
                                                             guidance=config.guidance))
    engine.calibrate(keys)
    seconds = estimate_seconds(plan.work, *engine_costs(engine, config, plan))
    print(f"{len(plan.cells)} rows: {plan.work.images} images and {plan.work.train_steps} gate-training steps, "
          f"about {seconds / 60:.1f} min ({engine.costs.source}).", file=sys.stderr)
    # 2. run with a progress bar in percent of the expected time
    bar = progress_bar(100, "evaluate", "%", "{percentage:3.0f}%|{bar}| {desc}")

    def on_progress(tally):
        bar.n = round(100 * tally.fraction)
        bar.set_description(tally.message[:100], refresh=False)
        bar.refresh()

    try:
        result = evaluate(engine, keys, config, suite, mixture, on_progress)
    finally:
        bar.close()
    # 3. outputs
    paths = write_outputs(result, args.out, extra={"command": " ".join(sys.argv), "config": config.to_dict()})
    print(to_markdown(result))
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0
