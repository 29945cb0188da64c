"""Regions in the app, handlers called directly (no server): a region per expert in Toggle experts (a preset or a
drawing), the coloured overlay, Compare's MoLE placed the same way, and the refusals."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

from mole_core.image.engine import Engine
from tests.app.test_app import compare_args, toggle_args
from tests.helpers import pixels, world_paths
from ui import compare_tab, region_ui, session, toggle_tab

M = session.MAX_EXPERTS


@pytest.fixture(scope="module")
def studio(request, tmp_path_factory):
    return session.Studio(Engine(*world_paths(request.config, tmp_path_factory)),
                          root=tmp_path_factory.mktemp("sessions"))


@pytest.fixture(scope="module")
def keys(studio):
    return [entry.key for entry in studio.engine.bank.entries if not entry.error][:2]


def regions(*choices):
    return list(choices) + ["whole"] * (M - len(choices))


def test_toggle_places_experts_and_whole_is_unplaced(studio, keys):
    state = session.new_session()
    plain, _, state = toggle_tab.toggle(studio, *toggle_args(keys, state, [True, True]), *regions())
    whole, _, state = toggle_tab.toggle(studio, *toggle_args(keys, state, [True, True]), *regions("whole", "whole"))
    placed, caption, state = toggle_tab.toggle(studio, *toggle_args(keys, state, [True, True]),
                                               *regions("left", "right"))
    assert np.array_equal(pixels(plain), pixels(whole))
    assert not np.array_equal(pixels(placed), pixels(plain)) and "regions" in caption
    assert {k: r.spec for k, r in state["regions"].items()} == {keys[0]: "left", keys[1]: "right"}
    image, legend, state = region_ui.show(studio, keys, state, *regions("left", "right"))
    tinted = np.asarray(image, dtype=int)
    w = tinted.shape[1]
    assert image.size == placed.size and "left" in legend and "right" in legend
    assert tinted[:, : w // 4, 0].mean() > tinted[:, : w // 4, 2].mean()         # red tint on the left
    assert tinted[:, 3 * w // 4:, 2].mean() > tinted[:, 3 * w // 4:, 0].mean()   # blue tint on the right
    # Compare's MoLE renders with the same placement
    gallery, *_ = compare_tab.compare(studio, *compare_args(keys, ["mole"], state, gate="sample"))
    assert "regions" in gallery[0][1]


def test_a_drawn_region(studio, keys):
    state = session.new_session()
    with pytest.raises(gr.Error, match=f"No region is drawn for {keys[0]}"):
        toggle_tab.toggle(studio, *toggle_args(keys, state, [True, True]), *regions("drawn"))
    with pytest.raises(gr.Error, match="The pad is empty"):
        region_ui.use_drawing(keys, keys[0], {"background": None, "layers": [np.zeros((8, 8, 4), np.uint8)],
                                              "composite": None}, state)
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[:, :4] = 255                                                        # strokes on the left half
    state, *radios = region_ui.use_drawing(keys, keys[0], {"background": None, "layers": [layer],
                                                           "composite": None}, state)
    assert radios[0].value == "drawn" and state["drawn"][keys[0]][:, :4].min() == 1
    drawn, _, state = toggle_tab.toggle(studio, *toggle_args(keys, state, [True, True]), *regions("drawn"))
    left, _, _ = toggle_tab.toggle(studio, *toggle_args(keys, session.new_session(), [True, True]), *regions("left"))
    assert np.array_equal(pixels(drawn), pixels(left)), "a drawing of the left half == the preset 'left'"

