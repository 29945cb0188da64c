"""The Train gates tab: gate kind, granularity, steps, learning rate, α; an expected duration, progress, live curves, Cancel; the mixture to download or load back."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd

from mole_core.attach import GRANULARITIES
from mole_core.defaults import (DEFAULT_GATE, TRAIN_BATCH, TRAIN_LR, TRAIN_STEPS)
from mole_core.mix import mole_config_for
from mole_core.mixture import load_mixture
from mole_core.train import TrainConfig
from ui.fields import FieldNumber
from ui.worker import StepWorker as _Worker
from ui.session import Studio, bank_of, human, public_message, session_dir


GATE_CHOICES = [("Per token + trigger routing", "routed"), ("Per token / pixel", "token"),
                ("Per sample (the paper)", "sample"), ("Static (one weight per LoRA)", "static")]


# ---- Train gates --------------------------------------------------------------------------------
def train_configs(studio: Studio, keys, granularity, steps, lr, alpha, seed, gate):
    """(MoleConfig, TrainConfig) from the form; gr.Error naming the field for what cannot run."""
    if len(keys or []) < 2:
        raise gr.Error(f"Gate training needs at least two LoRAs; {len(keys or [])} selected in the Bank tab.")
    for label, value in (("Steps", steps), ("Learning rate", lr), ("Balance α", alpha), ("Seed", seed)):
        if value is None or not math.isfinite(float(value)):
            raise gr.Error(f"{label} must be a finite number; got {value!r}.")
    if float(steps) != int(steps) or float(seed) != int(seed):
        raise gr.Error("Steps and the seed must be whole numbers.")
    mole = mole_config_for(granularity, gate)
    train = TrainConfig(steps=int(steps), lr=float(lr), seed=int(seed), batch_size=TRAIN_BATCH,
                        balance_alpha=float(alpha))           # the α box: 0 and fixed for "routed" (alpha_field)
    return mole, train


def alpha_field(gate: str) -> gr.Number:
    """The Balance α box for a gate kind: 0 and fixed for trigger routing (it trains with α = 0), else the
    paper's 0.5, editable."""
    routed = gate == "routed"
    alpha = TrainConfig().alpha_for(mole_config_for("block", gate))      # the default of this gate kind
    return FieldNumber(alpha, label="Balance α", minimum=0, maximum=100,
                     interactive=not routed, elem_id="train-alpha",
                     info="trigger routing trains with α = 0" if routed else "weight of the balance loss")


def check_train(studio: Studio, keys, granularity, steps, lr, alpha, seed, gate, state: dict) -> None:
    mole, train = train_configs(studio, keys, granularity, steps, lr, alpha, seed, gate)
    for warning in human(studio, studio.engine.check_train, keys, mole, train, bank_of(studio, state)):
        gr.Warning(warning)                  # routed gates over a LoRA without a trigger: the per-token gate trains


def train_estimate(studio: Studio, keys, steps, gate) -> str:
    """What a run of `steps` over the selected LoRAs will take on this server, from the costs this machine
    measured (a short timing at start-up, then its last runs: `Engine.costs`)."""
    try:
        experts = max(2, len(keys or []))
        seconds = studio.engine.expected_seconds(train_steps=int(steps), gate=gate, batch_size=TRAIN_BATCH,
                                                 experts=experts)
    except (TypeError, ValueError, OverflowError):
        return ""
    return (f"Expected: about {duration(seconds)} on this server ({int(steps)} steps, {experts} LoRAs; "
            f"{cost_source(studio)}).")


def cost_source(studio: Studio) -> str:
    return getattr(getattr(studio.engine, "costs", None), "source", "estimated")


def duration(seconds: float) -> str:
    if seconds < 1:
        return "a second"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def train(studio: Studio, keys: list[str], granularity: str, steps: float, lr: float, alpha: float,
          seed: float, gate: str, state: dict, progress=gr.Progress()):
    """Train the gates; stream (state, status, task-loss plot, balance plot, gate plot, mixture file)."""
    engine, bank = studio.engine, bank_of(studio, state)
    mole, config = train_configs(studio, keys, granularity, steps, lr, alpha, seed, gate)
    state["cancel"] = False
    out_path = session_dir(studio, state, "mixture") / "mixture.safetensors"
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
    mixture = human(studio, load_mixture, path, display=name)
    missing = [k for k in mixture.names if k not in bank.keys()]
    if missing:
        raise gr.Error(f"{name} needs LoRAs the bank does not hold: {', '.join(missing)}.")
    human(studio, mixture.check, [(k, bank.get(k).lora_path) for k in mixture.names], studio.engine.model_name)
    target = session_dir(studio, state, "mixture") / "mixture.safetensors"
    shutil.copyfile(path, target)
    state["mixture"] = load_mixture(target, display=name)
    state["mixture_file"] = str(target)
    return state, list(mixture.names), f"Loaded {name}: {mixture.mole_config().describe} gates of " \
                                       f"{', '.join(mixture.names)}."


def train_seconds(studio: Studio, keys, granularity, steps, lr, alpha, seed, gate, *rest, **kwargs) -> float:
    return studio.engine.expected_seconds(train_steps=int(steps), gate=gate, batch_size=TRAIN_BATCH,
                                          experts=max(2, len(keys or [])))


def layout(studio: Studio) -> dict:
    c = {}
    limits = studio.engine.limits
    gr.Markdown("Only the gates learn, from the chosen LoRAs' example images; the LoRAs stay frozen.")
    with gr.Row():
        c["granularity"] = gr.Radio(list(GRANULARITIES), value="block", label="Granularity")
        c["gate_kind"] = gr.Radio(GATE_CHOICES, value=DEFAULT_GATE, label="Gates")
        c["steps"] = FieldNumber(TRAIN_STEPS, label="Steps", precision=0, minimum=1, maximum=limits.train_steps,
                               elem_id="train-steps")
        c["lr"] = FieldNumber(TRAIN_LR, label="Learning rate", minimum=1e-7, maximum=10)
        c["alpha"] = alpha_field(DEFAULT_GATE)
        c["seed"] = FieldNumber(TrainConfig().seed, label="Seed", precision=0, minimum=0)
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
