"""Tiny Stable Diffusion pipelines and LoRA banks built from config (nothing downloaded), shared by the tests.

Mirrors diffusers' `get_dummy_components`: a few thousand parameters per model, random weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "on", "the", "left", "right",
         "center", "and", "sks", "photo", "of", "dog", "cat", "style"]


def build_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A word-level CLIP BPE tokenizer: every word in WORDS is one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = {}, []

    def add(tok):
        vocab.setdefault(tok, len(vocab))

    for ch in sorted({c for w in WORDS for c in w}):
        add(ch)
        add(ch + "</w>")
    for w in WORDS:  # merge left to right: ((c1 c2) c3) ... c_n</w>
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            merges.append(f"{cur} {p}")
            cur = cur + p
            add(cur)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        add(special)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def build_pipeline(tmp_dir: str | Path, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16)
    tokenizer = build_tokenizer(Path(tmp_dir) / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BLOCK = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
UP = "unet.up_blocks.1.attentions.0.transformer_blocks.0"
# bank key -> the modules its LoRA adapts (overlapping, not identical, so merges take the union)
LORAS = {
    "dog": [f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn1.to_v", f"{BLOCK}.ff.net.2", f"{UP}.attn2.to_k"],
    "cat": [f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn2.to_out.0", f"{UP}.attn1.to_v", f"{UP}.ff.net.2"],
    "style": [f"{BLOCK}.attn1.to_v", f"{UP}.attn1.to_q", f"{UP}.attn2.to_k"],
}


def make_model_dir(folder: Path) -> Path:
    """The tiny pipeline saved as a diffusers folder, as a user would point the engine at."""
    pipe = build_pipeline(folder / "build")
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def make_bank(folder: Path, model_dir: Path, loras=LORAS, rank: int = 2, seed: int = 0) -> Path:
    """A bank of LoRA files in diffusers/PEFT keys (non-zero B) with manifests and example images."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "examples").mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for key, targets in loras.items():
        tensors = {}
        for target in targets:
            weight = unet.get_submodule(target.removeprefix("unet.")).weight
            d_out, d_in = weight.shape
            tensors[f"{target}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen)
            tensors[f"{target}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen)
        save_file(tensors, str(folder / f"{key}.safetensors"))
        examples = []
        for i in range(2):
            image = f"examples/{key}_{i}.png"
            PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / image)
            examples.append({"image": image, "caption": f"a photo of sks {key}"})
        manifest = {"name": key.title(), "trigger": ["sks"], "description": f"tiny test LoRA {key}",
                    "base_model": "tiny", "kind": "subject", "default_weight": 1.0, "examples": examples}
        (folder / f"{key}.json").write_text(json.dumps(manifest))
    return folder


def make_text_world(folder: Path, keys=("alpha", "beta")) -> tuple[Path, Path]:
    """(model folder, bank folder): a tiny random BART with the text world's tokenizer, saved with
    save_pretrained, and one random text LoRA per key (B non-zero) with a manifest of example pairs."""
    import json

    import torch
    from transformers import BartForConditionalGeneration

    from mole_core.lora import Lora, LoraWeights
    from mole_core.world.text.config import LORA_TARGETS, TextBuildConfig
    from mole_core.text.lora_io import save_text_lora
    from mole_core.world.text.tokenizer import build_tokenizer

    torch.manual_seed(0)
    model_dir, bank = Path(folder) / "text-model", Path(folder) / "text-bank"
    tok = build_tokenizer(model_dir)
    model = BartForConditionalGeneration(TextBuildConfig.quick_config(folder).model_config(len(tok))).eval()
    model.save_pretrained(model_dir)
    bank.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(keys):
        g = torch.Generator().manual_seed(i + 1)
        modules = {name: LoraWeights(A=torch.randn(4, m.in_features, generator=g) * 0.3,
                                     B=torch.randn(m.out_features, 4, generator=g) * 0.3, scale=0.5)
                   for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS}
        save_text_lora(Lora(name=key, modules=modules), bank / f"{key}.safetensors")
        (bank / f"{key}.json").write_text(json.dumps({
            "name": key.capitalize(), "kind": "text", "task": key, "trigger": key, "description": f"the {key} task",
            "examples": [{"input": f"{key}: abc", "output": "cba"}, {"input": f"{key}: xyz", "output": "zyx"}]}))
    return model_dir, bank
