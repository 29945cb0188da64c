"""Tiny SDXL, SD3 and FLUX pipelines built from config (nothing downloaded), shared by the family tests.

Mirrors diffusers' own `get_dummy_components` for `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` and
`FluxPipeline`: random weights, a few thousand parameters per model, but the real classes and the real wiring
(SDXL: two CLIP encoders, `addition_embed_type="text_time"`; SD3: MMDiT + CLIP-L + CLIP-G + T5, 16 latent
channels; FLUX: double + single blocks, CLIP + T5, 16 latent channels packed 2×2). The VAEs have four levels,
so `vae_scale_factor` is 8 as in the real models, and the default side is 32 px.

Tokenizers are made locally: CLIP's word-level BPE from `tests.tiny.build_tokenizer`, T5's as a Unigram
vocabulary of the same words (`T5TokenizerFast(vocab=[(piece, score), ...])`, transformers 5).

    pipe = open_family("flux", tmp_path)      # built, saved with save_pretrained, reopened from the folder
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from tests.tiny import WORDS, build_pipeline, build_tokenizer

SIDE = 32          # default image side of the tiny families (latents 4×4)
T5_DIM = 32        # T5 d_model = the MMDiT / FLUX joint_attention_dim
T5_LENGTH = 16     # max_sequence_length to pass to SD3 / FLUX calls (their defaults are 256 / 512)


def build_t5_tokenizer() -> T5TokenizerFast:
    """A Unigram T5 tokenizer whose pieces are '▁' + each word of WORDS (plus pad, eos, unk)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS] + [("▁", -2.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_LENGTH)


def _clip(tokenizer, hidden: int, projection: bool):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=8, d_ff=48, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def _vae(latent_channels: int, flow: bool) -> AutoencoderKL:
    """Four levels (vae_scale_factor 8). SD3 / FLUX VAEs have no quant convs and a shift factor."""
    extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035) \
        if flow else {}
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
                         latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=SIDE, **extra)


def build_sdxl(tmp_dir: str | Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL: UNet with text_time added conditions (6 time ids × 8 + pooled 16 = 64), cross-attention on the
    two CLIP encoders' concatenated hidden states (16 + 16), a first down block without attention and a
    2-layer transformer in the second, as in SDXL."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(Path(tmp_dir) / "tokenizer")
    tokenizer_2 = build_tokenizer(Path(tmp_dir) / "tokenizer_2")
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=SIDE // 8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(4, flow=False), text_encoder=_clip(tokenizer, 16, False),
                                     text_encoder_2=_clip(tokenizer_2, 16, True), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd3(tmp_dir: str | Path, seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3: a 2-block MMDiT (the last block context_pre_only), 16 latent channels, patch 2; CLIP-L and CLIP-G
    with projection (pooled 16 + 16 = 32) and T5 (d_model 32 = joint_attention_dim)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(Path(tmp_dir) / "tokenizer")
    tokenizer_2 = build_tokenizer(Path(tmp_dir) / "tokenizer_2")
    tokenizer_3 = build_t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=SIDE // 8, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=T5_DIM, caption_projection_dim=16,
                                        pooled_projection_dim=32, pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, flow=True),
        text_encoder=_clip(tokenizer, 16, True), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, 16, True), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3), tokenizer_3=tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux(tmp_dir: str | Path, seed: int = 0) -> FluxPipeline:
    """FLUX: 2 double (FluxTransformerBlock) + 2 single (FluxSingleTransformerBlock) blocks, 16 latent channels
    packed 2×2 (in_channels 64), RoPE axes (2, 2, 4) = head dim 8; CLIP (pooled 16) and T5 (32)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(Path(tmp_dir) / "tokenizer")
    tokenizer_2 = build_t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                         pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=_vae(16, flow=True), text_encoder=_clip(tokenizer, 16, False), tokenizer=tokenizer,
                        text_encoder_2=_t5(tokenizer_2), tokenizer_2=tokenizer_2)
    pipe.default_sample_size = SIDE // 8      # FluxPipeline's is 128 (1024 px); not saved with the folder
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"sd": build_pipeline, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}


def make_family_dir(family: str, folder: str | Path, seed: int = 0) -> Path:
    """The tiny pipeline of `family` saved with save_pretrained as `folder`/model; returns that folder."""
    folder = Path(folder)
    pipe = BUILDERS[family](folder / "build", seed=seed)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def open_family(family: str, folder: str | Path, seed: int = 0):
    """Build, save and reopen with `DiffusionPipeline.from_pretrained(local_files_only=True)`."""
    pipe = DiffusionPipeline.from_pretrained(make_family_dir(family, folder, seed), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(family: str) -> dict:
    """Keyword arguments every tiny-family call needs: the side, and a short T5 sequence for SD3 / FLUX."""
    return {"height": SIDE, "width": SIDE, **({"max_sequence_length": T5_LENGTH} if family in ("sd3", "flux") else {})}
