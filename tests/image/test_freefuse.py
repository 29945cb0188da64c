"""FreeFuse (mole_core/image/freefuse.py) and regions through the Engine on every family (tiny SD 1.x, SDXL, SD3,
FLUX pipelines from config, the two random LoRAs of test_routing_families with their trigger words):

- one LoRA whose mask covers the image (the only trigger in the prompt) is that LoRA alone;
- a prompt without a trigger is the base model bit for bit;
- the masks of N concepts partition the image (every pixel exactly one concept, none empty);
- the pipeline is left as found: processors and weights, and the base image after a FreeFuse call;
- regions: every region "whole" is the MoLE image bit for bit, a left / right placement changes it;
- a regional pass (mole_core/image/regional.py) covering the whole image is its expert alone, its phrase encoded
  by the pipeline itself; a placement runs one more denoiser call per placed expert and step (FLUX with true CFG
  too: two calls per step, each pass reading the text of its call).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mole_core.image.engine import Engine, Mix
from mole_core.image.freefuse import balanced_argmax, masks_from_masses
from mole_core.image.regional import Pass, conditioning, regional
from tests.image.test_routing_families import ask, family_dir, make_bank, pixels

BOTH = "a catdog on the left and a sks style square"


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"freefuse_{family}")
    model_dir = family_dir(family, root)
    bank = make_bank(root / "bank", model_dir, family)
    return family, Engine(str(model_dir), str(bank))


def test_one_lora_whose_mask_covers_the_image_is_that_lora_alone(setup):
    family, engine = setup
    alone, fused = engine.compare([Mix("single:a"), Mix("freefuse", ("a", "b"))], ask(family, "a catdog square"))
    assert "a 100%" in fused.label and "b 0%" in fused.label
    assert np.abs(pixels(alone.image) - pixels(fused.image)).max() <= 1       # merged vs unmerged: rounding


def test_no_trigger_is_the_base_model_and_the_pipeline_is_left_as_found(setup):
    family, engine = setup
    request = ask(family, "a red circle on the left")
    engine._kept.detach()                                                   # the bare pipeline
    base = engine.generate(Mix("base"), request)
    denoiser = getattr(engine.pipe, engine.family.denoiser)
    processors = {k: type(v) for k, v in denoiser.attn_processors.items()}
    weights = {k: v.clone() for k, v in denoiser.state_dict().items()}
    fused = engine.generate(Mix("freefuse", ("a", "b")), ask(family, BOTH))
    assert np.array_equal(pixels(engine.generate(Mix("freefuse", ("a", "b")), request).image), pixels(base.image))
    assert np.array_equal(pixels(engine.generate(Mix("base"), request).image), pixels(base.image))
    engine._kept.detach()
    assert {k: type(v) for k, v in denoiser.attn_processors.items()} == processors
    assert all(torch.equal(v, weights[k]) for k, v in denoiser.state_dict().items())
    assert "FreeFuse" in fused.label


def test_the_masks_of_n_concepts_partition_the_image(setup):
    family, engine = setup
    from mole_core.image.freefuse import FREEFUSE_MOLE, collect_steps, record_masses
    request = ask(family, BOTH)
    handle = engine._attached(("a", "b"), FREEFUSE_MOLE, engine.bank)
    masses = record_masses(engine.pipe, handle, engine._pipe_call(request, engine._latents(request)),
                           collect_steps(request.steps))
    assert masses and all(m.shape[1] == 2 and m.sum() > 0 for m in masses.values())
    masks = masks_from_masses(masses, torch.tensor([True, True]), engine._latent_grid(request),
                              engine.family.denoiser, engine._patch())
    assert torch.equal(masks.sum(0), torch.ones(masks.shape[1:]))          # every pixel exactly one concept
    assert bool((masks.flatten(1).sum(1) > 0).all())                       # each concept gets some


def test_regions_whole_is_mole_and_a_placement_changes_it(setup):
    family, engine = setup
    request = ask(family, BOTH)
    plain, whole, placed = engine.compare([Mix("mole", ("a", "b")),
                                           Mix("mole", ("a", "b"), regions={"a": "whole", "b": "whole"}),
                                           Mix("mole", ("a", "b"), regions={"a": "left", "b": "right"})], request)
    assert np.array_equal(pixels(plain.image), pixels(whole.image))
    assert not np.array_equal(pixels(plain.image), pixels(placed.image)) and "regions" in placed.label


def test_a_regional_pass_covering_the_image_is_its_expert_alone(setup):
    family, engine = setup
    request = ask(family, BOTH)
    alone = engine.generate(Mix("mole", ("a", "b"), mask={"b": False}), request)
    mole, _ = engine._routable(Mix("mole", ("a", "b")), engine.bank)
    handle = engine._attached(("a", "b"), mole, engine.bank)
    denoiser, latents = getattr(engine.pipe, engine.family.denoiser), engine._latents(request)
    with handle.apart([True, False]):
        texts = conditioning(engine.pipe, denoiser, engine._pipe_call(request, latents))
    whole = Pass([True, False], texts, torch.ones(engine._latent_grid(request)))
    with regional(denoiser, handle, [whole], engine._patch()):
        fused = engine._call_pipe(request, latents)
    assert np.abs(pixels(alone.image) - pixels(fused)).max() <= 1       # explicit vs fused attention: rounding


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_a_placement_runs_one_call_per_placed_expert_and_step(setup, negative):
    family, engine = setup
    request = ask(family, BOTH)
    request.negative, request.true_cfg = negative, 2.0 if negative else 1.0
    denoiser, calls = getattr(engine.pipe, engine.family.denoiser), []
    hook = denoiser.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        plain = engine.generate(Mix("mole", ("a", "b")), request)
        n_plain, calls[:] = len(calls), []
        placed = engine.generate(Mix("mole", ("a", "b"), regions={"a": "left", "b": "right"}), request)
    finally:
        hook.remove()
    per_step = n_plain // request.steps                       # FLUX with a negative prompt: 2
    assert per_step == (2 if family == "flux" and negative else 1)
    assert len(calls) == 2 * per_step + 3 * n_plain          # two phrases' first steps, then 3 calls per call
    assert np.isfinite(pixels(placed.image)).all() and not np.array_equal(pixels(plain.image), pixels(placed.image))


def test_balanced_argmax_balances_and_partitions():
    scores = torch.tensor([[1.0, 0.9, 0.8, 0.7], [0.0, 0.1, 0.2, 0.6]])     # concept 0 wins every pixel alone
    owner = balanced_argmax(scores)
    assert sorted(torch.bincount(owner, minlength=2).tolist()) == [2, 2] and owner[0] == 0 and owner[3] == 1
    masks = masks_from_masses({4: scores.T}, torch.tensor([True, False]), (2, 2), "unet")
    assert masks[0].eq(1).all() and masks[1].eq(0).all()                   # absent concept: empty mask


def test_freefuse_needs_a_trigger_for_every_lora(tmp_path):
    model_dir = family_dir("sd", tmp_path)
    bank = make_bank(tmp_path / "bank", model_dir, "sd", triggers={"a": ["catdog"], "b": []})
    with pytest.raises(ValueError, match="'b' has no trigger word"):
        Engine(str(model_dir), str(bank)).generate(Mix("freefuse", ("a", "b")), ask("sd", BOTH))
