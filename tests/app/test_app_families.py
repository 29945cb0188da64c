"""The app on tiny SDXL, SD3 and FLUX folders: it starts (`build_demo` on an Engine over the folder and a bank of
that family), says which family it loaded, and its `/compare` event returns an image for every method — the
merges, MoLE, LoRA Switch, LoRA Composite, the base and each LoRA alone — all of the model's default size.

The event is called as Gradio calls it: the function `build_demo` registered under api_name "compare" (with the
ZeroGPU wrapper where `spaces` is installed), after its validation step.
"""
from __future__ import annotations

import numpy as np
import pytest

import app
from tests.helpers import event, family_studio
from ui import bank_tab, compare_tab, session
from tests.image.test_engine_families import make_bank
from tests.tiny_families import SIDE, make_family_dir

TITLES = {"sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3", "flux": "FLUX.1"}


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def studio(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"app_{request.param}")
    model_dir = make_family_dir(request.param, root)
    bank = make_bank(root / "bank", model_dir, request.param)
    return request.param, family_studio(request.param, model_dir, bank, tmp_path_factory.mktemp("sessions"))


def test_the_app_starts_on_the_family_and_compare_returns_every_method(studio):
    family, studio = studio
    demo = app.build_demo(studio)
    state = session.new_session()
    *_, model_info = bank_tab.on_load(studio, state)
    assert TITLES[family] in model_info and f"{SIDE}×{SIDE} px" in model_info
    guidance = {"sdxl": 5.0, "sd3": 7.0, "flux": 3.5}[family]             # each pipeline's own __call__ default
    assert f"guidance {guidance:g} (its pipeline's own default)" in model_info
    keys = ["a", "b"]
    methods = [value for _, value in compare_tab.COMPARE_METHODS] + [f"single:{k}" for k in keys]
    args = (keys, "a photo of a", "", 3, False, 2, 3.0, methods, None, 2, True, 0.5, 1, "block", "sample", state)
    gallery, seed, notes, state = event(demo, "compare")(*args)
    assert seed == 3 and len(gallery) == len(methods)
    labels = [caption.rsplit(" · ", 1)[0] for _, caption in gallery]
    assert [m.method for m in state["compared"]["mixes"]] == methods
    images = {m: np.asarray(image, dtype=np.int16) for m, (image, _) in zip(methods, gallery)}
    assert all(image.shape == (SIDE, SIDE, 3) for image in images.values())
    assert "Switch" in labels[methods.index("switch")] and "Composite" in labels[methods.index("composite")]
    for method in methods:
        if method != "base":
            assert not np.array_equal(images[method], images["base"]), method
