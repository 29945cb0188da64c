"""The Compare tab: MoLE beside the merges and the other composition methods, same prompt, seed and starting noise, side by side."""
from __future__ import annotations

import math
import random

import gradio as gr
import pandas as pd

from mole_core.image.bank import Bank
from mole_core.defaults import (DEFAULT_DENOISE_STEPS, DEFAULT_GATE)
from mole_core.image.engine import GenerateRequest
from mole_core.mix import Mix
from mole_core.image.families import default_guidance
from ui.region_ui import session_regions
from ui.fields import FieldNumber
from ui.session import MAX_EXPERTS, Studio, bank_of, human
from ui.train_tab import cost_source, duration


COMPARE_METHODS = [("MoLE", "mole"), ("linear", "linear"), ("SVD", "svd"), ("TIES", "ties"), ("DARE", "dare"),
                   ("LoRA Switch", "switch"), ("LoRA Composite (N× the cost)", "composite"),
                   ("FreeFuse (automatic masks)", "freefuse"), ("base", "base")]


DEFAULT_METHODS = ["mole", "linear", "svd", "ties", "dare", "switch", "base"]   # Composite: N× cost, opt-in


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


# ---- Compare ------------------------------------------------------------------------------------
def request_from_form(prompt, negative, seed, steps, guidance) -> GenerateRequest:
    for label, value in (("Seed", seed), ("Denoising steps", steps), ("Guidance", guidance)):
        if value is None or not math.isfinite(float(value)):
            raise gr.Error(f"{label} must be a finite number; got {value!r}.")
    if float(seed) != int(seed) or float(steps) != int(steps):
        raise gr.Error("The seed and the number of steps must be whole numbers.")
    return GenerateRequest(prompt=str(prompt or ""), negative=str(negative or ""), seed=int(seed),
                           steps=int(steps), guidance=float(guidance))


def weights_from_table(table: pd.DataFrame | None) -> dict[str, float] | None:
    """Merge weights from the editable table (None or empty -> each LoRA's default weight)."""
    if table is None or len(table) == 0:
        return None
    try:
        return {str(k): float(w) for k, w in zip(table["expert"], table["weight"]) if str(k)}
    except (KeyError, TypeError, ValueError) as err:
        raise gr.Error(f"The weights table needs an 'expert' and a numeric 'weight' column ({err}).") from err


def mixture_for(state: dict, keys: list[str]):
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
    shared = dict(weights=weights_from_table(weights), normalize=bool(normalize), rank=int(rank) if rank else None,
                  density=float(density if density is not None else 0.5),
                  switch_every=int(switch_every or 5), granularity=granularity or "block", gate=gate or DEFAULT_GATE)
    mixes = []
    for method in methods or []:
        if method.startswith("single:"):
            mixes.append(Mix(method))
        elif method == "base":
            mixes.append(Mix("base"))
        else:
            mole = method == "mole"          # MoLE takes the regions placed in Toggle experts (region_ui)
            mixes.append(Mix(method, keys, mixture=mixture_for(state, keys) if mole else None,
                             regions=session_regions(state, keys) if mole else None, **shared))
    return mixes


def compare_estimate(studio: Studio, keys, methods, steps, gate) -> str:
    """What rendering the ticked methods will take on this server (each method at its own measured cost)."""
    try:
        mixes = _estimate_mixes(keys, methods, gate)
        seconds = studio.engine.expected_seconds(mixes=mixes, denoise_steps=int(steps))
    except (TypeError, ValueError, OverflowError):
        return ""
    return f"Expected: about {duration(seconds)} for {len(mixes)} images ({cost_source(studio)})." if mixes else ""


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
    request = request_from_form(prompt, negative, seed, steps, guidance)
    mixes = mixes_from_form(state, keys, methods, weights, rank, normalize, density, switch_every, granularity, gate)
    results = human(studio, studio.engine.compare, mixes, request, bank_of(studio, state))
    warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
    state["compared"] = {"mixes": mixes, "request": request}
    state["gates"] = next((r.gates for r in results if r.method == "mole"), state["gates"])
    gallery = [(r.image, f"{r.label} · {r.seconds:.2f} s") for r in results]
    if "mole" in methods and mixture_for(state, keys) is None:
        mole = next(r for r in results if r.method == "mole")
        routed = mole.mix.mole_config.route == "trigger" and "routing off" not in mole.label
        warnings.append(("MoLE uses untrained gates: each LoRA acts where the prompt names its trigger, and a prompt "
                         "without triggers is the base model" if routed else
                         "MoLE uses untrained gates (equal weights, the same as the linear merge)") +
                        ": train gates for this selection in the Train gates tab.")
    return gallery, request.seed, "\n".join(f"- {w}" for w in warnings), state


# ---- How the gallery shows the images -------------------------------------------------------------
DISPLAY_SIDE = 256      # px: small images are enlarged by the whole factor that brings them closest to this


def display_scale(height: int, width: int) -> int:
    """The whole factor the Compare gallery enlarges the model's images by (8 for 32 px; 1, their own size,
    from 256 px up): a whole factor with nearest-neighbour pixels keeps every pixel square and sharp."""
    return max(1, DISPLAY_SIDE // max(int(height), int(width), 1))


def display_css(height: int, width: int) -> str:
    """CSS that shows each Compare image at `display_scale` × its size (never wider than the page), unsmoothed,
    with its caption whole below it rather than over it (Gradio's gallery crops to square cells and lays
    the caption over the image)."""
    k = display_scale(height, width)
    return f"""
#results .grid-wrap {{ height: auto !important; min-height: 0 !important; max-height: none !important;
  overflow: visible; }}
#results .grid-container {{ display: flex; flex-wrap: wrap; gap: 12px; }}
#results .gallery-item {{ flex: 0 0 auto; width: auto; max-width: 100%; }}
#results .thumbnail-item {{ width: auto; height: auto; aspect-ratio: auto; display: flex; flex-direction: column;
  align-items: flex-start; overflow: visible; }}
#results .thumbnail-item img {{ width: {k * int(width)}px !important; max-width: 100%; height: auto !important;
  object-fit: contain !important; image-rendering: pixelated; }}
#results .caption-label {{ position: static; width: {k * int(width)}px; max-width: 100%; white-space: normal;
  overflow: visible; text-overflow: clip; transform: none; margin: 4px 0 0 0; text-align: left; }}
"""


# ---- GPU time (Hugging Face ZeroGPU: ui.gpu) --------------------------------------------
# What each model-running event expects to take, from its own inputs and the engine's costs; a ZeroGPU Space
# asks spaces.GPU for that much (with a margin). Elsewhere the handlers run undecorated.
def compare_seconds(studio: Studio, keys, prompt, negative, seed, randomise, steps, guidance, methods, weights,
                    rank, normalize, density, switch_every, granularity, gate, *rest, **kwargs) -> float:
    return studio.engine.expected_seconds(mixes=_estimate_mixes(keys, methods, gate), denoise_steps=int(steps))


def layout(studio: Studio) -> dict:
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
        c["seed"] = FieldNumber(0, label="Seed", precision=0, minimum=0, maximum=2**63 - 1)
        c["randomise"] = gr.Checkbox(False, label="Randomise seed")
        c["used_seed"] = FieldNumber(0, label="Used seed", precision=0, interactive=False, elem_id="used-seed")
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
    c["notes"] = gr.Markdown(elem_id="compare-notes")
    c["results"] = gr.Gallery(label="Same seed, side by side", columns=4, height="auto", format="png",
                              elem_id="results")
    return c
