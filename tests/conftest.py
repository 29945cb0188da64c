import pytest

from tests.tiny import build_pipeline


def pytest_addoption(parser):
    # Point the app/browser tests at another model or bank (default: the embedded world or a tiny one).
    parser.addoption("--model", default=None, help="diffusers model folder for the app tests")
    parser.addoption("--bank", default=None, help="LoRA bank folder for the app tests")


@pytest.fixture
def tiny_pipe(tmp_path):
    """A fresh tiny StableDiffusionPipeline (random weights, built from config)."""
    return build_pipeline(tmp_path)
