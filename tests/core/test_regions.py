"""Regions (mole_core/regions.py): per-pixel expert weights at the image-token modules, on a tiny "unet" whose
modules read (B, h·w, d) tokens and whose conv reads (B, C, h, w). Equivalences:

- every region "whole" (or none) is the model without regions, bit for bit;
- with "a" on the left and "b" on the right, the left half of the output is "a" alone, the right half "b" alone
  (one-hot gates), for a per-sample gate, a per-token gate and a forced gate;
- a pixel no region covers runs the base model; an expert without a region acts everywhere;
- a text-side token count (no resolution of the map) keeps the gate's weights;
- bad values are refused with a sentence naming the field; Mix / mixture / snippet carry the regions.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from mole_core.attach import MoleConfig, attach
from mole_core.mix import Mix
from mole_core.mixture import load_mixture, save_mixture
from mole_core.regions import (RegionMaps, caption_positions, caption_regions, overlay, parse_region,
                               parse_regions, region_phrases, stack)
from tests.helpers import make_lora

H = W = 4


class Tiny(nn.Module):
    """A conv on the (B, C, h, w) grid, then a linear on its h·w tokens (row-major, as diffusers flattens)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.proj = nn.Linear(5, 6)

    def forward(self, x):
        y = self.conv(x)                                               # (B, 5, h, w)
        return self.proj(y.flatten(2).transpose(1, 2))                 # (B, h·w, 6)


def setup(gate="sample"):
    torch.manual_seed(0)
    model = nn.ModuleDict({"unet": Tiny()})
    loras = [make_lora(model, name, seed, 2, ["unet.conv", "unet.proj"]) for name, seed in (("a", 1), ("b", 2))]
    handle = attach(model, loras, MoleConfig(granularity="block", gate=gate))
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(3))
    return handle, x


def maps(regions, keys=("a", "b")):
    weights = stack(parse_regions(regions, keys), keys, H, W)
    return None if weights is None else RegionMaps(weights, "unet")


@torch.no_grad()
def out(handle, x, **settings):
    with handle.settings(**settings):
        return handle.model["unet"](x)


@pytest.mark.parametrize("gate", ["sample", "token"])
def test_whole_regions_are_no_regions_bit_for_bit(gate):
    handle, x = setup(gate)
    plain = out(handle, x)
    assert maps({"a": "whole", "b": "0,0,1,1"}) is None             # nothing to apply
    torch.testing.assert_close(out(handle, x, regions=RegionMaps(torch.ones(2, H, W), "unet")), plain,
                               rtol=0, atol=1e-6)
    assert torch.equal(out(handle, x), plain)                        # nothing left attached after the call


@pytest.mark.parametrize("gate", ["sample", "token"])
def test_left_and_right_halves_are_each_expert_alone(gate):
    handle, x = setup(gate)
    placed = out(handle, x, regions=maps({"a": "left", "b": "right"})).reshape(2, H, W, -1)
    only_a = out(handle, x, gates=[1.0, 0.0]).reshape(2, H, W, -1)
    only_b = out(handle, x, gates=[0.0, 1.0]).reshape(2, H, W, -1)
    # the conv's 3×3 kernel reads one column across the border: compare away from it, on the projection's
    # tokens whose conv inputs lie wholly inside one half
    torch.testing.assert_close(placed[:, :, :1], only_a[:, :, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(placed[:, :, 3:], only_b[:, :, 3:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(only_a, only_b)


def test_forced_gates_with_regions_give_each_pixel_its_lora_at_full_strength():
    handle, x = setup("sample")
    placed = out(handle, x, gates=[0.5, 0.5], regions=maps({"a": "left", "b": "right"})).reshape(2, H, W, -1)
    only_a = out(handle, x, gates=[1.0, 0.0]).reshape(2, H, W, -1)
    torch.testing.assert_close(placed[:, :, :1], only_a[:, :, :1], rtol=1e-5, atol=1e-5)


def test_uncovered_pixels_run_the_base_and_an_expert_without_region_acts_everywhere():
    handle, x = setup("sample")
    base = out(handle, x, mask=[False, False]).reshape(2, H, W, -1)
    placed = out(handle, x, regions=maps({"a": "left", "b": "left"})).reshape(2, H, W, -1)
    torch.testing.assert_close(placed[:, :, 3:], base[:, :, 3:], rtol=1e-5, atol=1e-5)   # right: no one
    only_b = out(handle, x, gates=[0.0, 1.0]).reshape(2, H, W, -1)
    placed = out(handle, x, regions=maps({"a": "0,0,0.01,0.01"})).reshape(2, H, W, -1)    # a: no cell; b: all
    torch.testing.assert_close(placed, only_b, rtol=1e-5, atol=1e-5)


def test_a_token_count_that_is_no_resolution_keeps_the_gate():
    m = maps({"a": "left"})
    assert m.at("unet", "unet.x", H * W).shape == (1, H * W, 2)
    assert m.at("unet", "unet.x", (H // 2) * (W // 2)).shape == (1, 4, 2)      # a coarser UNet level
    assert m.at("unet", "unet.attn2.to_k", 77) is None                          # text tokens
    assert m.at("text_encoder", "text_encoder.x", H * W) is None                # another network
    t = RegionMaps(torch.ones(2, 8, 8), "transformer", patch=2)
    assert t.at("transformer", "transformer.transformer_blocks.0.attn.add_k_proj", 16) is None
    assert t.at("transformer", "transformer.transformer_blocks.0.attn.to_q", 16).shape == (1, 16, 2)
    joint = t.at("transformer", "transformer.single_transformer_blocks.0.proj_mlp", 16 + 7)
    assert joint.shape == (1, 23, 2) and bool((joint[0, :7] == 1).all())      # [text, image]


def test_presets_boxes_and_mask_images(tmp_path):
    assert parse_region("left").grid(2, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert parse_region("top").grid(2, 2).tolist() == [[1, 1], [0, 0]]
    assert parse_region("centre").grid(4, 4)[1:3, 1:3].eq(1).all() and parse_region("centre").grid(4, 4).sum() == 4
    assert parse_region("0.5,0,1,0.5").grid(2, 2).tolist() == [[0, 1], [0, 0]]
    drawn = np.zeros((8, 8), np.uint8)
    drawn[:, 4:] = 255
    PIL.Image.fromarray(drawn).save(tmp_path / "mask.png")
    region = parse_region(str(tmp_path / "mask.png"))
    assert region.spec == "mask.png" and region.grid(2, 2).tolist() == [[0, 1], [0, 1]]
    assert parse_region(drawn).grid(2, 2).tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("value, words", [("leftish", "neither a preset"), ("0,0,2,1", "0 ≤ x0 < x1 ≤ 1"),
                                          ("1,2,3", "four numbers"), ("nan,0,1,1", "four numbers"),
                                          ("/srv/secret/missing.png", "'missing.png'")])
def test_bad_regions_are_refused_naming_the_field(value, words):
    with pytest.raises(ValueError, match="regions of 'a'") as err:
        Mix("mole", ("a", "b"), regions={"a": value}).check()
    assert words in str(err.value) and "/srv" not in str(err.value)
    with pytest.raises(ValueError, match="not in the selection"):
        Mix("mole", ("a", "b"), regions={"c": "left"}).check()


def test_an_unreadable_mask_file_is_refused(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="'bad.png' is not an image"):
        parse_region(str(tmp_path / "bad.png"), "regions of 'a'")


def test_an_oversized_mask_is_refused_before_its_pixels_are_read(tmp_path, monkeypatch):
    import PIL.Image
    from mole_core import regions
    PIL.Image.new("L", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(regions, "MAX_MASK_PIXELS", 40 * 30 - 1)
    with pytest.raises(ValueError, match="'big.png' is 40 × 30 pixels; a mask may have at most 1,199"):
        parse_region(str(tmp_path / "big.png"), "regions of 'a'")
    with pytest.raises(ValueError, match="is 40 × 30 pixels"):
        parse_region(np.zeros((40, 30), np.float32), "regions of 'a'")


def test_snippet_and_mixture_carry_the_regions(tmp_path):
    mix = Mix("mole", ("a", "b"), regions={"a": "left", "b": "0.5,0,1,1"})
    assert "regions={'a': 'left', 'b': '0.5,0,1,1'}" in mix.to_python()
    assert "regions" not in Mix("linear", ("a", "b"), regions={"a": "left"}).to_python()
    handle, x = setup("sample")
    out(handle, x)                                                    # materialise the gates
    files = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode())
        files.append((name, tmp_path / f"{name}.safetensors"))
    drawn = np.zeros((4, 4), np.float32)
    drawn[:2] = 1
    save_mixture(tmp_path / "mix.safetensors", handle, files, regions={"a": "left", "b": drawn})
    mixture = load_mixture(tmp_path / "mix.safetensors")
    assert mixture.regions["a"] == parse_region("left")
    assert np.array_equal(mixture.regions["b"].mask, drawn) and "regions.b" not in mixture.gate_state


def test_caption_positions_follow_each_trigger():
    triggers = {"face": ["zwx"], "ring": ["qrb"], "checker": ["vkt"]}
    caption = "a qrb on the left and a zwx in the center and a red circle on the right"
    assert caption_positions(caption, triggers) == {"ring": "left", "face": "center"}
    regions = caption_regions(caption, triggers)
    assert regions["ring"].grid(1, 3).tolist() == [[1, 0, 0]] and regions["face"].grid(1, 3).tolist() == [[0, 1, 0]]
    assert caption_positions("a red circle on the left", triggers) == {}


def test_overlay_tints_each_region():
    image = overlay(None, {"a": parse_region("left"), "b": parse_region("right")}, ["a", "b"])
    pixels = np.asarray(image, dtype=int)
    assert pixels[128, 10, 0] > pixels[128, 10, 2] and pixels[128, 250, 2] > pixels[128, 250, 0]


def test_region_phrases_keep_each_experts_clauses_and_the_shared_ones():
    triggers = {"face": "zwx", "checker": "vrk", "ring": ["qlo"], "style": "sty"}
    world = "a zwx on the left and a vrk in the center and a qlo on the right"
    assert region_phrases(world, triggers, ["face", "checker", "ring"]) == {
        "face": "a zwx on the left", "checker": "a vrk in the center", "ring": "a qlo on the right"}
    photo = "a photo of zwx dog, qlo cat; on a beach BREAK sunny"
    assert region_phrases(photo, triggers, ["face", "ring"]) == {
        "face": "a photo of zwx dog, on a beach, sunny", "ring": "qlo cat, on a beach, sunny"}
    assert region_phrases("a zwx and a vrk", triggers, ["face", "style"])["style"] == "a vrk"   # names no placed one
    assert region_phrases("a zwx", triggers, ["checker", "face"])["checker"] == "a zwx"          # nothing left: all
