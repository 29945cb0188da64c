"""MoLE Studio, the web app: pick LoRAs from a bank, train MoLE gates, compare MoLE with the linear
and SVD merges side by side, switch experts on and off, look inside the gates, export a merge.

Layout and wiring live in `build_demo(engine)`; every handler is a short module-level function that
takes the engine first, so tests call them without a server. The engine is the one process-wide,
read-mostly object; everything that belongs to one browser (trained mixture, last comparison, gate
rows) lives in a `gr.State`, and the LoRA selection, masks and strengths are ordinary components, so
two people on one Space never see each other's settings. Every event that runs the model shares the
concurrency id "model" (one queue), validates first (`.click(check).success(run)`) and leaves the
pipeline as it found it (the engine guarantees that).

Run: `python app.py` (the embedded pixel world) or `python app.py --model DIR_OR_HUB_ID --bank DIR`.

References: MoLE (Wu et al., ICLR 2024, arXiv 2404.13628); Gradio 6 Blocks, gr.State, gr.Progress.
"""
from __future__ import annotations

import argparse
import queue
import random
import shutil
import tempfile
import re
import threading
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from mole_core.attach import GATE_KINDS, GRANULARITIES, MoleConfig
from mole_core.engine import DEFAULT_BANK, DEFAULT_GUIDANCE, DEFAULT_MODEL, Engine, GenerateRequest, write_gates_csv
from mole_core.mixture import load_mixture
from mole_core.train import TrainConfig

MAX_EXPERTS = 8                        # rows of switches/strengths (and weights) the page can show
TRAIN_STEPS = 60                       # default gate-training steps here (TrainConfig's 400 is the paper's)
TRAIN_LR = 1e-3                        # the study's gate learning rate: at TrainConfig's 1e-4, 60 steps left the
                                       # gates at 0.495 / 0.505
UPLOAD_MAX_BYTES = 256 * 2**20         # a LoRA file larger than this is refused before it is read
GATE_CHOICES = [("Per sample (the paper)", "sample"), ("Per token / pixel", "token")]   # MoleConfig.gate
MODEL_QUEUE = "model"                  # the concurrency id every model-running event shares
CSS_PATH = Path(__file__).resolve().parent / "assets" / "app.css"


def new_session() -> dict:
    """What one browser keeps between events (gr.State copies it for each session)."""
    return {
        "mixture": None,        # mole_core.mixture.Mixture of the last training (or upload)
        "mixture_file": None,   # where that mixture is saved, for download and the snippet
        "cancel": False,        # set by Cancel, read by the training loop
        "compared": None,       # the last comparison's arguments (keys, methods, request, weights, ...)
        "gates": None,          # tidy gate rows of the last MoLE image
    }


def _human(fn, *args, **kwargs):
    """Call fn; a ValueError (the engine's bad-input signal) becomes a gr.Error the user can read."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise gr.Error(str(err)) from err


def _workdir() -> Path:
    """A fresh folder for files this event hands to the browser (Gradio serves the temp dir)."""
    return Path(tempfile.mkdtemp(prefix="mole_studio_"))


# ---- Bank ---------------------------------------------------------------------------------------
def bank_gallery(engine: Engine) -> list[tuple[str | None, str]]:
    """(example image, "name · trigger") for every LoRA of the bank, in bank order."""
    return [(str(entry.examples[0][0]) if entry.examples else None, f"{entry.name} · {_triggers(entry)}")
            for entry in engine.bank.entries]


def _triggers(entry) -> str:
    return ", ".join(entry.trigger)


def bank_table(engine: Engine) -> str:
    """The bank as a Markdown table: name, trigger words, description."""
    lines = ["| LoRA | trigger | description |", "|---|---|---|"]
    for entry in engine.bank.entries:
        state = f" (broken: {entry.error})" if entry.error else ""
        lines.append(f"| {entry.name}{state} | `{_triggers(entry)}` | {entry.description} |")
    return "\n".join(lines)


def bank_choices(engine: Engine) -> list[tuple[str, str]]:
    return [(f"{entry.name} ({_triggers(entry)})", entry.key) for entry in engine.bank.entries]


def pick_from_gallery(engine: Engine, keys: list[str], index: int) -> list[str]:
    """Clicking a LoRA in the gallery adds it to the selection, or removes it if already chosen."""
    key = engine.bank.entries[index].key
    return [k for k in keys if k != key] if key in keys else [*keys, key]


def insert_triggers(engine: Engine, keys: list[str], prompt: str) -> str:
    """Append the trigger words of the chosen LoRAs that the prompt does not contain yet."""
    if not keys:
        raise gr.Error("No LoRA is selected: tick at least one LoRA in the Bank tab first.")
    missing = [w for k in keys for w in engine.bank.get(k).trigger if w.lower() not in prompt.lower()]
    return ", ".join([prompt.strip(), *missing]) if prompt.strip() else ", ".join(missing)


def method_choices(engine: Engine, keys: list[str]) -> list[tuple[str, str]]:
    """(label, engine method) for the Methods checkboxes: the four methods, then each LoRA alone."""
    return [("MoLE", "mole"), ("linear", "linear"), ("SVD", "svd"), ("base", "base")] + \
        [(f"only {engine.bank.get(k).name}", f"single:{k}") for k in keys]


def on_selection(engine: Engine, keys: list[str]):
    """Selection changed: method choices, linear weights and the expert rows follow it."""
    keys = list(keys or [])[:MAX_EXPERTS]
    methods = method_choices(engine, keys)
    weights = pd.DataFrame({"expert": keys, "weight": [engine.bank.get(k).default_weight for k in keys]})
    names = [engine.bank.get(k).name for k in keys] + [""] * (MAX_EXPERTS - len(keys))
    rows = [gr.Row(visible=i < len(keys)) for i in range(MAX_EXPERTS)]
    switches = [gr.Checkbox(value=True, label=names[i]) for i in range(MAX_EXPERTS)]
    strengths = [gr.Slider(value=1.0) for _ in range(MAX_EXPERTS)]
    return [gr.CheckboxGroup(choices=methods), weights, *rows, *switches, *strengths]


def upload_lora(engine: Engine, lora_file: str | None, name: str, trigger: str, description: str,
                examples: list[str] | None):
    """Validate an uploaded LoRA against the loaded model, then add it to the bank."""
    if not lora_file:
        raise gr.Error("No LoRA file was uploaded: choose a .safetensors file.")
    path = Path(lora_file)
    if path.suffix != ".safetensors":
        raise gr.Error(f"{path.name} is not a .safetensors file; only .safetensors LoRAs are accepted.")
    if path.stat().st_size > UPLOAD_MAX_BYTES:
        raise gr.Error(f"{path.name} is {path.stat().st_size / 2**20:.0f} MiB; the limit is "
                       f"{UPLOAD_MAX_BYTES / 2**20:.0f} MiB.")
    if not (trigger or "").strip():
        raise gr.Error("The trigger word is empty: give the word that calls this LoRA up in a prompt.")
    name = (name or "").strip() or path.stem
    words = [w.strip() for w in trigger.split(",") if w.strip()]
    manifest = {"name": name, "trigger": words, "description": description or "",
                "base_model": engine.model_id or "", "kind": "subject", "default_weight": 1.0}
    key = re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_") or "lora"
    images = [(image, f"a photo of {' '.join(words)}") for image in examples or []]
    entry = _human(engine.add_to_bank, path, manifest, images, key=key)
    gr.Info(f"{entry.name} joined the bank as {entry.key!r}.")
    return bank_gallery(engine), bank_table(engine), gr.CheckboxGroup(choices=bank_choices(engine))


# ---- Train gates --------------------------------------------------------------------------------
def check_train(engine: Engine, keys: list[str], granularity: str, steps: float, lr: float,
                alpha: float, seed: float, gate: str = "sample") -> None:
    if len(keys or []) < 2:
        raise gr.Error(f"Gate training needs at least two LoRAs; {len(keys or [])} selected in the Bank tab.")
    if len(keys) > MAX_EXPERTS:
        raise gr.Error(f"At most {MAX_EXPERTS} LoRAs can be mixed here; {len(keys)} are selected.")
    if granularity not in GRANULARITIES:
        raise gr.Error(f"Unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}.")
    if gate not in GATE_KINDS:
        raise gr.Error(f"Unknown gate kind {gate!r}: choose one of {', '.join(GATE_KINDS)}.")
    if not (steps and steps >= 1) or not (lr and lr > 0) or alpha is None or alpha < 0 or seed is None:
        raise gr.Error("Steps must be at least 1, the learning rate above 0, α at least 0, and a seed given.")
    _human(engine.check_request, keys, GenerateRequest(prompt=""), ["mole"])


def train(engine: Engine, keys: list[str], granularity: str, steps: float, lr: float, alpha: float,
          seed: float, gate: str, state: dict, progress=gr.Progress()):
    """Train the gates; stream (state, status, loss plot, gate-balance plot, mixture file) per step."""
    check_train(engine, keys, granularity, steps, lr, alpha, seed, gate)
    state["cancel"] = False
    config = TrainConfig(steps=int(steps), lr=float(lr), balance_alpha=float(alpha), seed=int(seed))
    out_path = _workdir() / "mixture.safetensors"
    worker = _Worker(lambda on_step: engine.train(keys, MoleConfig(granularity=granularity, gate=gate), config,
                                                  on_step=on_step, should_stop=lambda: state["cancel"],
                                                  out_path=out_path))
    losses, balance = [], []
    try:
        for step, loss, gates in worker:
            losses += [{"step": step, "term": term, "value": float(v)} for term, v in loss.items()]
            balance += [{"step": step, "expert": k, "gate": float(g)} for k, g in zip(keys, gates)]
            progress((step, int(steps)), desc=f"loss {loss['loss']:.4f}")
            yield state, f"Step {step}/{int(steps)} · loss {loss['loss']:.4f}", pd.DataFrame(losses), \
                pd.DataFrame(balance), None
    except ValueError as err:
        raise gr.Error(str(err)) from err
    finally:  # the page went away or the event was cancelled: stop the training thread too
        state["cancel"] = state["cancel"] or worker.running
    mixture = state["mixture"] = worker.result
    state["mixture_file"] = str(out_path)
    verb = "Stopped (cancelled)" if state["cancel"] else "Trained"
    final = mixture.meta.get("final_losses") or {}
    last = f" · last loss {final['loss']:.4f}" if "loss" in final else ""
    yield state, f"{verb} after {mixture.meta.get('steps', 0)} steps{last}.", pd.DataFrame(losses), \
        pd.DataFrame(balance), state["mixture_file"]


class _Worker:
    """Runs `work(on_step)` in a thread so a generator can yield while it runs.

    Iterating gives the arguments of every on_step call as they come; afterwards `result` holds what
    `work` returned (an exception inside `work` is raised again by the iteration).
    """

    def __init__(self, work):
        self._items: queue.Queue = queue.Queue()
        self.result, self._error, self.running = None, None, True
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work):
        try:
            self.result = work(lambda *args: self._items.put(args))
        except BaseException as err:  # handed to the iterating thread, never swallowed
            self._error = err
        finally:
            self.running = False
            self._items.put(None)

    def __iter__(self):
        while (item := self._items.get()) is not None:
            yield item
        if self._error is not None:
            raise self._error


def cancel_training(state: dict) -> str:
    state["cancel"] = True
    return "Cancelling after the current step…"


def load_mixture_upload(engine: Engine, path: str | None, keys: list[str], state: dict):
    """Take a downloaded mixture back; it must have been trained for the bank's LoRA files."""
    if not path:
        raise gr.Error("No mixture file was uploaded: choose a mixture .safetensors you downloaded here.")
    mixture = _human(load_mixture, path)
    missing = [k for k in mixture.names if not _known(engine, k)]
    if missing:
        raise gr.Error(f"The mixture needs LoRAs the bank does not hold: {', '.join(missing)}.")
    _human(mixture.check, [(k, engine.bank.get(k).lora_path) for k in mixture.names])
    state["mixture"] = mixture
    state["mixture_file"] = str(shutil.copy(path, _workdir() / "mixture.safetensors"))
    return state, list(mixture.names), f"Loaded a {mixture.granularity} mixture of {', '.join(mixture.names)}."


def _known(engine: Engine, key: str) -> bool:
    return any(entry.key == key for entry in engine.bank.entries)


# ---- Compare ------------------------------------------------------------------------------------
def _request(prompt, negative, seed, steps, guidance) -> GenerateRequest:
    return GenerateRequest(prompt=prompt or "", negative=negative or "", seed=int(seed or 0),
                           steps=int(steps), guidance=float(guidance))


def _weights(table: pd.DataFrame | None) -> dict[str, float] | None:
    """Linear/SVD weights from the editable table (None or empty -> the engine's defaults)."""
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


def check_compare(engine: Engine, keys, prompt, negative, seed, randomise, steps, guidance, methods) -> None:
    """Validate before queueing; a prompt too long for the text encoder is a warning, not an error."""
    for warning in _compare_warnings(engine, keys, prompt, negative, seed, steps, guidance, methods):
        gr.Warning(warning)


def _compare_warnings(engine: Engine, keys, prompt, negative, seed, steps, guidance, methods) -> list[str]:
    """gr.Error for input the engine cannot run; the engine's warnings (words cut from a prompt)."""
    if not methods:
        raise gr.Error("No method is ticked: choose at least one of MoLE, linear, SVD, base or a single LoRA.")
    if len(keys or []) > MAX_EXPERTS:
        raise gr.Error(f"At most {MAX_EXPERTS} LoRAs can be compared here; {len(keys)} are selected.")
    if seed is None or seed < 0:
        raise gr.Error("The seed must be a non-negative whole number.")
    return _human(engine.check_request, keys, _request(prompt, negative, seed, steps, guidance), methods)


def compare(engine: Engine, keys, prompt, negative, seed, randomise, steps, guidance, methods, weights,
            rank, normalize, state: dict):
    """Render every ticked method from the same seed; returns (gallery, used seed, notes, state)."""
    warnings = _compare_warnings(engine, keys, prompt, negative, seed, steps, guidance, methods)
    seed = random.randrange(2**31) if randomise else int(seed)
    request = _request(prompt, negative, seed, steps, guidance)
    mixture = _mixture_for(state, keys)
    results = _human(engine.compare, keys, list(methods), request, mixture=mixture, weights=_weights(weights),
                     rank=int(rank) if rank else None, normalize=bool(normalize))
    state["compared"] = dict(keys=list(keys), methods=list(methods), request=request, weights=_weights(weights),
                             rank=int(rank) if rank else None, normalize=bool(normalize),
                             mixture=mixture is not None)
    state["gates"] = next((r.gates for r in results if r.method == "mole"), state["gates"])
    gallery = [(r.image, f"{r.label} · {r.seconds:.2f} s") for r in results]
    if mixture is None and "mole" in methods:
        warnings.append("MoLE uses untrained gates (equal weights): train gates for this selection in the "
                        "Train tab.")
    return gallery, seed, "\n".join(f"- {w}" for w in warnings), state


# ---- Toggle experts -----------------------------------------------------------------------------
def toggle(engine: Engine, keys, prompt, negative, seed, steps, guidance, state: dict, *rows):
    """Re-render only the MoLE image with some experts off / weaker; the rest are renormalised."""
    keys = list(keys or [])
    switches, strengths = rows[:MAX_EXPERTS], rows[MAX_EXPERTS:]
    mask = {k: bool(on) for k, on in zip(keys, switches)}
    strength = {k: float(s) for k, s in zip(keys, strengths)}
    if keys and not any(mask.values()):
        gr.Info("Every expert is switched off: this is the base model.")
    request = _request(prompt, negative, seed, steps, guidance)
    result = _human(engine.generate, keys, "mole", request, mixture=_mixture_for(state, keys), mask=mask,
                    strengths=strength)
    state["gates"] = result.gates
    on = ", ".join(k for k in keys if mask[k]) or "none"
    return result.image, f"**{result.label} · {result.seconds:.2f} s** — experts on: {on}", state


# ---- Inspect gates ------------------------------------------------------------------------------
def show_gates(state: dict):
    """Heat-map (groups × experts), per-step line chart and CSV of the last MoLE image's gates."""
    rows = state.get("gates")
    if not rows:
        return None, pd.DataFrame({"step": [], "weight": [], "expert": []}), None
    frame = pd.DataFrame(rows)
    per_step = frame.groupby(["step", "expert"], sort=False, as_index=False)["weight"].mean()
    csv = write_gates_csv(rows, _workdir() / "gates.csv")
    return gate_heatmap(frame), per_step, str(csv)


VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _colour(value: float) -> tuple[int, int, int]:
    """Viridis-like colour of a value in [0, 1] (interpolated between five anchor colours)."""
    x = min(max(value, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    return tuple(round(a + (b - a) * (x - i)) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def gate_heatmap(frame: pd.DataFrame, cell=(72, 22)) -> Image.Image:
    """Mean gate weight per group (rows, network order) × expert (columns), drawn with PIL.

    PIL rather than a plotting library: a table of coloured cells with their values printed in them
    is all this needs, and it draws in milliseconds with no plotting backend to set up.
    """
    table = frame.groupby(["group", "expert"], sort=False)["weight"].mean().unstack("expert")
    table = table.loc[list(dict.fromkeys(frame["group"])), list(dict.fromkeys(frame["expert"]))]
    font = ImageFont.load_default(size=12)
    label_w = 8 + max(int(font.getlength(str(g))) for g in table.index)
    cw, ch = max(cell[0], 8 + max(int(font.getlength(str(e))) for e in table.columns)), cell[1]
    image = Image.new("RGB", (label_w + cw * table.shape[1] + 8, ch * (table.shape[0] + 1) + 8), "white")
    draw = ImageDraw.Draw(image)
    for j, expert in enumerate(table.columns):
        draw.text((label_w + j * cw + cw / 2, ch / 2), str(expert), fill="black", font=font, anchor="mm")
    for i, group in enumerate(table.index):
        y = ch * (i + 1)
        draw.text((label_w - 6, y + ch / 2), str(group), fill="black", font=font, anchor="rm")
        for j, value in enumerate(table.loc[group]):
            x = label_w + j * cw
            draw.rectangle([x, y, x + cw - 1, y + ch - 1], fill=_colour(value))
            draw.text((x + cw / 2, y + ch / 2), f"{value:.2f}", font=font, anchor="mm",
                      fill="black" if value > 0.6 else "white")
    return image


# ---- Export -------------------------------------------------------------------------------------
def export(engine: Engine, keys, method: str, fmt: str, weights, rank, normalize) -> str:
    """Write the linear or SVD merge of the selection as a LoRA file and hand it to the browser."""
    name = f"mole_studio_{method}{'_r' + str(int(rank)) if method == 'svd' and rank else ''}_{fmt}.safetensors"
    path = _human(engine.export, keys, method, _workdir() / name, weights=_weights(weights),
                  rank=int(rank) if rank else None, format=fmt, normalize=bool(normalize))
    return str(path)


def snippet(engine: Engine, state: dict) -> str:
    """Python that reproduces the last comparison with mole_core (the mixture as downloaded)."""
    if state.get("compared") is None:
        raise gr.Error("Nothing to reproduce yet: run a comparison in the Compare tab first.")
    args = dict(state["compared"])
    mixture_path = Path(state["mixture_file"]).name if args.pop("mixture") else None
    return engine.snippet(args.pop("keys"), args.pop("methods"), args.pop("request"),
                          mixture_path=mixture_path, **args)


# ---- Evaluate -----------------------------------------------------------------------------------
def study(engine: Engine, keys, seeds, n_prompts, train_steps, state: dict, progress=gr.Progress()):
    """A small study of the selection (mole_core.evaluate): -> (markdown, table, bar chart)."""
    from mole_core.evaluate import run_small_study  # its plotting imports load only when asked
    if len(keys or []) < 2:
        raise gr.Error(f"A study needs at least two LoRAs; {len(keys or [])} selected in the Bank tab.")
    return _human(run_small_study, engine, list(keys), seeds=int(seeds), n_prompts=int(n_prompts),
                  train_steps=int(train_steps), mixture=_mixture_for(state, keys),
                  on_progress=lambda done, total, message: progress((done, total), desc=message))


# ---- Layout and wiring --------------------------------------------------------------------------
def build_demo(engine: Engine) -> gr.Blocks:
    """The whole page for one engine. Loads nothing; the engine loads the model on first use."""
    model_event = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    keys0 = [entry.key for entry in engine.bank.entries if not entry.error][:2]

    with gr.Blocks(title="MoLE Studio") as demo:
        state = gr.State(new_session())  # Gradio deep-copies it for every browser session
        gr.Markdown("# MoLE Studio\nMix LoRAs as gated experts (MoLE) and compare with linear and SVD "
                    "merges, same seed, side by side.")
        with gr.Tabs():
            # 1. Bank
            with gr.Tab("Bank", id="bank"):
                gallery = gr.Gallery(bank_gallery(engine), label="LoRA bank (click to pick)", columns=6,
                                     fit_columns=False, height="auto", allow_preview=False,
                                     elem_id="bank-gallery")
                chosen = gr.CheckboxGroup(bank_choices(engine), value=keys0, label="Experts (pick 2 or more)",
                                          elem_id="chosen")
                table = gr.Markdown(bank_table(engine))
                with gr.Accordion("Add a LoRA to the bank", open=False):
                    with gr.Row():
                        up_file = gr.File(label="LoRA (.safetensors)", file_types=[".safetensors"])
                        up_examples = gr.File(label="Example images", file_count="multiple",
                                              file_types=["image"])
                    with gr.Row():
                        up_name = gr.Textbox(label="Name")
                        up_trigger = gr.Textbox(label="Trigger word(s), comma separated")
                        up_description = gr.Textbox(label="Description")
                    up_button = gr.Button("Validate and add")
            # 2. Train gates
            with gr.Tab("Train gates", id="train"):
                with gr.Row():
                    granularity = gr.Radio(list(GRANULARITIES), value="block", label="Granularity")
                    gate_kind = gr.Radio(GATE_CHOICES, value="sample", label="Gates")
                    train_steps = gr.Number(TRAIN_STEPS, label="Steps", precision=0, minimum=1,
                                            elem_id="train-steps")
                    lr = gr.Number(TRAIN_LR, label="Learning rate")
                    alpha = gr.Number(MoleConfig().balance_alpha, label="Balance α")
                    train_seed = gr.Number(TrainConfig().seed, label="Seed", precision=0)
                with gr.Row():
                    train_button = gr.Button("Train gates", variant="primary", elem_id="train-button")
                    cancel_button = gr.Button("Cancel", variant="stop")
                train_status = gr.Markdown(elem_id="train-status")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="value", color="term", height=240,
                                            title="Loss (total, denoising task, balance)")
                    balance_plot = gr.LinePlot(x="step", y="gate", color="expert", height=240,
                                               title="Mean gate per expert (balance)")
                with gr.Row():
                    mixture_out = gr.File(label="Trained mixture (download)", interactive=False)
                    mixture_in = gr.File(label="Load a mixture", file_types=[".safetensors"])
            # 3. Compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", scale=4, elem_id="prompt")
                    trigger_button = gr.Button("Insert trigger words", scale=1)
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    randomise = gr.Checkbox(False, label="Randomise seed")
                    used_seed = gr.Number(0, label="Used seed", precision=0, interactive=False,
                                          elem_id="used-seed")
                    steps = gr.Slider(1, 100, 20, step=1, label="Denoising steps", elem_id="steps")
                    guidance = gr.Slider(0, 15, DEFAULT_GUIDANCE, step=0.5, label="Guidance")
                # every LoRA alone is a valid choice for API clients; the page narrows it to the selection
                methods = gr.CheckboxGroup(method_choices(engine, engine.bank.keys()), label="Methods",
                                           value=["mole", "linear", "svd", "base"], elem_id="methods")
                with gr.Row():
                    weights = gr.Dataframe(headers=["expert", "weight"], datatype=["str", "number"],
                                           label="Linear / SVD weights",
                                           column_count=2, interactive=True, scale=3)
                    with gr.Column(scale=1):
                        rank = gr.Slider(1, 64, 8, step=1, label="SVD rank")
                        normalize = gr.Checkbox(True, label="Normalise weights to sum 1")
                compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                compare_notes = gr.Markdown()
                results = gr.Gallery(label="Same seed, side by side", columns=5, height="auto",
                                     format="png", elem_id="results")
            # 4. Toggle experts
            with gr.Tab("Toggle experts", id="toggle"):
                gr.Markdown("Switch experts off or weaken them: only the MoLE image is re-rendered, the "
                            "remaining experts renormalised, no retraining.")
                rows, switches, strengths = [], [], []
                for i in range(MAX_EXPERTS):  # a fixed number of rows; the selection shows the first N
                    with gr.Row(visible=False) as row:
                        rows.append(row)
                        switches.append(gr.Checkbox(True, label=f"expert {i}", elem_id=f"switch-{i}"))
                        strengths.append(gr.Slider(0, 2, 1.0, step=0.05, label="strength", show_label=False))
                toggle_button = gr.Button("Render MoLE", variant="primary", elem_id="toggle-button")
                toggle_caption = gr.Markdown(elem_id="toggle-caption")
                toggle_image = gr.Image(label="MoLE", type="pil", format="png", interactive=False,
                                        elem_id="toggle-image", height=384)
            # 5. Inspect gates
            with gr.Tab("Inspect gates", id="inspect"):
                gr.Markdown("Gates of the last MoLE image: mean weight per gated group (rows, network order) "
                            "× expert, and per denoising step.")
                heatmap = gr.Image(label="Gate heat-map", type="pil", format="png", interactive=False,
                                   elem_id="heatmap")
                step_plot = gr.LinePlot(x="step", y="weight", color="expert", height=260,
                                        title="Mean gate per denoising step")
                gates_csv = gr.File(label="Gate weights (CSV)", interactive=False)
            # 6. Export
            with gr.Tab("Export", id="export"):
                with gr.Row():
                    export_method = gr.Radio(["linear", "svd"], value="linear", label="Merge")
                    export_format = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Format")
                    export_button = gr.Button("Export LoRA")
                export_file = gr.File(label="Merged LoRA", interactive=False)
                snippet_button = gr.Button("Python for the last comparison")
                gr.Markdown("Run it beside the mixture file downloaded from the Train gates tab (if MoLE "
                            "used trained gates).")
                snippet_code = gr.Code(language="python", label="Reproduce with mole_core")
            # 7. Evaluate
            with gr.Tab("Evaluate", id="evaluate"):
                gr.Markdown("A small study of the selected LoRAs: MoLE (the session's trained gates if "
                            "they match, else freshly trained), linear, SVD, each LoRA alone and the base "
                            "model on the same prompts and seeds.")
                with gr.Row():
                    study_seeds = gr.Number(2, label="Seeds", precision=0, minimum=1)
                    study_prompts = gr.Number(4, label="Prompts", precision=0, minimum=1)
                    study_steps = gr.Number(30, label="Gate-training steps", precision=0, minimum=1)
                    study_button = gr.Button("Run the study", variant="primary")
                study_text = gr.Markdown()
                study_table = gr.Dataframe(label="Scores", interactive=False)
                study_chart = gr.Image(label="Scores with 95% intervals", type="pil", interactive=False)

        # Wiring. Selection-driven components are refreshed on load and whenever the selection changes.
        selection_outputs = [methods, weights, *rows, *switches, *strengths]
        demo.load(partial(on_selection, engine), [chosen], selection_outputs, api_visibility="private")
        chosen.change(partial(on_selection, engine), [chosen], selection_outputs, api_visibility="private")

        def pick(keys: list[str], evt: gr.SelectData) -> list[str]:  # a partial would hide the evt type
            return pick_from_gallery(engine, keys, evt.index)
        gallery.select(pick, [chosen], [chosen], api_visibility="private")
        trigger_button.click(partial(insert_triggers, engine), [chosen, prompt], [prompt],
                             api_visibility="private")
        upload_inputs = [up_file, up_name, up_trigger, up_description, up_examples]
        up_button.click(partial(upload_lora, engine), upload_inputs, [gallery, table, chosen],
                        api_name="add_lora", **model_event)

        train_inputs = [chosen, granularity, train_steps, lr, alpha, train_seed, gate_kind]
        train_button.click(partial(check_train, engine), train_inputs, None, api_visibility="private") \
            .success(partial(train, engine), [*train_inputs, state],
                     [state, train_status, loss_plot, balance_plot, mixture_out], api_name="train",
                     **model_event)
        cancel_button.click(cancel_training, [state], [train_status], queue=False, api_name="cancel")
        mixture_in.upload(partial(load_mixture_upload, engine), [mixture_in, chosen, state],
                          [state, chosen, train_status], api_name="load_mixture", **model_event)

        compare_inputs = [chosen, prompt, negative, seed, randomise, steps, guidance, methods]
        compare_button.click(partial(check_compare, engine), compare_inputs, None, api_visibility="private") \
            .success(partial(compare, engine), [*compare_inputs, weights, rank, normalize, state],
                     [results, used_seed, compare_notes, state], api_name="compare", **model_event) \
            .success(show_gates, [state], [heatmap, step_plot, gates_csv], api_visibility="private")

        toggle_inputs = [chosen, prompt, negative, used_seed, steps, guidance, state, *switches, *strengths]
        toggle_outputs = [toggle_image, toggle_caption, state]
        triggers = [toggle_button.click] + [s.input for s in switches] + [s.release for s in strengths]
        gr.on(triggers, partial(toggle, engine), toggle_inputs, toggle_outputs, api_name="toggle",
              trigger_mode="always_last", **model_event) \
            .success(show_gates, [state], [heatmap, step_plot, gates_csv], api_visibility="private")

        export_inputs = [chosen, export_method, export_format, weights, rank, normalize]
        export_button.click(partial(export, engine), export_inputs, [export_file], api_name="export",
                            **model_event)
        study_button.click(partial(study, engine), [chosen, study_seeds, study_prompts, study_steps, state],
                           [study_text, study_table, study_chart], api_name="study", **model_event)
        snippet_button.click(partial(snippet, engine), [state], [snippet_code], api_visibility="private")
    return demo


def launch_options() -> dict:
    """Keyword arguments of `demo.launch` shared by main() and the tests (Gradio 6: css goes here)."""
    options = {"max_file_size": UPLOAD_MAX_BYTES}
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
    args = parser.parse_args(argv)
    demo = build_demo(Engine(args.model, args.bank))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())


if __name__ == "__main__":
    main()
