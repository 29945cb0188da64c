from pathlib import Path

import pytest
import torch

from mole_core.defaults import DEFAULT_BANK, DEFAULT_MODEL
from tests.tiny import build_pipeline, make_bank, make_model_dir


# The models of the tests are tiny: one torch thread per test process. On a shared 2-core machine torch's
# default thread count thrashes (measured 28-70x slower than one thread under load).
torch.set_num_threads(1)


def pytest_addoption(parser):
    # Point the app/browser tests at another model or bank (default: the embedded world or a tiny one).
    parser.addoption("--model", default=None, help="diffusers model folder for the app tests")
    parser.addoption("--bank", default=None, help="LoRA bank folder for the app tests")


@pytest.fixture
def tiny_pipe(tmp_path):
    """A fresh tiny StableDiffusionPipeline (random weights, built from config)."""
    return build_pipeline(tmp_path)


@pytest.fixture(scope="session")
def world_engine():
    """An Engine on the embedded pixel world (skipped where the world is not in the checkout), one for the whole
    run: every call leaves it as it found it (a result depends on the call's arguments alone)."""
    from mole_core.image.engine import Engine
    if not (Path(DEFAULT_MODEL) / "model_index.json").exists():
        pytest.skip("the embedded world is not in this checkout")
    return Engine(DEFAULT_MODEL, DEFAULT_BANK)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """(model folder, bank folder) of the tiny pipeline and bank of tests/tiny.py, under a folder whose name must
    never reach a message (server_secret)."""
    root = tmp_path_factory.mktemp("tiny") / "server_secret"
    model_dir = make_model_dir(root)
    return model_dir, make_bank(root / "bank", model_dir)


@pytest.fixture(scope="module")
def tiny_engine(tiny_world):
    """An Engine on the tiny world, shared by the tests of a module (each leaves it as it found it)."""
    from mole_core.image.engine import Engine
    return Engine(str(tiny_world[0]), str(tiny_world[1]))
