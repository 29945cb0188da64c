"""LoRA files: our loader against diffusers' own, both encodings, saving, inspecting, refusing bad files."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from mole_core.lora import delta_weight, sha256_file
from mole_core.image.lora_files import inspect_lora, load_lora, pipeline_components, save_lora, validate_lora
from mole_core.merge import merged_weights
from tests.tiny import build_pipeline
from tests.helpers import TARGETS, assert_close, model_outputs, random_lora


@pytest.fixture
def comps(tiny_pipe):
    return pipeline_components(tiny_pipe)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_loader_matches_diffusers_load_lora_weights(tiny_pipe, comps, tmp_path, fmt):
    path = tmp_path / f"x_{fmt}.safetensors"
    save_lora(random_lora(comps, alpha=1.0), path, format=fmt)
    base_unet, base_text = model_outputs(tiny_pipe)

    lora = load_lora(path)
    validate_lora(lora, comps)
    with merged_weights(comps, lora):
        ours_unet, ours_text = model_outputs(tiny_pipe)

    tiny_pipe.load_lora_weights(str(path), adapter_name="x")
    ref_unet, ref_text = model_outputs(tiny_pipe)
    assert not torch.allclose(ref_unet, base_unet)  # the LoRA does something
    assert not torch.allclose(ref_text, base_text)
    assert_close(ours_unet, ref_unet)
    assert_close(ours_text, ref_text)


def test_kohya_and_diffusers_encodings_load_identically(comps, tmp_path):
    lora = random_lora(comps, alpha=3.0, rank=4)
    save_lora(lora, tmp_path / "d.safetensors", format="diffusers")
    save_lora(lora, tmp_path / "k.safetensors", format="kohya")
    d, k = load_lora(tmp_path / "d.safetensors"), load_lora(tmp_path / "k.safetensors")
    assert (d.format, k.format) == ("diffusers", "kohya")
    assert set(d.modules) == set(k.modules) == set(TARGETS)
    for key, w in lora.modules.items():
        ref = delta_weight(w.A, w.B, w.scale)
        for got in (d.modules[key], k.modules[key]):
            torch.testing.assert_close(delta_weight(got.A, got.B, got.scale), ref, rtol=1e-6, atol=1e-7)
    assert all(w.scale == pytest.approx(3.0 / 4) for w in k.modules.values())  # alpha / rank


def test_hand_written_kohya_file_with_alpha(comps, tmp_path):
    """The kohya layout as trainers write it (text_model in the TE names, alpha tensors), read via diffusers."""
    g = torch.Generator().manual_seed(1)
    state = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 16, generator=g),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(16, 4, generator=g),
    }
    save_file(state, tmp_path / "k.safetensors")
    lora = load_lora(tmp_path / "k.safetensors", name="mine")
    assert lora.name == "mine" and lora.format == "kohya"
    q = lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.scale == pytest.approx(0.5) and q.rank == 4
    te = lora.modules["text_encoder.encoder.layers.0.self_attn.q_proj"]
    assert te.scale == 1.0  # no alpha in the file -> scale 1
    validate_lora(lora, comps)


def test_diffusers_metadata_alpha_sets_scale(comps, tmp_path):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {f"{key}.lora_A.weight": torch.randn(2, 8), f"{key}.lora_B.weight": torch.randn(8, 2)}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 8})}
    save_file(state, tmp_path / "m.safetensors", metadata=meta)
    assert load_lora(tmp_path / "m.safetensors").modules[key].scale == pytest.approx(4.0)


def test_file_saved_by_diffusers_with_metadata(tiny_pipe, comps, tmp_path):
    """A PEFT-format file as diffusers' own `save_lora_weights` writes it (alpha in the header metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "proj_in"], init_lora_weights=False,
                        alpha_pattern={"proj_in": 12})
    ref_pipe = build_pipeline(tmp_path / "ref")              # same seed: the same weights as tiny_pipe
    ref_pipe.unet.add_adapter(config, adapter_name="t")
    ref_unet, _ = model_outputs(ref_pipe)
    ref_pipe.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref_pipe.unet, adapter_name="t"),
                               unet_lora_adapter_metadata=config.to_dict(), weight_name="t.safetensors")

    lora = load_lora(tmp_path / "t.safetensors")
    assert {w.scale for k, w in lora.modules.items() if "proj_in" in k} == {3.0}
    assert {w.scale for k, w in lora.modules.items() if "proj_in" not in k} == {0.5}
    validate_lora(lora, comps)
    with merged_weights(comps, lora):
        ours_unet, _ = model_outputs(tiny_pipe)
    assert_close(ours_unet, ref_unet)


def test_save_is_atomic_and_overwrites(comps, tmp_path):
    path = tmp_path / "out" / "out.safetensors"
    save_lora(random_lora(comps, seed=1), path)
    save_lora(random_lora(comps, seed=2), path, format="kohya")
    assert [p.name for p in path.parent.iterdir()] == ["out.safetensors"]  # no temp file left
    assert load_lora(path).format == "kohya"
    with pytest.raises(ValueError, match="unknown LoRA file format"):
        save_lora(random_lora(comps), tmp_path / "z.safetensors", format="ckpt")


def test_inspect_and_sha256(comps, tmp_path):
    path = tmp_path / "x.safetensors"
    save_lora(random_lora(comps, rank=3, alpha=6.0), path, format="kohya")
    info = inspect_lora(path, comps)
    assert info["format"] == "kohya" and info["modules"] == len(TARGETS)
    assert info["targets"] == {"unet": 8, "text_encoder": 3}
    assert (info["linear"], info["conv"]) == (8, 3)
    assert info["ranks"] == [3] and info["alphas"] == [6.0]
    assert info["size_bytes"] == path.stat().st_size and info["verdict"] == "ok" and info["ok"]
    assert "no model" in inspect_lora(path)["verdict"]
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# ---- bad files: each refused with a message naming the file and what is wrong ----------------------

def _good_state():
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return {f"{key}.lora_A.weight": torch.randn(2, 8), f"{key}.lora_B.weight": torch.randn(8, 2)}


def _write(tmp_path, name, state):
    path = tmp_path / name
    save_file(state, path)
    return path


def test_refuses_pickles_without_unpickling(tmp_path):
    for suffix in (".ckpt", ".pt", ".bin"):
        path = tmp_path / f"x{suffix}"
        path.write_bytes(b"\x80\x04this would be a pickle")
        with pytest.raises(ValueError, match=rf"x\{suffix}.*pickle"):
            load_lora(path)


def test_refuses_empty_truncated_missing(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.safetensors.*empty"):
        load_lora(tmp_path / "empty.safetensors")
    full = _write(tmp_path, "full.safetensors", _good_state()).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="cut.safetensors.*truncated"):
        load_lora(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="nope.safetensors.*no such file"):
        load_lora(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix, what", [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr")])
def test_refuses_lycoris(tmp_path, suffix, what):
    state = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{suffix}": torch.randn(2, 8),
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=f"ly.safetensors.*{what}"):
        load_lora(_write(tmp_path, "ly.safetensors", state))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite(tmp_path, bad):
    state = _good_state()
    next(iter(state.values()))[0, 0] = bad
    with pytest.raises(ValueError, match=r"nf.safetensors.*lora_A.weight.*NaN/Inf"):
        load_lora(_write(tmp_path, "nf.safetensors", state))


def test_refuses_foreign_keys(tmp_path):
    state = {"transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 8),
             "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 2)}
    with pytest.raises(ValueError, match="flux.safetensors"):
        load_lora(_write(tmp_path, "flux.safetensors", state))


def test_sdxl_lora_on_sd15_names_module_and_shapes(comps, tmp_path):
    """Cross-attention of an SDXL UNet reads 2048-d text features; the tiny SD model has 16."""
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    state = {f"{key}.lora_A.weight": torch.randn(4, 2048), f"{key}.lora_B.weight": torch.randn(8, 4),
             "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 1280),
             "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(1280, 4)}
    lora = load_lora(_write(tmp_path, "xl.safetensors", state))
    with pytest.raises(ValueError) as e:
        validate_lora(lora, comps)
    msg = str(e.value)
    assert "xl.safetensors" in msg and key in msg
    assert "expected A (4, 16)" in msg and "found A (4, 2048)" in msg
    assert "no such component 'text_encoder_2'" in msg


def test_wrong_module_type_and_missing_module(comps, tmp_path):
    state = {"unet.down_blocks.0.resnets.0.norm1.lora_A.weight": torch.randn(2, 8),
             "unet.down_blocks.0.resnets.0.norm1.lora_B.weight": torch.randn(8, 2),
             "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.randn(2, 8),
             "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.randn(8, 2)}
    lora = load_lora(_write(tmp_path, "odd.safetensors", state))
    with pytest.raises(ValueError, match=r"(?s)GroupNorm.*no such module"):
        validate_lora(lora, comps)
