"""The Bank tab: the LoRAs with example image, trigger and description; pick experts; add a LoRA (validated against the model; kept in the visitor's session on a public Space)."""
from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from mole_core.image.bank import Bank
from mole_core.defaults import (DEFAULT_GUIDANCE, DEFAULT_MODEL)
from mole_core.image.families import default_guidance
from mole_core.plots import placeholder
from ui.compare_tab import display_scale, prompt_examples
from ui.session import Studio, bank_of, human, public_message, session_dir


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
    k = display_scale(height, width)
    shown = (f" (Compare shows them {k}× larger, nearest-neighbour: each pixel a sharp {k}×{k} square)" if k > 1
             else " (Compare shows them at that size)")
    return (f"Model: **{engine.model_name}** ({engine.family.title}), {width}×{height} px by default{shown}; "
            f"guidance {guidance:g} ({source}).")


def pick_from_gallery(studio: Studio, keys: list[str], index: int, state: dict) -> list[str]:
    """Clicking a LoRA in the gallery adds it to the selection, or removes it if already chosen."""
    entry = bank_of(studio, state).entries[index]
    if entry.error:
        raise gr.Error(f"{entry.name} cannot be used: {public_message(studio, entry.error)}")
    return [k for k in keys if k != entry.key] if entry.key in keys else [*keys, entry.key]


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
            folder = session_dir(studio, state, "bank")
            studio.banks[state["dir"]] = engine.bank.overlay(folder)
        bank = studio.banks[state["dir"]]
    entry = human(studio, engine.add_to_bank, path, manifest, images, key=key, bank=bank, display=path.name)
    where = "the bank (every visitor sees it)" if studio.writable_bank else "your session's bank"
    gr.Info(f"{entry.name} joined {where} as {entry.key!r}.")
    return bank_gallery(bank), bank_table(studio, bank), gr.CheckboxGroup(choices=bank_choices(bank)), state


def compose_caption_words(words: list[str]) -> str:
    return f"a {words[0]} in the center"


# ---- Layout -------------------------------------------------------------------------------------
def layout(studio: Studio) -> dict:
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
