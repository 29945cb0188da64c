"""Composition peers on the tiny pipeline: learned static weights (MoleConfig(gate="static")), LoRA Switch
and LoRA Composite (mole_core.image.peers). Equivalences, as for MoLE: untrained static == the normalised linear
merge; static weights == the linear merge with those weights; Switch with k ≥ steps == the first LoRA
alone; Composite of one expert == that LoRA alone, of two == the hand-computed average; both leave the
pipeline bit-identical, also after an exception."""
from __future__ import annotations

import pytest
import torch

from mole_core.attach import MoleConfig, attach
from mole_core.image.lora_files import save_lora
from mole_core.merge import merge_loras, merged_weights
from mole_core.mixture import MixtureError, apply_mixture, load_mixture, save_mixture
from mole_core.image.peers import compositing, switching
from mole_core.train import TrainConfig, train_gates
from tests.helpers import close, components_of, inputs, pipeline_loras, run

PROMPT, NEGATIVE = "a red circle on the left", "blue square"


@pytest.fixture
def setup(tiny_pipe):
    comps = components_of(tiny_pipe)
    return tiny_pipe, comps, pipeline_loras(comps)


@torch.no_grad()
def render(pipe, steps=3, seed=0, guidance=5.0) -> torch.Tensor:
    """The pipeline's final latents from fixed starting latents, as the engine calls it (latents=)."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, latents=latents, num_inference_steps=steps,
                guidance_scale=guidance, output_type="latent").images


def alone(comps, lora):
    """Context: that LoRA merged into the weights (the reference for 'that LoRA alone')."""
    return merged_weights(comps, merge_loras([lora], method="linear"))


def one_hot(n, i):
    return [float(j == i) for j in range(n)]


# ---- learned static weights ---------------------------------------------------------------------------

def test_untrained_static_equals_the_normalised_linear_merge(setup):
    pipe, comps, loras = setup
    handle = attach(comps, loras, MoleConfig(gate="static"))
    assert handle.config.describe == "static"
    params = handle.gate_parameters()
    assert [tuple(p.shape) for p in params] == [(3,), ()]              # one logit per expert, one τ: once
    assert len(handle.gate_modules()) == len(handle.groups) > 1
    got = render(pipe)
    handle.detach()
    with merged_weights(comps, merge_loras(loras, method="linear")):
        close([got], [render(pipe)])


def test_static_weights_are_one_linear_merge_and_settings_still_work(setup):
    _, comps, loras = setup
    x = inputs()
    handle = attach(comps, loras, MoleConfig(gate="static", granularity="matrix"))
    with torch.no_grad():
        params = handle.gate_parameters()
        params[0].copy_(torch.tensor([1.0, -1.0, 0.5]))
        params[1].fill_(0.3)
    w = torch.softmax(torch.tensor([1.0, -1.0, 0.5]) / torch.tensor(0.3).exp(), 0)
    with handle.recording() as rec:
        got = run(comps, x)
    assert len({e[0] for e in rec.entries}) == len(handle.groups)       # every group evaluated ...
    for _, _, _, weights in rec.entries:                                 # ... to the same input-free weights
        torch.testing.assert_close(weights, w.expand(2, 3))
    with torch.no_grad(), handle.settings(gates=one_hot(3, 1)):
        forced = run(comps, x)
    with torch.no_grad(), handle.settings(mask={"beta": False}):
        masked = run(comps, x)
    handle.detach()
    with merged_weights(comps, merge_loras(loras, w.tolist(), method="linear", normalize=False)):
        close(got, run(comps, x))
    with alone(comps, loras[1]):
        close(forced, run(comps, x))
    renormalised = [w[0] / (w[0] + w[2]), w[2] / (w[0] + w[2])]
    with merged_weights(comps, merge_loras([loras[0], loras[2]], renormalised, method="linear", normalize=False)):
        close(masked, run(comps, x))


def test_training_moves_the_static_logits(setup):
    _, comps, loras = setup
    handle = attach(comps, loras, MoleConfig(gate="static"))
    x = inputs(batch=4)
    with torch.no_grad(), handle.settings(gates=one_hot(3, 0)):
        target = run(comps, x)[0]                                        # the UNet with expert alpha alone

    def loss_fn(generator, batch_size):
        i = torch.randint(4, (batch_size,), generator=generator)
        latents, t, ehs, _ = x
        return torch.nn.functional.mse_loss(comps["unet"](latents[i], t[i], ehs[i]).sample, target[i])

    params = handle.gate_parameters()
    assert len({id(p) for p in params}) == len(params) == 2
    result = train_gates(handle, loss_fn, TrainConfig(steps=5, lr=0.2, batch_size=2, balance_alpha=0.0))
    assert result.steps == 5
    logits = params[0].detach()
    assert logits.abs().max() > 0.05 and logits[0] == logits.max()     # moved, towards alpha
    assert result.mean_gates[0] > 1 / 3
    assert all(gate.logits is params[0] for gate in handle.gate_modules())   # still one set of weights
    handle.detach()


def test_static_mixture_round_trip(setup, tmp_path):
    pipe, comps, loras = setup
    files = []
    for lora in loras:
        save_lora(lora, tmp_path / f"{lora.name}.safetensors")
        files.append((lora.name, tmp_path / f"{lora.name}.safetensors"))
    handle = attach(comps, loras, MoleConfig(gate="static"))
    with torch.no_grad():
        handle.gate_parameters()[0].copy_(torch.tensor([0.4, -0.7, 1.1]))
    expected = render(pipe)
    save_mixture(tmp_path / "static.safetensors", handle, files, config=handle.config)
    handle.detach()
    mixture = load_mixture(tmp_path / "static.safetensors")
    assert mixture.gate == "static" and mixture.mole_config().gate == "static"
    wrong = attach(comps, loras, MoleConfig())
    with pytest.raises(MixtureError, match="per-static gates; the attachment was made with per-sample"):
        apply_mixture(wrong, mixture)
    with pytest.raises(ValueError, match="gate kind"):                  # the tensors do not fit either
        wrong.load_gate_state_dict(mixture.gate_state)
    wrong.detach()
    right = attach(comps, loras, mixture.mole_config())
    apply_mixture(right, mixture, files)
    assert torch.equal(render(pipe), expected)
    tampered = dict(mixture.gate_state)
    first = next(k for k in tampered if k.endswith(".logits"))
    tampered[first] = tampered[first] + 1.0
    with pytest.raises(ValueError, match="one set of weights"):
        right.load_gate_state_dict(tampered)
    right.reset_gates()
    assert handle.gate_parameters()[0].abs().max() > 0 and right.gate_parameters()[0].abs().max() == 0
    right.detach()


# ---- LoRA Switch ----------------------------------------------------------------------------------------

def test_switch_with_k_at_least_the_steps_is_the_first_lora_alone(setup):
    pipe, comps, loras = setup
    handle = attach(comps, loras)
    with switching(pipe, handle, every=3):
        got = render(pipe, steps=3)
    with handle.settings(gates=one_hot(3, 0)):
        assert torch.equal(got, render(pipe, steps=3))                   # the same computation exactly
    with handle.settings(mask=[False] * 3), alone(comps, loras[0]):
        close([got], [render(pipe, steps=3)])                            # and that LoRA merged alone
    with switching(pipe, handle, every=1):
        assert not torch.allclose(render(pipe, steps=3), got, atol=1e-4)


@pytest.mark.parametrize("every", [1, 2])
def test_switch_schedule_and_the_encoding_each_step_reads(setup, every):
    pipe, comps, loras = setup
    handle = attach(comps, loras[:2])
    encodings = []
    for i in range(2):                                    # expert i's prompt encoding, as the UNet gets it
        with torch.no_grad(), handle.settings(gates=one_hot(2, i)):
            positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        encodings.append(torch.cat([negative, positive]))
    assert not torch.allclose(encodings[0], encodings[1])
    seen = []
    with switching(pipe, handle, every=every), handle.recording() as rec:
        hook = pipe.unet.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
        try:
            render(pipe, steps=5)
        finally:
            hook.remove()
    active = [(t // every) % 2 for t in range(5)]
    assert len(seen) == 5
    for t, i in enumerate(active):
        assert torch.equal(seen[t], encodings[i])
        weights = [w for _, net, step, w in rec.entries if net == "unet" and step == t]
        assert weights and all(torch.equal(w, torch.tensor([one_hot(2, i)] * 2)) for w in weights)


# ---- LoRA Composite -------------------------------------------------------------------------------------

def test_composite_of_one_expert_is_that_lora_alone(setup):
    pipe, comps, loras = setup
    handle = attach(comps, [loras[1]])
    with compositing(pipe, handle):
        got = render(pipe)
    assert torch.equal(got, render(pipe))                                # one expert, weight 1: itself
    handle.detach()
    with alone(comps, loras[1]):
        close([got], [render(pipe)])


def test_composite_of_two_experts_averages_the_noise_predictions(setup):
    """One DDIM step written out: ε = mean_i ε_i([x; x], t, [neg_i; pos_i]); CFG; scheduler step."""
    pipe, comps, loras = setup
    handle = attach(comps, loras[:2])
    with compositing(pipe, handle):
        got = render(pipe, steps=1, guidance=4.0)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    eps = []
    with torch.no_grad():
        for i in range(2):
            with handle.settings(gates=one_hot(2, i)):
                positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
                eps.append(pipe.unet(torch.cat([latents] * 2), t,
                                     encoder_hidden_states=torch.cat([negative, positive])).sample)
        uncond, text = torch.stack(eps).mean(0).chunk(2)
        expected = pipe.scheduler.step(uncond + 4.0 * (text - uncond), t, latents).prev_sample
    close([got], [expected])
    singles = []
    for i in range(2):
        with handle.settings(gates=one_hot(2, i)):
            singles.append(render(pipe, steps=1, guidance=4.0))
    assert all(not torch.allclose(got, s, atol=1e-4) for s in singles)


# ---- both: the pipeline as found ------------------------------------------------------------------------

@pytest.mark.parametrize("peer", ["switch", "composite"])
def test_peers_leave_the_pipeline_as_found_even_after_an_error(setup, peer):
    pipe, comps, loras = setup
    handle = attach(comps, loras)
    context = (lambda: switching(pipe, handle, every=1)) if peer == "switch" else (lambda: compositing(pipe, handle))
    hooks = (dict(pipe.unet._forward_pre_hooks), dict(pipe.unet._forward_hooks))
    before = render(pipe)
    with context():
        inside = render(pipe)
    assert not torch.equal(inside, before)
    assert torch.equal(render(pipe), before)

    calls = []

    def fail_at_second_call(module, args):               # inside a UNet forward, after the gates are set
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    bomb = pipe.unet.mid_block.register_forward_pre_hook(fail_at_second_call)
    try:
        with pytest.raises(RuntimeError, match="boom"), context():
            render(pipe)
    finally:
        bomb.remove()
    assert "encode_prompt" not in vars(pipe)
    assert (dict(pipe.unet._forward_pre_hooks), dict(pipe.unet._forward_hooks)) == hooks
    assert torch.equal(render(pipe), before)
    with handle.settings(mask={"beta": False}):          # the caller's own settings hold inside and after
        masked = render(pipe)
        with context():
            render(pipe)
        assert torch.equal(render(pipe), masked)


def test_peers_refuse_what_they_cannot_drive(setup, tmp_path):
    from tests.tiny import build_pipeline
    pipe, comps, loras = setup
    handle = attach(comps, loras)
    with pytest.raises(ValueError, match="every must be a whole number"):
        with switching(pipe, handle, every=0):
            pass
    other = build_pipeline(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="not attached to this pipeline's UNet"):
        with compositing(other, handle):
            pass
    handle.detach()
    with pytest.raises(ValueError, match="not attached"):
        with switching(pipe, handle):
            pass
