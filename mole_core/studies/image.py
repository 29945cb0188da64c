"""The study harness: ways of combining LoRAs, each scored on the same captions and seeds.

A *cell* is one row of a results table: a label and a `Mix` (mole_core.mix), the whole of how that row
combines the LoRAs. An `EvalConfig` says what one evaluation draws and trains. `evaluate` turns it into
cells (one MoLE row per granularity × gate kind, its gates trained here unless a mixture is given; one
row per other method), draws every caption with every seed for every cell, so that every row starts
from the same noise, and scores the images. `train_mixture` and `score_cells` are its two halves, for
callers that build their own cells (bench/study.py).

Nothing here knows a particular model: captions and scorers come in a `Suite` (mole_core.studies.evaluate
builds the pixel world's from mole_core.world.pixel.scoring; a scorer has `name`, `score` and `preservation`,
see mole_core.metrics). A run counts its work in its real units, images drawn and gate-training steps
taken, each at its own rate; `plan_evaluation` counts them before anything runs and `estimate_seconds`
turns the counts into an expected duration. `on_progress(Tally)` hears of every unit, and `should_stop()`
is asked before every one: a stop raises `Stopped`.

References: MoLE (Wu et al., ICLR 2024), Tables 1, 7, 9 and Fig. 8 (what is compared); Custom Diffusion
(Kumari et al., 2023) for the text-/image-alignment protocol.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mole_core.attach import MoleConfig
from mole_core.defaults import (DEFAULT_DENOISE_STEPS, DEFAULT_GATE, DEFAULT_GUIDANCE, TRAIN_BATCH, TRAIN_LR,
                                TRAIN_STEPS)
from mole_core.image.engine import GenerateRequest
from mole_core.metrics import Target, mean_ci, plateau_step
from mole_core.mix import METHODS, Mix, mole_config_for
from mole_core.train import TrainConfig

SINGLES = "singles"      # in EvalConfig.methods: one row per LoRA alone ("single:<key>")


class Stopped(Exception):
    """should_stop() ended a run early; the message says how far it got. Nothing is scored."""


@dataclass
class EvalConfig:
    """What one evaluation draws and trains; every row sees the same captions, seeds and settings."""
    methods: tuple[str, ...] = ("mole", "linear", "svd", SINGLES, "base")  # the rows, in this order: any
                                          # Mix method (mix.METHODS, "single:<key>"), or "singles" = each LoRA alone
    granularities: tuple[str, ...] = ("block",)   # "mole": one row per granularity × gate kind
    gates: tuple[str, ...] = (DEFAULT_GATE,)      # ... any of mix.GATES: "sample" (the paper), "token", "routed",
                                                  # "static"
    mix: Mix = field(default_factory=Mix)         # what every row's Mix starts from (rank, density,
                                                  # switch_every, normalize, weights); method and keys are per row
    n_prompts: int = 6                    # captions asking for the LoRAs, from the suite (unless `templates`)
    templates: tuple[str, ...] = ()       # caption templates instead; "{0}", "{1}", ... = the LoRAs' triggers
    seeds: int = 4                        # image seeds per caption: seed_start, seed_start + 1, ...
    seed_start: int = 0
    denoise_steps: int = DEFAULT_DENOISE_STEPS   # per image
    guidance: float = DEFAULT_GUIDANCE
    train_steps: int = TRAIN_STEPS        # gate-training steps of each MoLE row (the app's defaults)
    lr: float | None = TRAIN_LR           # gate learning rate (None: TrainConfig's)
    batch_size: int | None = TRAIN_BATCH  # gate-training batch (None: TrainConfig's)
    alpha: float | None = None            # balance-loss weight α (None: TrainConfig.alpha_for, 0.5; 0 when routed)
    train_seed: int = 0                   # gate-training seed: data order and noise
    regions: str | None = None            # "caption": each MoLE row also drawn with each LoRA placed in the
                                          # region its caption's position words name (mole_core.regions)

    def __post_init__(self):
        self.methods, self.templates = tuple(self.methods), tuple(self.templates)
        self.granularities, self.gates = tuple(self.granularities), tuple(self.gates)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed_start, self.seed_start + self.seeds))

    def check(self) -> None:
        """ValueError naming the field for a config no evaluation can run (the engine checks the rest)."""
        unknown = [m for m in self.methods if m != SINGLES and m not in METHODS
                   and not (m.startswith("single:") and m.split(":", 1)[1].strip())]
        if unknown or not self.methods:
            raise ValueError(f"Unknown evaluation method(s) {unknown}: expected some of "
                             f"{', '.join([*METHODS, SINGLES])} or single:<bank key>.")
        for name, what in (("seeds", "Seeds per caption"), ("n_prompts", "Captions"),
                           ("train_steps", "Gate-training steps")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{what} must be a whole number of at least 1; got {value!r}.")
        if not isinstance(self.seed_start, int) or self.seed_start < 0:
            raise ValueError(f"The first seed must be a whole number ≥ 0; got {self.seed_start!r}.")
        if self.regions not in (None, "caption"):
            raise ValueError(f"Regions can come from the caption ('caption') or not at all; got {self.regions!r}.")
        if "mole" in self.methods and not (self.granularities and self.gates):
            raise ValueError("MoLE rows need at least one granularity and one gate kind.")

    def mole_config(self, granularity: str, gate: str) -> MoleConfig:
        """The MoleConfig of a MoLE row (mix.mole_config_for)."""
        return mole_config_for(granularity, gate)

    def train_config(self) -> TrainConfig:
        """Training settings of every MoLE row (α None: each row's default, TrainConfig.alpha_for)."""
        given = {"lr": self.lr, "batch_size": self.batch_size}
        return TrainConfig(steps=self.train_steps, seed=self.train_seed, balance_alpha=self.alpha,
                           **{k: v for k, v in given.items() if v is not None})

    def to_dict(self) -> dict:
        """Plain values for a results file; the mix as the Python that makes it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["mix"] = self.mix.to_python()
        return out


@dataclass
class Cell:
    """One row of a results table."""
    label: str        # row name, e.g. "MoLE (block)"
    mix: Mix          # how the row combines the LoRAs (a trained MoLE row carries its mixture)
    regions: str | None = None   # "caption": each image's regions from its caption's position words


def label_for(mix: Mix) -> str:
    """The row name of a Mix: "MoLE (block, per-token)", "SVD (r=4)", "Single: face", ..."""
    rank = f"r={mix.rank}" if mix.rank else ""
    if mix.single:
        return f"Single: {mix.single}"
    return {"mole": lambda: f"MoLE ({mix.mole_config.describe})",
            "linear": lambda: "Linear (normalised)" if mix.normalize else "Linear (raw weights)",
            "svd": lambda: f"SVD ({rank})" if rank else "SVD",
            "ties": lambda: f"TIES (d={mix.density:g}{', ' + rank if rank else ''})",
            "dare": lambda: f"DARE (d={mix.density:g}{', ' + rank if rank else ''})",
            "switch": lambda: f"LoRA Switch (every {mix.switch_every} steps)",
            "composite": lambda: "LoRA Composite",
            "freefuse": lambda: "FreeFuse",
            "base": lambda: "Base model"}[mix.method]()


def cells_for(config: EvalConfig, keys, mixture=None) -> list[Cell]:
    """The rows of an evaluation, in the order of config.methods. MoLE rows without a mixture are trained
    by `evaluate`; a given mixture makes one MoLE row of its own granularity and gate kind."""
    keys, rows = tuple(keys), []
    for method in config.methods:
        if method == "mole" and mixture is not None:
            mixes = [config.mix.replace(method="mole", keys=keys, mixture=mixture)]
        elif method == "mole":
            mixes = [config.mix.replace(method="mole", keys=keys, granularity=g, gate=k)
                     for g in config.granularities for k in config.gates]
        elif method == SINGLES:
            mixes = [Mix(f"single:{k}") for k in keys]
        elif method == "base" or method.startswith("single:"):
            mixes = [Mix(method)]
        else:
            mixes = [config.mix.replace(method=method, keys=keys)]
        rows += [Cell(label_for(mix), mix) for mix in mixes]
        if method == "mole" and config.regions == "caption":
            rows += [Cell(f"{label_for(mix)} + regions from caption", mix, "caption") for mix in mixes]
    labels = [c.label for c in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two rows would have the same name: {', '.join(labels)}; list each method once.")
    return rows


def _unrouted_labels(cells: list[Cell], bank, keys) -> list[Cell]:
    """Routed MoLE rows over a LoRA without a trigger run the per-token gate (Engine.routing_note): their
    label says so, e.g. "MoLE (block, per-token; routing off: no trigger for 'x')"."""
    from mole_core.routing import untriggered
    missing = untriggered({k: bank.get(k).trigger for k in keys})
    if not missing:
        return cells
    note = f"; routing off: no trigger for {', '.join(repr(k) for k in missing)}"
    return [Cell(f"MoLE ({c.mix.replace(gate='token').mole_config.describe}{note})", c.mix)
            if c.mix.method == "mole" and c.mix.mixture is None and c.mix.mole_config.route == "trigger" else c
            for c in cells]


def needs_training(cell: Cell) -> bool:
    return cell.mix.method == "mole" and cell.mix.mixture is None


def _placed(cell: Cell, prompt: str, bank) -> Mix:
    """The cell's Mix for one caption: with regions from the caption's position words when the cell asks."""
    if cell.regions != "caption":
        return cell.mix
    from mole_core.regions import caption_regions
    return cell.mix.replace(regions=caption_regions(prompt, {k: bank.get(k).trigger for k in cell.mix.keys}))


@dataclass
class Suite:
    """Where an evaluation's captions come from and what reads its images (a model family brings one)."""
    scorers: list = field(default_factory=list)     # each: name, score(images, captions, targets), preservation(...)
    prompts: Callable[[list[Target], int], list[str]] | None = None  # (targets, n) -> n captions asking for
                                                    # them; None: one caption "a photo of <trigger> and ..."
    plain_prompts: Callable[[int], list[str]] | None = None   # n -> trigger-free captions for base
                                                    # preservation; None: not measured
    notes: list[str] = field(default_factory=list)  # lines the report carries (e.g. why nothing is scored)


@dataclass
class Evaluation:
    """What a run produced: one summary row per cell and one record per scored image."""
    rows: list[dict]
    records: list[dict] = field(default_factory=list)
    training: dict = field(default_factory=dict)     # label -> {"steps", "seconds", "losses", "plateau_step", ...}
    notes: list[str] = field(default_factory=list)
    samples: dict = field(default_factory=dict)      # label -> first few images (PIL)


# ---------------------------------------------------------------------------------------------
# The work, counted before it starts and as it is done

@dataclass(frozen=True)
class Work:
    """A run's work in its real units."""
    images: int           # images drawn
    train_steps: int      # gate-training steps taken


def count_work(cells: list[Cell], n_prompts: int, n_plain: int, n_seeds: int, train_steps: int) -> Work:
    """What `score_cells` draws (every cell on every caption × seed; with `n_plain` trigger-free captions,
    every non-base cell again on them plus the base model once) and what training the cells need."""
    images = len(cells) * n_prompts * n_seeds
    if n_plain:
        images += (sum(c.mix.method != "base" for c in cells) + 1) * n_plain * n_seeds
    return Work(images, train_steps * sum(needs_training(c) and c.regions is None for c in cells))


def estimate_seconds(work: Work, seconds_per_image: float, seconds_per_train_step: float) -> float:
    """Expected wall time of `work` at these costs per image and per gate-training step (loading the model
    is not counted)."""
    return work.images * seconds_per_image + work.train_steps * seconds_per_train_step


@dataclass(frozen=True)
class Tally:
    """Where a run stands, in its real units: what `on_progress` receives."""
    images_done: int
    images: int
    train_steps_done: int
    train_steps: int
    elapsed: float            # seconds since the run started
    seconds_left: float       # expected; NaN when there is nothing to go by
    fraction: float           # share of the expected time done, never less than in an earlier tally
    doing: str                # the unit just done (or "starting"), e.g. "MoLE (block): gate-training step 3/30"

    @property
    def message(self) -> str:
        parts = [self.doing, f"{self.images_done}/{self.images} images"]
        if self.train_steps:
            parts.append(f"{self.train_steps_done}/{self.train_steps} gate-training steps")
        if math.isfinite(self.seconds_left):
            parts.append(f"about {self.seconds_left:.0f} s left")
        return " · ".join(parts)


class Progress:
    """Counts a run's images and gate-training steps as they are done, each at its own measured rate
    (before the first of a kind: the expected cost given), tells on_progress(Tally), and raises `Stopped`
    at the next unit once should_stop() is true."""

    def __init__(self, work: Work, on_progress=None, should_stop=None,
                 seconds_per_image: float = math.nan, seconds_per_train_step: float = math.nan):
        self.work, self.on_progress, self.should_stop = work, on_progress, should_stop
        self.done = {"image": 0, "train_step": 0}
        self.spent = {"image": 0.0, "train_step": 0.0}                # seconds, per kind
        self.expected = {"image": seconds_per_image, "train_step": seconds_per_train_step}
        self.start = self.last = time.perf_counter()
        self.fraction = 0.0

    def tally(self, doing: str) -> Tally:
        left, elapsed = 0.0, time.perf_counter() - self.start
        for kind, total in (("image", self.work.images), ("train_step", self.work.train_steps)):
            remaining = max(0, total - self.done[kind])
            if remaining:
                rate = self.spent[kind] / self.done[kind] if self.done[kind] else self.expected[kind]
                left += remaining * rate
        if math.isfinite(left) and elapsed + left > 0:        # the share of the expected time ...
            fraction = elapsed / (elapsed + left)
        else:                                                 # ... or of the units, when no time is expected
            fraction = (self.done["image"] + self.done["train_step"]) / max(1, self.work.images + self.work.train_steps)
        self.fraction = max(self.fraction, fraction)          # rates change as they are measured: never go back
        return Tally(self.done["image"], self.work.images, self.done["train_step"], self.work.train_steps,
                     elapsed, left, self.fraction, doing)

    def report(self, doing: str) -> None:
        if self.on_progress is not None:
            self.on_progress(self.tally(doing))

    def count(self, kind: str, doing: str) -> None:
        """One unit of `kind` ("image" | "train_step") is done; the time since the last unit was its."""
        now = time.perf_counter()
        self.spent[kind] += now - self.last
        self.done[kind] += 1
        self.last = now
        self.report(doing)

    def stop_requested(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def check_stop(self) -> None:
        if self.stop_requested():
            raise Stopped(self.stopped_message())

    def stopped_message(self) -> str:
        t = self.tally("stopped")
        steps = f" and {t.train_steps_done} of {t.train_steps} gate-training steps" if t.train_steps else ""
        return (f"Stopped on request after {t.images_done} of {t.images} images{steps} "
                f"({t.elapsed:.0f} s); nothing was scored.")


# ---------------------------------------------------------------------------------------------
# Targets and captions

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


def template_prompts(templates, targets: list[Target]) -> list[str]:
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


def plain_count(n_prompts: int) -> int:
    """How many trigger-free captions an evaluation with n_prompts captions draws for base preservation."""
    return max(2, n_prompts // 2)


# ---------------------------------------------------------------------------------------------
# Scoring

def draw(engine, cell: Cell, prompts, config: EvalConfig, progress: Progress | None, what: str = "", bank=None):
    """Every prompt with every seed for one cell -> (images, captions, seeds, seconds per image, gates).

    what: how progress messages name these captions (e.g. "trigger-free captions"); bank: the engine's
    `bank=` (None: its own).
    gates: expert -> mean gate weight over every recorded gate of every image (MoLE only, else {}).
    """
    images, captions, used_seeds, seconds = [], [], [], []
    gate_sum: dict[str, float] = {}
    gate_count: dict[str, int] = {}
    seeds = config.seed_list
    for prompt in prompts:
        for seed in seeds:
            if progress is not None:
                progress.check_stop()
            request = GenerateRequest(prompt=prompt, seed=seed, steps=config.denoise_steps, guidance=config.guidance)
            result = engine.generate(_placed(cell, prompt, bank or engine.bank), request, bank=bank)
            images.append(result.image)
            captions.append(prompt)
            used_seeds.append(seed)
            seconds.append(result.seconds)
            for g in result.gates or []:
                gate_sum[g["expert"]] = gate_sum.get(g["expert"], 0.0) + float(g["weight"])
                gate_count[g["expert"]] = gate_count.get(g["expert"], 0) + 1
            if progress is not None:
                progress.count("image", f"{cell.label}{', ' + what if what else ''}: "
                                        f"image {len(images)}/{len(prompts) * len(seeds)}")
    gates = {k: gate_sum[k] / gate_count[k] for k in gate_sum}
    return images, captions, used_seeds, seconds, gates


def score_cells(engine, cells: list[Cell], config: EvalConfig, targets: list[Target], prompts,
                plain_prompts=(), scorers=(), progress: Progress | None = None, keep_samples: int = 8,
                bank=None) -> Evaluation:
    """Draw and score every cell on the same prompts and seeds (config: seeds, denoising steps, guidance;
    bank: the engine's `bank=`, None for its own).

    Columns of a row: for each scorer's per-image column, "<col>" (mean) and "<col>_ci" (95% half
    width); "mean_subject" (oracle) / "clip_image" (CLIP): per image, the mean over the subjects its
    caption asks for; "base_preservation" / "clip_base_preservation": on `plain_prompts` (no trigger),
    agreement with the base model's image for the same prompt and seed; "seconds_per_image".
    """
    records, rows, samples = [], [], {}
    base_plain: list | None = None
    for cell in cells:
        # 1. draw the cell's images on the composed prompts
        images, captions, used_seeds, seconds, gates = draw(engine, cell, prompts, config, progress, bank=bank)
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
            plain = "trigger-free captions"
            if base_plain is None:
                base_plain = draw(engine, Cell("Base model", Mix("base")), plain_prompts, config, progress, plain,
                                  bank)[0]
            ours = base_plain if cell.mix.method == "base" else \
                draw(engine, cell, plain_prompts, config, progress, plain, bank)[0]
            for scorer in scorers:
                name = "base_preservation" if scorer.name == "oracle" else f"{scorer.name}_base_preservation"
                preservation[name] = scorer.preservation(ours, base_plain)
        # 4. summarise
        row = {"label": cell.label, "method": cell.mix.method, "keys": list(cell.mix.keys) or
               ([cell.mix.single] if cell.mix.single else []),
               "mask": cell.mix.mask, "images": len(images), "gates": gates,
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

def train_mixture(engine, keys, mole: MoleConfig, train: TrainConfig, progress: Progress | None = None,
                  label: str = "MoLE", bank=None) -> tuple[object, dict]:
    """engine.train with a clock: -> (mixture, {"steps", "seconds", "losses", "task", "seconds_at", ...}).

    "first_loss" / "final_loss" are the mean task (denoising) loss over the first / last tenth of the steps;
    "plateau_step" is where 90% of its drop was made, meaningful only when final_loss < first_loss.
    """
    losses, tasks, stamps, balances, gates = [], [], [], [], []
    start = time.perf_counter()

    def on_step(step, loss, mean_gates):
        losses.append(float(loss["loss"]))
        tasks.append(float(loss["task"]))
        balances.append(float(loss["balance"]))
        gates.append([float(g) for g in mean_gates] if mean_gates is not None else None)
        stamps.append(time.perf_counter() - start)
        if progress is not None:
            progress.count("train_step", f"{label}: gate-training step {len(losses)}/{train.steps}")

    mixture = engine.train(list(keys), mole, train, on_step=on_step,
                           should_stop=progress.stop_requested if progress is not None else None, bank=bank)
    if len(losses) < train.steps:     # engine.train ends early only when asked to stop
        raise Stopped(progress.stopped_message() if progress is not None else
                      f"Stopped on request after {len(losses)} of {train.steps} gate-training steps.")
    seconds = time.perf_counter() - start
    log = {"steps": len(losses), "seconds": seconds, "losses": losses, "task": tasks, "balance": balances,
           "mean_gates": gates, "seconds_at": stamps,
           "held_out": (getattr(mixture, "meta", None) or {}).get("held_out")}   # the task's fixed batch
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
# The whole comparison

@dataclass
class Plan:
    """Everything an evaluation will do, decided before the first image."""
    cells: list[Cell]
    targets: list[Target]
    prompts: list[str]
    plain_prompts: list[str]      # empty: base preservation is not measured
    seeds: list[int]
    work: Work


def plan_evaluation(bank, keys, config: EvalConfig, suite: Suite | None = None, mixture=None) -> Plan:
    """The rows, captions and seeds of an evaluation and its work; ValueError for input that cannot run."""
    config.check()
    keys, suite = list(keys), suite or Suite()
    if len(keys) < 2:
        raise ValueError(f"An evaluation composes at least two LoRAs; got {len(keys)}: {keys}.")
    if mixture is not None and list(mixture.names) != keys:
        raise ValueError(f"The mixture was trained for {', '.join(mixture.names)}, but the evaluation composes "
                         f"{', '.join(keys)}.")
    targets = targets_from_bank(bank, keys)
    if config.templates:
        prompts = template_prompts(config.templates, targets)
    elif suite.prompts is not None:
        prompts = list(suite.prompts(targets, config.n_prompts))
    else:
        prompts = [" and ".join(f"a photo of {t.trigger}" for t in targets)]
    measured = suite.plain_prompts is not None and bool(suite.scorers)
    plain = list(suite.plain_prompts(plain_count(config.n_prompts))) if measured else []
    cells = _unrouted_labels(cells_for(config, keys, mixture), bank, keys)
    work = count_work(cells, len(prompts), len(plain), config.seeds, config.train_steps)
    return Plan(cells, targets, prompts, plain, config.seed_list, work)


def engine_costs(engine, config: EvalConfig, plan: Plan) -> tuple[float, float]:
    """(seconds per image, seconds per gate-training step) the engine expects for this plan: the mean over
    its images, each at its row's method (a MoLE image costs more than a merge's), and over its training."""
    images, work = [], plan.work
    for cell in plan.cells:
        per_row = len(plan.prompts) + (len(plan.plain_prompts) if cell.mix.method != "base" else 0)
        images += [cell.mix] * per_row * len(plan.seeds)
    if plan.plain_prompts:
        images += [Mix("base")] * len(plan.plain_prompts) * len(plan.seeds)
    batch, experts = config.train_config().batch_size, len(plan.targets)
    trained = [c.mix.gate for c in plan.cells if needs_training(c)]
    per_image = engine.expected_seconds(mixes=images, denoise_steps=config.denoise_steps) / max(1, work.images)
    per_step = float(np.mean([engine.expected_seconds(train_steps=1, gate=g, batch_size=batch, experts=experts)
                              for g in trained or config.gates]))
    return per_image, per_step


def evaluate(engine, keys, config: EvalConfig | None = None, suite: Suite | None = None, mixture=None,
             on_progress=None, should_stop=None, bank=None) -> Evaluation:
    """Train the MoLE rows' gates (or take `mixture`) and score every row on the same captions and seeds.

    suite: the captions and scorers (None: no scorer, one plain caption). on_progress(Tally) after every
    image and training step; should_stop() before each: True raises `Stopped`. bank: the LoRA bank the
    keys name (None: the engine's own; the app passes a session's overlay).
    """
    # 1. plan, then let the engine refuse what it cannot run before anything is drawn
    config, suite = config or EvalConfig(), suite or Suite()
    plan = plan_evaluation(bank or engine.bank, keys, config, suite, mixture)
    keys = [t.key for t in plan.targets]
    warnings = check_with_engine(engine, plan, config, bank)
    progress = Progress(plan.work, on_progress, should_stop, *engine_costs(engine, config, plan))
    progress.report("starting")
    # 2. train one mixture per MoLE row
    training, trained_for = {}, {}
    for cell in plan.cells:
        if needs_training(cell):
            layout = (cell.mix.granularity, cell.mix.gate)     # a "+ regions" row reuses its MoLE row's gates
            if layout not in trained_for:
                trained_for[layout], training[cell.label] = train_mixture(
                    engine, keys, config.mole_config(*layout), config.train_config(), progress, cell.label, bank)
            cell.mix = cell.mix.replace(mixture=trained_for[layout])
    # 3. draw and score
    result = score_cells(engine, plan.cells, config, plan.targets, plan.prompts, plan.plain_prompts,
                         suite.scorers, progress, bank=bank)
    result.training = training
    result.notes = [*suite.notes, *warnings,
                    f"{len(plan.prompts)} prompts × {len(plan.seeds)} seeds = {len(plan.prompts) * len(plan.seeds)} "
                    f"images per row; {config.denoise_steps} denoising steps, guidance {config.guidance:g}."]
    return result


def check_with_engine(engine, plan: Plan, config: EvalConfig, bank=None) -> list[str]:
    """ValueError for anything the engine would refuse (every row's Mix, the request, the gate training);
    -> the engine's warnings about the captions (e.g. words cut by the text encoder), once each."""
    def request(prompt):
        return GenerateRequest(prompt=prompt, seed=plan.seeds[-1], steps=config.denoise_steps,
                               guidance=config.guidance)
    engine.check([c.mix for c in plan.cells], request(plan.prompts[0]), bank)
    trained = [c for c in plan.cells if needs_training(c)]
    if trained:
        engine.check_train([t.key for t in plan.targets],
                           config.mole_config(trained[0].mix.granularity, trained[0].mix.gate),
                           config.train_config(), bank)
    found = []
    for prompt in dict.fromkeys([*plan.prompts, *plan.plain_prompts]):
        found += [f"Prompt {prompt!r}: {warning}" for warning in engine.check([Mix("base")], request(prompt), bank)]
    return found
