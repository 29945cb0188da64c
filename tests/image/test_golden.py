"""Images from before the `Mix` refactor, reproduced bit for bit by today's engine.

tests/data/golden_images.json holds the sha256 of the pixels the engine gave for these requests at the
commit before `Mix` existed (the old call form `engine.generate(keys, method, request, ...)`, run once in a
worktree of that commit). The same requests as `Mix` values must give the very same pixels.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mole_core.attach import MoleConfig
from mole_core.image.engine import GenerateRequest, Mix
from mole_core.train import TrainConfig

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "data" / "golden_images.json").read_text())
KEYS = ("face", "ring")


def sha(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def test_every_method_gives_the_same_pixels_as_before(world_engine):
    engine = world_engine
    request = GenerateRequest("a zwx on the left and a qlo on the right", seed=3, steps=6)
    mixes = {"base": Mix("base"), "linear": Mix("linear", KEYS), "svd": Mix("svd", KEYS, rank=4),
             "single:face": Mix("single:face"), "mole": Mix("mole", KEYS),
             "linear_w": Mix("linear", KEYS, weights={"face": 2.0, "ring": 1.0})}
    results = engine.compare(list(mixes.values()), request)
    assert {name: sha(r.image) for name, r in zip(mixes, results)} == {name: GOLDEN[name] for name in mixes}
    mixture = engine.train(list(KEYS), MoleConfig(gate="token"), TrainConfig(steps=3, lr=1e-2, batch_size=2))
    trained = engine.generate(Mix("mole", KEYS, mixture=mixture), request)
    masked = engine.generate(Mix("mole", KEYS, mixture=mixture, mask={"ring": False}, strengths={"face": 1.5}),
                             request)
    assert sha(trained.image) == GOLDEN["mole_token_trained"]
    assert sha(masked.image) == GOLDEN["mole_token_trained_mask"]
