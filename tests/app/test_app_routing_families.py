"""The app's Compare and Toggle tabs route on the families the app opens (`--model` folder): on tiny SDXL and
FLUX folders with a bank whose triggers the tokenizers split (tests.image.test_routing_families), the default gate
(routed) gives the base image for a prompt without triggers and another image for a prompt naming one; the
notes and captions say what ran, and a LoRA without a trigger is reported, never silent. Driven through the
handlers the page registers ("compare", "toggle").
"""
from __future__ import annotations

import numpy as np
import pytest

import app
from tests.helpers import event, family_studio
from ui import session
from mole_core.defaults import DEFAULT_GATE
from mole_core.image.engine import Engine
from tests.image.test_routing_families import NAMED, PLAIN, family_dir, make_bank


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def studio(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"app_route_{request.param}")
    model_dir = family_dir(request.param, root)
    bank = make_bank(root / "bank", model_dir, request.param)
    return family_studio(request.param, model_dir, bank, tmp_path_factory.mktemp("sessions"))


def compare(demo, studio, state, prompt):
    args = (["a", "b"], prompt, "", 3, False, 2, 3.0, ["base", "mole"], None, 2, True, 0.5, 1, "block",
            DEFAULT_GATE, state)
    gallery, _, notes, state = event(demo, "compare")(*args)
    (base, _), (mole, caption) = gallery
    return np.asarray(base, dtype=np.int16), np.asarray(mole, dtype=np.int16), caption, notes


def toggle(demo, studio, state, prompt, on=(True, True)):
    switches = list(on) + [True] * (session.MAX_EXPERTS - 2)
    image, caption, _ = event(demo, "toggle")(["a", "b"], prompt, "", 3, 2, 3.0, "block", DEFAULT_GATE, state,
                                              *switches, *[1.0] * session.MAX_EXPERTS)
    return np.asarray(image, dtype=np.int16), caption


def test_compare_and_toggle_route_by_trigger(studio):
    demo, state = app.build_demo(studio), session.new_session()
    base, mole, caption, notes = compare(demo, studio, state, PLAIN)
    assert "trigger-routed" in caption and np.array_equal(mole, base), "no trigger: the base image"
    assert "a prompt without triggers is the base model" in notes
    base_named, mole_named, _, _ = compare(demo, studio, state, NAMED)
    assert not np.array_equal(mole_named, base_named), "a named trigger routes its LoRA in"
    toggled, caption = toggle(demo, studio, state, NAMED)
    assert "trigger-routed" in caption and np.array_equal(toggled, mole_named), "Toggle renders what Compare did"
    off, _ = toggle(demo, studio, state, NAMED, on=(False, True))
    assert np.array_equal(off, base_named), "its expert off, the one named: the base (b's trigger is absent)"
    plain, _ = toggle(demo, studio, state, PLAIN)
    assert np.array_equal(plain, base)


def test_a_lora_without_trigger_is_reported_by_compare_and_toggle(tmp_path):
    """The fallback is visible: Compare's notes carry the engine's sentence, the caption says routing is off."""
    model_dir = family_dir("sdxl", tmp_path)
    bank = make_bank(tmp_path / "bank", model_dir, "sdxl", triggers={"a": ["catdog"], "b": []})
    studio = session.Studio(Engine(str(model_dir), str(bank)), root=tmp_path / "sessions")
    demo, state = app.build_demo(studio), session.new_session()
    _, _, caption, notes = compare(demo, studio, state, NAMED)
    assert "routing off" in caption and "'b' has no trigger word" in notes
    assert "equal weights, the same as the linear merge" in notes
    _, caption = toggle(demo, studio, state, NAMED)
    assert "routing off" in caption and "'b' has no trigger word" in caption
