"""Regions in the app (mole_core/regions.py): a region per expert in Toggle experts (a preset, or a mask drawn on a
sketchpad over the current image), the Compare tab's MoLE uses the same placement, and a coloured overlay shows
where each expert acts. The session keeps the placement (`state["regions"]`: {key: preset}) and the drawings
(`state["drawn"]`: {key: mask array}); nothing here touches the model."""
from __future__ import annotations

import gradio as gr
import numpy as np

from mole_core.regions import COLOURS, overlay, parse_region
from ui.session import MAX_EXPERTS, bank_of

CHOICES = ["whole", "left", "right", "top", "bottom", "centre", "drawn"]


def radio(i: int) -> gr.Radio:
    """The region control of expert row i (Toggle experts)."""
    return gr.Radio(CHOICES, value="whole", label="region", elem_id=f"region-{i}", min_width=320)


def layout() -> dict:
    """The drawing pad and the overlay (below the expert rows)."""
    c = {}
    with gr.Accordion("Draw a region (white = where the expert acts)", open=False):
        with gr.Row():
            c["draw_for"] = gr.Dropdown([], label="for the expert", elem_id="draw-for", scale=1)
            c["use_drawing"] = gr.Button("Use this drawing", elem_id="use-drawing", scale=1)
        c["sketch"] = gr.Sketchpad(label="region", type="numpy", elem_id="region-sketch", height=320,
                                   canvas_size=(256, 256), brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
    c["overlay"] = gr.Image(label="where each expert acts", type="pil", format="png", interactive=False,
                            elem_id="region-overlay", height=256)
    c["legend"] = gr.Markdown(elem_id="region-legend")
    return c


def regions_from_form(keys, choices, state: dict) -> dict | None:
    """{key: Region} from the expert rows' choices ("whole" left out; "drawn" takes the session's drawing);
    gr.Error naming the expert for a drawing that is missing or empty."""
    drawn, regions = state.get("drawn") or {}, {}
    for key, choice in zip(list(keys or [])[:MAX_EXPERTS], choices):
        if choice == "drawn":
            if key not in drawn:
                raise gr.Error(f"No region is drawn for {key}: draw it, choose {key} and press 'Use this drawing'.")
            regions[key] = parse_region(drawn[key], f"drawn region of {key}")
        elif choice and choice != "whole":
            regions[key] = parse_region(choice, f"region of {key}")
    return regions or None


def mask_from_sketch(sketch) -> np.ndarray | None:
    """The drawn strokes of a gr.Sketchpad value (numpy) as an (H, W) mask in [0, 1], or None when empty."""
    if not isinstance(sketch, dict):
        return None
    layers = [np.asarray(layer) for layer in sketch.get("layers") or [] if layer is not None]
    if layers and layers[0].ndim == 3 and layers[0].shape[-1] == 4:
        mask = np.max([layer[..., 3] for layer in layers], axis=0).astype(np.float32) / 255.0
    elif sketch.get("composite") is not None:
        composite = np.asarray(sketch["composite"])
        mask = (composite[..., :3].mean(-1) if composite.ndim == 3 else composite).astype(np.float32) / 255.0
    else:
        return None
    return mask if mask.max() > 0 else None


def use_drawing(keys, expert, sketch, state: dict):
    """Keep the sketch as `expert`'s drawn region; its row switches to "drawn". -> (state, *radio updates)."""
    keys = list(keys or [])[:MAX_EXPERTS]
    if expert not in keys:
        raise gr.Error("Choose which expert the drawing is for (the dropdown above the pad).")
    mask = mask_from_sketch(sketch)
    if mask is None:
        raise gr.Error("The pad is empty: draw where the expert should act (white strokes), then press again.")
    state.setdefault("drawn", {})[expert] = mask
    return [state] + [gr.Radio(value="drawn") if i < len(keys) and keys[i] == expert else gr.Radio()
                      for i in range(MAX_EXPERTS)]


def show(studio, keys, state: dict, *choices):
    """The overlay (over the last MoLE image of Toggle experts, else a grey canvas) and its legend; keeps the
    placement in the session for Compare's MoLE. -> (overlay, legend, state)."""
    keys = list(keys or [])[:MAX_EXPERTS]
    regions = regions_from_form(keys, choices, state)
    state["regions"] = regions
    names = {k: bank_of(studio, state).get(k).name for k in keys}
    legend = " · ".join(f"<span style='color:rgb{COLOURS[i % len(COLOURS)]}'>■</span> {names[k]}: "
                        f"{regions[k].spec if regions and k in regions else 'everywhere'}"
                        for i, k in enumerate(keys))
    return overlay(state.get("toggle_image"), regions, keys), legend, state


def experts_dropdown(studio, keys, state: dict):
    """The drawing's expert choices follow the selection."""
    keys = list(keys or [])[:MAX_EXPERTS]
    return gr.Dropdown(choices=[(bank_of(studio, state).get(k).name, k) for k in keys],
                       value=keys[0] if keys else None)


def session_regions(state: dict, keys) -> dict | None:
    """The session's placement for Compare's MoLE, for the experts of `keys` only."""
    regions = state.get("regions") or {}
    kept = {k: r for k, r in regions.items() if k in list(keys or [])}
    return kept or None
