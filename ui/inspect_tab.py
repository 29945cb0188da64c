"""The Inspect gates tab: heat-map of gate weight per gated group × expert, per-step curves, CSV."""
from __future__ import annotations


import gradio as gr
import pandas as pd

from mole_core.image.engine import write_gates_csv
from mole_core.plots import gate_heatmap, mean_by
from ui.session import Studio, session_dir


# ---- Inspect gates ------------------------------------------------------------------------------
def show_gates(studio: Studio, state: dict):
    """Heat-map (groups × experts), per-step line chart and CSV of the last MoLE image's gates."""
    rows = state.get("gates")
    if not rows:
        return None, pd.DataFrame({"step": [], "weight": [], "expert": []}), None, state
    per_step = pd.DataFrame([{"step": step, "expert": expert, "weight": w}
                             for (step, expert), w in mean_by(rows, "step", "expert").items()])
    csv = write_gates_csv(rows, session_dir(studio, state, "gates") / "gates.csv")
    return gate_heatmap(rows), per_step, str(csv), state


def layout(studio: Studio) -> dict:
    gr.Markdown("Gates of the last MoLE image: mean weight per gated group (rows, network order) × expert, "
                "and per denoising step. Each row sums to 1; with trigger routing, *no LoRA* is the share of "
                "words and pixels routed to no LoRA (the base model alone draws them).")
    return {"heatmap": gr.Image(label="Gate heat-map", type="pil", format="png", interactive=False,
                                elem_id="heatmap"),
            "step_plot": gr.LinePlot(x="step", y="weight", color="expert", height=260, x_title="denoising step",
                                     title="Mean gate per denoising step", x_axis_format="d"),
            "csv": gr.File(label="Gate weights (CSV)", interactive=False, elem_id="gates-csv")}
