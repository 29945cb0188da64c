"""Measure the claim: every way of combining LoRAs, scored on the same prompts and seeds.

A *cell* is one row of a results table: a method of the engine ("mole", "linear", "svd", "base",
"single:<key>") over a set of LoRAs, with its trained mixture, mask or SVD rank. `score_cells` draws
every prompt with every seed for each cell (so every row sees the same starting noise) and scores
the images with the given scorers (`mole_core.metrics`). `evaluate` is the whole comparison the CLI
runs: train one mixture per granularity asked for, then score MoLE, linear, SVD, each single LoRA and
the base model. `run_small_study` is its quick version for the app.

Outputs: a markdown table (mean ± half-width of the 95% interval over images), a JSON file with
every per-image score, and a PNG bar chart.

References: MoLE (Wu et al., ICLR 2024), Tables 1, 7, 9 and Fig. 8 (what is compared);
Custom Diffusion (Kumari et al., 2023) for the text-/image-alignment protocol.
"""
from __future__ import annotations

import importlib
import io
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from mole_core.atomic import atomic_path, write_text
from mole_core.attach import GATE_KINDS, GRANULARITIES, MoleConfig
from mole_core.engine import DEFAULT_BANK, DEFAULT_GUIDANCE, DEFAULT_MODEL, Engine, GenerateRequest
from mole_core.metrics import ClipScorer, Target, WorldScorer, mean_ci, plateau_step
from mole_core.mixture import load_mixture
from mole_core.train import TrainConfig

NO_SCORER = ("No scores: this model has no oracle and no CLIP model was given "
             "(pass --clip PATH to a local CLIP model folder). Only timings are shown.")


@dataclass
class Cell:
    """One row of a results table."""
    label: str                                # row name, e.g. "MoLE (block)"
    method: str                               # engine method: mole | linear | svd | base | single:<key>
    keys: list[str]                           # the LoRAs composed (mole/linear/svd); context for the others
    mixture: object | None = None             # mole_core.mixture.Mixture (trained gates); None = untrained
    mask: dict[str, bool] | None = None       # mole only: experts switched off
    rank: int | None = None                   # svd only: None = the largest input rank
    normalize: bool = True                    # linear/svd: weights normalised to sum 1 (False: each LoRA at 1)


@dataclass
class Evaluation:
    """What a run produced: one summary row per cell and one record per scored image."""
    rows: list[dict]
    records: list[dict] = field(default_factory=list)
    training: dict = field(default_factory=dict)     # label -> {"steps", "seconds", "losses", "plateau_step", ...}
    notes: list[str] = field(default_factory=list)
    samples: dict = field(default_factory=dict)      # label -> first few images (PIL)


class Progress:
    """Counts work units (an image, a gate-training step) and estimates the time left."""

    def __init__(self, total: int, on_progress=None):
        self.total, self.done, self.start = max(1, int(total)), 0, time.perf_counter()
        self.on_progress = on_progress      # on_progress(done, total, message)

    def remaining_seconds(self) -> float:
        if self.done == 0:
            return math.nan
        return (time.perf_counter() - self.start) / self.done * (self.total - self.done)

    def step(self, message: str, units: int = 1) -> None:
        self.done = min(self.total, self.done + units)
        if self.on_progress is not None:
            left = self.remaining_seconds()
            eta = f" (about {left:.0f} s left)" if math.isfinite(left) else ""
            self.on_progress(self.done, self.total, message + eta)


# ---------------------------------------------------------------------------------------------
# Targets and prompts

def targets_from_bank(bank, keys) -> list[Target]:
    """One scoring target per LoRA: its first trigger word, kind, and example images as references."""
    targets = []
    for key in keys:
        entry = bank.get(key)
        if not entry.trigger:
            raise ValueError(f"The bank entry {key!r} has no trigger word, so no caption can ask for it.")
        targets.append(Target(key, entry.trigger[0], entry.kind or "subject",
                              [path for path, _ in entry.examples]))
    return targets


def _world():
    """The pixel world's caption grammar, or None when the world package is not there."""
    try:   # the package re-exports a function named `render`, so import the module by its full name
        return importlib.import_module("mole_core.world.render")
    except ImportError:
        return None


def speaks_world(targets: list[Target]) -> bool:
    """Every target is a subject or style of the pixel world, so world captions can ask for them."""
    world = _world()
    return world is not None and all(
        t.trigger in (world.STYLE_BY_TRIGGER if t.kind == "style" else world.SUBJECT_BY_TRIGGER)
        for t in targets)


def world_prompts(targets: list[Target], n: int, seed: int = 0) -> list[str]:
    """Captions that ask for the subjects (at most three per image, one per position) and the styles.

    Every ordered choice of positions and every choice of subjects is listed, then `n` are drawn
    without repetition (seeded) in a balanced way: each subject appears about equally often.
    """
    world = _world()
    subjects = [t for t in targets if t.kind != "style"]
    styles = [t for t in targets if t.kind == "style"]
    suffix = "".join(f" in {t.trigger} style" for t in styles[:1])
    if len(styles) > 1:
        raise ValueError(f"World captions can ask for one style at a time; got {[t.key for t in styles]}.")
    per_image = min(len(subjects), len(world.POSITIONS))
    options = []
    for chosen in itertools.combinations(subjects, per_image):
        for positions in itertools.permutations(world.POSITIONS, per_image):
            placed = sorted(zip(positions, chosen), key=lambda pc: world.POSITIONS.index(pc[0]))
            items = [f"a {t.trigger} {world.POSITION_PHRASE[p]}" for p, t in placed]
            options.append(" and ".join(items) + suffix)
    if not subjects:       # styles only: ordinary shape scenes in that style
        rng = np.random.default_rng([seed, 7])
        options = [world.caption(world.sample_scene(rng, n_objects=2)) + suffix for _ in range(max(n, 1))]
    random.Random(seed).shuffle(options)
    return [options[i % len(options)] for i in range(n)]


def world_plain_prompts(n: int, seed: int = 0) -> list[str]:
    """Trigger-free captions (two shapes in named colours) for base preservation."""
    world = _world()
    rng = np.random.default_rng([seed, 11])
    return [world.caption(world.sample_scene(rng, n_objects=2)) for _ in range(n)]


def template_prompts(templates: list[str], targets: list[Target]) -> list[str]:
    """Fill "{0}", "{1}", ... with the triggers of the targets in order; refuse unknown placeholders."""
    triggers = [t.trigger for t in targets]
    prompts = []
    for line in templates:
        try:
            prompts.append(line.format(*triggers))
        except (IndexError, KeyError) as err:
            raise ValueError(f"The caption template {line!r} names a placeholder ({err}) beyond the "
                             f"{len(triggers)} LoRAs given ({{0}}..{{{len(triggers) - 1}}}).") from None
    return prompts


def read_templates(path) -> list[str]:
    """One caption template per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"No caption template file at {path}.")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"The caption template file {path} holds no template (one per line, e.g. "
                         f"\"a {{0}} on the left and a {{1}} on the right\").")
    return lines


def default_scorers(engine, clip=None) -> list:
    """The world's oracle when the model ships one (its folder has oracle/), plus CLIP when given."""
    scorers = []
    model = getattr(engine, "model_id", None)
    if model and (Path(model) / "oracle" / "config.json").exists():
        scorers.append(WorldScorer.load(Path(model) / "oracle"))
    if clip:
        scorers.append(ClipScorer.load(clip))
    return scorers


# ---------------------------------------------------------------------------------------------
# Scoring

def render(engine, cell: Cell, prompts, seeds, steps: int, guidance: float, progress: Progress | None):
    """Every prompt with every seed for one cell -> (images, captions, seeds, seconds per image, gates).

    gates: expert -> mean gate weight over every recorded gate of every image (MoLE only, else {}).
    """
    images, captions, used_seeds, seconds = [], [], [], []
    gate_sum: dict[str, float] = {}
    gate_count: dict[str, int] = {}
    for prompt in prompts:
        for seed in seeds:
            request = GenerateRequest(prompt=prompt, seed=int(seed), steps=steps, guidance=guidance)
            raw = {} if cell.normalize else {"normalize": False}
            result = engine.generate(cell.keys, cell.method, request, mixture=cell.mixture,
                                     mask=cell.mask, rank=cell.rank, **raw)
            images.append(result.image)
            captions.append(prompt)
            used_seeds.append(int(seed))
            seconds.append(result.seconds)
            for g in getattr(result, "gates", None) or []:
                gate_sum[g["expert"]] = gate_sum.get(g["expert"], 0.0) + float(g["weight"])
                gate_count[g["expert"]] = gate_count.get(g["expert"], 0) + 1
            if progress is not None:
                progress.step(f"{cell.label}: image {len(images)}/{len(prompts) * len(seeds)}")
    gates = {k: gate_sum[k] / gate_count[k] for k in gate_sum}
    return images, captions, used_seeds, seconds, gates


def count_images(cells: list[Cell], prompts, plain_prompts, seeds, scored: bool = True) -> int:
    """How many images `score_cells` draws: every cell on every prompt × seed; with plain prompts (and a
    scorer), every non-base cell again on them, plus the base model once."""
    composed = len(cells) * len(prompts) * len(seeds)
    if not (plain_prompts and scored):
        return composed
    return composed + (sum(c.method != "base" for c in cells) + 1) * len(plain_prompts) * len(seeds)


def score_cells(engine, cells: list[Cell], prompts, seeds, scorers, targets: list[Target],
                plain_prompts=(), steps: int = 20, guidance: float = DEFAULT_GUIDANCE, progress: Progress | None = None,
                keep_samples: int = 8) -> Evaluation:
    """Draw and score every cell on the same prompts and seeds.

    Columns of a row: for each scorer's per-image column, "<col>" (mean) and "<col>_ci" (95% half
    width); "mean_subject" (oracle) / "clip_image" (CLIP): per image, the mean over the subjects its
    caption asks for; "base_preservation" / "clip_base_preservation": on `plain_prompts` (no trigger),
    agreement with the base model's image for the same prompt and seed; "seconds_per_image".
    """
    records, rows, samples = [], [], {}
    base_plain: list | None = None
    for cell in cells:
        # 1. draw the cell's images on the composed prompts
        images, captions, used_seeds, seconds, gates = render(engine, cell, prompts, seeds, steps, guidance,
                                                              progress)
        samples[cell.label] = images[:keep_samples]
        columns: dict[str, np.ndarray] = {}
        # 2. score them
        for scorer in scorers:
            columns.update(scorer.score(images, captions, targets))
        for prefix, out in (("subject:", "mean_subject"), ("clip_image:", "clip_image")):
            per_subject = [v for k, v in columns.items() if k.startswith(prefix)]
            if per_subject:
                stacked = np.vstack(per_subject)                          # (targets, n)
                asked = np.isfinite(stacked).sum(0)                       # (n,) subjects per caption
                columns[out] = np.where(asked > 0, np.nansum(stacked, 0) / np.maximum(asked, 1), np.nan)
        # 3. base preservation on trigger-free captions (the base images are drawn once)
        preservation: dict[str, np.ndarray] = {}
        if plain_prompts and scorers:
            base_cell = Cell("base", "base", cell.keys)
            if base_plain is None:
                base_plain = render(engine, base_cell, plain_prompts, seeds, steps, guidance, progress)[0]
            ours = base_plain if cell.method == "base" else \
                render(engine, cell, plain_prompts, seeds, steps, guidance, progress)[0]
            for scorer in scorers:
                name = "base_preservation" if scorer.name == "oracle" else f"{scorer.name}_base_preservation"
                preservation[name] = scorer.preservation(ours, base_plain)
        # 4. summarise
        row = {"label": cell.label, "method": cell.method, "keys": list(cell.keys),
               "mask": cell.mask, "images": len(images), "gates": gates,
               "seconds_per_image": float(np.mean(seconds)) if seconds else math.nan}
        for name, values in {**columns, **preservation}.items():
            mean, half, n = mean_ci(values)
            row[name], row[name + "_ci"], row[name + "_n"] = mean, half, n
        rows.append(row)
        for i in range(len(images)):
            records.append({"label": cell.label, "prompt": captions[i], "seed": used_seeds[i],
                            "seconds": seconds[i],
                            **{k: _json_number(v[i]) for k, v in columns.items()}})
    return Evaluation(rows=rows, records=records, samples=samples)


def _json_number(x):
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# Gate training, timed

def train_mixture(engine, keys, mole_config, train_config, progress: Progress | None = None,
                  label: str = "MoLE") -> tuple[object, dict]:
    """engine.train with a clock: -> (mixture, {"steps", "seconds", "losses", "seconds_at", ...})."""
    losses, tasks, stamps, balances, gates = [], [], [], [], []
    start = time.perf_counter()

    def on_step(step, loss, mean_gates):
        losses.append(float(loss["loss"]) if isinstance(loss, dict) else float(loss))
        tasks.append(float(loss.get("task", losses[-1])) if isinstance(loss, dict) else losses[-1])
        balances.append(float(loss.get("balance", math.nan)) if isinstance(loss, dict) else math.nan)
        gates.append([float(g) for g in (mean_gates.tolist() if hasattr(mean_gates, "tolist") else mean_gates)]
                     if mean_gates is not None else None)
        stamps.append(time.perf_counter() - start)
        if progress is not None:
            progress.step(f"{label}: training gates, step {len(losses)}/{train_config.steps}")

    mixture = engine.train(list(keys), mole_config, train_config, on_step=on_step)
    seconds = time.perf_counter() - start
    log = {"steps": len(losses), "seconds": seconds, "losses": losses, "task": tasks, "balance": balances,
           "mean_gates": gates, "seconds_at": stamps}
    if losses:
        # the task (denoising) loss, comparable with and without the balance term
        tenth = max(1, len(tasks) // 10)
        plateau = plateau_step(tasks)
        log.update(plateau_step=plateau, plateau_seconds=stamps[plateau],
                   first_loss=float(np.mean(tasks[:tenth])), final_loss=float(np.mean(tasks[-tenth:])))
        if gates and all(g is not None for g in gates):
            # how far the mean gates still are from where they end: 90% of that way covered = settled
            g = np.asarray(gates)                                        # (steps, experts)
            distance = np.linalg.norm(g - g[-tenth:].mean(0), axis=1)    # (steps,)
            gate_plateau = plateau_step(distance)
            log.update(gate_plateau_step=gate_plateau, gate_plateau_seconds=stamps[gate_plateau])
    return mixture, log


# ---------------------------------------------------------------------------------------------
# The comparison the CLI runs

def evaluate(engine, keys, *, granularities=("block",), gates=("sample",), methods=("mole", "linear", "svd", "base", "singles"),
             prompts=None, seeds=range(4), n_prompts: int = 6, plain_prompts=None, train_steps: int = 100,
             lr: float | None = None, balance_alpha: float = 0.5, train_seed: int = 0,
             batch_size: int | None = None, mixture=None, rank: int | None = None, steps: int = 20, guidance: float = DEFAULT_GUIDANCE,
             scorers=None, on_progress=None) -> Evaluation:
    """Train (or take) the mixtures and score every method on the same prompts and seeds.

    methods: any of "mole", "linear", "svd", "base", "singles" (= each LoRA alone).
    granularities x gates: one MoLE row per pair; gates "sample" (the paper) and/or "token" (per-token).
    mixture: a trained Mixture to use instead of training (its granularity and gate kind are the only ones scored).
    prompts: captions; None -> world captions asking for the LoRAs (pixel world) or a plain template.
    plain_prompts: trigger-free captions for base preservation; None -> world captions when the
    world's grammar applies, else base preservation is skipped.
    """
    # 1. check inputs, choose prompts
    keys, seeds = list(keys), [int(s) for s in seeds]
    unknown = set(methods) - {"mole", "linear", "svd", "base", "singles"}
    if unknown:
        raise ValueError(f"Unknown evaluation method(s) {sorted(unknown)}: expected mole, linear, svd, base, singles.")
    if len(keys) < 2:
        raise ValueError(f"An evaluation composes at least two LoRAs; got {len(keys)}: {keys}.")
    if not seeds:
        raise ValueError("An evaluation needs at least one seed.")
    targets = targets_from_bank(engine.bank, keys)
    world = speaks_world(targets)
    if prompts is None:
        prompts = world_prompts(targets, n_prompts) if world else \
            [" and ".join(f"a photo of {t.trigger}" for t in targets)]
    if plain_prompts is None:
        plain_prompts = world_plain_prompts(max(2, n_prompts // 2)) if world else []
    scorers = default_scorers(engine) if scorers is None else scorers
    notes = [] if scorers else [NO_SCORER]
    if mixture is not None:
        granularities, gates = [mixture.granularity], [mixture.gate]
    configs = [MoleConfig(granularity=g, gate=k, balance_alpha=balance_alpha) for g in granularities for k in gates]
    # 2. the rows
    cells = [Cell(f"MoLE ({c.describe})", "mole", keys) for c in configs] if "mole" in methods else []
    if "linear" in methods:
        cells.append(Cell("Linear (normalised)", "linear", keys))
    if "svd" in methods:
        cells.append(Cell(f"SVD (r={rank})" if rank else "SVD", "svd", keys, rank=rank))
    if "singles" in methods:
        cells += [Cell(f"Single: {k}", f"single:{k}", keys) for k in keys]
    if "base" in methods:
        cells.append(Cell("Base model", "base", keys))
    # 3. count the work for the progress bar, then train one mixture per granularity
    to_train = len(configs) * train_steps if ("mole" in methods and mixture is None) else 0
    progress = Progress(count_images(cells, prompts, plain_prompts, seeds, bool(scorers)) + to_train, on_progress)
    training = {}
    for cell, mole in zip(cells, configs if "mole" in methods else []):
        if mixture is not None:
            cell.mixture = mixture
            continue
        given = {"lr": lr, "batch_size": batch_size}
        train_config = TrainConfig(steps=train_steps, balance_alpha=balance_alpha, seed=train_seed,
                                   resolution=engine.default_size()[0],
                                   **{k: v for k, v in given.items() if v is not None})
        cell.mixture, training[cell.label] = train_mixture(engine, keys, mole, train_config,
                                                           progress, cell.label)
    # 4. score
    result = score_cells(engine, cells, prompts, seeds, scorers, targets, plain_prompts, steps, guidance, progress)
    result.training, result.notes = training, notes + prompt_warnings(engine, keys, list(prompts) + list(plain_prompts))
    result.notes.append(f"{len(prompts)} prompts × {len(seeds)} seeds = {len(prompts) * len(seeds)} images "
                        f"per row; {steps} denoising steps, guidance {guidance:g}.")
    return result


def prompt_warnings(engine, keys, prompts) -> list[str]:
    """The engine's warnings for these prompts (e.g. words cut by the text encoder's length), once each."""
    check = getattr(engine, "check_request", None)
    if check is None:
        return []
    found = []
    for prompt in dict.fromkeys(prompts):
        for warning in check(keys, GenerateRequest(prompt=prompt), ["base"]):
            found.append(f"Prompt {prompt!r}: {warning}")
    return found


def run_small_study(engine, keys, *, seeds: int = 2, n_prompts: int = 4, train_steps: int = 30,
                    lr: float = 1e-3, steps: int = 20, guidance: float = DEFAULT_GUIDANCE, mixture=None, clip=None, scorers=None,
                    on_progress=None):
    """The app's quick version: -> (markdown, pandas DataFrame of the rows, plot as a PIL image).

    Trains block-level gates, per sample (the paper) and per token (ours), unless a mixture is given, and
    scores MoLE, linear, SVD, each LoRA alone and the base model on a few world captions; seconds to a
    couple of minutes on the world.
    Gate learning rate 1e-3, as in the study (TrainConfig's 1e-4 hardly moves gates in 30 steps).
    Scorers: the world's oracle when the model ships one, CLIP when `clip` names a local CLIP folder
    (or pass `scorers`); with neither, the markdown says so and only timings are shown.
    """
    import pandas as pd
    result = evaluate(engine, keys, methods=("mole", "linear", "svd", "base", "singles"), seeds=range(seeds),
                      gates=("sample", "token"), lr=lr,
                      n_prompts=n_prompts, train_steps=train_steps, mixture=mixture, steps=steps,
                      guidance=guidance, scorers=default_scorers(engine, clip) if scorers is None else scorers,
                      on_progress=on_progress)
    table = pd.DataFrame([{**{k: v for k, v in row.items() if k not in ("keys", "mask", "gates")},
                           **{f"gate:{expert}": w for expert, w in (row.get("gates") or {}).items()}}
                          for row in result.rows])     # flat columns: a table widget shows no dicts
    return to_markdown(result), table, plot(result)


# ---------------------------------------------------------------------------------------------
# Reporting

METRIC_NAMES = {  # column -> header, in the order shown
    "caption_fidelity": "caption fidelity",
    "mean_subject": "subject fidelity (mean)",
    "base_preservation": "base preservation",
    "clip_text": "CLIP text-align",
    "clip_image": "CLIP image-align (mean)",
    "clip_base_preservation": "CLIP base similarity",
}


def metric_columns(rows: list[dict]) -> list[str]:
    """Score columns present in the rows: the headline ones first, then per-subject columns."""
    present = {k for row in rows for k in row if not k.endswith(("_ci", "_n"))
               and isinstance(row[k], float) and k != "seconds_per_image"}
    ordered = [c for c in METRIC_NAMES if c in present]
    return ordered + sorted(c for c in present if c not in METRIC_NAMES)


def header(column: str) -> str:
    if column in METRIC_NAMES:
        return METRIC_NAMES[column]
    kind, _, key = column.partition(":")
    return f"{'CLIP image-align' if kind == 'clip_image' else 'subject fidelity'}: {key}"


def cell_text(row: dict, column: str) -> str:
    mean, half = row.get(column, math.nan), row.get(column + "_ci", math.nan)
    if mean is None or not math.isfinite(mean):
        return "—"
    return f"{mean:.3f} ± {half:.3f}" if half is not None and math.isfinite(half) else f"{mean:.3f}"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = metric_columns(rows) if columns is None else columns
    lines = ["| method | " + " | ".join(header(c) for c in columns) + " | images | s / image |",
             "|---|" + "---|" * len(columns) + "---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(cell_text(row, c) for c in columns)
                     + f" | {row['images']} | {row['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def leaders(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    """For each headline metric: which row leads, and whether MoLE's best row is within its interval.

    Only composing rows (MoLE, linear, SVD) compete; single LoRAs and the base model are references.
    With fewer than two competing rows nobody leads, and no line is written.
    """
    competing = [r for r in rows if r["method"] in ("mole", "linear", "svd")]
    lines = []
    for column in columns or [c for c in METRIC_NAMES if any(c in r for r in competing)]:
        scored = [r for r in competing if r.get(column) is not None and math.isfinite(r.get(column, math.nan))]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda r: r[column])
        moles = [r for r in scored if r["method"] == "mole"]
        if best["method"] == "mole":
            others = [r for r in scored if r["method"] != "mole"]
            runner = max(others, key=lambda r: r[column]) if others else None
            tie = runner is not None and best[column] - runner[column] <= (best[column + "_ci"] or 0) + (runner[column + "_ci"] or 0)
            lines.append(f"{header(column)}: {best['label']} leads ({best[column]:.3f})"
                         + (f", within the intervals of {runner['label']} ({runner[column]:.3f}): not a clear win"
                            if tie else ""))
        elif moles:
            mole = max(moles, key=lambda r: r[column])
            lines.append(f"{header(column)}: {best['label']} leads ({best[column]:.3f}); MoLE does not win "
                         f"(best MoLE row {mole['label']}: {mole[column]:.3f})")
        else:
            lines.append(f"{header(column)}: {best['label']} leads ({best[column]:.3f})")
    return lines


def to_markdown(result: Evaluation, title: str = "Results") -> str:
    parts = [f"### {title}", "", markdown_table(result.rows) if result.rows else "(no rows)", ""]
    parts += [f"- {line}" for line in leaders(result.rows)]
    for label, log in result.training.items():
        if log.get("steps"):
            parts.append(f"- {label}: {log['steps']} gate-training steps in {log['seconds']:.1f} s; task loss "
                         f"{log['first_loss']:.4f} → {log['final_loss']:.4f}; 90% of the drop by step "
                         f"{log['plateau_step']} ({log['plateau_seconds']:.1f} s).")
    parts += [f"- {note}" for note in result.notes]
    return "\n".join(parts) + "\n"


def plot(result: Evaluation, columns: list[str] | None = None, title: str = "") -> PIL.Image.Image:
    """Grouped bars (rows × headline metrics) with 95% intervals, as a PIL image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result.rows
    columns = columns or [c for c in METRIC_NAMES if any(c in r for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 3.8), dpi=100)
    if not columns:
        ax.barh([r["label"] for r in rows], [r["seconds_per_image"] for r in rows])
        ax.set_xlabel("seconds per image (no scorer: see the notes)")
    else:
        width = 0.8 / len(columns)
        x = np.arange(len(rows))
        for j, column in enumerate(columns):
            means = [r.get(column, math.nan) for r in rows]
            errs = [r.get(column + "_ci", math.nan) for r in rows]
            ax.bar(x + (j - (len(columns) - 1) / 2) * width, np.nan_to_num(means), width,
                   yerr=np.nan_to_num(errs), capsize=2, label=header(column))
        ax.set_xticks(x, [r["label"] for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def sample_grid(result: Evaluation, scale: int = 2) -> PIL.Image.Image | None:
    """The first images of each row side by side (one line per row), enlarged `scale` times."""
    lines = [imgs for imgs in result.samples.values() if imgs]
    if not lines:
        return None
    w, h = lines[0][0].size
    grid = PIL.Image.new("RGB", (max(len(x) for x in lines) * w, len(lines) * h), "white")
    for i, imgs in enumerate(lines):
        for j, im in enumerate(imgs):
            grid.paste(im.convert("RGB").resize((w, h)), (j * w, i * h))
    return grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)


def to_json(result: Evaluation, extra: dict | None = None) -> dict:
    def clean(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean({"rows": result.rows, "training": result.training, "notes": result.notes,
                  "records": result.records, **(extra or {})})


def write_outputs(result: Evaluation, out_dir, name: str = "results", title: str = "Results",
                  extra: dict | None = None, plot_columns: list[str] | None = None) -> dict[str, Path]:
    """<name>.md, <name>.json, <name>.png (plot) and <name>_samples.png in out_dir, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{name}.md", "json": out / f"{name}.json", "plot": out / f"{name}.png"}
    markdown = to_markdown(result, title)
    write_text(paths["markdown"], markdown)
    payload = json.dumps(to_json(result, extra), indent=1)
    write_text(paths["json"], payload)
    image = plot(result, columns=plot_columns, title=title)
    with atomic_path(paths["plot"], suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    grid = sample_grid(result)
    if grid is not None:
        paths["samples"] = out / f"{name}_samples.png"
        with atomic_path(paths["samples"], suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
    return paths


# ---------------------------------------------------------------------------------------------
# Command line: python -m mole_core evaluate ...

def add_arguments(parser) -> None:
    """The flags of `python -m mole_core evaluate` (cli.py registers the subcommand)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder (default: the pixel world)")
    parser.add_argument("--bank", default=DEFAULT_BANK, help="LoRA bank folder (default: the shipped bank)")
    parser.add_argument("--lora", action="append", default=[], metavar="KEY",
                        help="a bank key to compose (repeat; default: the mixture's LoRAs)")
    parser.add_argument("--mixture", help="a trained mixture (.safetensors) to score instead of training")
    parser.add_argument("--granularity", action="append", choices=GRANULARITIES,
                        help="train and score MoLE at this granularity (repeat; default: block)")
    parser.add_argument("--gate", action="append", choices=GATE_KINDS,
                        help="gate kind: sample (the paper: one decision per image) or token (per pixel / "
                             "token); repeat for both (default: sample)")
    parser.add_argument("--methods", default="mole,linear,svd,singles,base",
                        help="comma-separated: mole, linear, svd, singles, base")
    parser.add_argument("--steps", type=int, default=100, help="gate-training steps")
    parser.add_argument("--lr", type=float, default=None, help="gate learning rate (default: TrainConfig's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="balance-loss weight α")
    parser.add_argument("--seed", type=int, default=0, help="gate-training seed")
    parser.add_argument("--seeds", type=int, default=4, help="image seeds per prompt (START..START+N-1)")
    parser.add_argument("--seed-start", type=int, default=0, help="first image seed (the study uses 1000)")
    parser.add_argument("--batch-size", type=int, default=None, help="gate-training batch (default: TrainConfig's)")
    parser.add_argument("--prompts", type=int, default=6, help="prompts drawn from the world's captions")
    parser.add_argument("--templates", help="file of caption templates, one per line; {0}, {1}, ... = the "
                        "LoRAs' triggers in --lora order")
    parser.add_argument("--denoise-steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    parser.add_argument("--rank", type=int, default=None, help="SVD rank (default: the largest LoRA rank)")
    parser.add_argument("--clip", help="a local CLIP model folder for CLIP text-/image-alignment")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a busy shared machine 1 can be many times faster than 2)")
    parser.add_argument("--out", required=True, help="folder for results.md, results.json, results.png")


def cli_evaluate(args) -> int:
    """Body of `python -m mole_core evaluate`: run, show a progress bar, write the three outputs."""
    from tqdm import tqdm
    # 1. inputs
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    engine = Engine(args.model, args.bank)
    mixture = load_mixture(args.mixture) if args.mixture else None
    keys = list(args.lora) or (list(mixture.names) if mixture is not None else [])
    if mixture is not None and list(mixture.names) != keys:
        raise ValueError(f"The mixture {args.mixture} was trained for {', '.join(mixture.names)}, "
                         f"but --lora asks for {', '.join(keys)}.")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    prompts = template_prompts(read_templates(args.templates), targets_from_bank(engine.bank, keys)) \
        if args.templates else None
    scorers = default_scorers(engine, args.clip)
    # 2. run with a progress bar (tqdm estimates the time left from the rate so far)
    bar = tqdm(total=1, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_progress(done, total, message):
        bar.total, bar.n = total, done
        bar.set_description(message.split(" (about")[0][:60])
        bar.refresh()

    try:
        result = evaluate(engine, keys, granularities=args.granularity or ["block"], gates=args.gate or ["sample"],
                          methods=methods,
                          prompts=prompts, seeds=range(args.seed_start, args.seed_start + args.seeds),
                          n_prompts=args.prompts, train_steps=args.steps, lr=args.lr, balance_alpha=args.alpha,
                          train_seed=args.seed, batch_size=args.batch_size,
                          mixture=mixture, rank=args.rank, steps=args.denoise_steps, guidance=args.guidance,
                          scorers=scorers, on_progress=on_progress)
    finally:
        bar.close()
    # 3. outputs
    paths = write_outputs(result, args.out, extra={"command": " ".join(sys.argv)})
    print(to_markdown(result))
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0
