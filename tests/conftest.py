import pytest

from tests.tiny import build_pipeline


@pytest.fixture
def tiny_pipe(tmp_path):
    """A fresh tiny StableDiffusionPipeline (random weights, built from config)."""
    return build_pipeline(tmp_path)
