"""The image engine keeps one MoLE attachment between calls (mole_core.attach.KeptAttachment): an untrained MoLE
gets the granularity it asks for whatever ran before it, and a mixture is checked against the model it was
trained on even after a good one was checked (the check is cached per file state, not per mixture)."""
from __future__ import annotations

import dataclasses

import pytest

from mole_core.attach import MoleConfig
from mole_core.image.engine import Engine, GenerateRequest, Mix
from mole_core.mixture import MixtureError
from mole_core.train import TrainConfig
from tests.tiny import BLOCK, UP

REQUEST = GenerateRequest(prompt="a photo of sks dog", negative="blue", seed=3, steps=2, guidance=4.0)
KEYS = ("dog", "cat")


@pytest.fixture(scope="module")
def mixture(tiny_engine):
    """Gates trained on the tiny model (its model_name is the folder name, 'model')."""
    return tiny_engine.train(list(KEYS), MoleConfig(), TrainConfig(steps=2, batch_size=1, lr=0.05, seed=0))


def test_mixture_of_another_model_is_refused_even_after_a_good_one_was_checked(tiny_engine, mixture):
    assert mixture.meta["model_id"] == tiny_engine.model_name == "model"
    assert tiny_engine.check([Mix("mole", mixture=mixture)], REQUEST) == []             # checked once, cached
    elsewhere = dataclasses.replace(mixture, meta={**mixture.meta, "model_id": "x"})   # same LoRA files
    with pytest.raises(MixtureError, match="was trained on the model 'x', not 'model'"):
        tiny_engine.check([Mix("mole", mixture=elsewhere)], REQUEST)
    with pytest.raises(MixtureError, match="was trained on the model 'x', not 'model'"):
        tiny_engine.generate(Mix("mole", mixture=elsewhere), REQUEST)


# ---- the MoLE attachment is keyed by what the Mix asks for ---------------------------------------------------

def _groups(result) -> set[str]:
    return {r["group"] for r in result.gates}


def test_untrained_mole_gets_the_granularity_it_asks_for(tiny_engine, tiny_world, mixture):
    block = tiny_engine.generate(Mix("mole", KEYS, granularity="block"), REQUEST)
    layer = tiny_engine.generate(Mix("mole", KEYS, granularity="layer"), REQUEST)
    fresh = Engine(str(tiny_world[0]), str(tiny_world[1])).generate(Mix("mole", KEYS, granularity="layer"), REQUEST)
    assert block.label == "MoLE (block, 2 experts, untrained)"
    assert layer.label == "MoLE (layer, 2 experts, untrained)"
    layers = {f"{BLOCK}.attn1", f"{BLOCK}.attn2", f"{BLOCK}.ff", f"{UP}.attn1", f"{UP}.attn2", f"{UP}.ff"}
    assert _groups(block) == {"unet.down_blocks.0.attentions.0", "unet.up_blocks.1.attentions.0"}
    assert _groups(layer) == _groups(fresh) == layers
    assert {round(r["weight"], 6) for r in layer.gates} == {0.5}
    # a trained mixture in between: the next untrained call neither keeps its gates nor its granularity
    trained = tiny_engine.generate(Mix("mole", mixture=mixture), REQUEST)
    assert trained.label == "MoLE (block, 2 experts)" and {round(r["weight"], 6) for r in trained.gates} != {0.5}
    again = tiny_engine.generate(Mix("mole", KEYS, granularity="layer", gate="token"), REQUEST)
    assert again.label == "MoLE (layer, per-token, 2 experts, untrained)"
    assert _groups(again) == layers and {round(r["weight"], 6) for r in again.gates} == {0.5}
