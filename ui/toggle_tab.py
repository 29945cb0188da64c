"""The Toggle experts tab: a switch and a strength per expert; the MoLE image re-renders with the rest renormalised, no retraining."""
from __future__ import annotations


import gradio as gr

from mole_core.defaults import DEFAULT_GATE
from mole_core.mix import Mix
from ui.compare_tab import mixture_for, request_from_form
from ui.session import MAX_EXPERTS, Studio, bank_of, human


# ---- Toggle experts -----------------------------------------------------------------------------
def toggle(studio: Studio, keys, prompt, negative, seed, steps, guidance, granularity, gate, state: dict, *rows):
    """Re-render only the MoLE image with some experts off / weaker; the rest are renormalised."""
    keys = list(keys or [])[:MAX_EXPERTS]
    switches, strengths = rows[:MAX_EXPERTS], rows[MAX_EXPERTS:]
    mask = {k: bool(on) for k, on in zip(keys, switches)}
    strength = {k: (1.0 if s is None else float(s)) for k, s in zip(keys, strengths)}
    if keys and not any(mask.values()):
        gr.Info("Every expert is switched off: this is the base model.")
    mix = Mix("mole", keys, mixture=mixture_for(state, keys), mask=mask, strengths=strength,
              granularity=granularity or "block", gate=gate or DEFAULT_GATE)
    result = human(studio, studio.engine.generate, mix, request_from_form(prompt, negative, seed, steps, guidance),
                    bank_of(studio, state))
    state["gates"] = result.gates
    on = ", ".join(f"{k}{'' if strength[k] == 1 else f' ×{strength[k]:g}'}" for k in keys if mask[k]) or "none"
    caption = (f"**{result.label} · {result.seconds:.2f} s** — experts on: {on} · prompt “{prompt}”, "
               f"seed {int(seed)}")
    return result.image, caption, state


def toggle_seconds(studio: Studio, keys, prompt, negative, seed, steps, *rest, **kwargs) -> float:
    return studio.engine.expected_seconds(images=1, denoise_steps=int(steps))


def layout(studio: Studio) -> dict:
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
