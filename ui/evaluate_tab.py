"""The Evaluate tab: a small version of the study on the selected LoRAs, with its expected duration, progress and Cancel."""
from __future__ import annotations

import math

import gradio as gr
import pandas as pd

from mole_core.studies.evaluate import SMALL_STUDY, run_small_study, small_study_seconds
from ui.fields import FieldNumber
from ui.worker import StepWorker as _Worker
from ui.compare_tab import mixture_for
from ui.session import Studio, bank_of, public_message
from ui.train_tab import cost_source, duration

STUDY_COLUMNS = ["method", "caption fidelity", "subject fidelity (mean)", "base preservation", "images",
                 "s / image"]        # the Scores table's headers before a study has run



# ---- Evaluate -----------------------------------------------------------------------------------
def study_estimate(studio: Studio, keys, seeds, n_prompts, train_steps, state: dict) -> str:
    if len(keys or []) < 2:
        return ""
    try:
        seconds = small_study_seconds(studio.engine, list(keys), seeds=int(seeds), n_prompts=int(n_prompts),
                                      train_steps=int(train_steps), mixture=mixture_for(state, keys),
                                      bank=bank_of(studio, state))
    except (TypeError, ValueError, OverflowError):
        return ""
    return f"Expected: about {duration(seconds)} on this server ({cost_source(studio)})."


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
        mixture=mixture_for(state, keys), on_progress=on_progress, should_stop=lambda: state["cancel"],
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


def study_seconds(studio: Studio, keys, seeds, n_prompts, train_steps, state: dict, *rest, **kwargs) -> float:
    return small_study_seconds(studio.engine, list(keys), seeds=int(seeds), n_prompts=int(n_prompts),
                               train_steps=int(train_steps), mixture=mixture_for(state, keys),
                               bank=bank_of(studio, state))


def layout(studio: Studio) -> dict:
    c = {}
    limits = studio.engine.limits
    gr.Markdown("A small study of the selected LoRAs on the pixel world's captions: MoLE (per sample and per "
                "token, freshly trained, or the session's trained gates if they match), the merges, each LoRA "
                "alone and the base model, on the same prompts and seeds, scored by the world's oracle.")
    with gr.Row():
        c["seeds"] = FieldNumber(SMALL_STUDY.seeds, label="Seeds", precision=0, minimum=1, maximum=limits.study_seeds)
        c["prompts"] = FieldNumber(SMALL_STUDY.n_prompts, label="Prompts", precision=0, minimum=1,
                                 maximum=limits.study_prompts)
        c["steps"] = FieldNumber(SMALL_STUDY.train_steps, label="Gate-training steps", precision=0, minimum=1,
                               maximum=limits.train_steps)
        c["button"] = gr.Button("Run the study", variant="primary")
        c["cancel"] = gr.Button("Cancel", variant="stop")
    c["estimate"] = gr.Markdown()
    c["text"] = gr.Markdown(elem_id="study-text")
    c["table"] = gr.Dataframe(pd.DataFrame(columns=STUDY_COLUMNS), label="Scores (± : 95% interval half-width)",
                              interactive=False, elem_id="study-table")
    c["chart"] = gr.Image(label="Scores with 95% intervals", type="pil", interactive=False)
    return c
