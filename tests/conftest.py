import pytest
import torch

from tests.tiny import build_pipeline


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
