"""The app's Text mode: MoLE over text LoRAs (the paper's NLP half) on a `TextEngine`.

Pick text LoRAs, train their gates (progress, cancel), compare every method's answer to one input side by side
with the expected answer where the text world knows it, switch experts off, and see the per-token gate weights
coloured over the prompt and the answer, and the per-layer heat-map. `build_text_mode` lays it out inside the
current Blocks; its events are named `{prefix}train`, `{prefix}cancel`, `{prefix}compare`, `{prefix}toggle`
(prefix "text_" beside the image tabs, "" when the app serves a text model alone).
"""
from __future__ import annotations

import html
import shutil
import re
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from mole_core.attach import GRANULARITIES, MoleConfig
from mole_core.mix import MERGES, NAMES, Mix
from mole_core.plots import gate_heatmap
from mole_core.text.engine import TextEngine
from mole_core.train import BALANCE_ALPHA, TrainConfig, divergence_note
from ui.fields import FieldNumber
from ui.worker import StepWorker

TEXT_GATES = ("prompt", "sample", "token", "static")   # "prompt" (mole_core.text.gate): the text default
MAX_INPUT_CHARS = 200                                                       # the Input box's cap
TEXT_QUEUE = "text"       # the Text tab's short events: their own queue, so one waiting for a text training
                          # (which holds the text engine between its steps) never stalls the image tabs' queue
TEXT_TRAIN = TrainConfig(steps=100, lr=5e-3, batch_size=8, seed=0)        # the text study's gate training
EXPERT_COLOURS = ("#e4572e", "#2e86ab", "#76b041", "#f3a712", "#a23b72", "#3b1f2b", "#17bebb", "#8d6a9f")
START_METHODS = ["mole", "linear", "svd", "arrow", "base"]


@dataclass
class TextStudio:
    engine: TextEngine
    message: callable = str            # error text -> what a visitor may see (server folders cut out)


def new_text_session() -> dict:
    return {"mixture": None, "cancel": False, "mixture_dir": None}


def end_text_session(state: dict) -> None:
    """The browser went away: stop its training and remove its mixture's folder."""
    if isinstance(state, dict):
        state["cancel"] = True
        shutil.rmtree(state.get("mixture_dir") or "", ignore_errors=True)


def plain_markdown(text: str) -> str:
    """`text` shown as itself inside Markdown: HTML escaped and every Markdown mark backslash-escaped (a model's
    answer may hold `<img …>`, `[link](…)` or `**`)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", html.escape(text, quote=False))


def _human(ts: TextStudio, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, KeyError) as err:
        raise gr.Error(ts.message(str(err).strip("'\""))) from err


def expected_answer(prompt: str) -> str | None:
    """The text world's answer to 'task: word' or 'outer inner: word' (None when it is not one of its tasks)."""
    from mole_core.world.text.tasks import TASKS, composed
    head, sep, word = prompt.partition(": ")
    if not sep or not word or not word.isalpha() or len(word) > 20:
        return None
    names = head.split()
    try:
        if len(names) == 1 and names[0] in TASKS:
            return TASKS[names[0]].fn(word)
        if len(names) == 2:
            return composed(*names).fn(word)
    except (KeyError, TypeError, ValueError):
        return None
    return None


def bank_rows(engine: TextEngine) -> str:
    lines = ["| LoRA | role | what it does | example |", "|---|---|---|---|"]
    for e in engine.bank.entries:
        if e.error:
            lines.append(f"| {html.escape(e.key)} | – | cannot be used: {html.escape(e.error)} | |")
            continue
        example = f"`{e.examples[0][0]}` → `{e.examples[0][1]}`" if e.examples else ""
        lines.append(f"| {html.escape(e.name)} | {html.escape(e.role)} | {html.escape(e.description.split(' (e.g.')[0])} "
                     f"| {example} |")
    return "\n".join(lines)


def ordered_keys(engine: TextEngine) -> list[str]:
    """Usable LoRAs, main ones first (bank order within each role)."""
    entries = [e for e in engine.bank.entries if e.error is None]
    return [e.key for e in entries if e.role == "main"] + [e.key for e in entries if e.role != "main"]


def starting_keys(engine: TextEngine) -> list[str]:
    """The LoRAs selected when the page opens: the main ones (at most 5 and the engine's expert limit), else
    the bank's first two."""
    entries = [e for e in engine.bank.entries if e.error is None]
    main = [e.key for e in entries if e.role == "main"][:min(5, engine.limits.experts)]
    return main if len(main) >= 2 else ordered_keys(engine)[:2]


def short_label(entry) -> str:
    """'Reverse · writes the word backwards' (the manifest's description without its key and example)."""
    text = entry.description.split(" (e.g.")[0]
    text = text.removeprefix(f"{entry.key}: ")
    return f"{entry.name} · {text}" if text else entry.name


def prompt_examples(engine: TextEngine) -> list[str]:
    keys = ordered_keys(engine)
    start = starting_keys(engine)
    out = [f"{k}: planet" for k in dict.fromkeys([*start, *keys[:3]])][:3]
    from mole_core.world.text.tasks import COMPOSED_PAIRS
    out += [f"{a} {b}: garden" for a, b in COMPOSED_PAIRS if a in keys and b in keys][:3]
    return out


# ---- colouring --------------------------------------------------------------------------------
def _blend(weights: list[float]) -> str:
    rgb = [0.0, 0.0, 0.0]
    for w, c in zip(weights, EXPERT_COLOURS * 4):
        for i in range(3):
            rgb[i] += w * int(c[1 + 2 * i:3 + 2 * i], 16)
    # lighten towards white so the text stays readable
    return "#" + "".join(f"{round(255 - 0.55 * (255 - v)):02x}" for v in rgb)


def coloured(tokens: list[str], gates: list[list[float]] | None, experts: list[str]) -> str:
    """Tokens as spans whose background mixes the experts' colours by their gate weights (tooltip: the weights)."""
    spans = []
    for i, tok in enumerate(tokens):
        w = gates[i] if gates and i < len(gates) and gates[i] is not None else None
        shown = html.escape(tok).replace(" ", "&nbsp;") or "&nbsp;"
        if w is None:
            spans.append(f"<span class='tok'>{shown}</span>")
            continue
        tip = " · ".join(f"{e} {v:.2f}" for e, v in zip(experts, w))
        spans.append(f"<span class='tok' style='background:{_blend(w)}' title='{html.escape(tip)}'>{shown}</span>")
    return "".join(spans)


def legend(experts: list[str]) -> str:
    return " ".join(f"<span class='tok' style='background:{_blend([1.0 if j == i else 0.0 for j in range(len(experts))])}'>"
                    f"{html.escape(e)}</span>" for i, e in enumerate(experts))


def mole_view(result) -> str:
    """Prompt and answer tokens coloured by the gate weights that saw them; the weights on hover."""
    if result is None or result.token_gates is None:
        return "<p>Run MoLE to see its gates per token.</p>"
    return (f"<div class='text-gates'><p>Experts: {legend(result.experts)}</p>"
            f"<p><b>Prompt</b> (encoder gates): {coloured(result.prompt_tokens, result.prompt_gates, result.experts)}</p>"
            f"<p><b>Answer</b> (the decoder's gates at the step that wrote each token): "
            f"{coloured(result.tokens, result.token_gates, result.experts)}</p>"
            f"<p style='font-size:0.85em'>Hover a token for its weights. Per-sample gates give one mixture per "
            f"pass, so the prompt has one colour and each answer token the mixture of the pass that chose it.</p></div>")


def results_table(results, expected: str | None) -> str:
    head = "<tr><th>method</th><th>answer</th>" + ("<th>expected</th><th></th>" if expected is not None else "") \
        + "<th>seconds</th></tr>"
    rows = []
    for r in results:
        answer = coloured(r.tokens, r.token_gates, r.experts) if r.token_gates else html.escape(r.text)
        mark = ""
        if expected is not None:
            mark = f"<td>{html.escape(expected)}</td><td>{'✓' if r.text == expected else '✗'}</td>"
        rows.append(f"<tr><td>{html.escape(r.label)}</td><td class='answer'>{answer or '&nbsp;'}</td>{mark}"
                    f"<td>{r.seconds:.2f}</td></tr>")
    return f"<table class='text-results'>{head}{''.join(rows)}</table>"


# ---- handlers ---------------------------------------------------------------------------------
def method_choices(engine: TextEngine, keys: list[str]) -> list[tuple[str, str]]:
    out = [(NAMES[m], m) for m in ("mole", *MERGES, "arrow", "base")]
    out += [(f"{engine.bank.get(k).name} alone", f"single:{k}") for k in keys if k in engine.bank.usable_keys()]
    return out


def on_selection(ts: TextStudio, keys: list[str], methods: list[str], state: dict):
    choices = method_choices(ts.engine, keys or [])
    valid = {v for _, v in choices}
    if state.get("mixture") is not None and list(state["mixture"].names) != list(keys or []):
        state["mixture"] = None
    note = ("Gates trained for these LoRAs." if state.get("mixture") is not None else
            "MoLE's gates are untrained (equal weights) until you train them (the Train gates tab here).")
    return gr.update(choices=choices, value=[m for m in methods if m in valid] or ["mole", "linear", "base"]), \
        gr.update(choices=list(keys or []), value=list(keys or [])), note, state, train_estimate(ts, keys, None, None, None)


def train_estimate(ts: TextStudio, keys, gate, steps, granularity) -> str:
    """'Expected: about N s' for training these gates, from the model's measured cost (TextEngine.train_estimate)."""
    keys = list(keys or [])
    if len(keys) < 2:
        return "Choose at least two LoRAs to train their gates."
    try:
        mole = MoleConfig(granularity=granularity or "block", gate=gate or TEXT_GATES[0])
        config = TrainConfig(steps=int(steps or TEXT_TRAIN.steps), lr=TEXT_TRAIN.lr, batch_size=TEXT_TRAIN.batch_size)
        seconds = ts.engine.train_estimate(keys, mole, config)
    except (TypeError, ValueError, OverflowError):
        return "Expected duration: unknown for these settings."
    return f"Expected duration: about **{seconds:.0f} s** on this machine (from a measured forward pass of the model)."


def _mole_mix(state: dict, keys, granularity: str, gate: str, mask=None) -> Mix:
    mixture = state.get("mixture")
    if mixture is not None and list(mixture.names) == list(keys):
        return Mix("mole", tuple(keys), mixture=mixture, granularity=mixture.granularity,
                   gate=mixture.mole_config().gate, mask=mask)
    return Mix("mole", tuple(keys), granularity=granularity, gate=gate, mask=mask)


def recompare(ts: TextStudio, keys, prompt: str, methods, granularity: str, gate: str, rank, density, state: dict):
    """`compare` after the selection changed, when there is something to compare (nothing to say otherwise)."""
    if not (prompt or "").strip() or not methods or len(prompt) > 200 or len(list(keys or [])) < 1:
        return gr.update(), gr.update(), gr.update(), state
    return compare(ts, keys, prompt, methods, granularity, gate, rank, density, state)


def compare(ts: TextStudio, keys, prompt: str, methods, granularity: str, gate: str, rank, density, state: dict):
    """(results table, MoLE per-token view, heat-map, state)."""
    keys, methods = list(keys or []), list(methods or [])
    if not methods:
        raise gr.Error("Tick at least one method to compare.")
    _check_input(ts, prompt, "Type an input, e.g. 'reverse: planet'.")
    mixes = []
    for m in methods:
        if m.startswith("single:") or m == "base":
            mixes.append(Mix(m))
        elif not keys:
            raise gr.Error(f"'{NAMES.get(m, m)}' combines LoRAs: choose some above.")
        elif m == "mole":
            mixes.append(_mole_mix(state, keys, granularity, gate))
        else:
            mixes.append(Mix(m, tuple(keys), rank=None if rank in (None, 0) else int(rank),
                             density=float(density) if m in ("ties", "dare") else Mix.density))
    results = _human(ts, ts.engine.compare, mixes, prompt.strip())
    mole = next((r for r in results if r.method == "mole"), None)
    heat = gate_heatmap(mole.gates) if mole is not None and mole.gates else None
    return results_table(results, expected_answer(prompt.strip())), mole_view(mole), heat, state


def _check_input(ts: TextStudio, prompt, empty: str) -> None:
    """gr.Error for an Input that is empty, over the box's cap, or longer than the model's positions."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error(empty)
    if len(prompt) > MAX_INPUT_CHARS:
        raise gr.Error(f"The input is {len(prompt)} characters long; at most {MAX_INPUT_CHARS} here.")
    _human(ts, ts.engine.check_prompt, prompt.strip(), "The input")


def toggle_caption(on: int, total: int, answer: str, expected: str | None) -> str:
    """'1 of 2 experts on: **answer** ✓' with the answer shown as plain text (never as markup)."""
    verdict = "" if expected is None else (" ✓" if answer == expected else f" ✗ (expected {plain_markdown(expected)})")
    return f"{on} of {total} experts on: **{plain_markdown(answer) if answer else '(empty)'}**{verdict}"


def toggle(ts: TextStudio, keys, prompt: str, on: list[str], granularity: str, gate: str, state: dict):
    """MoLE's answer with the unticked experts off (the others renormalised)."""
    keys = list(keys or [])
    if len(keys) < 2:
        raise gr.Error("Choose at least two LoRAs to switch experts on and off.")
    _check_input(ts, prompt, "Type an input on the Compare tab first.")
    mask = {k: k in (on or []) for k in keys}
    if not any(mask.values()):
        mix = Mix("base")
    else:
        mix = _mole_mix(state, keys, granularity, gate, mask)
    result = _human(ts, ts.engine.generate, mix, prompt.strip())
    caption = toggle_caption(sum(mask.values()), len(keys), result.text, expected_answer(prompt.strip()))
    return caption, mole_view(result) if result.method == "mole" else "<p>Every expert off: the base model.</p>", state


def train(ts: TextStudio, keys, granularity: str, gate: str, steps, lr, alpha, state: dict,
          progress=gr.Progress()):
    """Stream (state, status, mixture file) while the gates train; cancel stops after the current step. The trained
    mixture is written to a fresh temporary folder and offered for download."""
    keys = list(keys or [])
    try:
        mole = MoleConfig(granularity=granularity, gate=gate)
        config = TrainConfig(steps=int(steps), lr=float(lr), balance_alpha=float(alpha),
                             batch_size=TEXT_TRAIN.batch_size, seed=TEXT_TRAIN.seed)
    except (TypeError, ValueError, OverflowError) as err:
        raise gr.Error(f"Steps, learning rate and α must be numbers: {err}") from err
    _human(ts, ts.engine.check_train, keys, mole, config)
    state["cancel"] = False
    losses = []
    shutil.rmtree(state.get("mixture_dir") or "", ignore_errors=True)     # one mixture file per session at a time
    state["mixture_dir"] = tempfile.mkdtemp(prefix="mole_text_")
    out_path = Path(state["mixture_dir"]) / f"mixture_{'_'.join(keys)[:60]}.safetensors"
    worker = StepWorker(lambda on_step: ts.engine.train(keys, mole, config, on_step=on_step, out_path=out_path,
                                                        should_stop=lambda: state["cancel"]))
    try:
        for step, loss, gates in worker:
            progress((step, config.steps), desc=f"training step {step}/{config.steps}")
            losses.append(float(loss["task"]))
            yield state, (f"Step {step}/{config.steps} · task loss {loss['task']:.4f} · mean gates "
                          + " / ".join(f"{k} {float(g):.2f}" for k, g in zip(keys, gates))), gr.update()
    except ValueError as err:
        raise gr.Error(ts.message(str(err))) from err
    finally:
        state["cancel"] = state["cancel"] or worker.running
    mixture = state["mixture"] = worker.result
    final = mixture.meta.get("final_losses", {})
    verb = "Stopped (cancelled)" if state["cancel"] else "Trained"
    yield state, (f"**{verb} after {mixture.meta.get('steps', 0)} steps** ({mixture.meta.get('seconds', 0):.1f} s) on "
                  f"the manifests' example pairs · last loss {final.get('loss', float('nan')):.4f} · mean gates "
                  + " / ".join(f"{k} {g:.2f}" for k, g in zip(keys, mixture.meta.get("mean_gates", [])))
                  + ". Compare again to use them." + (f"\n\n**Warning:** {note}" if (note := divergence_note(
                      losses, config.lr)) else "")), gr.update(value=str(out_path), visible=True)


def cancel(state: dict) -> str:
    state["cancel"] = True
    return "Cancelling after the current step…"


# ---- layout -----------------------------------------------------------------------------------
def intro(engine: TextEngine) -> str:
    """The Text mode's opening lines (Markdown): the embedded world's, or any other model's."""
    if engine.model_name == "text-world":
        return ("MoLE over **text LoRAs** — the paper's NLP half (its Flan-T5 task LoRAs), here on the embedded text "
                "world: a tiny encoder-decoder that follows FLAN-style instructions, and one LoRA per task. Each LoRA "
                "alone solves its own task; the question is how to combine them. Pick LoRAs, type an input such as "
                "`reverse: planet` or a composed one never trained, `reverse upper: planet`, and compare; then train "
                "the gates and compare again.")
    return (f"MoLE over **text LoRAs** — the paper's NLP half (its Flan-T5 task LoRAs), on "
            f"{html.escape(engine.model_name)}. Pick LoRAs, type an input, compare; then train the gates on the "
            "manifests' example pairs and compare again.")


def build_text_mode(ts: TextStudio, prefix: str = "text_", fast: dict | None = None, long: dict | None = None) -> None:
    """Lay the Text mode out inside the current Blocks and wire its events (fast / long: the queues' settings)."""
    fast = fast or dict(concurrency_id=TEXT_QUEUE, concurrency_limit=1)
    long = long or dict(concurrency_id="long", concurrency_limit=1)
    engine = ts.engine
    start = starting_keys(engine)
    state = gr.State(new_text_session, time_to_live=4 * 3600, delete_callback=end_text_session)
    gr.Markdown(intro(engine))
    with gr.Row():
        by_key = {e.key: e for e in engine.bank.entries if e.error is None}
        chosen = gr.CheckboxGroup([(short_label(by_key[k]), k) for k in ordered_keys(engine)], value=start,
                                  label="Text LoRAs (experts; the distractors after the main five)", scale=2,
                                  elem_id="text-chosen")
        with gr.Accordion("The text bank", open=False):
            gr.Markdown(bank_rows(engine))
    with gr.Tabs():
        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(label="Input", elem_id="text-prompt", value=(prompt_examples(engine) or ["reverse: planet"])[0],
                                    placeholder="e.g. reverse: planet", scale=3)
                go = gr.Button("Compare", variant="primary", scale=1, elem_id="text-compare")
            gr.Examples(prompt_examples(engine), [prompt], label="Inputs (the last ones compose two tasks)")
            methods = gr.CheckboxGroup(method_choices(engine, start), value=START_METHODS,
                                       label="Methods")
            with gr.Row():
                granularity = gr.Radio(list(GRANULARITIES), value="block", label="MoLE granularity (untrained)")
                gate = gr.Radio(list(TEXT_GATES), value=TEXT_GATES[0], label="MoLE gate (untrained)")
                rank = FieldNumber(value=0, precision=0, label="SVD/TIES/DARE rank (0: the LoRAs' own)", minimum=0,
                                 maximum=1024)
                density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="TIES/DARE density")
            note = gr.Markdown("MoLE's gates are untrained (equal weights) until you train them (the Train gates tab here).")
            table = gr.HTML(label="Answers", elem_id="text-results")
            view = gr.HTML(elem_id="text-view")
            heat = gr.Image(label="MoLE gates per layer (mean over tokens and steps)", type="pil", height=260,
                            show_label=True)
        with gr.Tab("Train gates"):
            gr.Markdown("Trains only the gates (the LoRAs stay frozen) on the example pairs in the chosen LoRAs' "
                        "manifests. **prompt** (the default): one decision per answer, read from the instruction by the "
                        "base model, given to every layer; sample / token / static: the paper's gates, trained with the "
                        "token loss of the answers.")
            with gr.Row():
                t_gran = gr.Radio(list(GRANULARITIES), value="block", label="Granularity")
                t_gate = gr.Radio(list(TEXT_GATES), value=TEXT_GATES[0], label="Gate")
                steps = FieldNumber(value=TEXT_TRAIN.steps, precision=0, minimum=1, maximum=engine.limits.train_steps,
                                  label="Steps")
                lr = FieldNumber(value=TEXT_TRAIN.lr, minimum=1e-6, maximum=10, label="Learning rate")
                alpha = FieldNumber(value=BALANCE_ALPHA, minimum=0, maximum=100, label="Balance α")
            with gr.Row():
                train_btn = gr.Button("Train gates", variant="primary", elem_id="text-train")
                cancel_btn = gr.Button("Cancel", elem_id="text-cancel")
            estimate = gr.Markdown(lambda: train_estimate(ts, start, TEXT_GATES[0], TEXT_TRAIN.steps, "block"),
                                   elem_id="text-estimate")
            status = gr.Markdown("Not trained yet.", elem_id="text-status")
            download = gr.File(label="Trained mixture (.safetensors: load it with the CLI's --mixture)", visible=False,
                               interactive=False, elem_id="text-mixture")
        with gr.Tab("Toggle experts"):
            on = gr.CheckboxGroup(start, value=start, label="Experts on (the rest renormalised)", elem_id="text-on")
            toggle_btn = gr.Button("Answer with MoLE", elem_id="text-toggle")
            caption = gr.Markdown(elem_id="text-caption")
            toggle_view = gr.HTML()

    chosen.change(partial(on_selection, ts), [chosen, methods, state], [methods, on, note, state, estimate],
                  queue=False, api_visibility="private").then(
        partial(recompare, ts), [chosen, prompt, methods, granularity, gate, rank, density, state],
        [table, view, heat, state], api_visibility="private", **fast)
    gr.on([t_gate.change, steps.change, t_gran.change], partial(train_estimate, ts), [chosen, t_gate, steps, t_gran],
          [estimate], queue=False, api_visibility="private")
    go.click(partial(compare, ts), [chosen, prompt, methods, granularity, gate, rank, density, state],
             [table, view, heat, state], api_name=f"{prefix}compare", **fast)
    prompt.submit(partial(compare, ts), [chosen, prompt, methods, granularity, gate, rank, density, state],
                  [table, view, heat, state], api_visibility="private", **fast)
    train_btn.click(partial(train, ts), [chosen, t_gran, t_gate, steps, lr, alpha, state], [state, status, download],
                    api_name=f"{prefix}train", **long)
    cancel_btn.click(cancel, [state], [status], queue=False, api_name=f"{prefix}cancel")
    gr.on([toggle_btn.click, on.change], partial(toggle, ts), [chosen, prompt, on, granularity, gate, state],
          [caption, toggle_view, state], api_name=f"{prefix}toggle", trigger_mode="always_last", **fast)


TEXT_CSS = """
.tok { padding: 1px 2px; margin: 0 1px; border-radius: 3px; font-family: monospace; font-size: 1.05em; }
.text-results td.answer { font-family: monospace; }
.text-results td, .text-results th { padding: 4px 8px; }
"""


def build_text_demo(engine: TextEngine, message=str, delete_cache: tuple[int, int] = (600, 3600)) -> gr.Blocks:
    """The app for a text model alone (`python app.py --model TEXT_MODEL --bank TEXT_BANK`): /train, /cancel,
    /compare, /toggle."""
    with gr.Blocks(title="MoLE Studio — text", delete_cache=delete_cache) as demo:
        gr.Markdown(f"# MoLE Studio — text\nModel **{html.escape(engine.model_name)}** "
                    f"({'encoder-decoder' if getattr(engine.model.config, 'is_encoder_decoder', False) else 'causal LM'}), "
                    f"{len(engine.bank.usable_keys())} text LoRAs.")
        build_text_mode(TextStudio(engine, message), prefix="")
    return demo
