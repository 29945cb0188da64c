"""Trigger routing (MoleConfig(gate="token", route="trigger"), mole_core/routing.py) on the tiny pipeline:
β = 0 is the per-token gate; an untrained routed MoLE on a trigger-free prompt is the linear merge;
multi-token triggers are found; routing does act when the prompt has triggers; masks renormalise; all off
is the base model; mixtures keep the new fields; detach leaves the pipeline bit-identical."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mole_core.attach import MoleConfig, attach
from mole_core.image.lora_files import save_lora
from mole_core.merge import merge_loras, merged_weights
from mole_core.routing import trigger_positions, trigger_token_ids
from tests.helpers import components_of, inputs, pipeline_loras, randomise_gates, run

# "gt" and "ei" are not words of the tiny tokenizer: each is two letter tokens (multi-token triggers)
TRIGGERS = {"alpha": "gt", "beta": "red", "gamma": ["ei", "blue"]}
PROMPT = "a gt on the left and a red square on the right"


def render(pipe, prompt=PROMPT, steps=2):
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, height=16, width=16, output_type="np",
                   generator=torch.Generator().manual_seed(0),
                   latents=torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1)))
    return out.images[0]


def routed(comps, loras, pipe, **kw):
    handle = attach(comps, loras, MoleConfig(gate="token", route="trigger", **kw))
    handle.set_triggers(pipe.tokenizer, TRIGGERS)
    return handle


@pytest.fixture
def setup(tiny_pipe):
    comps = components_of(tiny_pipe)
    return tiny_pipe, comps, pipeline_loras(comps)


def test_trigger_positions_multi_token_and_phrase(tiny_pipe):
    tok = tiny_pipe.tokenizer
    ids = trigger_token_ids(tok, TRIGGERS, ["alpha", "beta", "gamma"])
    assert len(ids[0][0]) == 2 and len(ids[1][0]) == 1 and len(ids[2]) == 2
    input_ids = tok([PROMPT], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    pos = trigger_positions(input_ids, ids)
    words = tok.convert_ids_to_tokens(input_ids[0].tolist())
    assert [words[j] for j in pos[0, :, 0].nonzero().flatten()] == ["g", "t</w>"]
    assert [words[j] for j in pos[0, :, 1].nonzero().flatten()] == ["red</w>"]
    assert pos[0, :, 2].sum() == 0
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    phrase = trigger_positions(input_ids, ids, "phrase", special)
    owner = phrase[0].argmax(-1).tolist()
    n_alpha = int(phrase[0, :, 0].sum())
    assert n_alpha == len("g t on the left and a".split())               # up to the next trigger
    assert phrase[0, -1].sum() == 0 and phrase[0, 0].sum() == 0            # BOS / padding never count
    assert owner[words.index("square</w>")] == 1


def test_beta_zero_is_the_per_token_gate(setup):
    pipe, comps, loras = setup
    x = inputs()
    token = attach(comps, loras, MoleConfig(gate="token"))
    randomise_gates(token, x)
    state, layout = token.gate_state_dict(), token.gate_layout()
    expected = render(pipe)
    token.detach()
    handle = routed(comps, loras, pipe, route_beta=0.0)
    handle.load_gate_state_dict(state, layout)
    got = render(pipe)
    assert handle.router.unet_tokens is not None and handle.router.unet_tokens.sum() > 0   # triggers were found
    assert handle.router.masses                                                             # and masses recorded
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with torch.no_grad():                        # now β acts: the routing term changes the image
        for gate in handle.gate_modules():
            gate.route_beta.fill_(2.0)
    assert np.abs(render(pipe) - expected).max() > 1e-4
    handle.detach()


def test_untrained_without_triggers_is_the_linear_merge(setup):
    pipe, comps, loras = setup
    plain = "a green circle on the left"         # no trigger of any expert
    with merged_weights(comps, merge_loras(loras, method="linear")):
        expected = render(pipe, plain)
    handle = routed(comps, loras, pipe, route_beta=3.0)
    np.testing.assert_allclose(render(pipe, plain), expected, atol=1e-5)
    handle.reset_gates()
    assert all(float(g.route_beta.detach()) == 3.0 for g in handle.gate_modules())  # reset keeps β's start value
    handle.detach()


def test_masks_renormalise_and_all_off_is_base(setup):
    pipe, comps, loras = setup
    base = render(pipe)
    handle = routed(comps, loras, pipe, route_beta=2.0)
    randomise_gates(handle, inputs())
    with handle.settings(mask={"gamma": False}), handle.recording() as rec:
        render(pipe)
    w = torch.cat([e[3] for e in rec.entries])                             # (M·B, N)
    assert torch.all(w[..., 2] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    with handle.settings(mask=[False, False, False]):
        np.testing.assert_array_equal(render(pipe), base)
    handle.detach()


def test_mixture_round_trip_keeps_route_fields(setup, tmp_path):
    from mole_core.mixture import apply_mixture, load_mixture, save_mixture
    pipe, comps, loras = setup
    config = dict(route_beta=0.7, route_tokens="phrase", route_norm="share", route_eps=1e-2)
    handle = routed(comps, loras, pipe, **config)
    randomise_gates(handle, inputs())
    with torch.no_grad():
        for i, gate in enumerate(handle.gate_modules()):
            gate.route_beta.fill_(0.5 + 0.1 * i)
    expected = render(pipe)
    files = []
    for lora in loras:
        save_lora(lora, tmp_path / f"{lora.name}.safetensors")
        files.append((lora.name, tmp_path / f"{lora.name}.safetensors"))
    save_mixture(tmp_path / "m.safetensors", handle, files, config=handle.config)
    handle.detach()
    mixture = load_mixture(tmp_path / "m.safetensors")
    assert mixture.mole_config() == handle.config
    again = attach(comps, loras, mixture.mole_config())
    again.set_triggers(pipe.tokenizer, TRIGGERS)
    apply_mixture(again, mixture, files)
    np.testing.assert_allclose(render(pipe), expected, atol=1e-6)
    again.detach()
    plain = attach(comps, loras, MoleConfig(gate="token"))
    with pytest.raises(ValueError, match="routing β"):
        plain.load_gate_state_dict(mixture.gate_state, mixture.layout)
    plain.detach()


def test_detach_is_bit_identical_and_restores_processors(setup):
    pipe, comps, loras = setup
    before = render(pipe)
    processors = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "set_processor")}
    hooks = (len(pipe.unet._forward_pre_hooks), len(pipe.text_encoder._forward_pre_hooks),
             len(pipe.text_encoder._forward_hooks))
    handle = routed(comps, loras, pipe)
    randomise_gates(handle, inputs())
    assert not np.array_equal(render(pipe), before)
    handle.detach()
    assert {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "set_processor")} == processors
    assert (len(pipe.unet._forward_pre_hooks), len(pipe.text_encoder._forward_pre_hooks),
            len(pipe.text_encoder._forward_hooks)) == hooks
    np.testing.assert_array_equal(render(pipe), before)
    handle.reattach()                                  # and back on, routing included
    assert handle.router._processors
    handle.detach()


def test_route_needs_per_token_gates_and_a_known_route(setup):
    _, comps, loras = setup
    with pytest.raises(ValueError, match="needs per-token gates"):
        attach(comps, loras, MoleConfig(gate="sample", route="trigger"))
    with pytest.raises(ValueError, match="Unknown route"):
        attach(comps, loras, MoleConfig(gate="token", route="pixels"))
    handle = attach(comps, loras, MoleConfig(gate="token", route="trigger"))
    with pytest.raises(ValueError, match="unknown expert"):
        handle.set_triggers(None, {"delta": "x"})
    handle.detach()


def test_training_provides_trigger_positions(setup):
    """DiffusionTask's captions reach the UNet's routing through the text-encoder hook."""
    from mole_core.train import TrainConfig, train_gates
    from mole_core.image.task import DiffusionTask
    import PIL.Image
    pipe, comps, loras = setup
    handle = routed(comps, loras, pipe)
    img = PIL.Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    examples = [(img, "a gt on the left", "alpha"), (img, "a red circle", "beta"), (img, "a ei", "gamma")]
    task = DiffusionTask(pipe, examples, resolution=16)
    result = train_gates(handle, task, TrainConfig(steps=2, batch_size=3, lr=1e-2))
    assert result.steps == 2 and handle.router.unet_tokens.sum() >= 3
    assert any(float(g.route_beta.detach()) != 1.0 for g in handle.gate_modules())   # β learns
    handle.detach()


def test_text_only_routing_leaves_the_attention_processors(setup):
    pipe, comps, loras = setup
    processors = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "set_processor")}
    handle = routed(comps, loras, pipe, route_pixels=False, route_tokens="phrase")
    randomise_gates(handle, inputs())
    render(pipe)
    assert not handle.router.masses and handle.router.unet_tokens.sum() > 0
    assert {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "set_processor")} == processors
    handle.detach()


def test_route_absent_off_gives_the_base_model_without_triggers(setup):
    pipe, comps, loras = setup
    plain = "a green circle on the left"
    base = render(pipe, plain)
    handle = routed(comps, loras, pipe, route_absent="off")
    randomise_gates(handle, inputs())
    np.testing.assert_array_equal(render(pipe, plain), base)          # no trigger anywhere: base, bit for bit
    with handle.recording() as rec:
        render(pipe, "a red square on the left")                       # only beta's trigger: beta alone
    unet = [w for _, net, _, w in rec.entries if net == "unet"]
    torch.testing.assert_close(torch.cat(unet)[:, 1], torch.ones(sum(len(w) for w in unet)))
    handle.detach()


def test_spatial_norm_ignores_how_much_and_keeps_where(setup):
    """route_norm="spatial": scaling one expert's attention map everywhere (mention order) changes nothing."""
    from mole_core.routing import TriggerRouter
    _, comps, _ = setup
    router = TriggerRouter(comps, 2, norm="spatial", eps=1e-6)
    m = torch.rand(1, 16, 2) + 0.1
    router.masses[16] = m
    a = router.map_for("unet", 1, 16)
    router.masses[16] = m * torch.tensor([10.0, 0.5])
    torch.testing.assert_close(router.map_for("unet", 1, 16), a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 16), rtol=1e-4, atol=1e-4)


def test_route_absent_off_without_triggers_set_is_not_the_base_model(setup):
    """Forgetting set_triggers must not silently switch every expert off."""
    pipe, comps, loras = setup
    base = render(pipe)
    handle = attach(comps, loras, MoleConfig(gate="token", route="trigger", route_absent="off"))
    assert not np.allclose(render(pipe), base, atol=1e-4)
    handle.detach()
