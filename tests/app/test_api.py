"""The named API endpoints from gradio_client against a locally launched app.

Each `Client` is its own session (its own gr.State): a client can train and then compare with its
mixture, and two clients toggling different experts at the same time get exactly the images each
gets alone (one engine lock; every call leaves the shared pipeline as it found it). A visitor's compare
is served while another visitor trains, and the training goes on with the same result.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gradio_client import Client

from ui import session
from mole_core.image.engine import Engine
from tests.helpers import SETTINGS, distinct_copy, launch, pixels, world_paths

NO_WEIGHTS = {"headers": ["expert", "weight"], "data": []}   # an empty weights table: the bank's defaults


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """(url, bank keys, studio) of a running app."""
    studio = session.Studio(Engine(*world_paths(request.config, tmp_path_factory)),
                        root=tmp_path_factory.mktemp("api_sessions"))
    demo, url = launch(studio)
    yield url, [e.key for e in studio.engine.bank.entries if not e.error][:2], studio
    demo.close()


def client(url: str) -> Client:
    return Client(url, verbose=False)


def compare_call(c: Client, keys, methods, seed=SETTINGS["seed"]):
    s = SETTINGS
    return c.predict(keys, s["prompt"], s["negative"], seed, False, s["steps"], s["guidance"], methods,
                     NO_WEIGHTS, 2, True, 0.5, 1, "block", "sample", api_name="/compare")


def toggle_call(c: Client, keys, switches):
    s = SETTINGS
    switches = list(switches) + [True] * (session.MAX_EXPERTS - len(switches))
    return c.predict(keys, s["prompt"], s["negative"], s["seed"], s["steps"], s["guidance"], "block", "sample",
                     *switches, *[1.0] * session.MAX_EXPERTS, api_name="/toggle")


def train_submit(c: Client, keys, steps, gate="sample"):
    return c.submit(keys, "block", steps, 1e-2, 0.5, 0, gate, api_name="/train")


def test_endpoints_are_named(served):
    url, *_ = served
    names = set(client(url).view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/train", "/compare", "/toggle", "/export", "/add_lora", "/study", "/cancel"} <= names


def test_compare_returns_labelled_images(served):
    url, keys, _ = served
    gallery, used_seed, notes = compare_call(client(url), keys, ["mole", "linear", "base"])
    assert used_seed == SETTINGS["seed"] and len(gallery) == 3
    captions = [item["caption"] for item in gallery]
    assert captions[0].startswith("MoLE") and all(c.endswith(" s") for c in captions)
    assert all(pixels(item["image"]).size for item in gallery)


def test_compare_refuses_bad_input_with_a_sentence(served):
    url, *_ = served
    with pytest.raises(Exception, match="No LoRA is selected"):
        compare_call(client(url), [], ["mole"])


def test_train_then_compare_uses_this_sessions_mixture(served):
    url, keys, _ = served
    trained, other = client(url), client(url)
    status, *_, mixture_file = train_submit(trained, keys, 2).result(timeout=300)
    assert status.startswith("**Trained after 2 steps**") and mixture_file
    mine, _, _ = compare_call(trained, keys, ["mole"])
    theirs, _, _ = compare_call(other, keys, ["mole"])
    assert "untrained" not in mine[0]["caption"]
    assert "untrained" in theirs[0]["caption"], "another session must not see this session's mixture"


def test_concurrent_toggles_match_solo_runs(served):
    url, keys, _ = served
    masks = {"a": [False, True], "b": [True, False]}
    solo = {name: pixels(toggle_call(client(url), keys, mask)[0]) for name, mask in masks.items()}
    assert not np.array_equal(solo["a"], solo["b"])
    clients = {name: client(url) for name in masks}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(toggle_call, clients[name], keys, masks[name]) for name in masks}
        together = {name: pixels(f.result()[0]) for name, f in futures.items()}
    for name in masks:
        assert np.array_equal(together[name], solo[name]), name


def test_cancel_stops_this_sessions_training(served):
    url, keys, _ = served
    c = client(url)
    job = train_submit(c, keys, 400)
    while not (job.status().code.name == "ITERATING" or job.done()):  # wait for the first step
        time.sleep(0.1)
    c.predict(api_name="/cancel")
    status, *_, mixture_file = job.result(timeout=300)
    assert status.startswith("**Stopped (cancelled) after") and mixture_file
    assert int(status.split(" after ")[1].split()[0]) < 400


def test_a_compare_is_served_while_another_visitor_trains(served):
    """Another visitor's compare does not wait for the whole run (the training steps aside between steps);
    the training then goes on to the very same gates as without the interruption."""
    url, keys, studio = served
    steps, engine = 8, studio.engine
    started, sending, answered, stalled = threading.Event(), threading.Event(), threading.Event(), []
    alone = train_submit(client(url), keys, steps).result(timeout=600)
    train = engine.train

    def held(*args, on_step=None, **kwargs):
        """engine.train whose run, until the compare's answer is back, goes past a step only once the compare is
        on its way and someone waits for the model (whom it then lets go first): the answer provably comes
        while the training runs."""
        def step(number, *rest):
            on_step(number, *rest)
            started.set()
            deadline = time.monotonic() + 60
            while not answered.is_set() and not (sending.is_set() and engine._lock.waiting()) \
                    and time.monotonic() < deadline:
                time.sleep(0.001)
            if time.monotonic() >= deadline:
                stalled.append(number)
        return train(*args, on_step=step, **kwargs)

    engine.train = held
    try:
        job = train_submit(client(url), keys, steps)
        assert started.wait(60)
        sending.set()
        gallery, _, _ = compare_call(client(url), keys, ["base"])
        still_training = not job.done()
        answered.set()
        interrupted = job.result(timeout=600)
    finally:
        answered.set()
        del engine.train
    assert gallery and still_training, "the compare came back only after the training ended"
    assert not stalled, f"nobody asked for the model after training step {stalled}"
    assert interrupted[0].startswith(f"**Trained after {steps} steps**")
    from mole_core.mixture import load_mixture
    a, b = load_mixture(alone[-1]), load_mixture(interrupted[-1])
    assert a.gate_state.keys() == b.gate_state.keys()
    assert all(np.array_equal(a.gate_state[k].numpy(), b.gate_state[k].numpy()) for k in a.gate_state)


@pytest.mark.slow
def test_disk_returns_to_the_start_after_uploads_and_exports(tmp_path, request, tmp_path_factory, monkeypatch):
    """20 uploads and 20 exports from two visitors, then their sessions end (idle past the session lifetime):
    the sessions' folders are gone and Gradio's cache holds no more bytes than before (delete_cache).
    The app gets a cache folder of its own: the machine-wide one also grows with every other Gradio app."""
    import shutil
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio_cache"))

    import gradio.utils
    from gradio_client import handle_file
    model, bank = world_paths(request.config, tmp_path_factory)
    shutil.copytree(bank, tmp_path / "bank")
    studio = session.Studio(Engine(model, str(tmp_path / "bank")), root=tmp_path / "sessions")
    demo, url = launch(studio, delete_cache=(1, 1), session_ttl=3)
    cache = Path(gradio.utils.get_upload_folder())

    def used() -> int:       # bytes on disk that this test can grow
        return sum(p.stat().st_size for folder in (cache, tmp_path / "sessions") for p in folder.rglob("*")
                   if p.is_file())
    keys = [e.key for e in studio.engine.bank.entries if not e.error][:2]
    warm = client(url)      # the gallery's cached example images and one export: what any visitor causes once
    warm.predict(keys, "linear", "diffusers", NO_WEIGHTS, 2, True, 0.5, api_name="/export")
    warm.close()
    time.sleep(5)
    before = used()
    source = studio.engine.bank.get(keys[0]).lora_path
    for visitor in range(2):
        c = client(url)
        for i in range(10):
            upload = tmp_path / f"u{visitor}_{i}.safetensors"
            distinct_copy(source, upload, visitor * 10 + i)
            c.predict(handle_file(str(upload)), f"Upload {visitor} {i}", "pony", "", [], api_name="/add_lora")
            c.predict(keys, "linear", "diffusers", NO_WEIGHTS, 2, True, 0.5, api_name="/export")
        c.close()
    assert used() > before + 10 * source.stat().st_size
    deadline = time.time() + 120
    while used() > before and time.time() < deadline:
        time.sleep(1)
    demo.close()
    left = [str(p.relative_to(tmp_path)) for p in (tmp_path / "sessions").rglob("*")]
    assert used() <= before and not left, left


def test_a_study_stops_when_its_visitor_goes(served, monkeypatch):
    """/study is a stream: when its client cancels (or leaves), the study stops at its next image or step and
    the model is free for the next visitor."""
    url, keys, studio = served
    steps = []
    train = studio.engine.train

    def counted(*args, on_step=None, **kwargs):             # count the study's gate-training steps
        def step(*a):
            steps.append(a[0])
            return on_step(*a) if on_step else None
        return train(*args, on_step=step, **kwargs)
    monkeypatch.setattr(studio.engine, "train", counted)
    c = client(url)
    job = c.submit(keys, 1, 1, 400, api_name="/study")   # 2 gate kinds × 400 steps, then images
    while not steps:
        time.sleep(0.01)
    job.cancel()
    gallery, _, _ = compare_call(client(url), keys, ["base"])
    assert gallery
    deadline = time.time() + 120
    while studio.engine._kept._training is not None and time.time() < deadline:
        time.sleep(0.1)
    done = len(steps)
    time.sleep(1)
    assert len(steps) == done < 800, "the study went on training after its visitor left"


def test_nan_and_text_in_number_fields_over_raw_http_get_a_message(served):
    """T6/T13 on the image tabs: raw HTTP (curl) can send NaN, Infinity or text where the page sends numbers;
    each is refused naming the field (Gradio's own preprocess of a Number answered {"error": null})."""
    import json
    import urllib.request
    url, keys, _ = served

    def call(api, data: str) -> str:
        request = urllib.request.Request(f"{url}gradio_api/call/{api}", data=data.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        event = json.loads(urllib.request.urlopen(request, timeout=60).read())["event_id"]
        return urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event}", timeout=300).read().decode()

    k = json.dumps(keys)
    table = json.dumps(NO_WEIGHTS | {"metadata": None})
    for api, data, field in (
            ("compare", f'{k}, "a", "", NaN, false, 2, 2.5, ["base"], {table}, 2, true, 0.5, 1, "block", "sample"',
             "Seed must be a finite number"),
            ("compare", f'{k}, "a", "", 0, false, NaN, 2.5, ["base"], {table}, 2, true, 0.5, 1, "block", "sample"',
             "Denoising steps must be a finite number"),
            ("train", f'{k}, "block", NaN, 0.01, 0.5, 0, "sample"', "Steps must be a finite number"),
            ("train", f'{k}, "block", "5; rm -rf /", 0.01, 0.5, 0, "sample"', "Steps must be a finite number"),
            ("train", f'{k}, "block", 2, Infinity, 0.5, 0, "sample"', "Learning rate must be a finite number"),
            ("study", f'{k}, NaN, 1, 1', "Seeds must be a finite number")):
        reply = call(api, '{"data": [' + data + ']}')
        assert "event: error" in reply and field in reply, (api, data, reply)
