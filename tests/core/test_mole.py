"""MoLE layers and attachment: equivalences on tiny models built from config (nothing downloaded).

untrained == equal-weight linear; one-hot gate == that LoRA alone == diffusers loading its file; constant
gate == linear merge; all masked == base; mask + renormalise == hand computation; detach bit-identical;
gate counts per granularity; CFG (per-sample gates) and two resolutions; Linear, 1x1 and 3x3 Conv LoRAs.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM

from mole_core.attach import MoleConfig, attach
from mole_core.layers import Gate, MoleConv2d, MoleLinear
from mole_core.lora import Lora, LoraWeights, delta_weight
from mole_core.image.lora_files import save_lora
from mole_core.merge import merge_loras, merged_weights
from tests.helpers import (CONVS, UNET_LINEAR, close, components_of, inputs, make_lora, pipeline_loras,
                           randomise_gates, run)


@torch.no_grad()
def dense(comps: nn.ModuleDict, loras: list[Lora], weights: list[float]) -> nn.ModuleDict:
    """A copy of the model with W + Σ w_i ΔW_i written into the weights (the reference)."""
    ref = copy.deepcopy(comps)
    for lora, w in zip(loras, weights):
        for key, lw in lora.modules.items():
            ref.get_submodule(key).weight += w * delta_weight(lw.A, lw.B, lw.scale)
    return ref


@pytest.fixture
def setup(tiny_pipe):
    comps = components_of(tiny_pipe)
    return tiny_pipe, comps, pipeline_loras(comps)


# ---- equivalences ---------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["matrix", "layer", "block", "network"])
def test_untrained_mole_equals_equal_weight_linear(setup, granularity):
    _, comps, loras = setup
    x = inputs()
    expected = run(dense(comps, loras, [1 / 3] * 3), x)
    handle = attach(comps, loras, MoleConfig(granularity=granularity))
    got = run(comps, x)
    close(got, expected)
    assert handle.mean_gates() == pytest.approx([1 / 3] * 3, abs=1e-6)
    # the foundation's exact linear merge agrees too
    handle.detach()
    with merged_weights(comps, merge_loras(loras, method="linear")):
        close(run(comps, x), expected)


def test_untrained_equals_linear_at_two_resolutions(setup):
    _, comps, loras = setup
    ref = dense(comps, loras, [1 / 3] * 3)
    handle = attach(comps, loras)
    for size in (8, 16):
        x = inputs(size=size)
        close(run(comps, x), run(ref, x))
    handle.detach()


def test_one_hot_gate_equals_single_lora(setup):
    _, comps, loras = setup
    x = inputs()
    handle = attach(comps, loras)
    randomise_gates(handle, x)
    for i, lora in enumerate(loras):
        one_hot = [1.0 if j == i else 0.0 for j in range(3)]
        with handle.settings(gates=one_hot):
            got = run(comps, x)
        handle.detach()
        close(got, run(dense(comps, [lora], [1.0]), x))
        handle = attach(comps, loras)


def test_one_hot_gate_equals_diffusers_loading_the_file(setup, tmp_path):
    pipe, comps, loras = setup
    x = inputs()
    target = loras[1]
    path = tmp_path / "beta.safetensors"
    save_lora(target, path)
    handle = attach(comps, loras)
    with handle.settings(gates={"alpha": 0.0, "beta": 1.0, "gamma": 0.0}):
        ours = run(comps, x)
    handle.detach()
    pipe.load_lora_weights(str(path), adapter_name="beta")
    theirs = run(comps, x)
    pipe.unload_lora_weights()
    close(ours, theirs, tol=2e-5)


def test_constant_gate_equals_linear_merge_with_those_weights(setup):
    _, comps, loras = setup
    x = inputs()
    w = [0.2, 0.5, 0.9]                                            # not normalised: used as given
    handle = attach(comps, loras, MoleConfig(granularity="layer"))
    randomise_gates(handle, x)                                     # forced gates override trained ones
    with handle.settings(gates=w):
        got = run(comps, x)
    # strengths multiply each expert's contribution: same result from gates 1 and strengths w
    with handle.settings(gates=[1.0, 1.0, 1.0], strengths={"alpha": 0.2, "beta": 0.5, "gamma": 0.9}):
        got_strengths = run(comps, x)
    handle.detach()
    expected = run(dense(comps, loras, w), x)
    close(got, expected)
    close(got_strengths, expected)
    with merged_weights(comps, merge_loras(loras, w, method="linear", normalize=False)):
        close(got, run(comps, x))


def test_all_masked_is_base_and_detach_is_bit_identical(setup):
    _, comps, loras = setup
    x = inputs()
    base = run(comps, x)
    originals = {k: comps.get_submodule(k) for lora in loras for k in lora.modules}
    handle = attach(comps, loras)
    randomise_gates(handle, x)
    assert not torch.equal(run(comps, x)[0], base[0])
    with handle.settings(mask={"alpha": False, "beta": False, "gamma": False}):
        masked = run(comps, x)
    assert all(torch.equal(a, b) for a, b in zip(masked, base))
    handle.detach()
    assert all(comps.get_submodule(k) is m for k, m in originals.items())
    assert not any(isinstance(m, (MoleLinear, MoleConv2d, Gate)) for m in comps.modules())
    assert all(torch.equal(a, b) for a, b in zip(run(comps, x), base))


def test_settings_are_restored_on_exit(setup):
    _, comps, loras = setup
    x = inputs()
    handle = attach(comps, loras)
    randomise_gates(handle, x)
    full = run(comps, x)
    with handle.settings(mask=[True, False, True]):
        only_ac = run(comps, x)
        with handle.settings(mask={"alpha": False}):               # a second user's setting, in turn
            inner = run(comps, x)
        close(run(comps, x), only_ac)
    close(run(comps, x), full)
    assert not torch.allclose(only_ac[0], full[0]) and not torch.allclose(inner[0], only_ac[0])
    with pytest.raises(ValueError, match="unknown expert"):
        with handle.settings(mask={"delta": False}):
            pass
    with pytest.raises(ValueError, match="one value per expert"):
        with handle.settings(strengths=[1.0, 2.0]):
            pass


def one_linear_masked_by_hand(gate_kind: str):
    """A bare model with one wrapped Linear, random gate, experts masked [on, off, on], run under a
    recording; -> (output, recording, W, expert outputs E_i (B, T, d_out), the gate, the mask)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    loras = [make_lora(model, f"e{i}", 10 + i, r, ["0"]) for i, r in enumerate((1, 2, 3))]
    handle = attach(model, loras, MoleConfig(granularity="matrix", gate=gate_kind))
    x = torch.randn(3, 4, 6)                                       # (B, T, d_in)
    with torch.no_grad():
        model(x)
    gate = handle.gate_modules()[0]
    with torch.no_grad():
        gate.proj.weight.normal_()
        gate.proj.bias.normal_()
        gate.log_tau.fill_(0.4)
    m = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad(), handle.settings(mask=m.bool().tolist()), handle.recording() as rec:
        got = model(x)
    E = [l.modules["0"].scale * (x @ l.modules["0"].A.T @ l.modules["0"].B.T) for l in loras]   # (B, T, d_out)
    return got, rec, handle.layers["0"].base(x), E, gate, m


def test_mask_renormalises_by_hand_on_one_linear():
    """A bare model with one wrapped Linear: the output matches the docs/MOLE.md formulas written out."""
    got, rec, Wx, E, gate, m = one_linear_masked_by_hand("sample")
    z = F.layer_norm(torch.cat([e.mean(1) for e in E], dim=-1), (3 * 5,))
    G = torch.softmax((z @ gate.proj.weight.T + gate.proj.bias) / torch.exp(torch.tensor(0.4)), dim=-1)
    G = m * G / (m * G).sum(-1, keepdim=True)
    expected = Wx + sum(G[:, i, None, None] * E[i] for i in range(3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert len(rec.entries) == 1
    torch.testing.assert_close(rec.entries[0][3], G)
    assert G[:, 1].abs().max().item() == 0.0


# ---- granularity --------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity,unet_only,with_convs,text", [
    # tiny UNet: 4 transformer blocks x (attn1, attn2: 4 linears; ff: 2 linears); convs: 2 proj_in of a
    # Transformer2DModel, resnet conv1, a downsampler conv (no block), a resnet conv_shortcut
    ("matrix", 40, 45, 12), ("layer", 12, 17, 4), ("block", 4, 7, 2), ("network", 1, 1, 1)])
def test_gate_count_per_granularity(setup, granularity, unet_only, with_convs, text):
    _, comps, loras = setup
    cfg = MoleConfig(granularity=granularity)
    unet_lora = Lora("u", {k: w for k, w in loras[0].modules.items() if UNET_LINEAR.search(k)})
    h = attach(comps, [unet_lora], cfg)
    assert len(h.groups) == unet_only
    h.detach()
    h = attach(comps, [Lora("u", {k: w for k, w in loras[0].modules.items() if k.startswith("unet.")})], cfg)
    assert len(h.groups) == with_convs
    h.detach()
    h = attach(comps, [Lora("t", {k: w for k, w in loras[0].modules.items() if k.startswith("text_encoder.")})], cfg)
    assert len(h.groups) == text and len(h.gates) == text
    h.detach()
    # groups never span two networks
    h = attach(comps, loras, cfg)
    assert len(h.groups) == with_convs + text
    assert all(g.split(".")[0] in ("unet", "text_encoder") for g in h.groups)
    h.detach()


def test_block_groups_on_the_unet(setup):
    _, comps, loras = setup
    h = attach(comps, loras, MoleConfig(granularity="block"))
    assert "unet.down_blocks.0.attentions.0" in h.groups          # Transformer2DModel (with its proj_in)
    assert "unet.down_blocks.0.resnets.0" in h.groups             # ResnetBlock2D
    assert "unet.down_blocks.0.downsamplers.0.conv" in h.groups   # no block around it: its own gate
    assert "text_encoder.encoder.layers.1" in h.groups            # CLIPEncoderLayer
    assert not any(g.endswith(("ff.net.0", "to_out", "transformer_blocks.0")) for g in h.groups)
    h.detach()


@pytest.mark.parametrize("granularity,count", [("matrix", 14), ("layer", 4), ("block", 2), ("network", 1)])
def test_gate_count_on_a_bare_llama(granularity, count):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    keys = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    ids = torch.randint(0, 40, (2, 7))
    loras = [make_lora(model, f"e{i}", i, 2, keys) for i in range(2)]
    with torch.no_grad():
        expected = dense(nn.ModuleDict({"m": model}), [Lora(l.name, {"m." + k: w for k, w in l.modules.items()})
                                                       for l in loras], [0.5, 0.5])["m"](ids).logits
    h = attach(model, loras, MoleConfig(granularity=granularity))
    assert len(h.groups) == count
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
    if granularity == "network":
        assert h.groups == ["model"]
    h.detach()


def test_leader_is_the_first_member_to_run():
    """CLIPAttention registers k_proj before q_proj; whichever runs first leads, and must keep leading."""
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16))
    keys = [f"encoder.layers.0.self_attn.{p}_proj" for p in ("k", "v", "q", "out")]
    h = attach(te, [make_lora(te, "a", 0, 2, keys), make_lora(te, "b", 1, 2, keys)], MoleConfig(granularity="layer"))
    order = []
    hooks = [h.layers[k].register_forward_pre_hook(lambda m, a: order.append(m.key)) for k in keys]
    with torch.no_grad():
        te(torch.randint(0, 30, (2, 5)))
    layout = h.gate_layout()["encoder.layers.0.self_attn"]
    assert layout["leader"] == order[0] and layout["d_out"] == 8
    for hook in hooks:
        hook.remove()
    # a pass in which another member runs first is refused with a clear message
    h.gate_modules()[0].leader = "encoder.layers.0.self_attn.out_proj"
    with pytest.raises(RuntimeError, match="ran before the group's leader"):
        with torch.no_grad():
            te(torch.randint(0, 30, (2, 5)))
    h.detach()


# ---- CFG, recording, errors ----------------------------------------------------------------------

def test_per_sample_gates_under_cfg(setup):
    _, comps, loras = setup
    x = inputs(batch=2)
    handle = attach(comps, loras)
    randomise_gates(handle, x)
    with handle.recording() as rec:
        both = run(comps, x)
    singles = [run(comps, tuple(t[i:i + 1] for t in x)) for i in range(2)]
    for j in range(2):
        close([both[j]], [torch.cat([s[j] for s in singles])])
    w = rec.entries[0][3]
    assert w.shape == (2, 3) and not torch.allclose(w[0], w[1])   # one gate per sample, not shared


def test_recording_through_the_pipeline(setup, tmp_path):
    pipe, comps, loras = setup
    handle = attach(comps, loras)
    with handle.recording() as rec:
        pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, height=16, width=16,
             generator=torch.Generator().manual_seed(0), output_type="np")
    unet_groups = [g for g in handle.groups if g.startswith("unet.")]
    unet_steps = sorted({e[2] for e in rec.entries if e[1] == "unet"})
    assert unet_steps == [0, 1]                                    # call index per UNet forward = step
    rows = rec.table()
    assert set(rows[0]) == {"group", "step", "sample", "expert", "weight"}
    unet_rows = [r for r in rows if r["group"].startswith("unet.")]
    assert len(unet_rows) == len(unet_groups) * 2 * 2 * 3          # groups x steps x samples (CFG) x experts
    assert all(abs(r["weight"] - 1 / 3) < 1e-6 for r in rows)
    groups, means = rec.mean_by_group()
    assert groups == handle.groups and means.shape == (len(handle.groups), 3)
    steps, per_step = rec.mean_by_step("unet")
    assert steps == [0, 1] and per_step.shape == (2, 3)
    text = rec.to_csv(tmp_path / "gates.csv").read_text().splitlines()
    assert text[0] == "group,step,sample,expert,weight" and len(text) == len(rows) + 1
    handle.detach()


def test_attach_refuses_what_does_not_fit(setup):
    _, comps, loras = setup
    bad_key = Lora("x", {"unet.down_blocks.9.nothing": loras[0].modules[CONVS[0]]})
    with pytest.raises(ValueError, match="unet.down_blocks.9.nothing"):
        attach(comps, [bad_key])
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = Lora("y", {key: LoraWeights(torch.zeros(2, 7), torch.zeros(16, 2), 1.0)})
    with pytest.raises(ValueError, match=r"expected A \(2, 16\), B \(16, 2\); found A \(2, 7\)"):
        attach(comps, [wrong])
    with pytest.raises(ValueError, match="unique"):
        attach(comps, [loras[0], loras[0]])
    with pytest.raises(ValueError, match="granularity"):
        attach(comps, loras, MoleConfig(granularity="token"))
    h = attach(comps, loras)
    with pytest.raises(ValueError, match="already carries MoLE"):
        attach(comps, loras[:1])
    h.detach()
    assert not any(isinstance(m, (MoleLinear, MoleConv2d)) for m in comps.modules())


def test_registered_tensors_follow_the_model(setup):
    _, comps, loras = setup
    handle = attach(comps, loras)
    run(comps, inputs())
    layer = handle.layers[CONVS[2]]
    assert {"A_cat", "B_cat", "scales"} <= {n for n, _ in layer.named_buffers()}
    assert layer.A_cat.shape == (2 + 3, 8, 3, 3)                   # alpha r=2 + beta r=3; gamma has no conv
    comps.to(torch.float64)
    out = run(comps, tuple(t.double() if t.is_floating_point() else t for t in inputs()))
    assert out[0].dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in handle.gate_parameters())
    gate_ids = {id(p) for p in handle.gate_parameters()}
    assert gate_ids <= {id(p) for p in comps.parameters()}          # the gates travel with the model
    handle.detach()


# ---- per-token gates (MoleConfig(gate="token"), beside the paper's per-sample gates) -----------------

def test_per_token_gates_by_hand_on_one_linear():
    """gate="token": the same gate applied to each token's expert outputs; matches the formula written out."""
    got, rec, Wx, E, gate, m = one_linear_masked_by_hand("token")
    z = F.layer_norm(torch.cat(E, dim=-1), (3 * 5,))                                           # per token
    G = torch.softmax((z @ gate.proj.weight.T + gate.proj.bias) / torch.exp(torch.tensor(0.4)), dim=-1)  # (B, T, N)
    G = m * G / (m * G).sum(-1, keepdim=True)
    expected = Wx + sum(G[..., i, None] * E[i] for i in range(3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(G[:, 0], G[:, 1])                    # tokens of one sample really differ
    torch.testing.assert_close(rec.entries[0][3], G.mean(1))       # recorded: the per-sample mean


def test_per_token_gates_by_hand_on_a_conv():
    """A 3x3 conv: each pixel gets its own expert weights (tokens in row-major pixel order)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    loras = [make_lora(model, f"e{i}", 20 + i, r, ["0"]) for i, r in enumerate((2, 3))]
    handle = attach(model, loras, MoleConfig(granularity="matrix", gate="token"))
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        model(x)
        gate = handle.gate_modules()[0]
        gate.proj.weight.normal_()
        gate.proj.bias.normal_()
        got = model(x)
        E = [F.conv2d(F.conv2d(x, l.modules["0"].A, padding=1), l.modules["0"].B) * l.modules["0"].scale
             for l in loras]                                                            # (B, d_out, H, W)
        z = F.layer_norm(torch.cat(E, 1).permute(0, 2, 3, 1), (2 * 4,))                # (B, H, W, N·d_out)
        G = torch.softmax(z @ gate.proj.weight.T + gate.proj.bias, dim=-1)             # (B, H, W, N)
        expected = handle.layers["0"].base(x) + sum(G[..., i].unsqueeze(1) * E[i] for i in range(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_per_token_gates_untrained_constant_and_one_hot_agree_with_per_sample(setup):
    """Where per-token weights are the same at every token, per-token MoLE == per-sample MoLE:
    untrained (equal weights), a forced one-hot gate, a bias-only gate; a cross-attention member (text
    tokens, another layout than the leader's pixels) runs too."""
    _, comps, loras = setup
    x = inputs()
    equal = run(dense(comps, loras, [1 / 3] * 3), x)
    sample = attach(comps, loras, MoleConfig(granularity="block"))
    randomise_gates(sample, x, scale=0.0)                          # bias only: constant over tokens
    with torch.no_grad():
        bias_only, one_hot = run(comps, x), None
        with sample.settings(gates=[0.0, 1.0, 0.0]):
            one_hot = run(comps, x)
    state = sample.gate_state_dict()
    sample.detach()
    token = attach(comps, loras, MoleConfig(granularity="block", gate="token"))
    close(run(comps, x), equal)
    token.load_gate_state_dict(state, {g: {"leader": l} for g, l in
                                      ((g, v["leader"]) for g, v in sample.gate_layout().items())})
    close(run(comps, x), bias_only)
    with token.settings(gates=[0.0, 1.0, 0.0]):
        close(run(comps, x), one_hot)
    randomise_gates(token, x, scale=0.05)                          # now tokens differ: so do the outputs
    assert not torch.allclose(run(comps, x)[0], bias_only[0], atol=1e-4)
    token.detach()


def test_mixture_keeps_its_gate_kind(setup, tmp_path):
    from mole_core.mixture import MixtureError, apply_mixture, load_mixture, save_mixture
    _, comps, loras = setup
    x = inputs()
    handle = attach(comps, loras, MoleConfig(gate="token"))
    randomise_gates(handle, x)
    files = []
    for lora in loras:
        save_lora(lora, tmp_path / f"{lora.name}.safetensors")
        files.append((lora.name, tmp_path / f"{lora.name}.safetensors"))
    expected = run(comps, x)
    save_mixture(tmp_path / "m.safetensors", handle, files, config=handle.config)
    handle.detach()
    mixture = load_mixture(tmp_path / "m.safetensors")
    assert mixture.gate == "token" and mixture.mole_config().gate == "token"
    wrong = attach(comps, loras, MoleConfig())
    with pytest.raises(MixtureError, match="per-token gates; the attachment was made with per-sample"):
        apply_mixture(wrong, mixture)
    wrong.detach()
    right = attach(comps, loras, mixture.mole_config())
    apply_mixture(right, mixture, files)
    close(run(comps, x), expected)
    right.detach()
    with pytest.raises(ValueError, match="Unknown gate kind 'pixel'"):
        attach(comps, loras, MoleConfig(gate="pixel"))
