"""A long job steps aside for a short one: while gate training runs in one thread, a MoLE image over other
LoRAs (another attachment) is rendered from another thread before the training ends, and the training
then ends with exactly the gates it reaches alone (its attachment is put back as it was). The text engine
does the same (hostile-visitor T18: a text training held its lock for the whole run). Underneath: the fair lock
hands the model over to waiters in arrival order."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from mole_core.attach import MoleConfig
from mole_core.image.engine import Engine, GenerateRequest, Mix
from mole_core.locks import FairLock
from mole_core.train import TrainConfig
from tests.helpers import pixels

REQUEST = GenerateRequest(prompt="a photo of sks dog", negative="blue", seed=3, steps=2, guidance=4.0)
KEYS = ("dog", "cat")

CONFIG = TrainConfig(steps=6, lr=1e-2, batch_size=1)


def test_another_attachment_between_training_steps(world_engine):
    engine = world_engine
    alone = engine.train(["face", "ring"], MoleConfig(), CONFIG)
    steps, out = [], {}

    def on_step(step, *_):
        steps.append(step)
        if step == 1:
            _wait_until(lambda: engine._lock.waiting() == 1)          # the image below is queued for the model

    thread = threading.Thread(target=lambda: out.setdefault("mixture", engine.train(
        ["face", "ring"], MoleConfig(), CONFIG, on_step=on_step)))
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
    keys, mole, config = ["alpha", "beta"], MoleConfig(gate="token"), TrainConfig(steps=10, lr=5e-3, batch_size=2)
    mix = Mix("mole", tuple(keys), gate="token")
    alone, untrained = engine.train(keys, mole, config), engine.generate(mix, "alpha: abc")
    steps, out = [], {}

    def on_step(step, *_):
        steps.append(step)
        if step == 1:
            _wait_until(lambda: engine._lock.waiting() == 1)          # the answer below is queued for the model

    thread = threading.Thread(target=lambda: out.setdefault("mixture", engine.train(
        keys, mole, config, on_step=on_step)))
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


# ---- the fair lock -------------------------------------------------------------------------------------------

def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_fair_lock_yields_to_waiters_in_arrival_order_and_is_reentrant():
    lock, order = FairLock(), []

    def waiter(name):
        with lock:
            order.append(name)

    with lock:
        assert lock.yield_to_waiters() is False                       # nobody waits: no hand-over
        with lock:                                                    # reentrant
            threads = []
            for i, name in enumerate(("first", "second", "third")):
                threads.append(threading.Thread(target=waiter, args=(name,)))
                threads[-1].start()
                _wait_until(lambda: lock.waiting() == i + 1)          # queued in this order
            assert lock.yield_to_waiters() is True                    # everyone queued before goes first ...
            order.append("holder")                                    # ... then the holder is back
            assert lock.waiting() == 0
        order.append("holder, depth 1")                               # still held after the inner exit
        late = threading.Thread(target=waiter, args=("late",))
        late.start()
        _wait_until(lambda: lock.waiting() == 1)
        assert order == ["first", "second", "third", "holder", "holder, depth 1"]
    late.join(10)
    for t in threads:
        t.join(10)
    assert order[-1] == "late" and lock.waiting() == 0
    with pytest.raises(RuntimeError, match="released by a thread that does not hold it"):
        lock.release()


# ---- the tiny engine: training gives way to others between steps, and trains the same gates ----------------------------------

TRAIN = TrainConfig(steps=30, batch_size=1, lr=0.05, seed=0)   # the hand-over is after step 1 by construction


def _train_with_a_visitor(tiny_engine, visitor: Mix):
    """Train; after step 1, another thread asks for `visitor`. Returns (mixture, visitor's result, the number
    of training steps done when the visitor's image was drawn, steps done when its call returned)."""
    steps, log, threads = [], {}, []
    call_pipe = tiny_engine._call_pipe

    def spy(*args, **kwargs):
        log["drawn_at"] = len(steps)
        return call_pipe(*args, **kwargs)

    def visit():
        log["result"] = tiny_engine.generate(visitor, REQUEST)
        log["returned_at"] = len(steps)

    def on_step(step, losses, gates):
        steps.append(step)
        if step == 1:
            threads.append(threading.Thread(target=visit))
            threads[0].start()
            _wait_until(lambda: tiny_engine._lock.waiting() == 1)          # the visitor is queued for the model

    tiny_engine._call_pipe = spy
    try:
        mixture = tiny_engine.train(list(KEYS), MoleConfig(), TRAIN, on_step=on_step)
    finally:
        del tiny_engine._call_pipe
        for t in threads:
            t.join(60)
    assert steps == list(range(1, TRAIN.steps + 1))
    return mixture, log.get("result"), log.get("drawn_at"), log.get("returned_at")


def _same_gates(a, b) -> bool:
    return set(a.gate_state) == set(b.gate_state) and all(torch.equal(a.gate_state[k], b.gate_state[k])
                                                          for k in a.gate_state)


@pytest.fixture(scope="module")
def trained_alone(tiny_engine):
    return tiny_engine.train(list(KEYS), MoleConfig(), TRAIN)


def test_an_image_asked_for_during_training_comes_after_one_step(tiny_engine, trained_alone):
    alone = tiny_engine.generate(Mix("base"), REQUEST)
    mixture, result, drawn_at, returned_at = _train_with_a_visitor(tiny_engine, Mix("base"))
    assert drawn_at == 1 and returned_at < TRAIN.steps             # between steps 1 and 2, long before the end
    assert np.array_equal(pixels(result.image), pixels(alone.image))
    assert _same_gates(mixture, trained_alone)                     # training went on exactly as alone


@pytest.mark.parametrize("visitor", [Mix("mole", ("dog", "style")), Mix("mole", KEYS, granularity="layer")],
                         ids=["other-keys", "other-granularity"])
def test_a_mole_image_asked_for_during_training_does_not_disturb_it(tiny_engine, tiny_world, trained_alone, visitor):
    alone = Engine(str(tiny_world[0]), str(tiny_world[1])).generate(visitor, REQUEST)
    mixture, result, drawn_at, returned_at = _train_with_a_visitor(tiny_engine, visitor)
    assert drawn_at == 1 and returned_at < TRAIN.steps
    assert np.array_equal(pixels(result.image), pixels(alone.image)) and result.label == alone.label
    assert _same_gates(mixture, trained_alone)
