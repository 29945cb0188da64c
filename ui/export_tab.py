"""The Export tab: any merge as a LoRA file (diffusers or kohya) and the Python that reproduces the comparison."""
from __future__ import annotations


import gradio as gr

from ui.compare_tab import mixes_from_form
from ui.session import Studio, bank_of, human, session_dir


# ---- Export -------------------------------------------------------------------------------------
def export(studio: Studio, keys, method: str, fmt: str, weights, rank, normalize, density, state: dict):
    """Write a merge of the selection as a LoRA file and hand it to the browser."""
    if fmt not in ("diffusers", "kohya"):
        raise gr.Error(f"Unknown format {fmt!r}: choose diffusers or kohya.")
    mix = mixes_from_form(state, keys, [method], weights, rank, normalize, density, 5, "block", "sample")[0]
    name = f"mole_studio_{method}{'_r' + str(int(rank)) if rank and method != 'linear' else ''}_{fmt}.safetensors"
    path = session_dir(studio, state, "export") / name
    return str(human(studio, studio.engine.export, mix, path, format=fmt, bank=bank_of(studio, state))), state


def snippet(studio: Studio, state: dict) -> str:
    """Python that reproduces the last comparison with mole_core (the mixture as downloaded)."""
    if state.get("compared") is None:
        raise gr.Error("Nothing to reproduce yet: run a comparison in the Compare tab first.")
    return studio.engine.snippet(state["compared"]["mixes"], state["compared"]["request"],
                                 mixture_file="mixture.safetensors")


def layout(studio: Studio) -> dict:
    c = {}
    with gr.Row():
        c["method"] = gr.Radio(["linear", "svd", "ties", "dare"], value="linear", label="Merge")
        c["format"] = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Format")
        c["button"] = gr.Button("Export LoRA")
    c["file"] = gr.File(label="Merged LoRA", interactive=False)
    c["snippet_button"] = gr.Button("Python for the last comparison")
    gr.Markdown("Install MoLE Studio (`pip install -e .` in its folder), put the mixture downloaded from the "
                "Train gates tab beside the script as `mixture.safetensors` (if MoLE used trained gates), run it.")
    c["snippet"] = gr.Code(language="python", label="Reproduce with mole_core")
    return c
