"""A long job steps aside for a short one: while gate training runs in one thread, a MoLE image over other
LoRAs (another attachment) is rendered from another thread before the training ends, and the training
then ends with exactly the gates it reaches alone (its attachment is put back as it was). The text engine
does the same (hostile-visitor T18: a text training held its lock for the whole run)."""
from __future__ import annotations

import threading
import time

import torch

from mole_core.attach import MoleConfig
from mole_core.image.engine import GenerateRequest, Mix
from mole_core.train import TrainConfig

CONFIG = TrainConfig(steps=30, lr=1e-2, batch_size=1)


def test_another_attachment_between_training_steps(world_engine):
    engine = world_engine
    alone = engine.train(["face", "ring"], MoleConfig(), CONFIG)
    steps, out = [], {}
    thread = threading.Thread(target=lambda: out.setdefault("mixture", engine.train(
        ["face", "ring"], MoleConfig(), CONFIG, on_step=lambda step, *_: steps.append(step))))
    thread.start()
    while not steps:
        time.sleep(0.005)
    result = engine.generate(Mix("mole", ("checker", "heart"), gate="token"),
                             GenerateRequest("a vrk on the left", seed=1, steps=2))
    served_at = steps[-1]
    thread.join()
    assert result.label.startswith("MoLE (block, per-token") and served_at < CONFIG.steps
    interrupted = out["mixture"]
    assert interrupted.meta["steps"] == CONFIG.steps
    assert all(torch.equal(alone.gate_state[k], interrupted.gate_state[k]) for k in alone.gate_state)


def test_a_text_answer_during_text_training(tmp_path):
    """A MoLE answer over the very LoRAs and gate layout being trained is served between two training steps
    with untrained gates (never the half-trained ones), and the training still ends with the gates it reaches
    alone."""
    from mole_core.text.engine import TextEngine
    from tests.tiny import make_text_world
    engine = TextEngine(*make_text_world(tmp_path))
    keys, mole, config = ["alpha", "beta"], MoleConfig(gate="token"), TrainConfig(steps=200, lr=5e-3, batch_size=2)
    mix = Mix("mole", tuple(keys), gate="token")
    alone, untrained = engine.train(keys, mole, config), engine.generate(mix, "alpha: abc")
    steps, out = [], {}
    thread = threading.Thread(target=lambda: out.setdefault("mixture", engine.train(
        keys, mole, config, on_step=lambda step, *_: steps.append(step))))
    thread.start()
    while not steps:
        time.sleep(0.005)
    during = engine.generate(mix, "alpha: abc")
    served_at = steps[-1]
    thread.join()
    assert served_at < config.steps
    assert (during.text, during.token_gates) == (untrained.text, untrained.token_gates)
    interrupted = out["mixture"]
    assert interrupted.meta["steps"] == config.steps
    assert all(torch.equal(alone.gate_state[k], interrupted.gate_state[k]) for k in alone.gate_state)
