"""Model families (SD, SDXL, SD3, FLUX): detection, loading, starting noise, and LoRA files against diffusers.

Every equivalence is with diffusers' own machinery on tiny pipelines built from config (tests/tiny_families.py):
a LoRA trained with PEFT and saved by the pipeline class's own `save_lora_weights` gives, through our loader and
`merged_weights`, the same output as `pipe.load_lora_weights`; our starting noise is the very noise the pipeline
draws itself; our kohya SDXL file is read by diffusers as the diffusers one.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from mole_core.image.families import (FAMILIES, components, default_size, denoiser, family_of, family_of_lora,
                                latent_shape, latents_for, lora_families, load_pipeline, pipeline_class,
                                text_encoders)
from mole_core.lora import Lora, LoraWeights, delta_weight
from mole_core.image.lora_files import check_family, inspect_lora, load_lora, save_lora, validate_lora
from mole_core.merge import merged_weights
from tests.tiny_families import SIDE, call_kwargs, make_family_dir

torch.set_num_threads(1)

TEXT_ENCODERS = {"sd": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
                 "sd3": ["text_encoder", "text_encoder_2", "text_encoder_3"], "flux": ["text_encoder", "text_encoder_2"]}
# What a LoRA usually targets (diffusers' train_dreambooth_lora_{sdxl,sd3,flux}.py), as PEFT target_modules.
DENOISER_TARGETS = {"sdxl": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"],
                    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "ff_context.net.2"],
                    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp", "proj_out"]}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny family built once and saved as a diffusers folder."""
    root = tmp_path_factory.mktemp("families")
    return {name: make_family_dir(name, root / name) for name in FAMILIES}


def open_pipe(folders, family):
    return load_pipeline(folders[family], "cpu")


def final_latents(pipe, family, seed=7, **kwargs):
    """Two denoising steps from fixed latents, latents out (text encoders and denoiser both count)."""
    with torch.no_grad():
        return pipe("a red circle on the left", num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **call_kwargs(family), **kwargs).images


def assert_close(a, b, rtol=1e-4):
    err = (a - b).abs().max().item()
    assert err <= rtol * max(a.abs().max().item(), 1e-6), f"max abs diff {err}"


# ---- pipelines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_opens_from_its_folder_and_its_family_is_detected(folders, family):
    pipe = open_pipe(folders, family)
    fam = family_of(pipe)
    assert fam is FAMILIES[family] and type(pipe).__name__ == fam.pipeline and family_of(type(pipe)) is fam
    assert denoiser(pipe) == ("unet" if family in ("sd", "sdxl") else "transformer")
    assert text_encoders(pipe) == TEXT_ENCODERS[family]
    comps = components(pipe)
    assert list(comps) == [denoiser(pipe), *fam.lora_text_encoders]          # T5 is never a LoRA target
    for name in fam.lora_text_encoders:        # CLIPTextModelWithProjection keeps `.text_model` in transformers 5
        assert comps[name] is getattr(getattr(pipe, name), "text_model", getattr(pipe, name))
    assert all(not p.requires_grad for p in comps.parameters()) and not any(m.training for c in comps.values() for m in c.modules())
    assert getattr(pipe, "safety_checker", None) is None
    image = pipe("a red circle", num_inference_steps=2, output_type="np", **call_kwargs(family)).images
    assert image.shape == (1, SIDE, SIDE, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_load_pipeline_refuses_what_is_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        load_pipeline(tmp_path, "cpu")
    with pytest.raises(ValueError, match="not a pipeline of a supported family"):
        family_of(object())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_latents_for_is_the_noise_the_pipeline_draws_itself(folders, family):
    pipe = open_pipe(folders, family)
    latents = latents_for(pipe, seed=3, height=SIDE, width=SIDE)
    packed = family == "flux"
    channels, f = getattr(pipe, denoiser(pipe)).config.in_channels, pipe.vae_scale_factor   # tiny SD: f = 2
    expected = (1, (SIDE // 16) ** 2, 64) if packed else (1, channels, SIDE // f, SIDE // f)
    assert latents.shape == latent_shape(pipe, SIDE, SIDE) == expected
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"
    assert torch.equal(latents, latents_for(pipe, 3, SIDE, SIDE))
    assert not torch.equal(latents, latents_for(pipe, 4, SIDE, SIDE))
    # pipe(latents=ours) == pipe(generator=seed): the layout (and FLUX's packing) is the pipeline's own
    ours = final_latents(pipe, family, latents=latents)
    theirs = final_latents(pipe, family, seed=3)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="multiple of"):
        latents_for(pipe, 0, SIDE + 1, SIDE)


def test_default_size(folders):
    assert default_size(open_pipe(folders, "sdxl")) == (SIDE, SIDE)
    assert default_size(open_pipe(folders, "sd3")) == (SIDE, SIDE)
    assert default_size(open_pipe(folders, "flux")) == (1024, 1024)   # FluxPipeline.default_sample_size 128 × 8


# ---- LoRA files of each family against diffusers' own loading --------------------------------------

def peft_lora_file(folders, family, folder, r=4, alpha=8):
    """A LoRA trained-as-if with PEFT on the denoiser and the usual text encoders, saved by the pipeline class's
    own save_lora_weights (PEFT LoraConfig in the header, as diffusers' training scripts write it)."""
    pipe = open_pipe(folders, family)
    cls, fam = pipeline_class(family), FAMILIES[family]
    kwargs = {}
    torch.manual_seed(1)
    for comp, targets in ((fam.denoiser, DENOISER_TARGETS[family]),
                          *((te, TEXT_TARGETS) for te in fam.lora_text_encoders)):
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        model = getattr(pipe, comp)
        model.add_adapter(config, adapter_name="t") if comp == fam.denoiser else _add_te_adapter(model, config)
        kwargs[f"{comp}_lora_layers"] = get_peft_model_state_dict(model, adapter_name="t")
        kwargs[f"{comp}_lora_adapter_metadata"] = config.to_dict()
    cls.save_lora_weights(folder, weight_name=f"{family}.safetensors", **kwargs)
    return folder / f"{family}.safetensors"


def _add_te_adapter(model, config):
    from peft import inject_adapter_in_model
    inject_adapter_in_model(config, model, adapter_name="t")
    for p in model.parameters():          # PEFT's init_lora_weights=False already made B non-zero
        p.requires_grad_(False)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_peft_lora_saved_by_diffusers_merges_like_diffusers_loads_it(folders, tmp_path, family):
    path = peft_lora_file(folders, family, tmp_path)
    pipe = open_pipe(folders, family)
    base = final_latents(pipe, family)

    lora = load_lora(path, family=family)
    assert lora.family == family and lora.format == "diffusers"
    fam = FAMILIES[family]
    assert {k.split(".")[0] for k in lora.modules} == set(fam.lora_components)
    assert {w.scale for w in lora.modules.values()} == {2.0}                  # alpha 8 / r 4, from the header
    comps = components(pipe)
    validate_lora(lora, comps, family)
    with merged_weights(comps, lora):
        ours = final_latents(pipe, family)
    assert torch.equal(final_latents(pipe, family), base)                     # pristine afterwards

    ref_pipe = open_pipe(folders, family)
    ref_pipe.load_lora_weights(str(path), adapter_name="x")
    ref = final_latents(ref_pipe, family)
    assert (ref - base).abs().max() > 1e-3                                    # the LoRA does something
    assert_close(ours, ref)

    # our own diffusers-format file of it is read back by diffusers to the same result
    save_lora(lora, tmp_path / "ours.safetensors")
    back_pipe = open_pipe(folders, family)
    back_pipe.load_lora_weights(str(tmp_path / "ours.safetensors"), adapter_name="y")
    assert_close(final_latents(back_pipe, family), ref)
    assert load_lora(tmp_path / "ours.safetensors").family == family         # recorded in the header


def random_lora(comps, targets, name="x", rank=2, alpha=3.0, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key in targets:
        m = comps.get_submodule(key)
        modules[key] = LoraWeights(A=torch.randn(rank, m.in_features, generator=g) * std,
                                   B=torch.randn(m.out_features, rank, generator=g) * std, scale=alpha / rank)
    return modules


SDXL_TARGETS = ["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                "unet.up_blocks.0.attentions.1.proj_in",
                "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
                "text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder.encoder.layers.0.self_attn.out_proj",
                "text_encoder.encoder.layers.1.mlp.fc1",
                "text_encoder_2.encoder.layers.0.self_attn.v_proj", "text_encoder_2.encoder.layers.0.self_attn.out_proj"]


def test_sdxl_kohya_and_diffusers_files_load_identically(folders, tmp_path):
    pipe = open_pipe(folders, "sdxl")
    comps = components(pipe)
    lora = Lora("x", random_lora(comps, SDXL_TARGETS, rank=4, alpha=3.0), family="sdxl")
    save_lora(lora, tmp_path / "d.safetensors")
    save_lora(lora, tmp_path / "k.safetensors", format="kohya")      # diffusers' convert_state_dict_to_kohya
    from safetensors import safe_open
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in f.keys()}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    d, k = load_lora(tmp_path / "d.safetensors"), load_lora(tmp_path / "k.safetensors")
    assert (d.format, k.format, d.family, k.family) == ("diffusers", "kohya", "sdxl", "sdxl")
    assert set(d.modules) == set(k.modules) == set(SDXL_TARGETS)
    assert all(w.scale == pytest.approx(3.0 / 4) for w in k.modules.values())           # alpha / rank kept
    for key, w in lora.modules.items():
        ref = delta_weight(w.A, w.B, w.scale)
        for got in (d.modules[key], k.modules[key]):
            torch.testing.assert_close(delta_weight(got.A, got.B, got.scale), ref, rtol=1e-6, atol=1e-7)
    # and diffusers reads our kohya file as it reads the diffusers one
    with merged_weights(comps, k):
        ours = final_latents(pipe, "sdxl")
    ref_pipe = open_pipe(folders, "sdxl")
    ref_pipe.load_lora_weights(str(tmp_path / "k.safetensors"), adapter_name="k")
    assert_close(final_latents(ref_pipe, "sdxl"), ours)


def test_kohya_flux_file_is_read_with_diffusers_conversion(folders, tmp_path):
    """A hand-written kohya FLUX file (sd-scripts' BFL names: fused img_attn_qkv, linear1/linear2 of the
    single blocks, alpha) read through FluxPipeline.lora_state_dict equals diffusers' own loading."""
    g = torch.Generator().manual_seed(5)
    d, r = 16, 2                                                  # tiny FLUX inner dim, rank
    shapes = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * d, d), "lora_unet_double_blocks_1_txt_attn_proj": (d, d),
              "lora_unet_double_blocks_0_img_mlp_0": (4 * d, d), "lora_unet_single_blocks_1_linear2": (d, 5 * d)}
    state = {}
    for name, (d_out, d_in) in shapes.items():
        state[f"{name}.lora_down.weight"] = torch.randn(r, d_in, generator=g) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(d_out, r, generator=g) * 0.3
        state[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(state, tmp_path / "kflux.safetensors")
    pipe = open_pipe(folders, "flux")
    lora = load_lora(tmp_path / "kflux.safetensors")
    assert lora.family == "flux" and lora.format == "kohya"
    assert "transformer.transformer_blocks.0.attn.to_k" in lora.modules           # qkv split by diffusers
    validate_lora(lora, components(pipe), "flux")
    with merged_weights(components(pipe), lora):
        ours = final_latents(pipe, "flux")
    ref_pipe = open_pipe(folders, "flux")
    ref_pipe.load_lora_weights(str(tmp_path / "kflux.safetensors"), adapter_name="k")
    assert_close(final_latents(ref_pipe, "flux"), ours)
    with pytest.raises(ValueError, match="no kohya format is written for FLUX"):
        save_lora(lora, tmp_path / "out.safetensors", format="kohya")


# ---- refusals and key detection -----------------------------------------------------------------------

def test_flux_lora_is_refused_on_the_sd_pipeline_naming_both_families(folders, tmp_path):
    flux = components(open_pipe(folders, "flux"))
    path = tmp_path / "fluxy.safetensors"
    save_lora(Lora("fluxy", random_lora(flux, ["transformer.single_transformer_blocks.0.attn.to_q",
                                                "transformer.transformer_blocks.1.attn.add_k_proj"]),
                   family="flux"), path)
    lora = load_lora(path, family="sd")                       # the keys say FLUX whatever the model is
    assert lora.family == "flux"
    sd = open_pipe(folders, "sd")
    for call in (lambda: check_family(lora, family_of(sd)), lambda: validate_lora(lora, components(sd), "sd")):
        with pytest.raises(ValueError) as e:
            call()
        assert all(s in str(e.value) for s in ("fluxy.safetensors", "FLUX.1", "'flux'", "Stable Diffusion 1.x/2.x",
                                                "'sd'"))
    info = inspect_lora(path, components(sd), family="sd")
    assert info["family"] == "flux" and not info["ok"] and "FLUX.1" in info["verdict"]
    assert inspect_lora(path)["family"] == "flux"


def test_family_of_lora_from_keys():
    t = torch.zeros(2, 8)
    cases = {
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
         "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"): ("sdxl",),
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"): ("flux",),
        ("lora_unet_single_blocks_3_linear1.lora_down.weight",): ("flux",),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",): ("flux",),
        ("transformer.transformer_blocks.20.attn.add_q_proj.lora_A.weight",): ("sd3",),   # FLUX has 19 double blocks
        ("transformer.transformer_blocks.3.attn2.to_q.lora_A.weight",): ("sd3",),         # SD3.5 dual attention
        ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight",): ("flux", "sd3"),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",): ("sd",),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",): ("sd",),
        ("unet.mid_block.attentions.0.proj_in.lora_A.weight",): ("sd", "sdxl"),
        ("transformer.blocks.0.attn.to_q.lora_A.weight",): (),
        ("unet.mid_block.attentions.0.proj_in.lora_A.weight", "transformer.proj_out.lora_A.weight"): (),
    }
    for keys, fits in cases.items():
        assert lora_families({k: t for k in keys}) == fits, keys
    xl = {"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048)}
    sd = {"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 768)}
    assert lora_families(xl) == ("sdxl",) and lora_families(sd) == ("sd",)        # cross-attention width
    both = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": t}
    assert family_of_lora(both).name == "flux" and family_of_lora(both, prefer="sd3").name == "sd3"
    assert family_of_lora(both, prefer="sd") .name == "flux" and family_of_lora({"x.lora_A.weight": t}) is None


def test_unet_only_lora_that_fits_sd_and_sdxl_is_not_refused_on_sdxl(folders, tmp_path):
    comps = components(open_pipe(folders, "sdxl"))
    path = tmp_path / "mid.safetensors"
    save_lora(Lora("mid", random_lora(comps, ["unet.mid_block.attentions.0.proj_in"])), path)   # no family known
    lora = load_lora(path)
    assert lora.family == "sd" and set(lora.fits) == {"sd", "sdxl"}
    validate_lora(lora, comps, "sdxl")                                       # fits both: the shapes decide
    assert load_lora(path, family="sdxl").family == "sdxl"
    with pytest.raises(ValueError, match="no kohya format is written for Stable Diffusion 3"):
        save_lora(Lora("t", {}, family="sd3"), tmp_path / "t.safetensors", format="kohya")
