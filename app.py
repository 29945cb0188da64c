"""MoLE Studio, the web app: pick LoRAs from a bank, train MoLE gates, compare MoLE with the merges and
the other composition methods side by side, switch experts on and off, look inside the gates, export.

Layout: one small function per tab (`_bank_tab`, `_train_tab`, …) builds its components; `build_demo`
puts the tabs together and wires the events. Every handler is a short module-level function that takes
the `Studio` (the engine + how this server runs) first, so tests call them without a server.

What belongs to one browser lives in its `gr.State` (a dict, see `new_session`): the trained mixture, the
last comparison (as `Mix` values), the gate rows, and a session folder for the files this session gets
(exports, the mixture, uploads). The folder is removed when the session ends (`end_session`, the State's
delete callback), so disk use returns to where it was. Every handler that writes into the folder returns the
state: Gradio starts a session's lifetime (and so its delete callback) only for a state an event outputs.

Uploads: on a public Space (the default) an uploaded LoRA joins only the uploader's bank, an overlay of
the shared bank in the session folder; `--writable-bank` (a private app) writes into the bank folder
itself, where every session sees it. The model events share one engine lock, handed over in arrival order;
gate training and the study step aside between steps, so a visitor's compare waits at most one training
step. Counts are capped by the engine's `Limits` (Space-sized unless `--local`).

Run: `python app.py` (the embedded pixel world) or `python app.py --model DIR_OR_HUB_ID --bank DIR`.

References: MoLE (Wu et al., ICLR 2024, arXiv 2404.13628); Gradio 6 Blocks, gr.State(delete_callback),
gr.Progress, Blocks(delete_cache).
"""
from __future__ import annotations

import argparse
import atexit
import math
import random
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from mole_core.attach import GRANULARITIES, MoleConfig
from mole_core.image.bank import Bank
from mole_core.cli import add_precision_arguments, engine_precision, hush_torchvision_notice
from mole_core.defaults import (DEFAULT_BANK, DEFAULT_DENOISE_STEPS, DEFAULT_GATE, DEFAULT_GUIDANCE, DEFAULT_MODEL,
                                PACKAGE_ROOT, TRAIN_BATCH, TRAIN_LR, TRAIN_STEPS, Limits)
from mole_core.image.engine import Engine, GenerateRequest, write_gates_csv
from mole_core.studies.evaluate import SMALL_STUDY, run_small_study, small_study_seconds
from ui.gpu import on_gpu, spaces_module
from mole_core.mix import Mix, mole_config_for
from mole_core.image.families import default_guidance
from mole_core.mixture import load_mixture
from mole_core.plots import gate_heatmap, mean_by, placeholder
from mole_core.text.engine import DEFAULT_TEXT_BANK, DEFAULT_TEXT_MODEL, TextEngine, is_text_model
from ui.text_tab import build_text_demo, build_text_mode, TextStudio
from mole_core.train import TrainConfig
from ui.worker import StepWorker as _Worker

MAX_EXPERTS = 8                        # rows of switches/strengths the page can show
GATE_CHOICES = [("Per token + trigger routing", "routed"), ("Per token / pixel", "token"),
                ("Per sample (the paper)", "sample"), ("Static (one weight per LoRA)", "static")]
COMPARE_METHODS = [("MoLE", "mole"), ("linear", "linear"), ("SVD", "svd"), ("TIES", "ties"), ("DARE", "dare"),
                   ("LoRA Switch", "switch"), ("LoRA Composite (N× the cost)", "composite"), ("base", "base")]
DEFAULT_METHODS = ["mole", "linear", "svd", "ties", "dare", "switch", "base"]   # Composite: N× cost, opt-in
STUDY_COLUMNS = ["method", "caption fidelity", "subject fidelity (mean)", "base preservation", "images",
                 "s / image"]        # the Scores table's headers before a study has run
MODEL_QUEUE = "model"                  # short model events (compare, toggle, export, uploads)
LONG_QUEUE = "long"                    # training and the study: one at a time, stepping aside for the rest
CSS_PATH = Path(__file__).resolve().parent / "assets" / "app.css"

ABOUT = """
**MoLE — Mixture of LoRA Experts** (Wu, Huang, Wei, ICLR 2024) keeps every LoRA frozen and separate and
learns only a small **gate** per block that decides how much each LoRA (an *expert*) contributes. Merging
the weights instead (linear, SVD, TIES, DARE) melts the LoRAs into one, which dilutes each; MoLE's gates
can give each expert its say where it matters, and experts can be switched off later without retraining.

- **Gates per token + trigger routing** (the default) — each word of the prompt goes to the LoRA whose trigger
  phrase it belongs to, and each pixel to the LoRAs in proportion to how much it attends to each trigger, so
  two subjects at two places each get their own LoRA; a LoRA whose trigger the prompt does not name is off,
  and words outside every trigger phrase reach no LoRA (the base model reads them). Trained with α = 0.
- **Linear merge** — one LoRA whose weight change is the weighted sum Σ wᵢ·ΔWᵢ of the LoRAs' changes.
- **SVD merge** — the linear merge's ΔW cut back to rank r by a truncated SVD (a LoRA file of rank r).
- **TIES merge** (Yadav et al. 2023) — in each ΔW keep the largest `density` share of entries, elect a sign
  per entry by total mass, average only the entries that agree with it; then rank r.
- **DARE merge** (Yu et al. 2024) — drop each entry with probability 1 − density, rescale the rest by
  1/density so the expectation is kept, sum; then rank r.
- **Granularity** — which layers share one gate: *matrix* (each weight matrix), *layer* (each attention /
  feed-forward layer), *block* (each transformer or resnet block), *network* (one gate per network).
- **Gates per sample / per token / static** — one decision per image (the paper); one per pixel or token,
  so two subjects at two places get different experts (ours); or one learned weight per LoRA for the whole
  model, whatever the input (LoraHub's idea, MoLE's static ablation).
- **Balance α** — weight of the loss that keeps every expert in use (α = 0: gates may collapse on one).
- **LoRA Switch / Composite** — no merge: one LoRA active at a time, rotating every k steps; or every
  LoRA run alone at each step and the predictions averaged (N× the cost).
- **Caption fidelity** — share of images whose every object is drawn where the caption says (the world's
  oracle reads the image). **Subject fidelity** — share showing a given LoRA's subject.
  **Base preservation** — caption fidelity on prompts without trigger words, with the LoRAs attached.
"""


@dataclass
class Studio:
    """The shared engine and how this server runs; handlers take it first."""
    engine: Engine
    writable_bank: bool = False        # uploads go into the bank folder (every session) instead of the session
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mole_studio_")))
    text: TextEngine | None = None     # the Text mode's engine (the embedded text world by default), or None
    banks: dict = field(default_factory=dict)   # session folder -> that session's overlay Bank

    def __post_init__(self):
        atexit.register(shutil.rmtree, self.root, True)


def new_session() -> dict:
    """What one browser keeps between events (gr.State copies it for each session)."""
    return {
        "dir": None,            # this session's folder (exports, mixture, uploads), made on first need
        "mixture": None,        # mole_core.mixture.Mixture of the last training (or upload)
        "mixture_file": None,   # where that mixture is saved, for download and the snippet
        "cancel": False,        # set by Cancel, read by the training loop and the study
        "compared": None,       # the last comparison: {"mixes": [Mix], "request": GenerateRequest}
        "gates": None,          # tidy gate rows of the last MoLE image
    }


def end_session(studio: Studio, state: dict) -> None:
    """The browser went away: stop its long jobs and remove its folder (uploads, exports, mixture)."""
    if not isinstance(state, dict):
        return
    state["cancel"] = True
    if state.get("dir"):
        studio.banks.pop(state["dir"], None)
        shutil.rmtree(state["dir"], ignore_errors=True)


def _session_dir(studio: Studio, state: dict, kind: str) -> Path:
    """`<session folder>/<kind>/`, emptied: one file of each kind per session at a time."""
    if not state.get("dir"):
        state["dir"] = str(studio.root / uuid.uuid4().hex)
    folder = Path(state["dir"]) / kind
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def bank_of(studio: Studio, state: dict | None) -> Bank:
    """The bank this session sees: its own overlay once it uploaded something, else the shared one."""
    return studio.banks.get((state or {}).get("dir"), studio.engine.bank)


def _human(studio: Studio, fn, *args, **kwargs):
    """Call fn; a ValueError (the engine's bad-input signal) becomes a gr.Error with no server paths."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, KeyError) as err:
        raise gr.Error(public_message(studio, str(err).strip("'\""))) from err


def public_message(studio: Studio, text: str) -> str:
    """A message with the server's folders cut out (a visitor sees their own file names only)."""
    folders = [studio.root, studio.engine.bank.folder, Path(studio.engine.model_id or "/nonexistent"),
               PACKAGE_ROOT, Path(tempfile.gettempdir())]
    if studio.text is not None:
        folders += [studio.text.bank.folder, Path(studio.text.model_id or "/nonexistent")]
    for folder in sorted({str(Path(f)) for f in folders}, key=len, reverse=True):
        text = re.sub(re.escape(folder) + r"[^\s:'\"]*/", "", text)
        text = text.replace(folder, "the server folder")
    return text


# ---- Bank ---------------------------------------------------------------------------------------
def bank_gallery(bank: Bank) -> list[tuple]:
    """(example image or a placeholder tile, "name · trigger") for every LoRA of the bank, in bank order."""
    items = []
    for entry in bank.entries:
        if entry.error:
            items.append((placeholder("cannot be used"), f"{entry.name} · broken"))
        elif entry.examples:
            items.append((str(entry.examples[0][0]), f"{entry.name} · {_triggers(entry)}"))
        else:
            items.append((placeholder("no example"), f"{entry.name} · {_triggers(entry)}"))
    return items


def _triggers(entry) -> str:
    return ", ".join(entry.trigger)


def bank_table(studio: Studio, bank: Bank) -> str:
    """The bank as a Markdown table: name, trigger words, description, problems."""
    lines = ["| LoRA | trigger | description |", "|---|---|---|"]
    for entry in bank.entries:
        state = f" (cannot be used: {public_message(studio, entry.error)})" if entry.error else ""
        lines.append(f"| {_cell(entry.name)}{_cell(state)} | `{_cell(_triggers(entry))}` | {_cell(entry.description)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def bank_choices(bank: Bank) -> list[tuple[str, str]]:
    return [(f"{entry.name} ({_triggers(entry)})", entry.key) for entry in bank.entries if not entry.error]


def on_load(studio: Studio, state: dict):
    """Page (re)load: the bank as it is now (a writable bank may have grown since start-up), the model."""
    bank = bank_of(studio, state)
    return bank_gallery(bank), bank_table(studio, bank), gr.CheckboxGroup(choices=bank_choices(bank)), \
        gr.Dropdown(choices=prompt_examples(bank)), model_line(studio)


def model_line(studio: Studio) -> str:
    """"Model: pixel-world (Stable Diffusion 1.x/2.x), 32×32 px" (loads the model on the first page load)."""
    engine = studio.engine
    height, width = engine.default_size()
    guidance = default_guidance(engine.model_id)
    source = ("the embedded world's measured best" if guidance == DEFAULT_GUIDANCE and engine.model_id == DEFAULT_MODEL
              else "its pipeline's own default")
    return (f"Model: **{engine.model_name}** ({engine.family.title}), {width}×{height} px by default; guidance "
            f"{guidance:g} ({source}).")


def pick_from_gallery(studio: Studio, keys: list[str], index: int, state: dict) -> list[str]:
    """Clicking a LoRA in the gallery adds it to the selection, or removes it if already chosen."""
    entry = bank_of(studio, state).entries[index]
    if entry.error:
        raise gr.Error(f"{entry.name} cannot be used: {public_message(studio, entry.error)}")
    return [k for k in keys if k != entry.key] if entry.key in keys else [*keys, entry.key]


PLACES = {1: ["in the center"], 2: ["on the left", "on the right"],
          3: ["on the left", "in the center", "on the right"]}    # the pixel world's three places


def compose_caption(bank: Bank, keys: list[str]) -> str:
    """A caption that asks for each chosen subject at its own place, styles last:
    "a zwx on the left and a qlo on the right in nyq style" (the pixel world's grammar, plain English).
    There are three places: subjects beyond the third are left out (`left_out` names them)."""
    entries = [bank.get(k) for k in keys]
    subjects = [e.trigger[0] for e in entries if e.kind == "subject" and e.trigger][:len(PLACES)]
    styles = [e.trigger[0] for e in entries if e.kind == "style" and e.trigger]
    text = " and ".join(f"a {word} {place}" for word, place in zip(subjects, PLACES.get(len(subjects), [])))
    return " ".join([text, *[f"in {word} style" for word in styles]]).strip()


def left_out(bank: Bank, keys: list[str]) -> list[str]:
    """Names of the chosen subjects `compose_caption` has no place for (the fourth and later)."""
    subjects = [bank.get(k) for k in keys if bank.get(k).kind == "subject" and bank.get(k).trigger]
    return [e.name for e in subjects[len(PLACES):]]


def insert_triggers(studio: Studio, keys: list[str], state: dict) -> str:
    """The prompt box gets a caption that places each chosen LoRA's trigger word (three places at most:
    a warning names the subjects left out)."""
    if not keys:
        raise gr.Error("No LoRA is selected: tick at least one LoRA in the Bank tab first.")
    bank = bank_of(studio, state)
    missing = left_out(bank, keys)
    if missing:
        gr.Warning(f"A caption has three places (left, center, right): {', '.join(missing)} "
                   f"{'is' if len(missing) == 1 else 'are'} not in it. Its expert stays in the mixture but no "
                   f"word of the prompt calls it; untick it or write your own prompt.")
    return compose_caption(bank, keys)


def prompt_examples(bank: Bank) -> list[str]:
    """Captions over pairs of the bank's subjects (first and second, third and fourth, fifth and sixth).
    Pairs only, no style: on the shipped world, trigger routing with the defaults (seed 0) draws both subjects
    of these pairs (tests/test_examples.py reads each with the world's oracle), while three subjects in one
    image came out as one, and a subject with the night style without the style (measured, seeds 0-1)."""
    subjects = [e.key for e in bank.entries if not e.error and e.kind == "subject" and e.trigger]
    sets = [subjects[i:i + 2] for i in range(0, len(subjects) - 1, 2)][:3]
    return list(dict.fromkeys(c for c in (compose_caption(bank, s) for s in sets) if c))


def example_keys(bank: Bank, caption: str) -> list[str]:
    """The bank LoRAs an example caption calls up (their trigger words), in bank order."""
    words = set(caption.split())
    return [e.key for e in bank.entries if not e.error and e.trigger and e.trigger[0] in words]


def pick_example(studio: Studio, caption: str, state: dict):
    """An example prompt goes into the prompt box and selects the LoRAs it names."""
    return caption, example_keys(bank_of(studio, state), caption or "")


def method_choices(bank: Bank, keys: list[str]) -> list[tuple[str, str]]:
    """(label, method) for the Methods checkboxes: every method, then each chosen LoRA alone."""
    return COMPARE_METHODS + [(f"only {bank.get(k).name}", f"single:{k}") for k in keys]


def on_selection(studio: Studio, keys: list[str], methods: list[str], state: dict):
    """Selection changed: method choices, linear weights and the expert rows follow it."""
    bank = bank_of(studio, state)
    keys = [k for k in (keys or []) if k in bank.keys()][:MAX_EXPERTS]
    choices = method_choices(bank, keys)
    kept = [m for m in (methods or []) if m in {value for _, value in choices}]
    weights = pd.DataFrame({"expert": keys, "weight": [bank.get(k).default_weight for k in keys]})
    names = [bank.get(k).name for k in keys] + [""] * (MAX_EXPERTS - len(keys))
    rows = [gr.Row(visible=i < len(keys)) for i in range(MAX_EXPERTS)]
    switches = [gr.Checkbox(value=True, label=names[i]) for i in range(MAX_EXPERTS)]
    strengths = [gr.Slider(value=1.0, label=f"strength of {names[i]}") for i in range(MAX_EXPERTS)]
    return [gr.CheckboxGroup(choices=choices, value=kept), weights, *rows, *switches, *strengths]


def upload_lora(studio: Studio, lora_file: str | None, name: str, trigger: str, description: str,
                examples: list[str] | None, state: dict):
    """Validate an uploaded LoRA against the loaded model, then add it to this session's bank (or the
    shared one with --writable-bank)."""
    engine = studio.engine
    if not lora_file:
        raise gr.Error("No LoRA file was uploaded: choose a .safetensors file.")
    path = Path(lora_file)
    if path.suffix != ".safetensors":
        raise gr.Error(f"{path.name} is not a .safetensors file; only .safetensors LoRAs are accepted.")
    if path.stat().st_size > engine.limits.upload_bytes:
        raise gr.Error(f"{path.name} is {path.stat().st_size / 2**20:.0f} MiB; the limit is "
                       f"{engine.limits.upload_bytes / 2**20:.0f} MiB.")
    words = [w.strip() for w in (trigger or "").split(",") if w.strip()]
    if not words:
        raise gr.Error("The trigger word is empty: give the word that calls this LoRA up in a prompt.")
    name = (name or "").strip()[:80] or path.stem[:80]
    manifest = {"name": name, "trigger": words, "description": (description or "")[:500],
                "base_model": engine.model_name, "kind": "subject", "default_weight": 1.0}
    key = re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_")[:48] or "lora"
    images = [(image, compose_caption_words(words)) for image in examples or []]
    if studio.writable_bank:
        bank = engine.bank
    else:   # this session's own bank on top of the shared one
        if state.get("dir") not in studio.banks:
            folder = _session_dir(studio, state, "bank")
            studio.banks[state["dir"]] = engine.bank.overlay(folder)
        bank = studio.banks[state["dir"]]
    entry = _human(studio, engine.add_to_bank, path, manifest, images, key=key, bank=bank, display=path.name)
    where = "the bank (every visitor sees it)" if studio.writable_bank else "your session's bank"
    gr.Info(f"{entry.name} joined {where} as {entry.key!r}.")
    return bank_gallery(bank), bank_table(studio, bank), gr.CheckboxGroup(choices=bank_choices(bank)), state


def compose_caption_words(words: list[str]) -> str:
    return f"a {words[0]} in the center"


# ---- Train gates --------------------------------------------------------------------------------
def _train_config(studio: Studio, keys, granularity, steps, lr, alpha, seed, gate):
    """(MoleConfig, TrainConfig) from the form; gr.Error naming the field for what cannot run."""
    if len(keys or []) < 2:
        raise gr.Error(f"Gate training needs at least two LoRAs; {len(keys or [])} selected in the Bank tab.")
    for label, value in (("Steps", steps), ("Learning rate", lr), ("Balance α", alpha), ("Seed", seed)):
        if value is None or not math.isfinite(float(value)):
            raise gr.Error(f"{label} must be a finite number; got {value!r}.")
    if float(steps) != int(steps) or float(seed) != int(seed):
        raise gr.Error("Steps and the seed must be whole numbers.")
    mole = mole_config_for(granularity, gate, float(alpha))     # "routed" trains with α = 0 by definition
    train = TrainConfig(steps=int(steps), lr=float(lr), seed=int(seed), batch_size=TRAIN_BATCH)
    return mole, train


def alpha_field(gate: str) -> gr.Number:
    """The Balance α box for a gate kind: 0 and fixed for trigger routing (it trains with α = 0), else the
    paper's 0.5, editable."""
    routed = gate == "routed"
    return gr.Number(0.0 if routed else MoleConfig().balance_alpha, label="Balance α", minimum=0, maximum=100,
                     interactive=not routed, elem_id="train-alpha",
                     info="trigger routing trains with α = 0" if routed else "weight of the balance loss")


def check_train(studio: Studio, keys, granularity, steps, lr, alpha, seed, gate, state: dict) -> None:
    mole, train = _train_config(studio, keys, granularity, steps, lr, alpha, seed, gate)
    _human(studio, studio.engine.check_train, keys, mole, train, bank_of(studio, state))


def train_estimate(studio: Studio, keys, steps, gate) -> str:
    """What a run of `steps` over the selected LoRAs will take on this server, from the costs this machine
    measured (a short timing at start-up, then its last runs: `Engine.costs`)."""
    try:
        experts = max(2, len(keys or []))
        seconds = studio.engine.expected_seconds(train_steps=int(steps), gate=gate, batch_size=TRAIN_BATCH,
                                                 experts=experts)
    except (TypeError, ValueError, OverflowError):
        return ""
    return (f"Expected: about {_duration(seconds)} on this server ({int(steps)} steps, {experts} LoRAs; "
            f"{_cost_source(studio)}).")


def _cost_source(studio: Studio) -> str:
    return getattr(getattr(studio.engine, "costs", None), "source", "estimated")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "a second"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def train(studio: Studio, keys: list[str], granularity: str, steps: float, lr: float, alpha: float,
          seed: float, gate: str, state: dict, progress=gr.Progress()):
    """Train the gates; stream (state, status, task-loss plot, balance plot, gate plot, mixture file)."""
    engine, bank = studio.engine, bank_of(studio, state)
    mole, config = _train_config(studio, keys, granularity, steps, lr, alpha, seed, gate)
    state["cancel"] = False
    out_path = _session_dir(studio, state, "mixture") / "mixture.safetensors"
    worker = _Worker(lambda on_step: engine.train(keys, mole, config, on_step=on_step, bank=bank,
                                                  should_stop=lambda: state["cancel"], out_path=out_path))
    task, balance, gates = [], [], []
    try:
        for step, loss, mean_gates in worker:
            task.append({"step": step, "term": "task (this step)", "value": loss["task"]})
            recent = [row["value"] for row in task if row["term"] == "task (this step)"][-10:]
            task.append({"step": step, "term": "task (mean of last 10)", "value": sum(recent) / len(recent)})
            balance.append({"step": step, "term": "balance", "value": loss["balance"]})
            gates += [{"step": step, "expert": k, "gate": float(g)} for k, g in zip(keys, mean_gates)]
            progress((step, config.steps), desc=f"training step {step}/{config.steps}")
            yield state, f"Step {step}/{config.steps} · task loss {loss['task']:.4f}", pd.DataFrame(task), \
                pd.DataFrame(balance), pd.DataFrame(gates), None
    except ValueError as err:
        raise gr.Error(public_message(studio, str(err))) from err
    finally:  # the page went away or the event was cancelled: stop the training thread too
        state["cancel"] = state["cancel"] or worker.running
    mixture = state["mixture"] = worker.result
    state["mixture_file"] = str(out_path)
    yield state, train_summary(mixture, [r["value"] for r in task if r["term"] == "task (this step)"],
                               state["cancel"]), pd.DataFrame(task), pd.DataFrame(balance), pd.DataFrame(gates), \
        state["mixture_file"]


def train_summary(mixture, task_losses: list[float], cancelled: bool) -> str:
    """What training changed: the gates' distance from uniform and the task loss, first vs last steps."""
    verb = "Stopped (cancelled)" if cancelled else "Trained"
    steps = mixture.meta.get("steps", 0)
    gates = mixture.meta.get("mean_gates") or []
    lines = [f"**{verb} after {steps} steps** ({mixture.meta.get('seconds', 0):.0f} s)."]
    if gates:
        n = len(gates)
        moved = max(abs(g - 1 / n) for g in gates)
        note = ("; per-pixel gates can route each place to one expert while their mean over the image stays "
                "near uniform") if mixture.gate == "token" else ""
        lines.append(f"Mean gates {' / '.join(f'{g:.2f}' for g in gates)} (uniform: {1 / n:.2f}; the largest "
                     f"move {moved:.2f}{note}). Compare, then Inspect gates shows them per layer.")
    held_out = mixture.meta.get("held_out")
    if held_out:
        before, after = held_out["before"], held_out["after"]
        change = f"{'fell' if after < before else 'rose'} {abs(after - before) / max(before, 1e-12):.0%}"
        why = (" Trigger routing already sends each subject's words and pixels to its own LoRA before training, "
               "so training only fine-tunes the gates and the loss moves little.") if mixture.meta.get(
            "mole_config", {}).get("route") == "trigger" else ""
        lines.append(f"Task (denoising) loss on one fixed batch, before → after training: {before:.4f} → "
                     f"{after:.4f} ({change}). The curve above swings from step to step because each step draws "
                     f"its own noise level; its first and last steps are not comparable.{why}")
    elif len(task_losses) >= 4:
        k = max(1, min(10, len(task_losses) // 4))
        first, last = sum(task_losses[:k]) / k, sum(task_losses[-k:]) / k
        lines.append(f"Task (denoising) loss, mean of the first {k} vs last {k} steps: {first:.4f} → {last:.4f}"
                     f" (each step draws its own noise level, so these move by chance over so few steps).")
    return " ".join(lines)


def cancel(state: dict) -> str:
    state["cancel"] = True
    return "Cancelling after the current step…"


def load_mixture_upload(studio: Studio, path: str | None, state: dict):
    """Take a downloaded mixture back; it must have been trained for the bank's LoRA files, this model."""
    if not path:
        raise gr.Error("No mixture file was uploaded: choose a mixture .safetensors you downloaded here.")
    name, bank = Path(path).name, bank_of(studio, state)
    mixture = _human(studio, load_mixture, path, display=name)
    missing = [k for k in mixture.names if k not in bank.keys()]
    if missing:
        raise gr.Error(f"{name} needs LoRAs the bank does not hold: {', '.join(missing)}.")
    _human(studio, mixture.check, [(k, bank.get(k).lora_path) for k in mixture.names], studio.engine.model_name)
    target = _session_dir(studio, state, "mixture") / "mixture.safetensors"
    shutil.copyfile(path, target)
    state["mixture"] = load_mixture(target, display=name)
    state["mixture_file"] = str(target)
    return state, list(mixture.names), f"Loaded {name}: {mixture.mole_config().describe} gates of " \
                                       f"{', '.join(mixture.names)}."


# ---- Compare ------------------------------------------------------------------------------------
def _request(prompt, negative, seed, steps, guidance) -> GenerateRequest:
    for label, value in (("Seed", seed), ("Denoising steps", steps), ("Guidance", guidance)):
        if value is None or not math.isfinite(float(value)):
            raise gr.Error(f"{label} must be a finite number; got {value!r}.")
    if float(seed) != int(seed) or float(steps) != int(steps):
        raise gr.Error("The seed and the number of steps must be whole numbers.")
    return GenerateRequest(prompt=str(prompt or ""), negative=str(negative or ""), seed=int(seed),
                           steps=int(steps), guidance=float(guidance))


def _weights(table: pd.DataFrame | None) -> dict[str, float] | None:
    """Merge weights from the editable table (None or empty -> each LoRA's default weight)."""
    if table is None or len(table) == 0:
        return None
    try:
        return {str(k): float(w) for k, w in zip(table["expert"], table["weight"]) if str(k)}
    except (KeyError, TypeError, ValueError) as err:
        raise gr.Error(f"The weights table needs an 'expert' and a numeric 'weight' column ({err}).") from err


def _mixture_for(state: dict, keys: list[str]):
    """The session's trained mixture if it was trained for exactly these LoRAs, else None (untrained)."""
    mixture = state.get("mixture")
    return mixture if mixture is not None and list(mixture.names) == list(keys) else None


def mixes_from_form(state: dict, keys, methods, weights, rank, normalize, density, switch_every,
                    granularity, gate) -> list[Mix]:
    """One Mix per ticked method, all over the same selection."""
    keys = list(keys or [])
    for label, value in (("SVD / TIES / DARE rank", rank), ("Density", density), ("Switch every", switch_every)):
        if value is not None and not math.isfinite(float(value)):
            raise gr.Error(f"{label} must be a finite number; got {value!r}.")
    shared = dict(weights=_weights(weights), normalize=bool(normalize), rank=int(rank) if rank else None,
                  density=float(density if density is not None else 0.5),
                  switch_every=int(switch_every or 5), granularity=granularity or "block", gate=gate or DEFAULT_GATE)
    mixes = []
    for method in methods or []:
        if method.startswith("single:"):
            mixes.append(Mix(method))
        elif method == "base":
            mixes.append(Mix("base"))
        else:
            mixes.append(Mix(method, keys, mixture=_mixture_for(state, keys) if method == "mole" else None,
                             **shared))
    return mixes


def check_compare(studio: Studio, keys, prompt, negative, seed, randomise, steps, guidance, methods, weights,
                  rank, normalize, density, switch_every, granularity, gate, state: dict) -> None:
    """Validate before queueing; a prompt too long for the text encoder is a warning, not an error."""
    if not methods:
        raise gr.Error("No method is ticked: choose at least one method or a single LoRA.")
    mixes = mixes_from_form(state, keys, methods, weights, rank, normalize, density, switch_every, granularity, gate)
    for warning in _human(studio, studio.engine.check, mixes, _request(prompt, negative, seed, steps, guidance),
                          bank_of(studio, state)):
        gr.Warning(warning)


def compare_estimate(studio: Studio, keys, methods, steps, gate) -> str:
    """What rendering the ticked methods will take on this server (each method at its own measured cost)."""
    try:
        mixes = _estimate_mixes(keys, methods, gate)
        seconds = studio.engine.expected_seconds(mixes=mixes, denoise_steps=int(steps))
    except (TypeError, ValueError, OverflowError):
        return ""
    return f"Expected: about {_duration(seconds)} for {len(mixes)} images ({_cost_source(studio)})." if mixes else ""


def _estimate_mixes(keys, methods, gate) -> list[Mix]:
    """The ticked methods as Mix values, as far as their cost goes (method, LoRAs, gate kind)."""
    keys = tuple(keys or ())
    return [Mix(m) if m.startswith("single:") or m == "base" else Mix(m, keys, gate=gate or DEFAULT_GATE)
            for m in methods or []]


def compare(studio: Studio, keys, prompt, negative, seed, randomise, steps, guidance, methods, weights,
            rank, normalize, density, switch_every, granularity, gate, state: dict):
    """Render every ticked method from the same seed; returns (gallery, used seed, notes, state)."""
    if not methods:
        raise gr.Error("No method is ticked: choose at least one method or a single LoRA.")
    seed = random.randrange(2**31) if randomise else seed
    request = _request(prompt, negative, seed, steps, guidance)
    mixes = mixes_from_form(state, keys, methods, weights, rank, normalize, density, switch_every, granularity, gate)
    bank = bank_of(studio, state)
    warnings = _human(studio, studio.engine.check, mixes, request, bank)
    results = _human(studio, studio.engine.compare, mixes, request, bank)
    state["compared"] = {"mixes": mixes, "request": request}
    state["gates"] = next((r.gates for r in results if r.method == "mole"), state["gates"])
    gallery = [(r.image, f"{r.label} · {r.seconds:.2f} s") for r in results]
    if "mole" in methods and _mixture_for(state, keys) is None:
        warnings.append("MoLE uses untrained gates (equal weights, the same as the linear merge): train gates "
                        "for this selection in the Train gates tab.")
    return gallery, request.seed, "\n".join(f"- {w}" for w in warnings), state


# ---- Toggle experts -----------------------------------------------------------------------------
def toggle(studio: Studio, keys, prompt, negative, seed, steps, guidance, granularity, gate, state: dict, *rows):
    """Re-render only the MoLE image with some experts off / weaker; the rest are renormalised."""
    keys = list(keys or [])[:MAX_EXPERTS]
    switches, strengths = rows[:MAX_EXPERTS], rows[MAX_EXPERTS:]
    mask = {k: bool(on) for k, on in zip(keys, switches)}
    strength = {k: (1.0 if s is None else float(s)) for k, s in zip(keys, strengths)}
    if keys and not any(mask.values()):
        gr.Info("Every expert is switched off: this is the base model.")
    mix = Mix("mole", keys, mixture=_mixture_for(state, keys), mask=mask, strengths=strength,
              granularity=granularity or "block", gate=gate or DEFAULT_GATE)
    result = _human(studio, studio.engine.generate, mix, _request(prompt, negative, seed, steps, guidance),
                    bank_of(studio, state))
    state["gates"] = result.gates
    on = ", ".join(f"{k}{'' if strength[k] == 1 else f' ×{strength[k]:g}'}" for k in keys if mask[k]) or "none"
    caption = (f"**{result.label} · {result.seconds:.2f} s** — experts on: {on} · prompt “{prompt}”, "
               f"seed {int(seed)}")
    return result.image, caption, state


# ---- Inspect gates ------------------------------------------------------------------------------
def show_gates(studio: Studio, state: dict):
    """Heat-map (groups × experts), per-step line chart and CSV of the last MoLE image's gates."""
    rows = state.get("gates")
    if not rows:
        return None, pd.DataFrame({"step": [], "weight": [], "expert": []}), None, state
    per_step = pd.DataFrame([{"step": step, "expert": expert, "weight": w}
                             for (step, expert), w in mean_by(rows, "step", "expert").items()])
    csv = write_gates_csv(rows, _session_dir(studio, state, "gates") / "gates.csv")
    return gate_heatmap(rows), per_step, str(csv), state


# ---- Export -------------------------------------------------------------------------------------
def export(studio: Studio, keys, method: str, fmt: str, weights, rank, normalize, density, state: dict):
    """Write a merge of the selection as a LoRA file and hand it to the browser."""
    if fmt not in ("diffusers", "kohya"):
        raise gr.Error(f"Unknown format {fmt!r}: choose diffusers or kohya.")
    mix = mixes_from_form(state, keys, [method], weights, rank, normalize, density, 5, "block", "sample")[0]
    name = f"mole_studio_{method}{'_r' + str(int(rank)) if rank and method != 'linear' else ''}_{fmt}.safetensors"
    path = _session_dir(studio, state, "export") / name
    return str(_human(studio, studio.engine.export, mix, path, format=fmt, bank=bank_of(studio, state))), state


def snippet(studio: Studio, state: dict) -> str:
    """Python that reproduces the last comparison with mole_core (the mixture as downloaded)."""
    if state.get("compared") is None:
        raise gr.Error("Nothing to reproduce yet: run a comparison in the Compare tab first.")
    return studio.engine.snippet(state["compared"]["mixes"], state["compared"]["request"],
                                 mixture_file="mixture.safetensors")


def snippet_file(studio: Studio, state: dict):
    """The snippet, shown and as a named file to download: (code, path of mole_compare.py, state)."""
    code = snippet(studio, state)
    path = _session_dir(studio, state, "snippet") / "mole_compare.py"
    path.write_text(code)
    return code, str(path), state


# ---- Evaluate -----------------------------------------------------------------------------------
def study_estimate(studio: Studio, keys, seeds, n_prompts, train_steps, state: dict) -> str:
    if len(keys or []) < 2:
        return ""
    try:
        seconds = small_study_seconds(studio.engine, list(keys), seeds=int(seeds), n_prompts=int(n_prompts),
                                      train_steps=int(train_steps), mixture=_mixture_for(state, keys),
                                      bank=bank_of(studio, state))
    except (TypeError, ValueError, OverflowError):
        return ""
    return f"Expected: about {_duration(seconds)} on this server ({_cost_source(studio)})."


def study(studio: Studio, keys, seeds, n_prompts, train_steps, state: dict, progress=gr.Progress()):
    """A small study of the selection: streams its progress, then (markdown, table, bar chart)."""
    limits = studio.engine.limits
    if len(keys or []) < 2:
        raise gr.Error(f"A study needs at least two LoRAs; {len(keys or [])} selected in the Bank tab.")
    for label, value, most in (("Seeds", seeds, limits.study_seeds), ("Prompts", n_prompts, limits.study_prompts),
                               ("Gate-training steps", train_steps, limits.train_steps)):
        if value is None or not math.isfinite(float(value)) or not 1 <= float(value) <= most:
            raise gr.Error(f"{label} must be between 1 and {most} on this server; got {value!r}.")
    state["cancel"] = False
    worker = _Worker(lambda on_progress: run_small_study(
        studio.engine, list(keys), seeds=int(seeds), n_prompts=int(n_prompts), train_steps=int(train_steps),
        mixture=_mixture_for(state, keys), on_progress=on_progress, should_stop=lambda: state["cancel"],
        bank=bank_of(studio, state)))
    try:
        for (tally,) in worker:
            progress(tally.fraction, desc=tally.message)
            yield tally.message, None, None
    except ValueError as err:
        raise gr.Error(public_message(studio, str(err))) from err
    finally:
        state["cancel"] = state["cancel"] or worker.running
    text, table, chart = worker.result
    yield _without_table(text), table, chart


def _without_table(markdown: str) -> str:
    """The study's findings without its Markdown table: the Scores table below shows it, once."""
    return "\n".join(line for line in markdown.splitlines() if not line.lstrip().startswith("|"))


# ---- GPU time (Hugging Face ZeroGPU: ui.gpu) --------------------------------------------
# What each model-running event expects to take, from its own inputs and the engine's costs; a ZeroGPU Space
# asks spaces.GPU for that much (with a margin). Elsewhere the handlers run undecorated.
def compare_seconds(studio: Studio, keys, prompt, negative, seed, randomise, steps, guidance, methods, weights,
                    rank, normalize, density, switch_every, granularity, gate, *rest, **kwargs) -> float:
    return studio.engine.expected_seconds(mixes=_estimate_mixes(keys, methods, gate), denoise_steps=int(steps))


def toggle_seconds(studio: Studio, keys, prompt, negative, seed, steps, guidance, granularity, gate, *rest,
                   **kwargs) -> float:
    return studio.engine.expected_seconds(mixes=_estimate_mixes(keys, ["mole"], gate), denoise_steps=int(steps))


def train_seconds(studio: Studio, keys, granularity, steps, lr, alpha, seed, gate, *rest, **kwargs) -> float:
    return studio.engine.expected_seconds(train_steps=int(steps), gate=gate, batch_size=TRAIN_BATCH,
                                          experts=max(2, len(keys or [])))


def study_seconds(studio: Studio, keys, seeds, n_prompts, train_steps, state: dict, *rest, **kwargs) -> float:
    return small_study_seconds(studio.engine, list(keys), seeds=int(seeds), n_prompts=int(n_prompts),
                               train_steps=int(train_steps), mixture=_mixture_for(state, keys),
                               bank=bank_of(studio, state))


def on_model(handler, seconds, studio: Studio):
    """partial(handler, studio), under spaces.GPU on a ZeroGPU Space, asking for partial(seconds, studio)."""
    return on_gpu(partial(seconds, studio))(partial(handler, studio))


# ---- Layout -------------------------------------------------------------------------------------
def _bank_tab(studio: Studio) -> dict:
    bank = studio.engine.bank
    keys0 = [entry.key for entry in bank.entries if not entry.error][:2]
    c = {}
    c["gallery"] = gr.Gallery(bank_gallery(bank), label="LoRA bank (click to pick)", columns=6, rows=1,
                              height=200, allow_preview=False, elem_id="bank-gallery")
    c["chosen"] = gr.CheckboxGroup(bank_choices(bank), value=keys0, label="Experts (pick 2 or more)",
                                   elem_id="chosen")
    c["table"] = gr.Markdown(bank_table(studio, bank))
    where = ("the bank folder: every visitor sees it" if studio.writable_bank else
             "your session only: it is gone when you close the page")
    with gr.Accordion(f"Add a LoRA (kept in {where})", open=False):
        with gr.Row():
            c["up_file"] = gr.File(label="LoRA (.safetensors)", file_types=[".safetensors"])
            c["up_examples"] = gr.File(label="Example images (optional; they are the gate-training data)",
                                       file_count="multiple", file_types=["image"])
        with gr.Row():
            c["up_name"] = gr.Textbox(label="Name", max_length=80)
            c["up_trigger"] = gr.Textbox(label="Trigger word(s), comma separated", max_length=200)
            c["up_description"] = gr.Textbox(label="Description", max_length=500)
        c["up_button"] = gr.Button("Validate and add")
    return c


def _train_tab(studio: Studio) -> dict:
    c = {}
    limits = studio.engine.limits
    gr.Markdown("Only the gates learn, from the chosen LoRAs' example images; the LoRAs stay frozen.")
    with gr.Row():
        c["granularity"] = gr.Radio(list(GRANULARITIES), value="block", label="Granularity")
        c["gate_kind"] = gr.Radio(GATE_CHOICES, value=DEFAULT_GATE, label="Gates")
        c["steps"] = gr.Number(TRAIN_STEPS, label="Steps", precision=0, minimum=1, maximum=limits.train_steps,
                               elem_id="train-steps")
        c["lr"] = gr.Number(TRAIN_LR, label="Learning rate", minimum=1e-7, maximum=10)
        c["alpha"] = alpha_field(DEFAULT_GATE)
        c["seed"] = gr.Number(TrainConfig().seed, label="Seed", precision=0, minimum=0)
    c["estimate"] = gr.Markdown(elem_id="train-estimate")
    with gr.Row():
        c["button"] = gr.Button("Train gates", variant="primary", elem_id="train-button")
        c["cancel"] = gr.Button("Cancel", variant="stop")
    c["status"] = gr.Markdown(elem_id="train-status")
    with gr.Row():
        axis = dict(x="step", height=240, x_title="step", x_axis_format="d")     # whole steps on the axis
        c["task_plot"] = gr.LinePlot(y="value", color="term", title="Denoising (task) loss", elem_id="task-plot",
                                     **axis)
        c["balance_plot"] = gr.LinePlot(y="value", color="term", title="Balance term (−Σ log mean gate)", **axis)
        c["gates_plot"] = gr.LinePlot(y="gate", color="expert", title="Mean gate per expert", **axis)
    with gr.Row():
        c["mixture_out"] = gr.File(label="Trained mixture (download)", interactive=False)
        c["mixture_in"] = gr.File(label="Load a mixture", file_types=[".safetensors"])
    return c


def _compare_tab(studio: Studio) -> dict:
    c = {}
    bank, limits = studio.engine.bank, studio.engine.limits
    examples = prompt_examples(bank)
    with gr.Row():
        c["prompt"] = gr.Textbox(label="Prompt", scale=4, elem_id="prompt", max_length=2000,
                                 value=examples[0] if examples else "",
                                 placeholder="e.g. " + (examples[0] if examples else "a photo of sks"))
        c["trigger_button"] = gr.Button("Caption from the chosen LoRAs", scale=1)
    c["examples"] = gr.Dropdown(examples, label="Example prompts (one selects the LoRAs it names)", value=None,
                                allow_custom_value=False, elem_id="example-prompts")
    c["negative"] = gr.Textbox(label="Negative prompt", max_length=2000)
    with gr.Row():
        c["seed"] = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=2**63 - 1)
        c["randomise"] = gr.Checkbox(False, label="Randomise seed")
        c["used_seed"] = gr.Number(0, label="Used seed", precision=0, interactive=False, elem_id="used-seed")
        c["steps"] = gr.Slider(1, limits.denoise_steps, DEFAULT_DENOISE_STEPS, step=1, label="Denoising steps",
                               elem_id="steps")
        c["guidance"] = gr.Slider(0, 15, default_guidance(studio.engine.model_id), step=0.5, label="Guidance")
    # every LoRA alone is a valid choice for API clients; the page narrows it to the selection
    c["methods"] = gr.CheckboxGroup(method_choices(bank, bank.keys()), label="Methods", value=DEFAULT_METHODS,
                                    elem_id="methods")
    with gr.Accordion("Method settings (merge weights, rank, density, switch interval)", open=False):
        with gr.Row():
            c["weights"] = gr.Dataframe(headers=["expert", "weight"], datatype=["str", "number"],
                                        label="Merge weights (linear / SVD / TIES / DARE)",
                                        column_count=2, interactive=True, scale=3)
            with gr.Column(scale=2):
                c["rank"] = gr.Slider(1, 64, 8, step=1, label="Rank of SVD / TIES / DARE")
                c["density"] = gr.Slider(0.05, 1, 0.5, step=0.05, label="TIES / DARE density (share kept)")
                c["switch_every"] = gr.Slider(1, 20, 5, step=1, label="LoRA Switch: steps per LoRA (k)")
                c["normalize"] = gr.Checkbox(True, label="Normalise weights to sum 1")
    c["button"] = gr.Button("Compare", variant="primary", elem_id="compare-button")
    c["estimate"] = gr.Markdown(elem_id="compare-estimate")
    c["notes"] = gr.Markdown()
    c["results"] = gr.Gallery(label="Same seed, side by side", columns=4, height="auto", format="png",
                              elem_id="results")
    return c


def _toggle_tab() -> dict:
    c = {"rows": [], "switches": [], "strengths": []}
    gr.Markdown("Switch experts off or weaken them: only the MoLE image is re-rendered (prompt and seed of the "
                "last comparison), the remaining experts renormalised, no retraining. A switch re-renders at "
                "once; after moving a strength, press Render.")
    for i in range(MAX_EXPERTS):  # a fixed number of rows; the selection shows the first N
        with gr.Row(visible=False) as row:
            c["rows"].append(row)
            c["switches"].append(gr.Checkbox(True, label=f"expert {i}", elem_id=f"switch-{i}"))
            c["strengths"].append(gr.Slider(0, 2, 1.0, step=0.05, label="strength", elem_id=f"strength-{i}"))
    c["button"] = gr.Button("Render MoLE", variant="primary", elem_id="toggle-button")
    c["caption"] = gr.Markdown(elem_id="toggle-caption")
    c["image"] = gr.Image(label="MoLE", type="pil", format="png", interactive=False, elem_id="toggle-image",
                          height=384)
    return c


def _inspect_tab() -> dict:
    gr.Markdown("Gates of the last MoLE image: mean weight per gated group (rows, network order) × expert, "
                "and per denoising step. Each row sums to 1; with trigger routing, *no LoRA* is the share of "
                "words and pixels routed to no LoRA (the base model alone draws them).")
    return {"heatmap": gr.Image(label="Gate heat-map", type="pil", format="png", interactive=False,
                                elem_id="heatmap"),
            "step_plot": gr.LinePlot(x="step", y="weight", color="expert", height=260, x_title="denoising step",
                                     title="Mean gate per denoising step", x_axis_format="d"),
            "csv": gr.File(label="Gate weights (CSV)", interactive=False)}


def _export_tab() -> dict:
    c = {}
    with gr.Row():
        c["method"] = gr.Radio(["linear", "svd", "ties", "dare"], value="linear", label="Merge")
        c["format"] = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Format")
        c["button"] = gr.Button("Export LoRA")
    c["file"] = gr.File(label="Merged LoRA", interactive=False)
    c["snippet_button"] = gr.Button("Python for the last comparison")
    gr.Markdown("Install MoLE Studio (`pip install -e .` in its folder), put the mixture downloaded from the "
                "Train gates tab beside the script as `mixture.safetensors` (if MoLE used trained gates), run it.")
    c["snippet"] = gr.Code(language="python", label="Reproduce with mole_core", buttons=["copy"],
                           elem_id="snippet")
    c["snippet_file"] = gr.File(label="mole_compare.py (download)", interactive=False, elem_id="snippet-file")
    return c


def _evaluate_tab(studio: Studio) -> dict:
    c = {}
    limits = studio.engine.limits
    gr.Markdown("A small study of the selected LoRAs on the pixel world's captions: MoLE (per sample and per "
                "token, freshly trained, or the session's trained gates if they match), the merges, each LoRA "
                "alone and the base model, on the same prompts and seeds, scored by the world's oracle.")
    with gr.Row():
        c["seeds"] = gr.Number(SMALL_STUDY.seeds, label="Seeds", precision=0, minimum=1, maximum=limits.study_seeds)
        c["prompts"] = gr.Number(SMALL_STUDY.n_prompts, label="Prompts", precision=0, minimum=1,
                                 maximum=limits.study_prompts)
        c["steps"] = gr.Number(SMALL_STUDY.train_steps, label="Gate-training steps", precision=0, minimum=1,
                               maximum=limits.train_steps)
        c["button"] = gr.Button("Run the study", variant="primary")
        c["cancel"] = gr.Button("Cancel", variant="stop")
    c["estimate"] = gr.Markdown()
    c["text"] = gr.Markdown()
    c["table"] = gr.Dataframe(pd.DataFrame(columns=STUDY_COLUMNS), label="Scores (± : 95% interval half-width)",
                              interactive=False, elem_id="study-table")
    c["chart"] = gr.Image(label="Scores with 95% intervals", type="pil", interactive=False)
    return c


def build_demo(studio: Studio | Engine, delete_cache: tuple[int, int] = (600, 3600),
               session_ttl: float = 4 * 3600) -> gr.Blocks:
    """The whole page. Loads nothing; the engine loads the model on first use.

    delete_cache: (every, older than) seconds: Gradio's copies of uploads and downloads are removed.
    session_ttl: a session idle this long ends (its State is deleted: `end_session` removes its folder);
    closing the page ends it too.
    """
    studio = studio if isinstance(studio, Studio) else Studio(studio)
    fast, long = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1), \
        dict(concurrency_id=LONG_QUEUE, concurrency_limit=1)
    private = dict(api_visibility="private")
    on = partial  # handlers take the studio first

    with gr.Blocks(title="MoLE Studio", delete_cache=delete_cache) as demo:
        state = gr.State(new_session(), time_to_live=session_ttl, delete_callback=partial(end_session, studio))
        gr.Markdown("# MoLE Studio\nMix LoRAs as gated experts (MoLE) and compare with the merges and the other "
                    "composition methods, same seed, side by side. **Start:** pick two LoRAs in *Bank* → "
                    "*Train gates* → *Compare* (the prompt is filled in) → *Toggle experts* / *Inspect gates*.")
        model_info = gr.Markdown(elem_id="model-info")
        with gr.Accordion("What is MoLE? (and the words this page uses)", open=False):
            gr.Markdown(ABOUT)
        with gr.Tabs():
            with gr.Tab("Bank", id="bank"):
                b = _bank_tab(studio)
            with gr.Tab("Train gates", id="train"):
                t = _train_tab(studio)
            with gr.Tab("Compare", id="compare"):
                c = _compare_tab(studio)
            with gr.Tab("Toggle experts", id="toggle"):
                g = _toggle_tab()
            with gr.Tab("Inspect gates", id="inspect"):
                i = _inspect_tab()
            with gr.Tab("Export", id="export"):
                x = _export_tab()
            with gr.Tab("Evaluate", id="evaluate"):
                e = _evaluate_tab(studio)
            if studio.text is not None:
                with gr.Tab("Text", id="text"):
                    build_text_mode(TextStudio(studio.text, partial(public_message, studio)), "text_", fast, long)

        # Bank and selection
        selection_outputs = [c["methods"], c["weights"], *g["rows"], *g["switches"], *g["strengths"]]
        demo.load(on(on_load, studio), [state], [b["gallery"], b["table"], b["chosen"], c["examples"], model_info],
                  **private) \
            .then(on(on_selection, studio), [b["chosen"], c["methods"], state], selection_outputs, **private)
        b["chosen"].change(on(on_selection, studio), [b["chosen"], c["methods"], state], selection_outputs,
                           **private)

        def pick(keys: list[str], st: dict, evt: gr.SelectData) -> list[str]:  # a partial would hide evt's type
            return pick_from_gallery(studio, keys, evt.index, st)
        b["gallery"].select(pick, [b["chosen"], state], [b["chosen"]], **private)
        b["up_button"].click(on(upload_lora, studio), [b["up_file"], b["up_name"], b["up_trigger"],
                                                       b["up_description"], b["up_examples"], state],
                             [b["gallery"], b["table"], b["chosen"], state], api_name="add_lora", **fast)

        # Train gates
        train_inputs = [b["chosen"], t["granularity"], t["steps"], t["lr"], t["alpha"], t["seed"], t["gate_kind"]]
        gr.on([demo.load, b["chosen"].change, t["steps"].change, t["gate_kind"].change], on(train_estimate, studio),
              [b["chosen"], t["steps"], t["gate_kind"]], [t["estimate"]], queue=False, **private)
        t["gate_kind"].change(alpha_field, [t["gate_kind"]], [t["alpha"]], queue=False, **private)
        t["button"].click(on(check_train, studio), [*train_inputs, state], None, **private) \
            .success(on_model(train, train_seconds, studio), [*train_inputs, state],
                     [state, t["status"], t["task_plot"], t["balance_plot"], t["gates_plot"], t["mixture_out"]],
                     api_name="train", **long)
        t["cancel"].click(cancel, [state], [t["status"]], queue=False, api_name="cancel")
        t["mixture_in"].upload(on(load_mixture_upload, studio), [t["mixture_in"], state],
                               [state, b["chosen"], t["status"]], api_name="load_mixture", **fast)

        # Compare
        c["trigger_button"].click(on(insert_triggers, studio), [b["chosen"], state], [c["prompt"]], **private)
        c["examples"].input(on(pick_example, studio), [c["examples"], state], [c["prompt"], b["chosen"]], **private)
        compare_inputs = [b["chosen"], c["prompt"], c["negative"], c["seed"], c["randomise"], c["steps"],
                          c["guidance"], c["methods"], c["weights"], c["rank"], c["normalize"], c["density"],
                          c["switch_every"], t["granularity"], t["gate_kind"], state]
        c["button"].click(on(check_compare, studio), compare_inputs, None, **private) \
            .success(on_model(compare, compare_seconds, studio), compare_inputs,
                     [c["results"], c["used_seed"], c["notes"], state],
                     api_name="compare", **fast) \
            .success(on(show_gates, studio), [state], [i["heatmap"], i["step_plot"], i["csv"], state], **private)

        gr.on([demo.load, b["chosen"].change, c["methods"].change, c["steps"].change, t["gate_kind"].change],
              on(compare_estimate, studio), [b["chosen"], c["methods"], c["steps"], t["gate_kind"]],
              [c["estimate"]], queue=False, **private)

        # Toggle experts
        toggle_inputs = [b["chosen"], c["prompt"], c["negative"], c["used_seed"], c["steps"], c["guidance"],
                         t["granularity"], t["gate_kind"], state, *g["switches"], *g["strengths"]]
        triggers = [g["button"].click] + [s.input for s in g["switches"]]
        gr.on(triggers, on_model(toggle, toggle_seconds, studio), toggle_inputs, [g["image"], g["caption"], state],
              api_name="toggle", trigger_mode="always_last", **fast) \
            .success(on(show_gates, studio), [state], [i["heatmap"], i["step_plot"], i["csv"], state], **private)

        # Export
        x["button"].click(on(export, studio), [b["chosen"], x["method"], x["format"], c["weights"], c["rank"],
                                               c["normalize"], c["density"], state], [x["file"], state],
                          api_name="export", **fast)
        x["snippet_button"].click(on(snippet_file, studio), [state], [x["snippet"], x["snippet_file"], state],
                                  **private)

        # Evaluate
        study_inputs = [b["chosen"], e["seeds"], e["prompts"], e["steps"], state]
        gr.on([demo.load, e["seeds"].change, e["prompts"].change, e["steps"].change, b["chosen"].change],
              on(study_estimate, studio), study_inputs, [e["estimate"]], queue=False, **private)
        e["button"].click(on_model(study, study_seconds, studio), study_inputs,
                          [e["text"], e["table"], e["chart"]],
                          api_name="study", **long)
        e["cancel"].click(cancel, [state], [e["text"]], queue=False, **private)
    return demo


def launch_options(engine: Engine | None = None) -> dict:
    """Keyword arguments of `demo.launch` shared by main() and the tests (Gradio 6: css goes here)."""
    limits = engine.limits if engine is not None else Limits()
    options = {"max_file_size": limits.upload_bytes}
    if CSS_PATH.exists():
        options["css_paths"] = [CSS_PATH]
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="MoLE Studio: mix LoRAs as gated experts in the browser.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="diffusers folder or hub id "
                        "(default: the embedded pixel world)")
    parser.add_argument("--bank", default=DEFAULT_BANK, help="LoRA bank folder (default: lora_bank)")
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, "
                        "GRADIO_SERVER_NAME on a Space)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--writable-bank", action="store_true",
                        help="uploads join the bank folder, for every session (a private app); default: "
                             "each visitor's uploads stay in their session and are removed when it ends")
    parser.add_argument("--local", action="store_true",
                        help="a private machine: raise the public-Space caps (training steps, study size, "
                             "image side) to mole_core.defaults.Limits.local()")
    parser.add_argument("--max-train-steps", type=int, default=None, help="cap on gate-training steps per run")
    add_precision_arguments(parser)    # --dtype, --cpu-offload
    args = parser.parse_args(argv)
    hush_torchvision_notice()
    limits = Limits.local() if args.local else Limits()
    if args.max_train_steps:
        limits = Limits(**{**limits.__dict__, "train_steps": args.max_train_steps})
    if is_text_model(args.model):  # a transformers text model: the Text mode alone
        bank = DEFAULT_TEXT_BANK if args.bank == DEFAULT_BANK else args.bank
        text = TextEngine(args.model, bank, limits=limits)
        demo = build_text_demo(text, partial(public_message, Studio(text)))
        demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())
        return
    try:
        engine = Engine(args.model, args.bank, limits=limits, **engine_precision(args))
    except ValueError as e:          # e.g. --cpu-offload without a GPU: one sentence, not a traceback
        parser.error(str(e))
    if args.writable_bank:
        engine.bank.clean()    # leftovers of an interrupted upload
    if spaces_module() is not None:
        engine.pipe            # ZeroGPU: load once, here; every GPU call runs in a worker that inherits it
    else:                      # the estimates shown come from this machine's own timings
        print("Timing this machine for the estimates ...", flush=True)
        print(f"... {engine.calibrate():.0f} s: {engine.costs.source}.", flush=True)
    text = TextEngine(limits=limits) if is_text_model(DEFAULT_TEXT_MODEL) else None
    demo = build_demo(Studio(engine, writable_bank=args.writable_bank, text=text))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options(engine))


if __name__ == "__main__":
    main()
