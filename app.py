"""MoLE Studio, the web app: pick LoRAs from a bank, train MoLE gates, compare MoLE with the merges and
the other composition methods side by side, switch experts on and off, look inside the gates, export.

This file is the page's layout and wiring only. Each tab is a module of `ui/` (`ui/bank_tab.py`, …,
`ui/text_tab.py`) holding its `layout(studio) -> components` and its handlers: short module-level functions
that take the `Studio` (the engine + how this server runs, `ui/session.py`) first, so tests call them without a
server. `build_demo` puts the tabs together and `_wire_<tab>` connects components to handlers.

What belongs to one browser lives in its `gr.State` (a dict, see `new_session`): the trained mixture, the
last comparison (as `Mix` values), the gate rows, and a session folder for the files this session gets
(exports, the mixture, uploads). The folder is removed when the session ends (`end_session`, the State's
delete callback), so disk use returns to where it was. Every handler that writes into the folder returns the
state: Gradio starts a session's lifetime (and so its delete callback) only for a state an event outputs.

Uploads: on a public Space (the default) an uploaded LoRA joins only the uploader's bank, an overlay of
the shared bank in the session folder; `--writable-bank` (a private app) writes into the bank folder
itself, where every session sees it. The model events share one engine lock, handed over in arrival order;
gate training and the study step aside between steps, so a visitor's compare waits at most one training
step. Counts are capped by the engine's `Limits` (Space-sized unless `--local`).

Run: `python app.py` (the embedded pixel world) or `python app.py --model DIR_OR_HUB_ID --bank DIR`.

References: MoLE (Wu et al., ICLR 2024, arXiv 2404.13628); Gradio 6 Blocks, gr.State(delete_callback),
gr.Progress, Blocks(delete_cache).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import gradio as gr

from mole_core.cli import (add_precision_arguments, check_model, engine_precision, hush_torchvision_notice,
                           quiet_libraries)
from mole_core.defaults import DEFAULT_BANK, DEFAULT_MODEL, Limits
from mole_core.image.engine import Engine
from mole_core.text.engine import DEFAULT_TEXT_BANK, DEFAULT_TEXT_MODEL, TextEngine, is_text_model
from ui import bank_tab, compare_tab, evaluate_tab, export_tab, inspect_tab, region_ui, toggle_tab, train_tab
from ui.gpu import spaces_module
from ui.session import LONG_QUEUE, MODEL_QUEUE, Studio, end_session, new_session, on_model, public_message
from ui.text_tab import TEXT_CSS, TEXT_QUEUE, TextStudio, build_text_demo, build_text_mode
from ui.train_tab import cancel

CSS_PATH = Path(__file__).resolve().parent / "assets" / "app.css"

ABOUT = """
**MoLE — Mixture of LoRA Experts** (Wu, Huang, Wei, ICLR 2024) keeps every LoRA frozen and separate and
learns only a small **gate** per block that decides how much each LoRA (an *expert*) contributes. Merging
the weights instead (linear, SVD, TIES, DARE) melts the LoRAs into one, which dilutes each; MoLE's gates
can give each expert its say where it matters, and experts can be switched off later without retraining.

- **Gates per token + trigger routing** (the default) — each word of the prompt goes to the LoRA whose trigger
  phrase it belongs to, and each pixel to the LoRAs in proportion to how much it attends to each trigger, so
  two subjects at two places each get their own LoRA; a LoRA whose trigger the prompt does not name is off,
  and words outside every trigger phrase reach no LoRA (the base model reads them). Trained with α = 0.
- **Linear merge** — one LoRA whose weight change is the weighted sum Σ wᵢ·ΔWᵢ of the LoRAs' changes.
- **SVD merge** — the linear merge's ΔW cut back to rank r by a truncated SVD (a LoRA file of rank r).
- **TIES merge** (Yadav et al. 2023) — in each ΔW keep the largest `density` share of entries, elect a sign
  per entry by total mass, average only the entries that agree with it; then rank r.
- **DARE merge** (Yu et al. 2024) — drop each entry with probability 1 − density, rescale the rest by
  1/density so the expectation is kept, sum; then rank r.
- **Granularity** — which layers share one gate: *matrix* (each weight matrix), *layer* (each attention /
  feed-forward layer), *block* (each transformer or resnet block), *network* (one gate per network).
- **Gates per sample / per token / static** — one decision per image (the paper); one per pixel or token,
  so two subjects at two places get different experts (ours); or one learned weight per LoRA for the whole
  model, whatever the input (LoraHub's idea, MoLE's static ablation).
- **Balance α** — weight of the loss that keeps every expert in use (α = 0: gates may collapse on one).
- **LoRA Switch / Composite** — no merge: one LoRA active at a time, rotating every k steps; or every
  LoRA run alone at each step and the predictions averaged (N× the cost).
- **Caption fidelity** — share of images whose every object is drawn where the caption says (the world's
  oracle reads the image). **Subject fidelity** — share showing a given LoRA's subject.
  **Base preservation** — caption fidelity on prompts without trigger words, with the LoRAs attached.
"""


def build_demo(studio: Studio | Engine, delete_cache: tuple[int, int] = (600, 3600),
               session_ttl: float = 4 * 3600) -> gr.Blocks:
    """The whole page. Loads nothing; the engine loads the model on first use.

    delete_cache: (every, older than) seconds: Gradio's copies of uploads and downloads are removed.
    session_ttl: a session idle this long ends (its State is deleted: `end_session` removes its folder);
    closing the page ends it too.
    """
    studio = studio if isinstance(studio, Studio) else Studio(studio)
    with gr.Blocks(title="MoLE Studio", delete_cache=delete_cache) as demo:
        state = gr.State(new_session(), time_to_live=session_ttl, delete_callback=partial(end_session, studio))
        gr.Markdown("# MoLE Studio\nMix LoRAs as gated experts (MoLE) and compare with the merges and the other "
                    "composition methods, same seed, side by side. **Start:** pick two LoRAs in *Bank* → "
                    "*Train gates* → *Compare* (the prompt is filled in) → *Toggle experts* / *Inspect gates*.")
        model_info = gr.Markdown(elem_id="model-info")
        with gr.Accordion("What is MoLE? (and the words this page uses)", open=False):
            gr.Markdown(ABOUT, elem_id="about")
        ui = {"state": state, "model_info": model_info}
        with gr.Tabs():
            for tab_id, title, tab in TABS:
                with gr.Tab(title, id=tab_id):
                    ui[tab_id] = tab.layout(studio)
            if studio.text is not None:
                with gr.Tab("Text", id="text"):
                    build_text_mode(TextStudio(studio.text, partial(public_message, studio)), "text_",
                                    dict(FAST, concurrency_id=TEXT_QUEUE), LONG)   # its own engine, own queue
        for wire in (_wire_bank, _wire_train, _wire_compare, _wire_toggle, _wire_export, _wire_evaluate):
            wire(demo, studio, ui)
    return demo


# ---- wiring: which component feeds which handler (handlers take the studio first) --------------------
FAST = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)     # short model events
LONG = dict(concurrency_id=LONG_QUEUE, concurrency_limit=1)      # training and the study
PRIVATE = dict(api_visibility="private")
TABS = [("bank", "Bank", bank_tab), ("train", "Train gates", train_tab), ("compare", "Compare", compare_tab),
        ("toggle", "Toggle experts", toggle_tab), ("inspect", "Inspect gates", inspect_tab),
        ("export", "Export", export_tab), ("evaluate", "Evaluate", evaluate_tab)]


def _wire_bank(demo, studio: Studio, ui: dict) -> None:
    b, c, g, state = ui["bank"], ui["compare"], ui["toggle"], ui["state"]
    selection_outputs = [c["methods"], c["weights"], *g["rows"], *g["switches"], *g["strengths"]]
    demo.load(partial(bank_tab.on_load, studio), [state],
              [b["gallery"], b["table"], b["chosen"], c["examples"], ui["model_info"]], **PRIVATE) \
        .then(partial(compare_tab.on_selection, studio), [b["chosen"], c["methods"], state], selection_outputs,
              **PRIVATE)
    b["chosen"].change(partial(compare_tab.on_selection, studio), [b["chosen"], c["methods"], state],
                       selection_outputs, **PRIVATE)

    def pick(keys: list[str], st: dict, evt: gr.SelectData) -> list[str]:  # a partial would hide evt's type
        return bank_tab.pick_from_gallery(studio, keys, evt.index, st)
    b["gallery"].select(pick, [b["chosen"], state], [b["chosen"]], **PRIVATE)
    b["up_button"].click(partial(bank_tab.upload_lora, studio),
                         [b["up_file"], b["up_name"], b["up_trigger"], b["up_description"], b["up_examples"], state],
                         [b["gallery"], b["table"], b["chosen"], state], api_name="add_lora", **FAST)


def _wire_train(demo, studio: Studio, ui: dict) -> None:
    b, t, state = ui["bank"], ui["train"], ui["state"]
    inputs = [b["chosen"], t["granularity"], t["steps"], t["lr"], t["alpha"], t["seed"], t["gate_kind"]]
    gr.on([demo.load, b["chosen"].change, t["steps"].change, t["gate_kind"].change],
          partial(train_tab.train_estimate, studio), [b["chosen"], t["steps"], t["gate_kind"]], [t["estimate"]],
          queue=False, **PRIVATE)
    t["gate_kind"].change(train_tab.alpha_field, [t["gate_kind"]], [t["alpha"]], queue=False, **PRIVATE)
    t["button"].click(partial(train_tab.check_train, studio), [*inputs, state], None, **PRIVATE) \
        .success(on_model(train_tab.train, train_tab.train_seconds, studio), [*inputs, state],
                 [state, t["status"], t["task_plot"], t["balance_plot"], t["gates_plot"], t["mixture_out"]],
                 api_name="train", **LONG)
    t["cancel"].click(cancel, [state], [t["status"]], queue=False, api_name="cancel")
    t["mixture_in"].upload(partial(train_tab.load_mixture_upload, studio), [t["mixture_in"], state],
                           [state, b["chosen"], t["status"]], api_name="load_mixture", **FAST)


def _compare_inputs(ui: dict) -> list:
    b, c, t = ui["bank"], ui["compare"], ui["train"]
    return [b["chosen"], c["prompt"], c["negative"], c["seed"], c["randomise"], c["steps"], c["guidance"],
            c["methods"], c["weights"], c["rank"], c["normalize"], c["density"], c["switch_every"],
            t["granularity"], t["gate_kind"], ui["state"]]


def _gate_outputs(ui: dict) -> list:
    i = ui["inspect"]
    return [i["heatmap"], i["step_plot"], i["csv"], ui["state"]]


def _wire_compare(demo, studio: Studio, ui: dict) -> None:
    b, c, state = ui["bank"], ui["compare"], ui["state"]
    c["trigger_button"].click(partial(compare_tab.insert_triggers, studio), [b["chosen"], state], [c["prompt"]],
                              **PRIVATE)
    c["examples"].input(partial(compare_tab.pick_example, studio), [c["examples"], state], [c["prompt"], b["chosen"]],
                        **PRIVATE)
    gr.on([demo.load, b["chosen"].change, c["methods"].change, c["steps"].change, ui["train"]["gate_kind"].change],
          partial(compare_tab.compare_estimate, studio), [b["chosen"], c["methods"], c["steps"],
                                                          ui["train"]["gate_kind"]], [c["estimate"]],
          queue=False, **PRIVATE)
    inputs = _compare_inputs(ui)
    c["button"].click(on_model(compare_tab.compare, compare_tab.compare_seconds, studio), inputs,
                      [c["results"], c["used_seed"], c["notes"], state], api_name="compare", **FAST) \
        .success(partial(inspect_tab.show_gates, studio), [state], _gate_outputs(ui), **PRIVATE)


def _wire_toggle(demo, studio: Studio, ui: dict) -> None:
    b, c, t, g, state = ui["bank"], ui["compare"], ui["train"], ui["toggle"], ui["state"]
    inputs = [b["chosen"], c["prompt"], c["negative"], c["used_seed"], c["steps"], c["guidance"],
              t["granularity"], t["gate_kind"], state, *g["switches"], *g["strengths"], *g["regions"]]
    triggers = [g["button"].click] + [s.input for s in g["switches"]] + [r.input for r in g["regions"]]
    overlay = (partial(region_ui.show, studio), [b["chosen"], state, *g["regions"]],
               [g["overlay"], g["legend"], state])
    gr.on(triggers, on_model(toggle_tab.toggle, toggle_tab.toggle_seconds, studio), inputs,
          [g["image"], g["caption"], state], api_name="toggle", trigger_mode="always_last", **FAST) \
        .success(partial(inspect_tab.show_gates, studio), [state], _gate_outputs(ui), **PRIVATE) \
        .success(*overlay, **PRIVATE)
    gr.on([demo.load, b["chosen"].change], partial(region_ui.experts_dropdown, studio), [b["chosen"], state],
          [g["draw_for"]], queue=False, **PRIVATE)
    g["use_drawing"].click(region_ui.use_drawing, [b["chosen"], g["draw_for"], g["sketch"], state],
                           [state, *g["regions"]], **PRIVATE).success(*overlay, **PRIVATE)


def _wire_export(demo, studio: Studio, ui: dict) -> None:
    b, c, x, state = ui["bank"], ui["compare"], ui["export"], ui["state"]
    x["button"].click(partial(export_tab.export, studio),
                      [b["chosen"], x["method"], x["format"], c["weights"], c["rank"], c["normalize"], c["density"],
                       state], [x["file"], state], api_name="export", **FAST)
    x["snippet_button"].click(partial(export_tab.snippet_file, studio), [state],
                              [x["snippet"], x["snippet_file"], state], **PRIVATE)


def _wire_evaluate(demo, studio: Studio, ui: dict) -> None:
    b, e, state = ui["bank"], ui["evaluate"], ui["state"]
    inputs = [b["chosen"], e["seeds"], e["prompts"], e["steps"], state]
    gr.on([demo.load, e["seeds"].change, e["prompts"].change, e["steps"].change, b["chosen"].change],
          partial(evaluate_tab.study_estimate, studio), inputs, [e["estimate"]], queue=False, **PRIVATE)
    e["button"].click(on_model(evaluate_tab.study, evaluate_tab.study_seconds, studio), inputs,
                      [e["text"], e["table"], e["chart"]], api_name="study", **LONG)
    e["cancel"].click(cancel, [state], [e["text"]], queue=False, **PRIVATE)


def launch_options(engine: Engine | None = None) -> dict:
    """Keyword arguments of `demo.launch` shared by main() and the tests (Gradio 6: css goes here)."""
    limits = engine.limits if engine is not None else Limits()
    options = {"max_file_size": limits.upload_bytes}
    if CSS_PATH.exists():
        options["css_paths"] = [CSS_PATH]
    options["css"] = TEXT_CSS                # the Text tab's token colours and answer table
    if engine is not None:                   # Compare images at a whole multiple of their size (loads the model)
        try:
            options["css"] += compare_tab.display_css(*engine.default_size())
        except (ValueError, OSError):        # a model that cannot load: the page says why on its first load
            pass
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
    parser.add_argument("--writable-bank", action="store_true",
                        help="uploads join the bank folder, for every session (a private app); default: "
                             "each visitor's uploads stay in their session and are removed when it ends")
    parser.add_argument("--local", action="store_true",
                        help="a private machine: raise the public-Space caps (training steps, study size, "
                             "image side) to mole_core.defaults.Limits.local()")
    parser.add_argument("--max-train-steps", type=int, default=None, help="cap on gate-training steps per run")
    add_precision_arguments(parser)    # --dtype, --cpu-offload
    args = parser.parse_args(argv)
    hush_torchvision_notice()
    if not sys.stderr.isatty():        # a Space's log, a file: no carriage-return loading bars from the libraries
        quiet_libraries()
    try:
        check_model(args.model, args.bank)    # a missing or unreadable model is refused at start, by name
    except ValueError as e:
        parser.error(str(e))
    limits = Limits.local() if args.local else Limits()
    if args.max_train_steps:
        limits = Limits(**{**limits.__dict__, "train_steps": args.max_train_steps})
    if is_text_model(args.model):  # a transformers text model: the Text mode alone
        bank = DEFAULT_TEXT_BANK if args.bank == DEFAULT_BANK else args.bank
        text = TextEngine(args.model, bank, limits=limits)
        demo = build_text_demo(text, partial(public_message, Studio(text)))
        demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())
        return
    try:
        engine = Engine(args.model, args.bank, limits=limits, **engine_precision(args))
    except ValueError as e:          # e.g. --cpu-offload without a GPU: one sentence, not a traceback
        parser.error(str(e))
    if args.writable_bank:
        engine.bank.clean()    # leftovers of an interrupted upload
    if spaces_module() is not None:
        engine.pipe            # ZeroGPU: load once, here; every GPU call runs in a worker that inherits it
    else:                      # the estimates shown come from this machine's own timings
        print("Timing this machine for the estimates ...", flush=True)
        print(f"... {engine.calibrate():.0f} s: {engine.costs.source}.", flush=True)
    text = TextEngine(limits=limits) if is_text_model(DEFAULT_TEXT_MODEL) else None
    demo = build_demo(Studio(engine, writable_bank=args.writable_bank, text=text))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options(engine))


if __name__ == "__main__":
    main()
