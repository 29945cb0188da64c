"""The app's handlers, called directly (no server): validation, compare, toggle, train, inspect, export,
uploads into a session's own bank, what a session leaves on disk.

The world they run on is a tiny pipeline and bank built in a temp folder, or a real one given with
`--model DIR --bank DIR` (tests/conftest.py registers those options) or the environment variables
MOLE_APP_MODEL / MOLE_APP_BANK, so the same tests also run on the embedded default.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import PIL.Image
import pytest

import app
from ui import bank_tab, compare_tab, evaluate_tab, export_tab, inspect_tab, session, toggle_tab, train_tab
from mole_core.image.engine import Engine
from tests.helpers import SETTINGS, bank_digest, distinct_copy, pixels, world_paths


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return world_paths(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def studio(world, tmp_path_factory):
    return session.Studio(Engine(*world), root=tmp_path_factory.mktemp("sessions"))


@pytest.fixture(scope="module")
def keys(studio):
    return [entry.key for entry in studio.engine.bank.entries if not entry.error][:2]


def compare_args(keys, methods, state, seed=SETTINGS["seed"], randomise=False, weights=None, rank=2,
                 normalize=True, density=0.5, switch_every=1, granularity="block", gate="sample"):
    s = SETTINGS
    return (keys, s["prompt"], s["negative"], seed, randomise, s["steps"], s["guidance"], methods, weights,
            rank, normalize, density, switch_every, granularity, gate, state)


def toggle_args(keys, state, switches, strengths=None, granularity="block", gate="sample"):
    s = SETTINGS
    switches = list(switches) + [True] * (session.MAX_EXPERTS - len(switches))
    strengths = list(strengths or []) + [1.0] * (session.MAX_EXPERTS - len(strengths or []))
    return (keys, s["prompt"], s["negative"], s["seed"], s["steps"], s["guidance"], granularity, gate, state,
            *switches, *strengths)


def copy_world(world, tmp_path) -> tuple[str, str]:
    bank = tmp_path / "bank"
    shutil.copytree(world[1], bank)
    return world[0], str(bank)


# ---- building the page ----------------------------------------------------------------------------
def test_build_demo_loads_no_model(world):
    engine = Engine(*world)
    demo = app.build_demo(engine)
    assert isinstance(demo, gr.Blocks)
    assert engine._pipe is None, "building the page must not load the pipeline"
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"train", "compare", "toggle", "export", "add_lora", "study", "cancel"} <= names


def test_bank_views_show_every_lora(studio):
    bank = studio.engine.bank
    gallery, table = bank_tab.bank_gallery(bank), bank_tab.bank_table(studio, bank)
    assert len(gallery) == len(bank.entries)
    for (image, caption), entry in zip(gallery, bank.entries):
        assert Path(image).exists() and entry.name in caption
        assert entry.name in table and entry.description in table


def test_entries_without_examples_or_manifest_never_break_the_page(world, tmp_path):
    """An upload without example images, a LoRA without its manifest (a crash mid-upload) and a manifest
    without its LoRA: the page builds, the gallery shows placeholders, broken entries say why."""
    model, bank = copy_world(world, tmp_path)
    first = sorted(Path(bank).glob("*.safetensors"))[0]
    shutil.copy(first, Path(bank) / "bare.safetensors")                 # no manifest
    manifest = json.loads(first.with_suffix(".json").read_text())
    (Path(bank) / "noexamples.json").write_text(json.dumps({**manifest, "examples": []}))
    shutil.copy(first, Path(bank) / "noexamples.safetensors")
    (Path(bank) / "orphan.json").write_text(json.dumps(manifest))          # no LoRA file
    studio = session.Studio(Engine(model, bank), root=tmp_path / "sessions")
    demo = app.build_demo(studio)                                         # start-up works
    gallery = bank_tab.bank_gallery(studio.engine.bank)
    by_key = dict(zip(studio.engine.bank.keys(), gallery))
    assert isinstance(by_key["noexamples"][0], PIL.Image.Image)           # a placeholder, never None
    assert by_key["bare"][1].endswith("broken") and by_key["orphan"][1].endswith("broken")
    # the page's postprocessing accepts every item (this is what used to raise "Cannot process type")
    gallery_component = next(b for b in demo.blocks.values() if isinstance(b, gr.Gallery))
    gallery_component.postprocess(gallery)
    table = bank_tab.bank_table(studio, studio.engine.bank)
    assert "no manifest bare.json" in table and str(tmp_path) not in table
    assert "noexamples" in dict(bank_tab.bank_choices(studio.engine.bank)).values()
    assert "bare" not in dict(bank_tab.bank_choices(studio.engine.bank)).values()


def test_selection_drives_methods_weights_and_rows(studio, keys):
    methods, weights, *rest = compare_tab.on_selection(studio, keys, ["mole", "single:nope"], session.new_session())
    values = [value for _, value in methods.choices]
    assert values[:9] == ["mole", "linear", "svd", "ties", "dare", "switch", "composite", "freefuse", "base"]
    assert values[9:] == [f"single:{k}" for k in keys]
    assert methods.value == ["mole"]                                      # a vanished choice is dropped
    assert list(weights["expert"]) == keys
    rows, switches = rest[:session.MAX_EXPERTS], rest[session.MAX_EXPERTS:2 * session.MAX_EXPERTS]
    assert [r.visible for r in rows] == [i < len(keys) for i in range(session.MAX_EXPERTS)]
    assert [s.label for s in switches[:len(keys)]] == [studio.engine.bank.get(k).name for k in keys]


def test_caption_from_the_chosen_loras_is_grammatical(studio, keys):
    bank = studio.engine.bank
    triggers = [bank.get(k).trigger[0] for k in keys]
    assert compare_tab.insert_triggers(studio, keys, session.new_session()) == \
        f"a {triggers[0]} on the left and a {triggers[1]} on the right"
    assert compare_tab.insert_triggers(studio, keys[:1], session.new_session()) == f"a {triggers[0]} in the center"
    with pytest.raises(gr.Error, match="No LoRA is selected"):
        compare_tab.insert_triggers(studio, [], session.new_session())
    assert compare_tab.prompt_examples(bank)[0].startswith("a ")


# ---- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(methods=[]), "No method is ticked"),
    (dict(keys=[]), "No LoRA is selected"),
    (dict(steps=0), "Steps must be"),
    (dict(steps=float("nan")), "Denoising steps must be a finite number"),
    (dict(guidance=99.0), "Guidance must be"),
    (dict(seed=2**64), "seed must be a whole number from 0"),
    (dict(keys=["no-such-lora"]), "Unknown LoRA"),
    (dict(weights=pd.DataFrame({"expert": ["dog"], "weight": [float("nan")]})), "must be a finite number"),
    (dict(density=0.0), "density must be above 0"),
])
def test_compare_refuses_bad_input_with_a_sentence(studio, keys, change, message):
    args = dict(keys=keys, prompt="a dog", negative="", seed=0, randomise=False, steps=3, guidance=4.0,
                methods=["mole", "linear", "ties"], weights=None, rank=2, normalize=True, density=0.5,
                switch_every=2, granularity="block", gate="sample", state=session.new_session()) | change
    if "weights" in change:
        args["weights"] = pd.DataFrame({"expert": [keys[0]], "weight": [float("nan")]})
    with pytest.raises(gr.Error, match=message):
        compare_tab.compare(studio, **args)


@pytest.mark.parametrize("change, message", [
    (dict(keys=["x"]), "at least two LoRAs"),
    (dict(granularity="pixel"), "granularity"),
    (dict(lr=float("nan")), "Learning rate must be a finite number"),
    (dict(lr=float("inf")), "Learning rate must be a finite number"),
    (dict(alpha=float("nan")), "Balance α must be a finite number"),
    (dict(alpha=-1.0), "Balance α must be between 0"),
    (dict(steps=10**9), "Training steps must be a whole number between 1 and"),
])
def test_check_train_refuses_bad_input(studio, keys, change, message):
    args = dict(keys=keys, granularity="block", steps=2, lr=1e-3, alpha=0.5, seed=0, gate="sample",
                state=session.new_session()) | change
    with pytest.raises(gr.Error, match=message):
        train_tab.check_train(studio, **args)


def test_long_prompt_is_warned_not_silently_cut(studio, keys):
    long_prompt = " ".join(["a red circle on the left and a blue square on the right"] * 20)
    args = list(compare_args(keys, ["base"], session.new_session()))
    args[1] = long_prompt
    _, _, notes, _ = compare_tab.compare(studio, *args)      # the engine checks once; warnings come back
    assert "words are cut" in notes and "the right" in notes.split("words are cut")[1]


# ---- compare, toggle, inspect ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def compared(studio, keys):
    """One comparison of every kind of method, shared by the tests below: (methods, outputs, state)."""
    methods = ["mole", "linear", "svd", "ties", "dare", "switch", "composite", "base", f"single:{keys[0]}"]
    state = session.new_session()
    return methods, compare_tab.compare(studio, *compare_args(keys, methods, state)), state


def test_compare_renders_each_method_labelled_with_its_time(studio, keys, compared):
    methods, (gallery, used_seed, notes, state), _ = compared
    assert len(gallery) == len(methods) and used_seed == SETTINGS["seed"]
    labels = [caption.rsplit(" · ", 1)[0] for _, caption in gallery]
    for image, caption in gallery:
        label, seconds = caption.rsplit(" · ", 1)
        assert label and seconds.endswith(" s") and float(seconds[:-2]) > 0
        assert image.size == gallery[0][0].size
    assert labels[0].startswith("MoLE (block") and "Composite (2× cost)" in labels[6]
    assert "untrained" in notes
    assert state["gates"] and [m.method for m in state["compared"]["mixes"]] == methods
    # randomise picks a seed and reports it
    _, random_seed, _, _ = compare_tab.compare(studio, *compare_args(keys, ["base"], session.new_session(), randomise=True))
    assert isinstance(random_seed, int) and random_seed >= 0


def test_toggle_rerenders_mole_with_experts_off(studio, keys, compared):
    _, (gallery, *_), _ = compared
    state = session.new_session()
    all_on, caption, state = toggle_tab.toggle(studio, *toggle_args(keys, state, [True, True]))
    assert np.array_equal(pixels(all_on), pixels(gallery[0][0])), "all experts on == the compared MoLE image"
    assert SETTINGS["prompt"] in caption and f"seed {SETTINGS['seed']}" in caption
    one_off, caption, state = toggle_tab.toggle(studio, *toggle_args(keys, state, [False, True]))
    assert not np.array_equal(pixels(one_off), pixels(all_on)) and f"experts on: {keys[1]}" in caption
    none_on, _, state = toggle_tab.toggle(studio, *toggle_args(keys, state, [False, False]))
    assert np.array_equal(pixels(none_on), pixels(gallery[7][0])), "every expert off == the base model"
    weaker, caption, _ = toggle_tab.toggle(studio, *toggle_args(keys, state, [True, True], [0.3, 1.0]))
    assert not np.array_equal(pixels(weaker), pixels(all_on)) and f"{keys[0]} ×0.3" in caption
    with pytest.raises(gr.Error, match="strength"):
        toggle_tab.toggle(studio, *toggle_args(keys, state, [True, True], [float("nan"), 1.0]))


def test_untrained_mole_follows_the_form_not_another_session(studio, keys):
    """The attachment is keyed by what the Mix asks for: a 'layer' MoLE after a 'block' one is 'layer'."""
    block, *_ = compare_tab.compare(studio, *compare_args(keys, ["mole"], session.new_session(), granularity="block"))
    layer, *_ = compare_tab.compare(studio, *compare_args(keys, ["mole"], session.new_session(), granularity="layer"))
    assert block[0][1].startswith("MoLE (block") and layer[0][1].startswith("MoLE (layer")


def test_show_gates_heatmap_chart_and_csv(studio, keys, compared):
    _, _, state = compared
    heatmap, per_step, csv, _ = inspect_tab.show_gates(studio, state)
    frame = pd.DataFrame(state["gates"])
    groups = frame["group"].nunique()
    assert isinstance(heatmap, PIL.Image.Image) and heatmap.height > groups * 10
    assert set(per_step["expert"]) == set(keys)
    assert len(per_step) == frame["step"].nunique() * len(keys)
    written = pd.read_csv(csv)
    assert list(written.columns) == ["group", "step", "sample", "expert", "weight"]
    assert len(written) == len(frame)
    assert inspect_tab.show_gates(studio, session.new_session())[0] is None


# ---- train, cancel, mixture round trip ------------------------------------------------------------
def run_training(studio, keys, state, steps=3, cancel_after=None, gate="sample"):
    updates = []
    for update in train_tab.train(studio, keys, "block", steps, 1e-2, 0.5, 0, gate, state,
                            progress=lambda *a, **k: None):
        updates.append(update)
        if cancel_after is not None and len(updates) == cancel_after:
            train_tab.cancel(state)
    return updates


def test_train_streams_loss_and_keeps_the_mixture(studio, keys):
    state = session.new_session()
    updates = run_training(studio, keys, state, steps=4)
    assert len(updates) == 5  # one per step, then the finished mixture
    *_, (state, status, task, balance, gates, mixture_file) = updates
    assert status.startswith("**Trained after 4 steps**") and "Mean gates" in status
    assert "Task (denoising) loss, mean of the first 1 vs last 1 steps" in status
    assert set(task["term"]) == {"task (this step)", "task (mean of last 10)"} and set(balance["term"]) == {"balance"}
    assert list(task[task["term"] == "task (this step)"]["step"]) == [1, 2, 3, 4]
    assert set(gates["expert"]) == set(keys) and len(gates) == 4 * len(keys)
    assert Path(mixture_file).exists() and list(state["mixture"].names) == keys
    gallery, _, notes, state = compare_tab.compare(studio, *compare_args(keys, ["mole"], state))
    assert "untrained" not in gallery[0][1] and notes == ""
    assert "load_mixture('mixture.safetensors')" in export_tab.snippet(studio, state)
    # the downloaded file loads back into a fresh session and gives the same MoLE image
    fresh = session.new_session()
    fresh, chosen, message = train_tab.load_mixture_upload(studio, mixture_file, fresh)
    assert chosen == keys and "block" in message
    reloaded, *_ = compare_tab.compare(studio, *compare_args(keys, ["mole"], fresh))
    assert np.array_equal(pixels(reloaded[0][0]), pixels(gallery[0][0]))


def test_cancel_stops_training_early(studio, keys):
    state = session.new_session()
    updates = run_training(studio, keys, state, steps=50, cancel_after=1)
    *_, (state, status, task, _, _, mixture_file) = updates
    assert status.startswith("**Stopped") and task["step"].max() < 50
    assert state["mixture"] is not None and Path(mixture_file).exists()


def test_training_states_its_expected_duration_for_the_selection(studio):
    text = train_tab.train_estimate(studio, ["a", "b"], 60, "token")
    seconds = studio.engine.expected_seconds(train_steps=60, gate="token", batch_size=train_tab.TRAIN_BATCH)
    assert text.startswith(f"Expected: about {train_tab.duration(seconds)} on this server (60 steps, 2 LoRAs; ")
    assert studio.engine.costs.source in text and seconds > 0
    four = studio.engine.expected_seconds(train_steps=60, gate="token", batch_size=train_tab.TRAIN_BATCH, experts=4)
    assert four > seconds                                  # more LoRAs, a longer run
    assert "4 LoRAs" in train_tab.train_estimate(studio, ["a", "b", "c", "d"], 60, "token")


@pytest.mark.parametrize("bad, message", [
    (b"not a safetensors file", "not a readable .safetensors file"),
])
def test_a_bad_mixture_is_refused_at_load_with_its_name(studio, tmp_path, bad, message):
    path = tmp_path / "my_mix.safetensors"
    path.write_bytes(bad)
    with pytest.raises(gr.Error, match=message) as err:
        train_tab.load_mixture_upload(studio, str(path), session.new_session())
    assert "my_mix.safetensors" in str(err.value) and str(tmp_path) not in str(err.value)


# ---- export, snippet, upload ----------------------------------------------------------------------
@pytest.mark.parametrize("method, fmt", [("linear", "diffusers"), ("svd", "kohya"), ("ties", "diffusers")])
def test_export_writes_a_lora_the_model_accepts(studio, world, keys, method, fmt):
    from mole_core.image.lora_files import load_lora, validate_lora
    path, _ = export_tab.export(studio, keys, method, fmt, None, 2, True, 0.5, session.new_session())
    lora = load_lora(path)
    validate_lora(lora, Engine(*world).components)  # a fresh model: no MoLE wrappers attached
    assert lora.format == fmt and lora.modules
    with pytest.raises(gr.Error, match="No LoRA is selected"):
        export_tab.export(studio, [], method, fmt, None, 2, True, 0.5, session.new_session())


def test_snippet_reproduces_the_last_comparison(studio, keys, compared):
    with pytest.raises(gr.Error, match="run a comparison"):
        export_tab.snippet(studio, session.new_session())
    methods, _, state = compared
    code = export_tab.snippet(studio, state)
    compile(code, "snippet", "exec")
    assert "engine.compare(mixes, request)" in code and f"Mix('ties', {tuple(keys)!r}" in code
    assert str(Path(studio.engine.bank.folder).parent) not in code, "no server folder in the snippet"


@pytest.mark.slow
def test_snippet_run_gives_the_same_images(studio, compared, tmp_path, monkeypatch):
    methods, (gallery, *_), state = compared
    code = export_tab.snippet(studio, state)
    engine = studio.engine
    code = code.replace(f"Engine({Path(engine.model_id).name!r}, {engine.bank.folder.name!r})",
                        f"Engine({engine.model_id!r}, {str(engine.bank.folder)!r})")   # where the files lie here
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "snippet", "exec"), {})
    for method, (image, _) in zip(methods, gallery):
        assert np.array_equal(pixels(tmp_path / (method.replace(":", "_") + ".png")), pixels(image)), method


def test_upload_of_a_bad_lora_changes_nothing_on_disk(studio, world, tmp_path):
    before = bank_digest(world[1])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    with pytest.raises(gr.Error) as err:
        bank_tab.upload_lora(studio, str(broken), "Broken", "zzz", "", [], session.new_session())
    assert "broken.safetensors: not a readable" in str(err.value) and str(tmp_path) not in str(err.value)
    not_lora = tmp_path / "notes.txt"
    not_lora.write_text("hello")
    with pytest.raises(gr.Error, match="not a .safetensors file"):
        bank_tab.upload_lora(studio, str(not_lora), "Notes", "zzz", "", [], session.new_session())
    with pytest.raises(gr.Error, match="trigger word is empty"):
        bank_tab.upload_lora(studio, str(broken), "Broken", " ", "", [], session.new_session())
    assert bank_digest(world[1]) == before


def test_upload_stays_in_the_uploaders_session_and_goes_with_it(world, keys, tmp_path):
    """Default (a public Space): the upload joins only this session's bank; the shared bank folder is
    untouched; another session does not see it; when the session ends its folder is gone."""
    model, bank = copy_world(world, tmp_path)
    studio = session.Studio(Engine(model, bank), root=tmp_path / "sessions")
    before = bank_digest(bank)
    source = studio.engine.bank.get(keys[0])
    upload = tmp_path / "upload.safetensors"
    distinct_copy(source.lora_path, upload)
    mine, theirs = session.new_session(), session.new_session()
    gallery, table, chosen, mine = bank_tab.upload_lora(studio, str(upload), "My Pony", "pony", "a pony", [], mine)
    assert ("My Pony (pony)", "my_pony") in chosen.choices and isinstance(gallery[-1][0], PIL.Image.Image)
    assert bank_digest(bank) == before, "the shared bank folder is not written"
    manifest = json.loads(next((tmp_path / "sessions").rglob("my_pony.json")).read_text())
    assert manifest["base_model"] == Path(model).name, "a portable model name, not a server path"
    assert "my_pony" in session.bank_of(studio, mine).keys() and "my_pony" not in session.bank_of(studio, theirs).keys()
    gallery, _, _, _ = compare_tab.compare(studio, *compare_args([keys[1], "my_pony"], ["linear"], mine))
    with pytest.raises(gr.Error, match="Unknown LoRA 'my_pony'"):
        compare_tab.compare(studio, *compare_args([keys[1], "my_pony"], ["linear"], theirs))
    with pytest.raises(gr.Error, match="already has an entry"):
        bank_tab.upload_lora(studio, str(upload), "My Pony", "pony", "", [], mine)
    session.end_session(studio, mine)
    assert not any((tmp_path / "sessions").iterdir()), "the session folder is removed"


def test_writable_bank_upload_is_seen_by_every_session(world, keys, tmp_path):
    model, bank = copy_world(world, tmp_path)
    studio = session.Studio(Engine(model, bank), writable_bank=True, root=tmp_path / "sessions")
    source = studio.engine.bank.get(keys[0])
    upload = tmp_path / "upload.safetensors"
    distinct_copy(source.lora_path, upload)
    bank_tab.upload_lora(studio, str(upload), "My Pony", "pony", "a pony", [str(source.examples[0][0])],
                    session.new_session())
    assert (Path(bank) / "my_pony.json").exists()
    gallery, _, chosen, _, model = bank_tab.on_load(studio, session.new_session())     # another visitor's page load
    assert "Stable Diffusion 1.x/2.x" in model and "px by default" in model
    assert ("My Pony (pony)", "my_pony") in chosen.choices


def test_a_session_leaves_nothing_on_disk(world, keys, tmp_path):
    """20 uploads and 20 exports in one session, then the session ends: the server's session folder is
    back to empty and the bank folder unchanged."""
    model, bank = copy_world(world, tmp_path)
    studio = session.Studio(Engine(model, bank), root=tmp_path / "sessions")
    before = bank_digest(bank)
    source = studio.engine.bank.get(keys[0])
    state = session.new_session()
    for i in range(20):
        upload = tmp_path / f"u{i}.safetensors"
        distinct_copy(source.lora_path, upload, i)
        *_, state = bank_tab.upload_lora(studio, str(upload), f"Upload {i}", "pony", "", [], state)
        export_tab.export(studio, keys, "linear", "diffusers", None, 2, True, 0.5, state)
    files = [p for p in (tmp_path / "sessions").rglob("*") if p.is_file()]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 20 + 1   # the uploads and the latest export
    session.end_session(studio, state)
    assert not any((tmp_path / "sessions").iterdir())
    assert bank_digest(bank) == before


def test_messages_never_show_server_folders(studio, tmp_path):
    text = session.public_message(studio, f"{studio.engine.bank.folder}/face.json: bad; {studio.root}/x/y/mix.safetensors: bad")
    assert str(studio.engine.bank.folder) not in text and str(studio.root) not in text
    assert "face.json: bad" in text and "mix.safetensors: bad" in text


def test_study_refuses_counts_above_the_servers_limits(studio, keys):
    limits = studio.engine.limits
    with pytest.raises(gr.Error, match="Seeds must be between 1 and"):
        next(evaluate_tab.study(studio, keys, limits.study_seeds + 1, 1, 1, session.new_session(),
                       progress=lambda *a, **k: None))
    with pytest.raises(gr.Error, match="Gate-training steps must be between 1 and"):
        next(evaluate_tab.study(studio, keys, 1, 1, 10**6, session.new_session(), progress=lambda *a, **k: None))


@pytest.mark.slow
def test_study_scores_every_method(studio, keys):
    pytest.importorskip("matplotlib")  # mole_core.studies.evaluate draws its chart with matplotlib
    *_, (text, table, chart) = evaluate_tab.study(studio, keys, 1, 1, 2, session.new_session(), progress=lambda *a, **k: None)
    assert "###" in text and len(table) >= 4 + len(keys)
    assert isinstance(chart, PIL.Image.Image)


def test_the_same_file_twice_under_another_name_is_refused(world, keys, tmp_path):
    """A byte-identical copy of a bank LoRA (or of this session's own upload) is refused, naming the entry
    that holds it; nothing is written."""
    model, bank = copy_world(world, tmp_path)
    studio = session.Studio(Engine(model, bank), root=tmp_path / "sessions")
    source = studio.engine.bank.get(keys[0])
    same = tmp_path / "renamed.safetensors"
    shutil.copy(source.lora_path, same)
    state = session.new_session()
    with pytest.raises(gr.Error, match=rf"renamed.safetensors is already in the bank as '{source.name}'"):
        bank_tab.upload_lora(studio, str(same), "Another name", "xyz", "", [], state)
    mine = distinct_copy(source.lora_path, tmp_path / "mine.safetensors")
    *_, state = bank_tab.upload_lora(studio, str(mine), "Mine", "xyz", "", [], state)
    again = tmp_path / "mine_again.safetensors"
    shutil.copy(mine, again)
    with pytest.raises(gr.Error, match="already in the bank as 'Mine'"):
        bank_tab.upload_lora(studio, str(again), "Mine again", "xyz", "", [], state)


@pytest.mark.parametrize("side, k", [(16, 16), (32, 8), (48, 5), (64, 4), (256, 1), (512, 1), (1024, 1)])
def test_compare_shows_images_at_a_whole_multiple_of_their_size(side, k):
    """Up to 256 px an image is enlarged by the whole factor that fits 256 px (nearest-neighbour), from there
    shown at its size; the CSS sizes each image to side·k and puts its caption below it (the browser test
    measures it on the page)."""
    assert compare_tab.display_scale(side, side) == k
    css = compare_tab.display_css(side, side)
    assert f"width: {side * k}px !important" in css and "image-rendering: pixelated" in css
    assert "position: static" in css                         # the caption below the image, not over it
