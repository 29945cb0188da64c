"""The named API endpoints from gradio_client against a locally launched app.

Each `Client` is its own session (its own gr.State): a client can train and then compare with its
mixture, and two clients toggling different experts at the same time get exactly the images each
gets alone (one model queue; every call leaves the shared pipeline as it found it).
"""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gradio_client import Client

import app
from mole_core.engine import Engine
from tests.test_app import SETTINGS, pixels, world_paths


NO_WEIGHTS = {"headers": ["expert", "weight"], "data": []}   # an empty weights table: the bank's defaults


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine: Engine) -> tuple:
    """Start the app for `engine` on a free localhost port: (demo, url)."""
    demo = app.build_demo(engine)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **app.launch_options())
    return demo, url


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """(url, bank keys) of a running app."""
    engine = Engine(*world_paths(request.config, tmp_path_factory))
    demo, url = launch(engine)
    yield url, [e.key for e in engine.bank.entries if not e.error][:2]
    demo.close()


def client(url: str) -> Client:
    return Client(url, verbose=False)


def compare_call(c: Client, keys, methods, seed=SETTINGS["seed"]):
    s = SETTINGS
    return c.predict(keys, s["prompt"], s["negative"], seed, False, s["steps"], s["guidance"], methods,
                     NO_WEIGHTS, 2, True, api_name="/compare")


def toggle_call(c: Client, keys, switches):
    s = SETTINGS
    switches = list(switches) + [True] * (app.MAX_EXPERTS - len(switches))
    return c.predict(keys, s["prompt"], s["negative"], s["seed"], s["steps"], s["guidance"],
                     *switches, *[1.0] * app.MAX_EXPERTS, api_name="/toggle")


def test_endpoints_are_named(served):
    url, _ = served
    names = set(client(url).view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/train", "/compare", "/toggle", "/export"} <= names


def test_compare_returns_labelled_images(served):
    url, keys = served
    gallery, used_seed, notes = compare_call(client(url), keys, ["mole", "linear", "base"])
    assert used_seed == SETTINGS["seed"] and len(gallery) == 3
    captions = [item["caption"] for item in gallery]
    assert captions[0].startswith("MoLE") and all(c.endswith(" s") for c in captions)
    assert all(pixels(item["image"]).size for item in gallery)


def test_compare_refuses_bad_input_with_a_sentence(served):
    url, _ = served
    with pytest.raises(Exception, match="No LoRA is selected"):
        compare_call(client(url), [], ["mole"])


def test_train_then_compare_uses_this_sessions_mixture(served):
    url, keys = served
    trained, other = client(url), client(url)
    status, _, _, mixture_file = trained.predict(keys, "block", 2, 1e-2, 0.5, 0, "sample", api_name="/train")
    assert status.startswith("Trained after 2 steps") and mixture_file
    mine, _, _ = compare_call(trained, keys, ["mole"])
    theirs, _, _ = compare_call(other, keys, ["mole"])
    assert "untrained" not in mine[0]["caption"]
    assert "untrained" in theirs[0]["caption"], "another session must not see this session's mixture"


def test_concurrent_toggles_match_solo_runs(served):
    url, keys = served
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
    url, keys = served
    c = client(url)
    job = c.submit(keys, "block", 500, 1e-2, 0.5, 0, "sample", api_name="/train")
    while not (job.status().code.name == "ITERATING" or job.done()):  # wait for the first step
        time.sleep(0.1)
    c.predict(api_name="/cancel")
    status, _, _, mixture_file = job.result(timeout=300)
    assert status.startswith("Stopped (cancelled) after") and mixture_file
    assert int(status.split(" after ")[1].split()[0]) < 500
