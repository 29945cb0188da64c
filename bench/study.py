"""The study: does gated composition (MoLE) keep each LoRA and the caption better than merges?

Run on the embedded pixel world, with fixed seeds, every cell (a label + a `Mix`) scored by the world's
oracle on the same prompts and seeds with the study harness (`mole_core.studies.image`; captions and the oracle's
scorer from `mole_core.world.pixel.scoring`). Six parts, after the MoLE paper:

  1. composition   2, 3 and 4 subjects composed: caption and per-subject fidelity for linear, SVD, MoLE
                   (paper Table 1) and MoLE with per-token gates (ours); base preservation on trigger-free
                   captions for the 3-subject set.
  2. granularity   m/l/b/n-MoLE: one gate per matrix, layer, block, network (paper Table 9).
  3. balance       balance loss on/off (α = 0.5 vs 0), and the trained gates' temperature scaled at
                   inference (τ × 0.5, τ × 2) (paper Table 7 analogue).
  4. flexibility   gates trained on three subjects, one switched off at inference (no retraining):
                   does it disappear while the other two stay? vs re-merging the remaining two linearly
                   (paper Fig. 8).
  5. cost          gate-training steps and seconds to the plateau (90% of the loss drop) on this machine.
  6. references    each LoRA alone and the un-normalised sum, on the 3-subject captions.

    python bench/study.py                      # the whole study in one process (see below for its size)
    python bench/study.py --parts 1 --seeds 2  # a quick look

With the defaults the whole study draws about 1,700 images (50 per row; a row shared by two parts is drawn
once) and trains ten mixtures of 150 steps at batch 4. At the costs measured on 2 quiet cores with one
thread (about 0.45 s per image, see mole_core.studies.evaluate.SMALL_STUDY; 0.11-0.13 s per gate-training step at
batch 4) that is some 15-20 minutes, and two to three times that on a busy shared machine.

The published run used the defaults, split into parallel processes sharing the output folder (each part
writes its own section; study.md is reassembled from all of them; part 5 reads every run's training log):
    python bench/study.py --parts 1 --compose 2,3 & python bench/study.py --parts 1 --compose 4 &
    python bench/study.py --parts 2,3 & python bench/study.py --parts 4 & python bench/study.py --parts 6 &
    wait; python bench/study.py --parts 5

Writes into bench/results/: study.md (every part's table, reassembled from the study_<part>.section.md
files), study_<part>.json (every per-image score), study_training_<run>.json (the gate-training curves),
and per part a PNG plot and a sample grid. Tables show mean ± half-width of the 95% interval.

References: MoLE (Wu et al., ICLR 2024, arXiv 2404.13628), Tables 1, 7, 9 and Fig. 8.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mole_core.studies import report  # noqa: E402
from mole_core.studies import image as harness  # noqa: E402
from mole_core.atomic import write_text  # noqa: E402
from mole_core.defaults import DEFAULT_BANK, DEFAULT_GUIDANCE, DEFAULT_MODEL  # noqa: E402
from mole_core.image.engine import Engine  # noqa: E402
from mole_core.lora import sha256_file  # noqa: E402
from mole_core.mix import Mix  # noqa: E402
from mole_core.studies.image import Cell, EvalConfig  # noqa: E402
from mole_core.world.pixel.scoring import WorldScorer, world_plain_prompts, world_prompts  # noqa: E402

SUBJECTS = ["face", "checker", "ring", "heart"]      # composed in this order: the first n
GRANULARITIES = ["matrix", "layer", "block", "network"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--bank", default=DEFAULT_BANK)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--parts", default="1,2,3,4,6,5", help="comma-separated parts to run (5 reports the trainings of 1-4)")
    p.add_argument("--prompts", type=int, default=5, help="captions per cell")
    p.add_argument("--seeds", type=int, default=10, help="seeds per caption (images per cell = prompts × seeds)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per image (the world's bars use 20)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--train-steps", type=int, default=150, help="gate-training steps per mixture")
    p.add_argument("--lr", type=float, default=1e-3, help="gate learning rate")
    p.add_argument("--batch", type=int, default=4, help="gate-training batch size")
    p.add_argument("--compose", default="2,3,4", help="part 1: how many subjects to compose (comma-separated)")
    p.add_argument("--flex-off", default="face,checker,ring",
                   help="part 4: the subjects switched off in turn (comma-separated)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine, 2 threads ran ~50x slower)")
    return p.parse_args(argv)


class Remembering:
    """The engine, remembering every image it drew: a row shared by two parts is drawn once.

    The same Mix (every field; the mixture by identity) with the same prompt, seed and settings gives the
    same image (the engine is deterministic for a seed), so the remembered one is returned with its
    seconds. The memory keeps each Mix, so a mixture's identity is never reused by another object.
    """

    def __init__(self, engine):
        self.engine, self.bank, self.model_id = engine, engine.bank, engine.model_id
        self.memory: dict = {}

    def generate(self, mix: Mix, request, bank=None):
        values = {f.name: getattr(mix, f.name) for f in dataclasses.fields(mix)}
        fields = tuple((name, id(v) if name == "mixture" else repr(v)) for name, v in values.items())
        key = (fields, request.prompt, request.seed, request.steps, request.guidance, request.height,
               request.width, request.negative)
        if key not in self.memory:
            self.memory[key] = (mix, self.engine.generate(mix, request, bank))
        return self.memory[key][1]

    def __getattr__(self, name):      # train, check, check_train, expected_seconds, ...: the engine's own
        return getattr(self.engine, name)


class Study:
    """Shared state of one run: the engine, the scorer, trained mixtures and their training logs."""

    def __init__(self, args):
        self.args = args
        self.engine = Remembering(Engine(args.model, args.bank))
        self.scorers = [WorldScorer.load(Path(args.model) / "oracle")]
        # seeds from 1000: held out from anything the build used
        self.config = EvalConfig(seeds=args.seeds, seed_start=1000, n_prompts=args.prompts, denoise_steps=args.steps,
                                 guidance=args.guidance, train_steps=args.train_steps, lr=args.lr,
                                 batch_size=args.batch)
        self.mixtures: dict[str, object] = {}
        self.training: dict[str, dict] = {}
        self.start = self.part_start = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[study {time.perf_counter() - self.start:6.0f}s] {msg}", flush=True)

    def progress(self, label):
        last = [0.0]

        def on_progress(tally):
            now = time.perf_counter()
            finished = tally.images_done == tally.images and tally.train_steps_done == tally.train_steps
            if now - last[0] > 15 or finished:
                last[0] = now
                self.log(f"{label}: {tally.message}")
        return on_progress

    def mixture(self, keys, granularity="block", alpha=0.5, gate="sample"):
        """Train (once) the gates for these keys and settings; remember the training log."""
        name = f"{'+'.join(keys)} · {granularity}{' per-token' if gate == 'token' else ''} · α={alpha:g}"
        if name not in self.mixtures:
            self.log(f"training {name}")
            config = dataclasses.replace(self.config, alpha=alpha)
            progress = harness.Progress(harness.Work(0, config.train_steps), self.progress(f"train {name}"))
            self.mixtures[name], log = harness.train_mixture(self.engine, keys, config.mole_config(granularity, gate),
                                                             config.train_config(), progress, name)
            log.update(keys=list(keys), granularity=granularity, gate=gate, alpha=alpha, lr=self.args.lr,
                       batch=self.args.batch, threads=torch.get_num_threads())
            self.training[name] = log
            self.log(f"trained {name}: {log['seconds']:.1f} s, loss {log['first_loss']:.4f} -> {log['final_loss']:.4f}")
        return self.mixtures[name]

    def score(self, label, cells, keys, plain=False):
        """Every cell on the part's captions (and, with `plain`, on as many trigger-free ones)."""
        targets = harness.targets_from_bank(self.engine.bank, keys)
        prompts = world_prompts(targets, self.config.n_prompts)
        plain_prompts = world_plain_prompts(self.config.n_prompts) if plain else []
        work = harness.count_work(cells, len(prompts), len(plain_prompts), self.config.seeds, 0)
        result = harness.score_cells(self.engine, cells, self.config, targets, prompts, plain_prompts, self.scorers,
                                     harness.Progress(work, self.progress(label)))
        result.notes.append(f"{len(prompts)} captions × {self.config.seeds} seeds = "
                            f"{len(prompts) * self.config.seeds} images per row; {self.config.denoise_steps} "
                            f"denoising steps, guidance {self.config.guidance:g}.")
        return result

    @property
    def tag(self) -> str:
        """This run's name among runs sharing the output folder (parts may run in parallel processes)."""
        return "parts_" + self.args.parts.replace(",", "") + "_compose_" + self.args.compose.replace(",", "")

    def add(self, key, title, result, text="", plot_columns=None):
        """Write one part: its plot, samples, JSON and its markdown section; then reassemble study.md."""
        out = Path(self.args.out)
        paths = report.write_outputs(result, out, name=f"study_{key}", title=title, plot_columns=plot_columns)
        section = (report.to_markdown(result, title) + (f"\n{text}\n" if text else "")
                   + f"\n![{title}]({paths['plot'].name}) ![samples]({paths['samples'].name})\n\n"
                   + f"_Run: `{self.command}`; this part took {time.perf_counter() - self.part_start:.0f} s._\n")
        self.write_section(key, section)
        self.part_start = time.perf_counter()

    @property
    def command(self) -> str:
        return "python bench/study.py " + " ".join(sys.argv[1:])

    def write_section(self, key, text):
        out = Path(self.args.out)
        write_text(out / f"study_{key}.section.md", text)
        self.write()

    def write(self):
        """study.md = header + every part's section found in the folder (from this run or a parallel one);
        study_training_<tag>.json = this run's gate-training logs."""
        out = Path(self.args.out)
        logs = report.to_json(harness.Evaluation(rows=[], training=self.training))["training"]
        payload = json.dumps({"command": self.command, "args": vars(self.args), "training": logs}, indent=1)
        write_text(out / f"study_training_{self.tag}.json", payload)
        header = [
            "# Study: MoLE vs linear vs SVD on the pixel world",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
            f"{torch.get_num_threads()} torch thread(s) per process; torch {torch.__version__}. "
            f"Scores: the world's oracle (caption fidelity ≈ CLIP text-alignment, subject fidelity ≈ "
            f"image-alignment), mean ± 95% interval over images; seeds from 1000 up, the same for every row. "
            f"Each part names the command that produced it; every per-image score is in study_<part>.json. "
            f"LoRA files (sha256, first 12): " + ", ".join(
                f"{e.key} {sha256_file(e.lora_path)[:12]}" for e in self.engine.bank.entries if e.lora_path) + ".",
            "",
        ]
        sections = [p.read_text() for p in sorted(out.glob("study_*.section.md"))]
        text = "\n".join(header) + "\n" + "\n".join(sections)
        write_text(out / "study.md", text)


# ---------------------------------------------------------------------------------------------
# The six parts

def part_composition(study: Study):
    """1. Composing 2, 3, 4 subjects: linear, SVD, MoLE (block), and MoLE with per-token gates (not in the
    paper: one gate decision per pixel instead of per image, so two subjects at two places can differ)."""
    for n in (int(x) for x in study.args.compose.split(",")):
        keys = SUBJECTS[:n]
        cells = [Cell("Linear (normalised)", Mix("linear", keys)), Cell("SVD", Mix("svd", keys)),
                 Cell("MoLE (block)", Mix("mole", keys, mixture=study.mixture(keys))),
                 Cell("MoLE (block, per-token)", Mix("mole", keys, mixture=study.mixture(keys, gate="token")))]
        if n == 3:
            cells.append(Cell("Base model", Mix("base")))
        note = ("With four subjects and three positions, each caption asks for three of the four."
                if n == 4 else "")
        study.add(f"1_composition_{n}", f"1. {n} subjects composed ({', '.join(keys)})",
                  study.score(f"part 1, n={n}", cells, keys, plain=(n == 3)), note)


def part_granularity(study: Study):
    """2. m/l/b/n-MoLE on the 3-subject set."""
    keys = SUBJECTS[:3]
    cells = [Cell(f"{g[0]}-MoLE ({g})", Mix("mole", keys, mixture=study.mixture(keys, g))) for g in GRANULARITIES]
    study.add("2_granularity", "2. Hierarchical control: where the gates sit (3 subjects)",
              study.score("part 2", cells, keys))


def with_temperature(mixture, factor: float):
    """The same trained gates with every temperature τ multiplied by `factor` (log τ + log factor)."""
    state = {k: (v + math.log(factor) if k.endswith("log_tau") else v) for k, v in mixture.gate_state.items()}
    if not any(k.endswith("log_tau") for k in state):
        raise ValueError("The mixture holds no temperature (no '...log_tau' tensor) to scale.")
    return dataclasses.replace(mixture, gate_state=state)


def part_balance(study: Study):
    """3. Balance loss on / off; temperature scaled at inference."""
    keys = SUBJECTS[:3]
    trained = study.mixture(keys, "block", 0.5)
    cells = [Cell("MoLE α=0.5 (balance on)", Mix("mole", keys, mixture=trained)),
             Cell("MoLE α=0 (balance off)", Mix("mole", keys, mixture=study.mixture(keys, "block", 0.0))),
             Cell("MoLE α=0.5, τ×0.5 (sharper)", Mix("mole", keys, mixture=with_temperature(trained, 0.5))),
             Cell("MoLE α=0.5, τ×2 (softer)", Mix("mole", keys, mixture=with_temperature(trained, 2.0)))]
    result = study.score("part 3", cells, keys)
    lines = ["", "Mean gate per expert while drawing (all groups, steps and samples):", "",
             "| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in result.rows:
        gates = row.get("gates") or {}
        lines.append(f"| {row['label']} | " + " | ".join(f"{gates.get(k, math.nan):.3f}" for k in keys) + " |")
    study.add("3_balance", "3. Balance loss and temperature (3 subjects)", result, "\n".join(lines))


def part_flexibility(study: Study):
    """4. Switch one of three experts off at inference vs re-merge the other two linearly."""
    keys = SUBJECTS[:3]
    trained = study.mixture(keys)
    cells = [Cell("MoLE, all on", Mix("mole", keys, mixture=trained))]
    switched = [k.strip() for k in study.args.flex_off.split(",") if k.strip()]
    unknown = set(switched) - set(keys)
    if unknown:
        raise SystemExit(f"--flex-off names {sorted(unknown)}, not among the three subjects {keys}")
    for off in switched:
        rest = [k for k in keys if k != off]
        cells.append(Cell(f"MoLE, {off} off", Mix("mole", keys, mixture=trained, mask={k: k != off for k in keys})))
        cells.append(Cell(f"Linear of {' + '.join(rest)}", Mix("linear", rest)))
    result = study.score("part 4", cells, keys)
    rows = {r["label"]: r for r in result.rows}
    lines = ["Captions ask for all three subjects. The switched-off subject should fall, the other two stay.", "",
             "| switched off | its fidelity: all on → MoLE off / linear of the rest | "
             "the other two (mean): all on → MoLE off / linear of the rest |", "|---|---|---|"]
    on = rows["MoLE, all on"]
    for off in switched:
        rest = [k for k in keys if k != off]
        masked, linear = rows[f"MoLE, {off} off"], rows[f"Linear of {' + '.join(rest)}"]
        others = lambda row: sum(row[f"subject:{k}"] for k in rest) / len(rest)  # noqa: E731
        lines.append(f"| {off} | {on[f'subject:{off}']:.3f} → {masked[f'subject:{off}']:.3f} / "
                     f"{linear[f'subject:{off}']:.3f} | {others(on):.3f} → {others(masked):.3f} / {others(linear):.3f} |")
    study.add("4_flexibility", "4. Flexibility: one expert switched off at inference", result, "\n".join(lines),
              plot_columns=[f"subject:{k}" for k in keys])


def part_cost(study: Study):
    """5. Gate-training cost, from every training the study ran."""
    lines = ["### 5. Gate-training cost on this machine", "",
             "Loss plateau: first step where the trailing mean (a tenth of the run) of the task (denoising) loss "
             "has made 90% of its drop; gate plateau: the same for the distance of the mean gates to their "
             "final value. The denoising loss is noisy (a random timestep per sample), so read both.", "",
             "| mixture | steps | batch | lr | threads | seconds | s / step | loss plateau: step (s) | "
             "gate plateau: step (s) | task loss first → last 10% | final mean gates |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    training = {}
    for path in sorted(Path(study.args.out).glob("study_training_*.json")):   # this run's and parallel runs'
        training.update(json.loads(path.read_text())["training"])
    training.update(report.to_json(harness.Evaluation(rows=[], training=study.training))["training"])
    for name, log in training.items():
        if not log.get("steps"):
            continue
        gates = log["mean_gates"][-1] if log.get("mean_gates") and log["mean_gates"][-1] else []
        gate_plateau = (f"{log['gate_plateau_step']} ({log['gate_plateau_seconds']:.1f})"
                        if "gate_plateau_step" in log else "—")
        fell = log["final_loss"] < log["first_loss"]     # a loss that did not fall has no plateau to time
        loss_plateau = f"{log['plateau_step']} ({log['plateau_seconds']:.1f})" if fell else "— (did not fall)"
        lines.append(f"| {name} | {log['steps']} | {log.get('batch')} | {log.get('lr')} | {log.get('threads')} | "
                     f"{log['seconds']:.1f} | {log['seconds'] / log['steps']:.3f} | "
                     f"{loss_plateau} | {gate_plateau} | "
                     f"{log['first_loss']:.4f} → {log['final_loss']:.4f} | "
                     f"{' / '.join(f'{g:.3f}' for g in gates)} |")
    lines.append("")
    study.write_section("5_cost", "\n".join(lines))


def part_references(study: Study):
    """6. References on the 3-subject captions: each LoRA alone, and the un-normalised sum (each at weight 1)."""
    keys = SUBJECTS[:3]
    cells = [Cell(f"Single: {k}", Mix(f"single:{k}")) for k in keys]
    cells.append(Cell("Linear, raw weights (each LoRA at 1)", Mix("linear", keys, normalize=False)))
    text = ("Same captions and seeds as part 1 with 3 subjects. A single LoRA can draw only its own subject, so its "
            "own column is the ceiling a composition could reach for that subject at full strength.")
    study.add("6_references", "6. References: each LoRA alone, and the raw sum (3 subjects)",
              study.score("part 6", cells, keys), text)


PARTS = {"1": part_composition, "2": part_granularity, "3": part_balance, "4": part_flexibility, "5": part_cost,
         "6": part_references}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    study = Study(args)
    for part in args.parts.split(","):
        if part.strip() not in PARTS:
            raise SystemExit(f"unknown part {part!r}; expected some of {','.join(PARTS)}")
        study.log(f"part {part} start")
        study.part_start = time.perf_counter()
        PARTS[part.strip()](study)
    study.log(f"done; tables in {Path(args.out) / 'study.md'}")


if __name__ == "__main__":
    main()
