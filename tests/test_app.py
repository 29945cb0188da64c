"""The app's handlers, called directly (no server): validation, compare, toggle, train, inspect, export.

The world they run on is a tiny pipeline and bank built in a temp folder, or a real one given with
`--model DIR --bank DIR` (when tests/conftest.py registers those options) or the environment variables
MOLE_APP_MODEL / MOLE_APP_BANK, so the same tests also run on the embedded default.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import PIL.Image
import pytest

import app
from mole_core.engine import Engine

SETTINGS = dict(prompt="a photo of sks dog", negative="", seed=3, steps=2, guidance=4.0)


# ---- the world the tests run on (shared with test_api.py and test_browser.py) -------------------
def world_paths(config, tmp_path_factory, prefer_default: bool = False) -> tuple[str, str]:
    """(model, bank): --model/--bank or MOLE_APP_MODEL/MOLE_APP_BANK if given; the embedded default
    when `prefer_default` and it is built; else a tiny pipeline and bank made in a temp folder."""
    model = config.getoption("--model", None) or os.environ.get("MOLE_APP_MODEL")
    bank = config.getoption("--bank", None) or os.environ.get("MOLE_APP_BANK")
    if model and bank:
        return model, bank
    if prefer_default and embedded_default_ready():
        return app.DEFAULT_MODEL, app.DEFAULT_BANK
    from tests.test_engine import make_bank, make_model_dir
    root = tmp_path_factory.mktemp("app_world")
    model_dir = make_model_dir(root)
    return str(model_dir), str(make_bank(root / "bank", model_dir))


def embedded_default_ready() -> bool:
    """The pixel world is built: its pipeline folder and at least two bank manifests exist."""
    return (Path(app.DEFAULT_MODEL) / "model_index.json").exists() and \
        len(list(Path(app.DEFAULT_BANK).glob("*.json"))) >= 2


def bank_digest(folder: str) -> dict[str, str]:
    """Every file of a folder tree with its hash, to prove that nothing on disk changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def pixels(image) -> np.ndarray:
    image = image if isinstance(image, PIL.Image.Image) else PIL.Image.open(image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return world_paths(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def engine(world):
    return Engine(*world)


@pytest.fixture(scope="module")
def keys(engine):
    return [entry.key for entry in engine.bank.entries if not entry.error][:2]


def compare_args(keys, methods, state, seed=SETTINGS["seed"], randomise=False, weights=None, rank=2,
                 normalize=True):
    s = SETTINGS
    return (keys, s["prompt"], s["negative"], seed, randomise, s["steps"], s["guidance"], methods, weights,
            rank, normalize, state)


def toggle_args(keys, state, switches, strengths=None):
    s = SETTINGS
    switches = list(switches) + [True] * (app.MAX_EXPERTS - len(switches))
    strengths = list(strengths or []) + [1.0] * (app.MAX_EXPERTS - len(strengths or []))
    return (keys, s["prompt"], s["negative"], s["seed"], s["steps"], s["guidance"], state, *switches,
            *strengths)


# ---- building the page ----------------------------------------------------------------------------
def test_build_demo_loads_no_model(world):
    engine = Engine(*world)
    demo = app.build_demo(engine)
    assert isinstance(demo, gr.Blocks)
    assert engine._pipe is None, "building the page must not load the pipeline"
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"train", "compare", "toggle", "export"} <= names


def test_bank_views_show_every_lora(engine):
    entries = engine.bank.entries
    gallery, table = app.bank_gallery(engine), app.bank_table(engine)
    assert len(gallery) == len(entries)
    for (image, caption), entry in zip(gallery, entries):
        assert Path(image).exists() and entry.name in caption
        assert entry.name in table and entry.description in table


def test_selection_drives_methods_weights_and_rows(engine, keys):
    methods, weights, *rest = app.on_selection(engine, keys)
    values = [value for _, value in methods.choices]
    assert values[:4] == ["mole", "linear", "svd", "base"]
    assert values[4:] == [f"single:{k}" for k in keys]
    assert list(weights["expert"]) == keys
    rows, switches = rest[:app.MAX_EXPERTS], rest[app.MAX_EXPERTS:2 * app.MAX_EXPERTS]
    assert [r.visible for r in rows] == [i < len(keys) for i in range(app.MAX_EXPERTS)]
    assert [s.label for s in switches[:len(keys)]] == [engine.bank.get(k).name for k in keys]


def test_insert_triggers_adds_only_missing_words(engine, keys):
    triggers = [w for k in keys for w in engine.bank.get(k).trigger]
    prompt = app.insert_triggers(engine, keys, "a small house")
    assert prompt.startswith("a small house") and all(t in prompt for t in triggers)
    assert app.insert_triggers(engine, keys, prompt) == prompt
    with pytest.raises(gr.Error, match="No LoRA is selected"):
        app.insert_triggers(engine, [], "a small house")


# ---- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(methods=[]), "No method is ticked"),
    (dict(keys=[]), "No LoRA is selected"),
    (dict(steps=0), "Steps must be"),
    (dict(guidance=99.0), "Guidance must be"),
    (dict(keys=["no-such-lora"]), "Unknown LoRA"),
])
def test_check_compare_refuses_bad_input_with_a_sentence(engine, keys, change, message):
    args = dict(keys=keys, prompt="a dog", negative="", seed=0, randomise=False, steps=3, guidance=4.0,
                methods=["mole", "linear"]) | change
    with pytest.raises(gr.Error, match=message):
        app.check_compare(engine, **args)


def test_check_train_needs_two_loras(engine, keys):
    with pytest.raises(gr.Error, match="at least two LoRAs"):
        app.check_train(engine, keys[:1], "block", 2, 1e-3, 0.5, 0)
    with pytest.raises(gr.Error, match="granularity"):
        app.check_train(engine, keys, "pixel", 2, 1e-3, 0.5, 0)


def test_long_prompt_is_warned_not_silently_cut(engine, keys):
    long_prompt = " ".join(["a red circle on the left and a blue square on the right"] * 20)
    with pytest.warns(UserWarning, match="words are cut"):
        app.check_compare(engine, keys, long_prompt, "", 0, False, 2, 4.0, ["base"])
    _, _, notes, _ = app.compare(engine, keys, long_prompt, "", 0, False, 2, 4.0, ["base"], None, 2, True,
                                 app.new_session())
    assert "words are cut" in notes and "the right" in notes.split("words are cut")[1]


# ---- compare, toggle, inspect ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def compared(engine, keys):
    """One comparison of every kind of method, shared by the tests below: (methods, outputs, state)."""
    methods = ["mole", "linear", "svd", "base", f"single:{keys[0]}"]
    state = app.new_session()
    return methods, app.compare(engine, *compare_args(keys, methods, state)), state


def test_compare_renders_each_method_labelled_with_its_time(engine, keys, compared):
    methods, (gallery, used_seed, notes, state), _ = compared
    assert len(gallery) == len(methods) and used_seed == SETTINGS["seed"]
    for image, caption in gallery:
        label, seconds = caption.rsplit(" · ", 1)
        assert label and seconds.endswith(" s") and float(seconds[:-2]) > 0
        assert image.size == gallery[0][0].size
    assert "untrained" in notes
    assert state["gates"] and state["compared"]["methods"] == methods
    # randomise picks a seed and reports it
    _, random_seed, _, _ = app.compare(engine, *compare_args(keys, ["base"], app.new_session(), randomise=True))
    assert isinstance(random_seed, int) and random_seed >= 0


def test_toggle_rerenders_mole_with_experts_off(engine, keys, compared):
    _, (gallery, *_), _ = compared
    state = app.new_session()
    all_on, caption, state = app.toggle(engine, *toggle_args(keys, state, [True, True]))
    assert np.array_equal(pixels(all_on), pixels(gallery[0][0])), "all experts on == the compared MoLE image"
    one_off, caption, state = app.toggle(engine, *toggle_args(keys, state, [False, True]))
    assert not np.array_equal(pixels(one_off), pixels(all_on)) and f"experts on: {keys[1]}" in caption
    none_on, _, state = app.toggle(engine, *toggle_args(keys, state, [False, False]))
    assert np.array_equal(pixels(none_on), pixels(gallery[3][0])), "every expert off == the base model"
    weaker, _, _ = app.toggle(engine, *toggle_args(keys, state, [True, True], [0.3, 1.0]))
    assert not np.array_equal(pixels(weaker), pixels(all_on))


def test_show_gates_heatmap_chart_and_csv(keys, compared):
    _, _, state = compared
    heatmap, per_step, csv = app.show_gates(state)
    frame = pd.DataFrame(state["gates"])
    groups = frame["group"].nunique()
    assert isinstance(heatmap, PIL.Image.Image) and heatmap.height > groups * 10
    assert set(per_step["expert"]) == set(keys)
    assert len(per_step) == frame["step"].nunique() * len(keys)
    written = pd.read_csv(csv)
    assert list(written.columns) == ["group", "step", "sample", "expert", "weight"]
    assert len(written) == len(frame)
    assert app.show_gates(app.new_session())[0] is None


# ---- train, cancel, mixture round trip ------------------------------------------------------------
def run_training(engine, keys, state, steps=3, cancel_after=None):
    updates = []
    for update in app.train(engine, keys, "block", steps, 1e-2, 0.5, 0, "sample", state, progress=lambda *a, **k: None):
        updates.append(update)
        if cancel_after is not None and len(updates) == cancel_after:
            app.cancel_training(state)
    return updates


def test_train_streams_loss_and_keeps_the_mixture(engine, keys):
    state = app.new_session()
    updates = run_training(engine, keys, state, steps=3)
    assert len(updates) == 4  # one per step, then the finished mixture
    *_, (state, status, losses, balance, mixture_file) = updates
    assert status.startswith("Trained after 3 steps")
    assert set(losses["term"]) == {"loss", "task", "balance"}
    assert list(losses[losses["term"] == "loss"]["step"]) == [1, 2, 3]
    assert set(balance["expert"]) == set(keys) and len(balance) == 3 * len(keys)
    assert Path(mixture_file).exists() and list(state["mixture"].names) == keys
    gallery, _, notes, state = app.compare(engine, *compare_args(keys, ["mole"], state))
    assert "untrained" not in gallery[0][1] and notes == ""
    assert "load_mixture('mixture.safetensors')" in app.snippet(engine, state)
    # the downloaded file loads back into a fresh session and gives the same MoLE image
    fresh = app.new_session()
    fresh, chosen, message = app.load_mixture_upload(engine, mixture_file, keys, fresh)
    assert chosen == keys and "block" in message
    reloaded, *_ = app.compare(engine, *compare_args(keys, ["mole"], fresh))
    assert np.array_equal(pixels(reloaded[0][0]), pixels(gallery[0][0]))


def test_cancel_stops_training_early(engine, keys):
    state = app.new_session()
    updates = run_training(engine, keys, state, steps=50, cancel_after=1)
    *_, (state, status, losses, _, mixture_file) = updates
    assert status.startswith("Stopped") and losses["step"].max() < 50
    assert state["mixture"] is not None and Path(mixture_file).exists()


# ---- export, snippet, upload ----------------------------------------------------------------------
@pytest.mark.parametrize("method, fmt", [("linear", "diffusers"), ("svd", "kohya")])
def test_export_writes_a_lora_the_model_accepts(engine, world, keys, method, fmt):
    from mole_core.lora import load_lora, validate_lora
    path = app.export(engine, keys, method, fmt, None, 2, True)
    lora = load_lora(path)
    validate_lora(lora, Engine(*world).components)  # a fresh model: no MoLE wrappers attached
    assert lora.format == fmt and lora.modules
    with pytest.raises(gr.Error, match="No LoRA is selected"):
        app.export(engine, [], method, fmt, None, 2, True)


def test_snippet_reproduces_the_last_comparison(engine, keys, compared):
    with pytest.raises(gr.Error, match="run a comparison"):
        app.snippet(engine, app.new_session())
    methods, _, state = compared
    code = app.snippet(engine, state)
    compile(code, "snippet", "exec")
    assert "engine.compare(" in code and repr(keys) in code and repr(methods) in code


@pytest.mark.slow
def test_snippet_run_gives_the_same_images(engine, compared, tmp_path, monkeypatch):
    methods, (gallery, *_), state = compared
    monkeypatch.chdir(tmp_path)
    exec(compile(app.snippet(engine, state), "snippet", "exec"), {})
    for method, (image, _) in zip(methods, gallery):
        assert np.array_equal(pixels(tmp_path / (method.replace(":", "_") + ".png")), pixels(image)), method


def test_upload_of_a_bad_lora_changes_nothing_on_disk(engine, world, tmp_path):
    before = bank_digest(world[1])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    with pytest.raises(gr.Error):
        app.upload_lora(engine, str(broken), "Broken", "zzz", "", [])
    not_lora = tmp_path / "notes.txt"
    not_lora.write_text("hello")
    with pytest.raises(gr.Error, match="not a .safetensors file"):
        app.upload_lora(engine, str(not_lora), "Notes", "zzz", "", [])
    with pytest.raises(gr.Error, match="trigger word is empty"):
        app.upload_lora(engine, str(broken), "Broken", " ", "", [])
    assert bank_digest(world[1]) == before


def test_upload_of_a_good_lora_joins_the_bank(world, keys, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(world[1], bank)
    engine = Engine(world[0], str(bank))
    source = engine.bank.get(keys[0])
    upload = tmp_path / "upload.safetensors"
    shutil.copy(source.lora_path, upload)
    gallery, table, chosen = app.upload_lora(engine, str(upload), "My Pony", "pony", "a pony",
                                             [str(source.examples[0][0])])
    entry = engine.bank.get("my_pony")
    assert entry.trigger == ["pony"] and entry.examples and entry.lora_path.exists()
    assert len(gallery) == len(engine.bank.entries) and "My Pony" in table
    assert ("My Pony (pony)", "my_pony") in chosen.choices
    with pytest.raises(gr.Error, match="already"):  # the same name twice: refused, nothing written
        before = bank_digest(str(bank))
        app.upload_lora(engine, str(upload), "My Pony", "pony", "", [])
    assert bank_digest(str(bank)) == before


@pytest.mark.slow
def test_study_scores_every_method(engine, keys):
    pytest.importorskip("matplotlib")  # mole_core.evaluate draws its chart with matplotlib
    text, table, chart = app.study(engine, keys, 1, 1, 2, app.new_session(), progress=lambda *a, **k: None)
    assert "###" in text and len(table) >= 4 + len(keys)
    assert isinstance(chart, PIL.Image.Image)
