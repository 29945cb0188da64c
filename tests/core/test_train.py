"""Gate training: only gates move, the loss goes down, the balance loss has a gradient, seeds repeat,
the diffusion and token tasks run on tiny models."""
from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mole_core.attach import MoleConfig, attach
from mole_core.mix import GATES, mole_config_for
from mole_core.train import BALANCE_ALPHA, TrainConfig, train_gates
from mole_core.image.task import DiffusionTask
from mole_core.text.task import TokenTask
from tests.helpers import components_of, make_lora, pipeline_loras
from tests.tiny import build_tokenizer


def mlp_with_experts(granularity="block"):
    """A two-block MLP (a 'Block' class so block granularity groups it) with three LoRA experts."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    keys = ["0.fc1", "0.fc2", "1.fc1", "1.fc2"]
    loras = [make_lora(model, f"e{i}", 20 + i, 2, keys) for i in range(3)]
    return model, loras, attach(model, loras, MoleConfig(granularity=granularity))


def regression_task(model, handle):
    """Targets = the model with only expert e0 on; the gates should learn to favour e0."""
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(64, 5, 8, generator=g)
    with torch.no_grad(), handle.settings(gates=[1.0, 0.0, 0.0]):
        ys = model(xs)

    def loss_fn(generator, batch_size):
        idx = torch.randint(64, (batch_size,), generator=generator)
        return F.mse_loss(model(xs[idx]), ys[idx])
    return loss_fn


def test_training_moves_only_the_gates_and_lowers_the_loss():
    model, loras, handle = mlp_with_experts()
    loss_fn = regression_task(model, handle)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(("log_tau", "weight", "bias"))
              or ".gate." not in n}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    steps = []
    result = train_gates(handle, loss_fn, TrainConfig(steps=40, lr=0.05, batch_size=8, balance_alpha=0.01),
                         on_step=lambda s, parts, gates: steps.append((s, parts, gates)))
    assert result.steps == 40 and len(result.history) == 40 and not result.stopped
    assert [s for s, _, _ in steps] == list(range(1, 41))
    assert set(steps[0][1]) == {"loss", "task", "balance"} and len(steps[0][2]) == 3
    first, last = result.history[0]["task"], np.mean([h["task"] for h in result.history[-5:]])
    assert last < 0.5 * first                                   # the gates learnt to prefer e0
    assert result.mean_gates[0] > 0.5
    gate_ids = {id(p) for p in handle.gate_parameters()}
    assert len(gate_ids) == 2 * 3                               # two gates: log_tau, proj.weight, proj.bias
    for n, p in model.named_parameters():
        if id(p) not in gate_ids:
            assert torch.equal(p, frozen[n]), n
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(p.requires_grad for p in model.parameters())     # flags restored after training


def test_training_is_deterministic_for_a_seed_and_stops_on_request():
    results = []
    for _ in range(2):
        model, _, handle = mlp_with_experts("matrix")
        results.append(train_gates(handle, regression_task(model, handle),
                                   TrainConfig(steps=5, lr=0.05, batch_size=4, seed=3)))
    assert results[0].history == results[1].history
    model, _, handle = mlp_with_experts()
    calls = []
    result = train_gates(handle, regression_task(model, handle), TrainConfig(steps=50, lr=0.05, batch_size=4),
                         on_step=lambda s, p, g: calls.append(s), should_stop=lambda: len(calls) >= 3)
    assert result.steps == 3 and result.stopped


def test_balance_loss_has_a_gradient():
    model, _, handle = mlp_with_experts()
    x = torch.randn(4, 5, 8)
    model(x)
    # equal gates: L = -Σ log(1/N) = N log N, and uniform is its minimum
    assert handle.balance_loss().item() == pytest.approx(3 * math.log(3), rel=1e-6)
    with torch.no_grad():
        for gate in handle.gate_modules():
            gate.proj.bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
    model(x)
    loss = handle.balance_loss()
    assert loss.item() > 3 * math.log(3)
    loss.backward()
    grads = [gate.proj.bias.grad for gate in handle.gate_modules()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g[0] > 0 and g[2] < 0 for g in grads)            # descent lowers the favourite, raises the last


def square_image(color, size=24):
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = color
    return PIL.Image.fromarray(img)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_task_trains_gates_on_a_tiny_pipeline(tiny_pipe, tmp_path, prediction_type):
    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type=prediction_type)
    comps = components_of(tiny_pipe)
    loras = pipeline_loras(comps)
    handle = attach(comps, loras)
    path = tmp_path / "red.png"
    square_image((255, 0, 0)).save(path)
    examples = [(path, "a red square", "alpha"), (square_image((0, 0, 255)), "a blue square", "beta"),
                (square_image((0, 255, 0)), "a green square", "gamma"), (path, "sks red square", "alpha")]
    task = DiffusionTask(tiny_pipe, examples, resolution=16)
    assert task.noise_scheduler.config.prediction_type == prediction_type
    frozen = {n: p.detach().clone() for n, p in comps.named_parameters()}
    result = train_gates(handle, task, TrainConfig(steps=2, lr=1e-2, batch_size=3))
    assert task.latents.shape == (4, 4, 8, 8)                  # VAE-encoded once, 16 px -> 8
    assert result.steps == 2 and all(math.isfinite(v) for v in result.final.values())
    gate_ids = {id(p) for p in handle.gate_parameters()}
    params = dict(comps.named_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in params.items() if id(p) not in gate_ids)
    moved = {n for n, p in params.items() if id(p) in gate_ids and n.endswith("proj.weight") and p.abs().sum() > 0}
    assert any(n.startswith("unet.") for n in moved)            # zero-initialised gates have moved,
    assert any(n.startswith("text_encoder.") for n in moved)    # the text encoder's gates too
    # batches are balanced across experts
    picks = task.batch_indices(torch.Generator().manual_seed(0), 6)
    assert sorted(examples[i][2] for i in picks) == ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]
    handle.detach()


def test_token_task_on_a_tiny_llama(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=32, pad_token_id=tok.pad_token_id))
    keys = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    handle = attach(model, [make_lora(model, "x", 0, 2, keys), make_lora(model, "y", 1, 2, keys)])
    pairs = [("a red", "circle on the left"), ("a blue", "square on the right"), ("photo of", "a dog")]
    task = TokenTask(model, tok, pairs)
    ids, labels = task.items[0]
    assert labels[:len(ids) - len([t for t in labels if t != -100])] == [-100] * (len(ids) - len([t for t in labels if t != -100]))
    assert any(t != -100 for t in labels)
    result = train_gates(handle, task, TrainConfig(steps=3, lr=1e-2, batch_size=2))
    assert result.steps == 3 and all(math.isfinite(h["task"]) for h in result.history)
    assert len(handle.groups) == 2 and handle.gate_layout()["model.layers.0"]["d_out"] is not None
    handle.detach()


def test_precision_can_change_between_trainings_in_one_process():
    finals = []
    for precision in ("bf16", "no"):
        model, _, handle = mlp_with_experts()
        finals.append(train_gates(handle, regression_task(model, handle),
                                  TrainConfig(steps=2, lr=0.05, batch_size=4, mixed_precision=precision)).final)
    assert all(math.isfinite(f["loss"]) for f in finals)


def test_examples_from_bank(tmp_path):
    from mole_core.image.bank import Bank
    from mole_core.lora import Lora
    from mole_core.image.lora_files import save_lora
    from mole_core.image.task import examples_from_bank

    folder = tmp_path / "bank"
    (folder / "examples").mkdir(parents=True)
    square_image((255, 0, 0)).save(folder / "examples" / "red_0.png")
    for key, examples in (("red", [{"image": "examples/red_0.png", "caption": "a photo of sks"}]), ("bare", [])):
        save_lora(Lora(key, {"unet.x": make_lora(nn.Sequential(nn.Linear(4, 4)), key, 0, 1, ["0"]).modules["0"]}),
                  folder / f"{key}.safetensors")
        (folder / f"{key}.json").write_text(__import__("json").dumps({"name": key, "examples": examples}))
    bank = Bank(folder)
    assert examples_from_bank(bank, ["red"]) == [(folder / "examples" / "red_0.png", "a photo of sks", "red")]
    with pytest.raises(ValueError, match="'bare' has no example images"):
        examples_from_bank(bank, ["red", "bare"])


def test_alpha_lives_in_train_config_alone():
    """α has one owner (TrainConfig.balance_alpha) and one default (BALANCE_ALPHA); trigger-routed gates (the
    "routed" choice, mix.ROUTED) train with α = 0 unless α is given; the MoleConfig has no α."""
    import dataclasses
    assert "balance_alpha" not in {f.name for f in dataclasses.fields(MoleConfig)} and BALANCE_ALPHA == 0.5
    for gate in GATES:
        mole = mole_config_for("block", gate)
        assert TrainConfig().alpha_for(mole) == (0.0 if gate == "routed" else BALANCE_ALPHA)
        assert TrainConfig(balance_alpha=0.25).alpha_for(mole) == 0.25
