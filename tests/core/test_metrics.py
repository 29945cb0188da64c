"""Metrics: the interval helper, the plateau finder, and CLIP alignments on a tiny CLIP built from config.
(The world oracle's scorer is tested with the world, in tests/test_world.py.)"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mole_core.metrics import ClipScorer, Target, mean_ci, mentions, plateau_step


def test_mean_ci_ignores_nan_and_matches_formula():
    mean, half, n = mean_ci([1.0, 0.0, math.nan, 1.0, 0.0])
    assert n == 4 and mean == 0.5
    assert half == pytest.approx(1.96 * np.std([1, 0, 1, 0], ddof=1) / 2)
    assert math.isnan(mean_ci([math.nan])[0]) and mean_ci([])[2] == 0


def test_plateau_step_finds_ninety_percent_of_the_drop():
    losses = [1.0] * 5 + [0.0] * 45          # a step down at step 5, window 5
    assert plateau_step(losses) == 9         # first window whose mean is <= 0.1 is steps 5..9
    assert plateau_step([1.0] * 10) == 0     # no drop: plateau from the start
    assert plateau_step(np.linspace(0.1, 0.4, 20)) == 0            # a rise: 0 too (the caller says it rose)
    decay = np.exp(-np.arange(200) / 20.0)
    step = plateau_step(decay, window=1)
    assert decay[step] <= 1 - 0.9 * (1 - decay[-1]) < decay[step - 1]
    with pytest.raises(ValueError, match="at least one loss"):
        plateau_step([])


def test_mentions_is_whole_word():
    assert mentions("a zwx on the left", "zwx") and not mentions("a zwxy on the left", "zwx")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIPModel + word-level tokenizer + image processor saved like a real CLIP folder."""
    from tests.helpers import build_tiny_clip
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_text_alignment_equals_the_models_own_logits(tiny_clip):
    scorer = ClipScorer.load(tiny_clip, device="cpu")
    images, captions = random_images(3), ["a red circle", "a sks dog on the left", "blue square"]
    text = scorer.score(images, captions, [])["clip_text"]
    # CLIPModel's logits_per_image are logit_scale * cos(image, text): undo the scale, read the diagonal.
    pixels = scorer.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           pixel_values=pixels)
    expected = (out.logits_per_image / scorer.model.logit_scale.exp()).diagonal().detach().numpy()
    np.testing.assert_allclose(text, expected, atol=1e-5)
    assert np.all(np.abs(text) <= 1 + 1e-6)


def test_clip_image_alignment_only_where_the_caption_asks(tiny_clip):
    scorer = ClipScorer.load(tiny_clip, device="cpu")
    images = random_images(3, seed=1)
    dog = Target("dog", "sks", references=[images[1]])
    scores = scorer.score(images, ["a red circle", "a sks dog", "a sks photo"], [dog])["clip_image:dog"]
    assert math.isnan(scores[0])
    assert scores[1] == pytest.approx(1.0, abs=1e-5)       # the reference itself
    assert -1 <= scores[2] < 1
    np.testing.assert_allclose(scorer.preservation(images, images), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="needs reference images"):
        scorer.score(images[:1], ["a sks dog"], [Target("cat", "sks")])


def test_clip_load_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(ValueError, match="No CLIP model at"):
        ClipScorer.load(tmp_path)
