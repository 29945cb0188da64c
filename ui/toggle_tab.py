"""The Toggle experts tab: a switch and a strength per expert; the MoLE image re-renders with the rest renormalised, no retraining."""
from __future__ import annotations


import gradio as gr

from mole_core.defaults import DEFAULT_GATE
from mole_core.mix import Mix
from ui import region_ui
from ui.compare_tab import _estimate_mixes, mixture_for, request_from_form
from ui.session import MAX_EXPERTS, Studio, bank_of, human


# ---- Toggle experts -----------------------------------------------------------------------------
def toggle(studio: Studio, keys, prompt, negative, seed, steps, guidance, granularity, gate, state: dict, *rows):
    """Re-render only the MoLE image with some experts off / weaker / placed in a region; the rest are
    renormalised. rows: the switches, the strengths, then the regions (region_ui) of the expert rows."""
    keys = list(keys or [])[:MAX_EXPERTS]
    switches, strengths = rows[:MAX_EXPERTS], rows[MAX_EXPERTS:2 * MAX_EXPERTS]
    regions = region_ui.regions_from_form(keys, rows[2 * MAX_EXPERTS:], state)
    mask = {k: bool(on) for k, on in zip(keys, switches)}
    strength = {k: (1.0 if s is None else float(s)) for k, s in zip(keys, strengths)}
    if keys and not any(mask.values()):
        gr.Info("Every expert is switched off: this is the base model.")
    mix = Mix("mole", keys, mixture=mixture_for(state, keys), mask=mask, strengths=strength,
              granularity=granularity or "block", gate=gate or DEFAULT_GATE, regions=regions)
    result = human(studio, studio.engine.generate, mix, request_from_form(prompt, negative, seed, steps, guidance),
                    bank_of(studio, state))
    state["gates"], state["toggle_image"], state["regions"] = result.gates, result.image, regions
    on = ", ".join(f"{k}{'' if strength[k] == 1 else f' ×{strength[k]:g}'}" for k in keys if mask[k]) or "none"
    note = studio.engine.routing_note(mix, bank_of(studio, state))           # routing fell back: say so
    caption = (f"**{result.label} · {result.seconds:.2f} s** — experts on: {on} · prompt “{prompt}”, "
               f"seed {int(seed)}" + (f"\n\n{note}" if note else ""))
    return result.image, caption, state


def toggle_seconds(studio: Studio, keys, prompt, negative, seed, steps, guidance, granularity, gate, *rest,
                   **kwargs) -> float:
    return studio.engine.expected_seconds(mixes=_estimate_mixes(keys, ["mole"], gate), denoise_steps=int(steps))


def layout(studio: Studio) -> dict:
    c = {"rows": [], "switches": [], "strengths": [], "regions": []}
    gr.Markdown("Switch experts off, weaken them or place each in a region: only the MoLE image is re-rendered "
                "(prompt and seed of the last comparison), the remaining experts renormalised, no retraining. A "
                "switch or a region re-renders at once; after moving a strength, press Render. Outside its region "
                "an expert's weight is 0; a pixel no region covers is the base model. Each placed expert also draws "
                "its region from its own part of the prompt (one more denoising pass per placed expert: a placed "
                "image takes 1 + that many times as long). Compare's MoLE uses the same regions.")
    for i in range(MAX_EXPERTS):  # a fixed number of rows; the selection shows the first N
        with gr.Row(visible=False) as row:
            c["rows"].append(row)
            c["switches"].append(gr.Checkbox(True, label=f"expert {i}", elem_id=f"switch-{i}"))
            c["strengths"].append(gr.Slider(0, 2, 1.0, step=0.05, label="strength", elem_id=f"strength-{i}"))
            c["regions"].append(region_ui.radio(i))
    c.update(region_ui.layout())
    c["button"] = gr.Button("Render MoLE", variant="primary", elem_id="toggle-button")
    c["caption"] = gr.Markdown(elem_id="toggle-caption")
    c["image"] = gr.Image(label="MoLE", type="pil", format="png", interactive=False, elem_id="toggle-image",
                          height=384)
    return c
