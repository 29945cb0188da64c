"""The prompt gate (mole_core/text/gate.py) and Arrow through PEFT (mole_core/text/arrow.py), on the text world's
BART (tiny, from config; and the shipped world when it is in the repo) and on a tiny Llama and T5 built from
config (tests/test_text_models.py's worlds)."""
from __future__ import annotations

import pytest
import torch

from mole_core.attach import MoleConfig, attach
from mole_core.merge import merged_weights
from mole_core.mix import Mix
from mole_core.mixture import load_mixture
from mole_core.text.engine import DEFAULT_TEXT_BANK, DEFAULT_TEXT_MODEL, TextEngine, is_text_model
from mole_core.text.gate import PREFIX, load_prompt_state, split_state
from mole_core.train import TrainConfig
from mole_core.text.decode import decode
from tests.text.test_text_models import _save_world
from tests.tiny import make_text_world

PROMPTS = ["alpha: abc", "beta: hello", "alpha: xy", "beta: abcd"]


@pytest.fixture(scope="module", params=["bart", "llama", "t5"])
def world(request, tmp_path_factory):
    """(kind, engine over two LoRAs 'alpha'/'a' and 'beta'/'b', their keys)."""
    folder = tmp_path_factory.mktemp(f"gate-{request.param}")
    if request.param == "bart":
        model_dir, bank = make_text_world(folder)
        return "bart", TextEngine(model_dir, bank), ("alpha", "beta")
    model_dir, bank = _save_world(folder, request.param)
    return request.param, TextEngine(model_dir, bank), ("a", "b")


PAIRS = [("alpha: abc", "cba"), ("alpha: xyz", "zyx"), ("beta: abc", "abc"), ("beta: hey", "hey")]


def test_untrained_prompt_gate_is_the_linear_merge(world):
    kind, engine, keys = world
    got = engine.answer(Mix("mole", keys, gate="prompt"), PROMPTS)[0]
    assert got == engine.answer(Mix("linear", keys), PROMPTS)[0]


def test_prompt_gate_trains_decides_per_prompt_and_round_trips(world, tmp_path):
    """Training moves only the prompt gate; its decision differs between prompts, is kept for every answer
    token, batched answers == one by one, and the mixture file gives the same answers."""
    kind, engine, keys = world
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    path = tmp_path / f"{kind}.safetensors"
    mixture = engine.train(keys, MoleConfig(gate="prompt"), TrainConfig(steps=40, lr=5e-2), pairs=PAIRS, out_path=path)
    assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    assert {PREFIX + k for k in ("log_tau", "query", "proj.weight", "proj.bias")} <= set(mixture.gate_state)
    assert mixture.gate == "prompt" and mixture.meta["steps"] == 40
    mix = Mix("mole", keys, mixture=mixture)
    a, b = engine.generate(mix, "alpha: abc"), engine.generate(mix, "beta: abc")
    assert a.token_gates and all(g == a.token_gates[0] for g in a.token_gates)     # one decision per answer
    assert a.prompt_gates and a.prompt_gates[0] == pytest.approx(a.token_gates[0])
    assert a.token_gates[0] != pytest.approx(b.token_gates[0], abs=1e-3)             # read from the prompt
    together = engine.answer(mix, PROMPTS)[0]
    assert together == [engine.answer(mix, [p])[0][0] for p in PROMPTS]
    assert engine.answer(Mix("mole", keys, mixture=load_mixture(path)), PROMPTS)[0] == together


def test_a_one_hot_prompt_decision_is_that_lora_alone(world):
    kind, engine, keys = world
    engine.release()
    model, tok = engine.model, engine.tokenizer
    with merged_weights(model, engine.lora(keys[1])):
        want = decode(model, tok, PROMPTS, 6)
    handle = engine._attached(keys, MoleConfig(gate="prompt"))
    with handle.settings(gates=torch.tensor([0.0, 1.0])):              # every prompt, every token
        got = decode(model, tok, PROMPTS, 6)
    engine.release()
    assert got == want


def test_arrow_runs_through_peft_and_leaves_the_model_as_found(world):
    """Arrow over one LoRA (top-1 of 1: weight 1 at every token) == that LoRA; over two it answers and the model
    is the bare base model again afterwards."""
    kind, engine, keys = world
    base = engine.answer(Mix("base"), PROMPTS)[0]
    assert engine.answer(Mix("arrow", keys[:1]), PROMPTS)[0] == engine.answer(Mix(f"single:{keys[0]}"), PROMPTS)[0]
    two, _, label = engine.answer(Mix("arrow", keys), PROMPTS)
    assert label.startswith("Arrow") and len(two) == len(PROMPTS)
    assert engine.answer(Mix("base"), PROMPTS)[0] == base
    assert not any("lora" in n for n, _ in engine.model.named_modules())


def test_prompt_state_is_checked_when_loaded(world, tmp_path):
    kind, engine, keys = world
    mixture = engine.train(keys, MoleConfig(gate="prompt"), TrainConfig(steps=2, lr=1e-2), pairs=PAIRS)
    _, prompt = split_state(mixture.gate_state)
    from mole_core.text.gate import PromptGate
    with pytest.raises(ValueError, match="prompt.query"):
        load_prompt_state(PromptGate(2), {k: v for k, v in prompt.items() if k != "query"})
    with pytest.raises(ValueError, match="3 experts"):
        load_prompt_state(PromptGate(3), prompt)


def test_pipelines_refuse_the_prompt_gate_and_arrow(world_engine):
    from torch import nn

    from mole_core.image.engine import GenerateRequest
    from mole_core.lora import Lora, LoraWeights
    net = nn.ModuleDict({"unet": nn.Sequential(nn.Linear(4, 4))})
    lora = Lora("x", {"unet.0": LoraWeights(A=torch.ones(1, 4), B=torch.ones(4, 1), scale=1.0)})
    with pytest.raises(ValueError, match="prompt"):
        attach(net, [lora], MoleConfig(gate="prompt"))
    keys = tuple(world_engine.bank.keys()[:2])
    with pytest.raises(ValueError, match="Arrow"):
        world_engine.check([Mix("arrow", keys)], GenerateRequest("a"))


@pytest.mark.skipif(not is_text_model(DEFAULT_TEXT_MODEL), reason="the text world is not built")
def test_the_shipped_world_routes_each_instruction_to_its_lora():
    """On the text world, a prompt gate trained with the text CLI's defaults on the manifests' examples answers
    each main task's held-out items as that task's LoRA alone does (the gate reads the instruction)."""
    import numpy as np

    from mole_core.world.text.tasks import TASKS, sample_items
    torch.set_num_threads(1)
    engine = TextEngine(DEFAULT_TEXT_MODEL, DEFAULT_TEXT_BANK)
    keys = ("reverse", "upper", "double")
    mixture = engine.train(keys, MoleConfig(gate="prompt"), TrainConfig(steps=150, lr=1e-3, batch_size=4))
    mix = Mix("mole", keys, mixture=mixture)
    for i, key in enumerate(keys):
        items = sample_items(TASKS[key], np.random.default_rng(100 + i), 4, held_out=True)
        prompts = [p for p, _ in items]
        assert engine.answer(mix, prompts)[0] == engine.answer(Mix(f"single:{key}"), prompts)[0]
    assert engine.answer(Mix("linear", keys), ["reverse: planet"])[0] != ["tenalp"]


def test_the_text_cli_defaults_to_the_prompt_gate(tmp_path, capsys):
    """train-gates on a text model without --gate writes a prompt-gate mixture; generate answers with it; a
    mixture-free generate without --gate is the untrained prompt gate (the linear merge)."""
    from mole_core import cli
    model_dir, bank = make_text_world(tmp_path)
    paths = ["--model", str(model_dir), "--bank", str(bank)]
    out = tmp_path / "m.safetensors"
    assert cli.main(["train-gates", *paths, "--lora", "alpha", "--lora", "beta", "--steps", "3",
                     "--out", str(out)]) == 0
    assert load_mixture(out).gate == "prompt" and "prompt gates" in capsys.readouterr().out
    answer = tmp_path / "a.txt"
    assert cli.main(["generate", *paths, "--method", "mole", "--mixture", str(out), "--prompt", "alpha: abc",
                     "--out", str(answer)]) == 0
    engine = TextEngine(model_dir, bank)
    want = engine.generate(Mix("mole", ("alpha", "beta"), mixture=load_mixture(out)), "alpha: abc").text
    assert answer.read_text() == want + "\n"
    assert cli.main(["generate", *paths, "--method", "mole", "--lora", "alpha", "--lora", "beta",
                     "--prompt", "alpha: abc", "--out", str(answer)]) == 0
    assert "MoLE (prompt, 2 experts, untrained)" in capsys.readouterr().out
