"""ZeroGPU (ui.gpu): with the `spaces` package importable, the app's model-running events run under
`spaces.GPU(duration=...)` with a duration sized from the engine's expected seconds; without it, nothing changes.
A fake `spaces` module in sys.modules stands in for the real one (which only does something on a ZeroGPU Space).
"""
from __future__ import annotations

import sys
import types

import pytest

import app
from ui import compare_tab, session, train_tab
from ui import gpu
from mole_core.image.engine import Engine
from mole_core.mix import Mix
from tests.helpers import world_paths


@pytest.fixture
def fake_spaces(monkeypatch):
    """A `spaces` module whose GPU(duration=...) records (the function, the duration) and marks the wrapper."""
    calls = []

    def GPU(duration=60):
        def decorate(fn):
            def wrapper(*args, **kwargs):
                return fn(*args, **kwargs)
            wrapper.gpu = (fn, duration)
            calls.append((fn, duration))
            return wrapper
        return decorate

    module = types.ModuleType("spaces")
    module.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", module)
    return calls


@pytest.fixture
def no_spaces(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)      # `import spaces` raises ImportError


def test_without_spaces_the_decorator_is_the_identity(no_spaces):
    def job(x):
        return x + 1
    assert gpu.spaces_module() is None
    assert gpu.on_gpu(30)(job) is job and gpu.on_gpu(lambda x: x)(job) is job


def test_with_spaces_the_function_runs_under_spaces_gpu_with_a_fitting_duration(fake_spaces):
    def job(steps, images=1):
        return steps * images
    fixed = gpu.on_gpu(40)(job)
    assert fixed(3, images=2) == 6 and fake_spaces[-1] == (job, gpu.fit_seconds(40)) and fixed.gpu[1] == 70
    sized = gpu.on_gpu(lambda steps, images=1: 2.0 * steps * images)(job)
    assert sized(3, images=2) == 6
    duration = sized.gpu[1]
    assert callable(duration)
    assert duration(10, images=4) == gpu.fit_seconds(80) == 130        # the job's own arguments
    assert duration(1) == gpu.MIN_SECONDS and duration(10_000) == gpu.MAX_SECONDS
    assert gpu.on_gpu(lambda *a: 1 / 0)(job).gpu[1](1) == gpu.MAX_SECONDS   # a failing estimate asks for the most
    assert gpu.fit_seconds(float("nan")) == gpu.MAX_SECONDS


def test_the_apps_model_events_run_under_spaces_gpu(fake_spaces, request, tmp_path_factory):
    engine = Engine(*world_paths(request.config, tmp_path_factory))
    studio = session.Studio(engine, root=tmp_path_factory.mktemp("sessions"))
    app.build_demo(studio)
    wrapped = {fn.func.__name__: duration for fn, duration in fake_spaces}
    assert set(wrapped) == {"train", "compare", "toggle", "study"}
    assert engine._pipe is None, "sizing the GPU time must not load the model at build time"
    keys = ["a", "b"]
    state = session.new_session()
    compare = wrapped["compare"](keys, "p", "", 0, False, 20, 2.5, ["mole", "linear", "composite"], None, 2, True,
                                 0.5, 5, "block", "sample", state)
    mixes = [Mix("mole", keys, gate="sample"), Mix("linear", keys), Mix("composite", keys)]
    assert compare == gpu.fit_seconds(engine.expected_seconds(mixes=mixes, denoise_steps=20))
    train = wrapped["train"](keys, "block", 100, 1e-3, 0.5, 0, "token", state)
    assert train == gpu.fit_seconds(engine.expected_seconds(train_steps=100, gate="token", batch_size=train_tab.TRAIN_BATCH))
    assert wrapped["toggle"](keys, "p", "", 0, 20, 2.5, "block", "sample", state) == \
        gpu.fit_seconds(engine.expected_seconds(mixes=[Mix("mole", keys, gate="sample")], denoise_steps=20))
    assert gpu.MIN_SECONDS <= train <= gpu.MAX_SECONDS


def test_without_spaces_the_app_handlers_are_plain(no_spaces, request, tmp_path_factory):
    studio = session.Studio(Engine(*world_paths(request.config, tmp_path_factory)),
                        root=tmp_path_factory.mktemp("sessions"))
    handler = session.on_model(compare_tab.compare, compare_tab.compare_seconds, studio)
    assert handler.func is compare_tab.compare and handler.args == (studio,)
