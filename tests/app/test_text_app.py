"""The app's Text mode (ui/text_tab.py): handlers, the /text_* endpoints through gradio_client, the
text-only app's /train, /compare, /toggle, and a real browser on the embedded text world (or a tiny one).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import app
from ui import session
from ui import text_tab as text_ui
from mole_core.mix import Mix
from mole_core.text.engine import DEFAULT_TEXT_BANK, DEFAULT_TEXT_MODEL, TextEngine, is_text_model
from tests.helpers import free_port
from tests.tiny import make_text_world


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir, bank = make_text_world(tmp_path_factory.mktemp("textapp"))
    return TextEngine(model_dir, bank)


@pytest.fixture
def ts(engine):
    return text_ui.TextStudio(engine)


def no_progress(*args, **kwargs):
    return None


def test_compare_shows_every_method_with_the_expected_answer_and_mole_token_colours(ts):
    methods = ["mole", "linear", "svd", "ties", "dare", "base", "single:alpha", "single:beta"]
    table, view, heat, _ = text_ui.compare(ts, ["alpha", "beta"], "reverse: abc", methods, "block", "token", 0, 0.5,
                                           text_ui.new_text_session())
    assert table.count("<tr>") == 1 + len(methods)
    assert "<th>expected</th>" in table and ">cba<" in table        # the text world's rule for 'reverse: abc'
    assert "class='tok'" in view and "alpha 0.50 · beta 0.50" in view  # untrained: equal weights on every token
    assert heat is not None and heat.size[0] > 0
    # a prompt the world does not know has no expected column
    table, *_ = text_ui.compare(ts, ["alpha", "beta"], "hello there", ["base"], "block", "sample", 0, 0.5,
                                text_ui.new_text_session())
    assert "expected" not in table


def test_toggle_one_expert_on_is_that_lora_alone(ts, engine):
    state = text_ui.new_text_session()
    caption, view, _ = text_ui.toggle(ts, ["alpha", "beta"], "alpha: abcd", ["alpha"], "block", "sample", state)
    alone = engine.generate(Mix("single:alpha"), "alpha: abcd").text
    assert caption.startswith("1 of 2 experts on") and f"**{text_ui.plain_markdown(alone) or '(empty)'}**" in caption
    caption, view, _ = text_ui.toggle(ts, ["alpha", "beta"], "alpha: abcd", [], "block", "sample", state)
    assert f"**{text_ui.plain_markdown(engine.generate(Mix('base'), 'alpha: abcd').text) or '(empty)'}**" in caption
    assert "base model" in view


def test_training_streams_steps_stores_the_gates_and_cancels(ts):
    state = text_ui.new_text_session()
    updates = list(text_ui.train(ts, ["alpha", "beta"], "block", "token", 4, 5e-3, 0.5, state, progress=no_progress))
    assert [u[1].split(" ·")[0] for u in updates[:4]] == [f"Step {i}/4" for i in range(1, 5)]
    assert updates[-1][1].startswith("**Trained after 4 steps**") and state["mixture"] is not None
    _, view, _, _ = text_ui.compare(ts, ["alpha", "beta"], "alpha: ab", ["mole"], "block", "sample", 0, 0.5, state)
    assert "per-token" not in view and state["mixture"].gate == "token"
    # cancel: the run stops after the current step and says so
    state = text_ui.new_text_session()
    run = text_ui.train(ts, ["alpha", "beta"], "block", "sample", 50, 5e-3, 0.5, state, progress=no_progress)
    next(run)
    text_ui.cancel(state)
    last = list(run)[-1][1]
    assert last.startswith("**Stopped (cancelled) after") and "50 steps" not in last


def test_the_tab_starts_on_the_prompt_gate_shows_the_expected_duration_and_offers_the_mixture(ts, engine):
    """Defaults: every main LoRA ticked (here both), the prompt gate; the expected duration is shown before
    training; the trained mixture is offered as a file that loads; a new selection re-renders the answers."""
    from mole_core.mixture import load_mixture
    assert text_ui.starting_keys(engine) == ["alpha", "beta"] and text_ui.TEXT_GATES[0] == "prompt"
    estimate = text_ui.train_estimate(ts, ["alpha", "beta"], "prompt", 100, "block")
    assert estimate.startswith("Expected duration: about **") and " s**" in estimate
    assert "at least two" in text_ui.train_estimate(ts, ["alpha"], "prompt", 100, "block")
    state = text_ui.new_text_session()
    updates = list(text_ui.train(ts, ["alpha", "beta"], "block", "prompt", 5, 5e-2, 0.5, state, progress=no_progress))
    path = updates[-1][2]["value"]
    assert load_mixture(path).gate == "prompt" and state["mixture"].gate == "prompt"
    table, view, _, _ = text_ui.recompare(ts, ["alpha", "beta"], "alpha: abc", ["mole", "arrow", "base"], "block",
                                          "prompt", 0, 0.5, state)
    assert table.count("<tr>") == 4 and "Arrow" in table and "class='tok'" in view
    nothing = text_ui.recompare(ts, ["alpha", "beta"], "", ["mole"], "block", "prompt", 0, 0.5, state)
    assert nothing[0] == text_ui.gr.update()


@pytest.mark.parametrize("bad, field", [((["alpha"], 5, 5e-3, 0.5), "two different LoRAs"),
                                        ((["alpha", "beta"], 0, 5e-3, 0.5), "Training steps"),
                                        ((["alpha", "beta"], 5, float("nan"), 0.5), "learning rate"),
                                        ((["alpha", "beta"], 5, 5e-3, float("inf")), "Balance α")])
def test_bad_training_input_is_refused_by_field(ts, bad, field):
    keys, steps, lr, alpha = bad
    with pytest.raises(Exception, match=field):
        list(text_ui.train(ts, keys, "block", "sample", steps, lr, alpha, text_ui.new_text_session(),
                           progress=no_progress))


def test_bad_compare_input_names_the_problem(ts):
    state = text_ui.new_text_session()
    for args, words in ((("", ["base"]), "Type an input"), (("a: b", []), "at least one method"),
                        (("x" * 300, ["base"]), "at most 200")):
        with pytest.raises(Exception, match=words):
            text_ui.compare(ts, ["alpha", "beta"], args[0], args[1], "block", "sample", 0, 0.5, state)
    with pytest.raises(Exception, match="Trigger routing"):
        text_ui.compare(ts, ["alpha", "beta"], "a: b", ["mole"], "block", "routed", 0, 0.5, state)


def test_text_endpoints_through_gradio_client(engine):
    """The text-only app (`python app.py --model TEXT_MODEL`) serves /train, /cancel, /compare, /toggle; the
    image app beside a text engine serves them as /text_*."""
    from gradio_client import Client
    demo = text_ui.build_text_demo(engine)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
        assert {"/train", "/cancel", "/compare", "/toggle"} <= names
        table, view, _ = client.predict(["alpha", "beta"], "reverse: abc", ["mole", "linear", "base"], "block",
                                        "sample", 0, 0.5, api_name="/compare")
        assert table.count("<tr>") == 4 and "class='tok'" in view
        status, mixture_file = client.predict(["alpha", "beta"], "block", "sample", 3, 5e-3, 0.5, api_name="/train")
        assert "Trained after 3 steps" in status and ".safetensors" in str(mixture_file)   # the download (an update)
        caption, _ = client.predict(["alpha", "beta"], "alpha: abc", ["beta"], "block", "sample", api_name="/toggle")
        assert caption.startswith("1 of 2 experts on")
    finally:
        demo.close()


def test_the_image_app_has_a_text_tab(engine, world_engine):
    demo = app.build_demo(session.Studio(world_engine, text=engine))
    names = {fn.api_name for fn in demo.fns.values() if getattr(fn, "api_name", None)}
    assert {"text_train", "text_cancel", "text_compare", "text_toggle", "train", "compare", "toggle"} <= names


def test_app_main_tells_a_text_model_from_a_pipeline(engine, tmp_path):
    assert is_text_model(engine.model_id)
    assert not is_text_model(tmp_path)


# ---- a real browser ------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
def test_text_mode_in_a_browser(engine, tmp_path):
    """Compare → answers with the expected column and coloured MoLE tokens; train → status; toggle → caption.
    On the embedded text world when it is shipped, else on the tiny one."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright
    torch.set_num_threads(1)
    text = TextEngine(DEFAULT_TEXT_MODEL, DEFAULT_TEXT_BANK) if is_text_model(DEFAULT_TEXT_MODEL) else engine
    demo = text_ui.build_text_demo(text)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    artifacts = Path(__file__).resolve().parents[2] / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(url)
            prefilled = page.locator("#text-prompt textarea").input_value()       # the page's own first example
            assert prefilled == text_ui.prompt_examples(text)[0]
            page.locator("#text-compare").click()
            page.wait_for_function("() => document.querySelectorAll('#text-results tr').length >= 5")
            rows = page.locator("#text-results tr").all_inner_texts()
            assert any(r.startswith("MoLE") for r in rows) and any(r.startswith("Base model") for r in rows)
            assert page.locator("#text-view span.tok").count() > 0
            page.screenshot(path=str(artifacts / "text_compare.png"), full_page=True)
            page.get_by_role("tab", name="Train gates").click()
            page.wait_for_function("() => document.querySelector('#text-estimate').innerText.includes('Expected duration')")
            page.locator("#text-train").click()
            page.wait_for_function("() => document.querySelector('#text-status').innerText.includes('Trained after')")
            page.wait_for_function("() => document.querySelector('#text-mixture a') !== null")   # the download
            if text is not engine:         # the shipped world, defaults: MoLE right, the merges wrong
                assert text_ui.starting_keys(text) == ["chop", "double", "drop", "reverse", "upper"]
                page.get_by_role("tab", name="Compare").click()
                page.locator("#text-compare").click()
                page.wait_for_function("() => [...document.querySelectorAll('#text-results tr')].some("
                                       "r => r.innerText.startsWith('MoLE (prompt') && !r.innerText.includes('untrained'))")
                rows = page.locator("#text-results tr").all_inner_texts()
                mole = next(r for r in rows if r.startswith("MoLE"))
                linear = next(r for r in rows if r.startswith("Linear merge"))
                assert "✓" in mole and "✗" in linear, rows
                assert page.locator("#text-view span.tok").count() > 0
                page.screenshot(path=str(artifacts / "text_trained.png"), full_page=True)
            page.get_by_role("tab", name="Toggle experts").click()
            page.locator("#text-toggle").click()
            page.wait_for_function("() => document.querySelector('#text-caption').innerText.includes('experts on')")
            page.screenshot(path=str(artifacts / "text_toggle.png"), full_page=True)
            browser.close()
    finally:
        demo.close()


def test_broken_text_bank_entries_never_break_the_page(tmp_path):
    """A manifest that is not JSON, a LoRA file without its manifest and a manifest without its file are listed
    with the reason and left out of the choices; the page builds and the good LoRAs work."""
    model_dir, bank = make_text_world(tmp_path)
    (bank / "bad.json").write_text("{not json")
    (bank / "orphan.json").write_text('{"kind": "text", "name": "Orphan"}')
    (bank / "alone.safetensors").write_bytes((bank / "alpha.safetensors").read_bytes())
    engine = TextEngine(model_dir, bank)
    assert engine.bank.usable_keys() == ["alpha", "beta"]
    assert engine.bank.keys() == ["alone", "alpha", "bad", "beta", "orphan"]      # get finds the broken ones too
    demo = text_ui.build_text_demo(engine)
    choices = [c for block in demo.blocks.values() if getattr(block, "elem_id", None) == "text-chosen"
               for c in block.choices]
    assert [value for _, value in choices] == ["alpha", "beta"]
    rows = text_ui.bank_rows(engine)
    for key in ("bad", "orphan", "alone"):
        assert f"| {key} | – | cannot be used" in rows
    assert str(bank) not in rows


def test_hostile_compare_values_are_refused_by_field(ts, tmp_path):
    state = text_ui.new_text_session()
    cases = [(dict(rank=10**9), "rank"), (dict(density=float("nan")), "ensity"),
             (dict(methods=["single:../../etc"]), "Unknown LoRA '../../etc'")]
    for change, words in cases:
        args = dict(keys=["alpha", "beta"], prompt="alpha: abc", methods=["svd", "ties"], granularity="block",
                    gate="sample", rank=0, density=0.5)
        args.update(change)
        with pytest.raises(Exception, match=words) as err:
            text_ui.compare(ts, args["keys"], args["prompt"], args["methods"], args["granularity"], args["gate"],
                            args["rank"], args["density"], state)
        assert "/" not in str(err.value).replace("../../etc", "")      # no server folder in the message
    # more experts than a public Space mixes
    from mole_core.defaults import Limits
    model_dir, bank = make_text_world(tmp_path, keys=tuple(f"k{i}" for i in range(9)))
    small = text_ui.TextStudio(TextEngine(model_dir, bank, limits=Limits()))
    with pytest.raises(Exception, match="At most 8 LoRAs"):
        text_ui.compare(small, [f"k{i}" for i in range(9)], "k0: abc", ["linear"], "block", "sample", 0, 0.5, state)


# ---- a hostile visitor (issue 25; tests/test_hardening.py holds the image tabs') ---------------------
def test_inputs_longer_than_the_models_positions_are_refused_by_field(ts, engine):
    """T2/T3: under the box's 200 characters but over the model's 64 positions, on Compare and on Toggle;
    Toggle also has the box's cap. The limit is the model's own (its config), never a server path."""
    state = text_ui.new_text_session()
    limit = engine.model.config.max_position_embeddings
    assert engine.prompt_limit() == limit
    long = "alpha: " + "z" * limit                                   # under 200 characters, over 64 tokens
    with pytest.raises(Exception, match=f"The input is .* tokens long .*reads at most {limit} tokens") as err:
        text_ui.compare(ts, ["alpha", "beta"], long, ["mole", "base"], "block", "sample", 0, 0.5, state)
    assert "/" not in str(err.value)
    with pytest.raises(Exception, match=f"reads at most {limit} tokens"):
        text_ui.toggle(ts, ["alpha", "beta"], long, ["alpha"], "block", "sample", state)
    with pytest.raises(Exception, match="100000 characters long; at most 200"):
        text_ui.toggle(ts, ["alpha", "beta"], "q" * 100_000, ["alpha"], "block", "sample", state)
    fits = "alpha: " + "z" * (limit - 9)                             # what fits is answered
    assert text_ui.toggle(ts, ["alpha", "beta"], fits, ["alpha"], "block", "sample", state)[0].startswith("1 of 2")


def test_the_toggle_caption_shows_the_answer_as_text():
    """T17/X3: a model's answer (a user's own model may write markup) is shown as itself, never rendered."""
    answer = "<img src=x onerror=alert(1)> [click](javascript:alert(2)) **bold** `code` # head"
    caption = text_ui.toggle_caption(1, 2, answer, "<b>x</b>")
    assert "<img" not in caption and "<b>" not in caption and "](" not in caption and "**bold**" not in caption
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in caption and "\\[click\\]" in caption
    assert caption.startswith("1 of 2 experts on: **") and "✗ (expected &lt;b&gt;x&lt;/b&gt;)" in caption


def test_text_events_have_their_own_queue(engine, world_engine):
    """T19: a text compare waiting for a text training (the text engine's lock) holds the Text tab's queue, not
    the image tabs' "model" queue; training shares the one long queue."""
    demo = app.build_demo(app.Studio(world_engine, text=engine))
    queue = {fn.api_name: fn.concurrency_id for fn in demo.fns.values() if getattr(fn, "api_name", None)}
    assert queue["text_compare"] == queue["text_toggle"] == text_ui.TEXT_QUEUE != queue["compare"] == app.MODEL_QUEUE
    assert queue["text_train"] == queue["train"] == app.LONG_QUEUE


def test_nan_and_text_in_number_fields_over_raw_http_get_a_message(engine):
    """T6/T13: raw HTTP (curl) can send NaN, Infinity or text where the page sends numbers; each is refused with
    the field's label (Gradio's own preprocess answered {"error": null})."""
    import json
    import urllib.request
    demo = text_ui.build_text_demo(engine)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)

    def call(api, data: str) -> str:
        request = urllib.request.Request(f"{url}gradio_api/call/{api}", data=data.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        event = json.loads(urllib.request.urlopen(request, timeout=60).read())["event_id"]
        return urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event}", timeout=120).read().decode()

    try:
        for api, data, field in (
                ("compare", '["alpha","beta"], "alpha: abc", ["svd"], "block", "sample", NaN, 0.5', "rank (0: the LoRAs' own)"),
                ("train", '["alpha","beta"], "block", "sample", NaN, 0.005, 0.5', "Steps"),
                ("train", '["alpha","beta"], "block", "sample", "5; rm -rf /", 0.005, 0.5', "Steps"),
                ("train", '["alpha","beta"], "block", "sample", 5, Infinity, 0.5', "Learning rate")):
            reply = call(api, '{"data": [' + data + ']}')
            assert "event: error" in reply and f"{field} must be a finite number" in reply, reply
        assert "Trained after 2 steps" in call("train", '{"data": [["alpha","beta"], "block", "sample", 2, 0.005, 0.5]}')
    finally:
        demo.close()


def test_a_diverging_training_says_so():
    """T22: a loss that ends far above its best gets one plain sentence; a noisy loss that does not (the
    text world's real losses at lr 0.3, one batch per step) gets none."""
    from mole_core.train import divergence_note
    blown = [1.7] * 5 + [1.69] * 15 + [5.0, 8.0, 12.0, 12.3, 12.2]           # the shape of T22's 500 steps
    assert "diverged" in divergence_note(blown, 5e-3) and "lower learning rate (e.g. 0.001)" in divergence_note(blown, 5e-3)
    noisy = [2.6, 4.18, 1.73, 3.37, 3.11, 2.25, 2.99, 2.7, 1.35, 2.61, 1.62, 3.75, 3.2, 2.73, 2.72, 5.45, 4.49,
             2.29, 2.69, 2.97, 5.09, 2.69, 3.28, 3.01, 2.34, 1.86, 3.43, 3.97, 2.63, 3.16]
    assert divergence_note(noisy, 0.3) == "" and divergence_note([3.0, 2.0, 1.0], 1.0) == ""


def test_a_text_session_removes_its_mixture_folder_when_it_ends(tmp_path):
    """Disk growth: each training's mixture lives in one folder per session, removed when the session ends."""
    folder = tmp_path / "mole_text_x"
    folder.mkdir()
    (folder / "mixture.safetensors").write_bytes(b"0" * 16)
    state = text_ui.new_text_session() | {"mixture_dir": str(folder)}
    text_ui.end_text_session(state)
    assert not folder.exists() and state["cancel"]
