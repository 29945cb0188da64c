"""Build the pixel world from nothing: VAE, base model, oracle, LoRA bank, and the measured bars.

Stages (`STAGES`, in this order), each with a fixed seed, each skipped when its output exists (unless forced):
  vae      AutoencoderKL trained on world renders; scaling_factor = 1 / std of its latents.
  decoder  the VAE decoder alone fine-tuned on scenes rich in subjects and night (the latent space stays).
  base     CLIPTextModel + UNet2DConditionModel trained jointly on shape scenes (no subjects, no
           styles), x0-prediction (prediction_type="sample"), 10% empty captions for guidance. Saved
           with the tokenizer and DDIM scheduler as an ordinary StableDiffusionPipeline folder.
  base2, base3  two more cosine cycles of the same training at a half and a quarter of the learning rate.
  oracle   the small CNN that reads images (mole_core.world.pixel.oracle).
  loras    one DreamBooth-style LoRA per subject and per style on the frozen base (peft via
           `unet.add_adapter`), saved with `StableDiffusionPipeline.save_lora_weights`; one is
           converted to kohya keys. Manifests + rendered example images.
  eval     the bars (mole_core.world.pixel.quality): oracle accuracy on clean renders, base accuracy on generated
           one- and two-object captions, each LoRA's subject/style rate and base preservation.
Every stage records its figures and seconds in assets/pixel-world/build_report.json. The settings, the
bank's LoRA specs and the random streams are in mole_core.world.pixel.config.

References: diffusers `train_text_to_image.py` and `train_dreambooth_lora.py` (the loops followed here);
DreamBooth (Ruiz et al., 2023) for rare-token triggers and prior preservation.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mole_core.atomic import atomic_path, write_text
from mole_core.world.pixel import render as world
from mole_core.world.pixel.config import STREAMS, BuildConfig, LoraSpec, load_pipeline, log, lora_specs, rng_for
from mole_core.world.pixel.quality import stage_eval
from mole_core.world.pixel.tokenizer import build_tokenizer

STAGES = ("vae", "decoder", "base", "base2", "base3", "oracle", "loras", "eval")
KOHYA_LORAS = ("heart",)            # LoRAs shipped in kohya format (the rest: diffusers format)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]     # UNet attention + ff
LORA_CONV_TARGETS = ["conv1", "conv2", "proj_in", "proj_out"]                   # UNet resnet convs (drawing)
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]     # CLIP text encoder


# ---------------------------------------------------------------------------------------------
# Small helpers

def write_json_atomic(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place (the old one, if any, is removed first)."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def update_report(cfg: BuildConfig, stage: str, figures: dict, seconds: float) -> None:
    path = cfg.model_dir / "build_report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.setdefault("stages", {})[stage] = {"seconds": round(seconds, 1), **figures}
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "torch": torch.__version__}
    report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    report["total_seconds"] = round(sum(s["seconds"] for s in report["stages"].values()), 1)
    write_json_atomic(path, report)


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_scheduler() -> DDIMScheduler:
    """The pipeline's sampler; training noise comes from a DDPMScheduler with the same config."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                         timestep_spacing="trailing", prediction_type="sample", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """float [0, 1] (B, 3, H, W) -> tensor in [-1, 1], what the VAE reads."""
    return torch.from_numpy(images) * 2 - 1


def encode_captions(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]                                   # (B, T, hidden)


# ---------------------------------------------------------------------------------------------
# 1. VAE

def stage_vae(cfg: BuildConfig) -> dict:
    rng = rng_for(cfg, "vae")
    torch.manual_seed(cfg.seed + 1)
    groups = min(32, cfg.vae_channels[0])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=cfg.vae_channels, norm_num_groups=groups,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=world.SIZE)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    mix = dict(subjects=tuple(s.key for s in world.SUBJECTS))
    for step in range(cfg.vae_steps):
        # the VAE must also encode subjects and night scenes: the LoRAs are trained in its latent space
        scenes = [world.sample_scene(rng, subjects=mix["subjects"] if rng.random() < 0.4 else (),
                                     style="night" if rng.random() < 0.25 else world.DEFAULT_STYLE)
                  for _ in range(cfg.vae_batch)]
        x = to_model_range(world.render_batch(scenes, rng))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1 = (recon - x).abs().mean()
        loss = l1 + 0.5 * F.mse_loss(recon, x) + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} l1 {l1.item():.4f}")
    # measure on fresh renders: reconstruction error and latent std -> scaling_factor
    vae.eval()
    with torch.no_grad():
        scenes = [world.sample_scene(rng, subjects=mix["subjects"]) for _ in range(256)]
        x = to_model_range(world.render_batch(scenes, rng))
        latents = vae.encode(x).latent_dist.sample()
        recon_l1 = (vae.decode(latents).sample.clamp(-1, 1) - x).abs().mean().item() / 2  # in [0,1] units
        std = latents.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    tmp = Path(tempfile.mkdtemp(dir=cfg.model_dir, prefix="vae."))
    vae.save_pretrained(tmp)
    replace_dir(tmp, cfg.model_dir / "vae")
    log(f"vae saved: recon L1 {recon_l1:.4f} (0-1 scale), latent std {std:.3f}")
    return {"vae_recon_l1": round(recon_l1, 4), "latent_std": round(std, 4),
            "vae_params": sum(p.numel() for p in vae.parameters())}


def stage_decoder(cfg: BuildConfig) -> dict:
    """Fine-tune the VAE decoder alone, on scenes rich in subjects and night: the encoder (and so the
    latent space the base and the LoRAs live in) stays as it is, the small details decode sharper."""
    rng = rng_for(cfg, "decoder")
    torch.manual_seed(cfg.seed + 6)
    vae = AutoencoderKL.from_pretrained(cfg.model_dir / "vae")
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    subjects = tuple(s.key for s in world.SUBJECTS)

    def batch(n):
        return [world.sample_scene(rng, subjects=subjects if rng.random() < 0.7 else (),
                                   style="night" if rng.random() < 0.4 else world.DEFAULT_STYLE) for _ in range(n)]

    for step in range(cfg.decoder_steps):
        x = to_model_range(world.render_batch(batch(cfg.vae_batch), rng))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.decoder_steps, cfg.vae_lr)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        loss = l1 + 0.5 * F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.decoder_steps - 1:
            log(f"decoder step {step}/{cfg.decoder_steps} l1 {l1.item():.4f}")
    vae.eval()
    with torch.no_grad():
        x = to_model_range(world.render_batch(batch(256), rng))
        recon_l1 = (vae.decode(vae.encode(x).latent_dist.sample()).sample.clamp(-1, 1) - x).abs().mean().item() / 2
    tmp = Path(tempfile.mkdtemp(dir=cfg.model_dir, prefix="vae."))
    vae.save_pretrained(tmp)
    replace_dir(tmp, cfg.model_dir / "vae")
    log(f"vae decoder saved: recon L1 {recon_l1:.4f} (0-1 scale) on subject/night-rich scenes")
    return {"decoder_recon_l1": round(recon_l1, 4)}


# ---------------------------------------------------------------------------------------------
# 2. Base model: text encoder + UNet

def make_text_encoder(cfg: BuildConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def make_unet(cfg: BuildConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=world.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.unet_channels, norm_num_groups=min(32, cfg.unet_channels[0]),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads)


def latents_of(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(to_model_range(images)).latent_dist.sample() * vae.config.scaling_factor


def denoise_loss(unet, text_encoder, tokenizer, vae, noise_scheduler, scenes, captions, rng, gen) -> torch.Tensor:
    """x0-prediction loss on rendered scenes: || unet(add_noise(z0, ε, t), t, text) - z0 ||²."""
    z0 = latents_of(vae, world.render_batch(scenes, rng))                     # (B, 4, 16, 16)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(scenes),), generator=gen)
    noisy = noise_scheduler.add_noise(z0, noise, t)
    context = encode_captions(tokenizer, text_encoder, captions)              # (B, T, hidden)
    pred = unet(noisy, t, context).sample
    return F.mse_loss(pred, z0)


def train_base_cycle(cfg: BuildConfig, name: str, unet, text_encoder, tokenizer, vae, noise_scheduler,
                     steps: int, peak_lr: float, rng, gen) -> float:
    """One cosine cycle of joint text-encoder + UNet training on fresh scenes; returns the running loss."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=1e-4)
    running = None
    for step in range(steps):
        scenes = [world.sample_scene(rng) for _ in range(cfg.base_batch)]
        captions = [world.caption(s) if rng.random() >= cfg.empty_caption_p else "" for s in scenes]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        loss = denoise_loss(unet, text_encoder, tokenizer, vae, noise_scheduler, scenes, captions, rng, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {running:.4f}")
    return running


def stage_base(cfg: BuildConfig) -> dict:
    rng = rng_for(cfg, "base")
    torch.manual_seed(cfg.seed + 2)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    vae = AutoencoderKL.from_pretrained(cfg.model_dir / "vae").eval().requires_grad_(False)
    tok_dir = Path(tempfile.mkdtemp(dir=cfg.model_dir, prefix="tokenizer."))
    tokenizer = build_tokenizer(tok_dir)
    text_encoder = make_text_encoder(cfg, tokenizer)
    unet = make_unet(cfg)
    scheduler = make_scheduler()
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    log(f"base: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    running = train_base_cycle(cfg, "base", unet, text_encoder, tokenizer, vae, noise_scheduler,
                               cfg.base_steps, cfg.base_lr, rng, gen)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    save_pipeline(pipe, cfg.model_dir, keep=("vae",))   # the VAE stages own vae/
    shutil.rmtree(tok_dir)
    return {"unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
            "final_loss": round(running, 4)}


def refine_base(cfg: BuildConfig, name: str, steps: int, peak_lr: float) -> dict:
    """Continue training the saved text encoder + UNet for one more cosine cycle (stages base2, base3).

    Split from `stage_base` so the build checkpoints between cycles: measured on the shipped build,
    1,000 steps left shapes and colours soft (oracle caption fidelity ~0.6 on generated images), 1,800
    left squares with round corners (objects right 0.88)."""
    rng = rng_for(cfg, name)
    torch.manual_seed(cfg.seed + STREAMS[name])
    gen = torch.Generator().manual_seed(cfg.seed + STREAMS[name])
    pipe = load_pipeline(cfg.model_dir)
    vae, tokenizer, text_encoder, unet = pipe.vae.requires_grad_(False), pipe.tokenizer, pipe.text_encoder, pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    text_encoder.requires_grad_(True).train()      # load_pipeline hands the models back frozen: these two train
    unet.requires_grad_(True).train()
    running = train_base_cycle(cfg, name, unet, text_encoder, tokenizer, vae, noise_scheduler, steps, peak_lr, rng, gen)
    text_encoder.eval()
    unet.eval()
    save_pipeline(pipe, cfg.model_dir, keep=("vae",))
    return {"final_loss": round(running, 4), "steps": steps}


def stage_base2(cfg: BuildConfig) -> dict:
    return refine_base(cfg, "base2", cfg.base2_steps, cfg.base_lr / 2)


def stage_base3(cfg: BuildConfig) -> dict:
    return refine_base(cfg, "base3", cfg.base3_steps, cfg.base_lr / 4)


def save_pipeline(pipe: StableDiffusionPipeline, model_dir: Path, keep=()) -> None:
    """save_pretrained into a temp folder, then move each part into model_dir (oracle/ and the
    folders named in `keep` stay as they are)."""
    tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix="pipeline."))
    pipe.save_pretrained(tmp)
    for config in [tmp / "model_index.json", *tmp.glob("*/config.json")]:   # no machine paths in the repo
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for part in sorted(tmp.iterdir()):
        if part.name in keep:
            continue
        if part.is_dir():
            replace_dir(part, model_dir / part.name)
        else:
            os.replace(part, model_dir / part.name)
    shutil.rmtree(tmp)
    log(f"pipeline saved to {model_dir}")


# ---------------------------------------------------------------------------------------------
# 3. Oracle

def stage_oracle(cfg: BuildConfig) -> dict:
    from mole_core.world.pixel import oracle as oracle_mod
    torch.manual_seed(cfg.seed + 3)
    net = oracle_mod.train_oracle(rng_for(cfg, "oracle"), steps=cfg.oracle_steps, batch=cfg.oracle_batch,
                                  log=log)
    oracle = oracle_mod.Oracle(net)
    # a first check on renders the training never saw (the eval stage measures the bar again)
    acc = oracle_mod.accuracy_on_renders(oracle, np.random.default_rng([cfg.seed, 3, 1]), 500)
    oracle.save(cfg.model_dir / "oracle", extra={"trained_steps": cfg.oracle_steps, "check": acc})
    log(f"oracle saved: item accuracy {acc['item_accuracy']:.4f} on 500 fresh renders")
    return {"oracle_params": sum(p.numel() for p in net.parameters()), "check": acc}


# ---------------------------------------------------------------------------------------------
# 4. LoRA bank

def train_lora(cfg: BuildConfig, spec: LoraSpec, rng: np.random.Generator) -> tuple[dict, dict, float]:
    """DreamBooth-style LoRA on the frozen base: UNet attention/ff (+ resnet convs) and, optionally, the
    text encoder. Returns (unet state dict, text-encoder state dict or {}, final running loss)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline(cfg.model_dir)
    unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    for m in (unet, text_encoder, vae):
        m.requires_grad_(False)
    lora = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian")
    unet.add_adapter(LoraConfig(**lora, target_modules=LORA_TARGETS + (LORA_CONV_TARGETS if cfg.lora_convs else [])))
    if cfg.lora_text_encoder:
        text_encoder.add_adapter(LoraConfig(**lora, target_modules=LORA_TEXT_TARGETS))
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lora_lr, weight_decay=0.0)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    unet.train()
    text_encoder.train(cfg.lora_text_encoder)
    running = None
    objects_p = cfg.lora_style_objects_p if spec.kind == "style" else cfg.lora_subject_objects_p
    for step in range(cfg.lora_steps):
        scenes = [spec.scene(rng, objects_p) for _ in range(cfg.lora_batch)]
        # prior preservation: ordinary captions must keep drawing what the base draws
        prior = cfg.lora_style_prior_batch if spec.kind == "style" else cfg.lora_prior_batch
        scenes += [world.sample_scene(rng) for _ in range(prior)]
        captions = [world.caption(s) for s in scenes]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lora_steps, cfg.lora_lr, warmup=min(20, cfg.lora_steps // 5 + 1))
        with torch.set_grad_enabled(cfg.lora_text_encoder):
            context = encode_captions(tokenizer, text_encoder, captions)
        z0 = latents_of(vae, world.render_batch(scenes, rng))
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(scenes),), generator=gen)
        pred = unet(noise_scheduler.add_noise(z0, noise, t), t, context).sample
        loss = F.mse_loss(pred, z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0 or step == cfg.lora_steps - 1:
            log(f"lora {spec.key} step {step}/{cfg.lora_steps} loss {running:.4f}")
    # PEFT key layout (`<path>.lora_A.weight`), which save_lora_weights prefixes with "unet." /
    # "text_encoder.". Not convert_state_dict_to_diffusers: it renames only the attention keys (to
    # `lora.down`) and leaves the feed-forward ones as lora_A, a mixed layout that stricter readers refuse.
    def state_of(model):
        return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return state_of(unet), (state_of(text_encoder) if cfg.lora_text_encoder else {}), running


def save_kohya(diffusers_file: Path, path: Path) -> None:
    """A diffusers-format LoRA file -> the same LoRA with kohya keys at `path` (mole_core.lora, atomic)."""
    from mole_core.image.lora_files import load_lora, save_lora
    save_lora(load_lora(str(diffusers_file)), str(path), format="kohya")


def stage_loras(cfg: BuildConfig) -> dict:
    """Train, save and describe each LoRA (cfg.loras: only those; the others' figures are kept)."""
    unknown = set(cfg.loras) - {s.key for s in lora_specs()}
    if unknown:
        raise ValueError(f"unknown LoRA(s) {sorted(unknown)}; the world's LoRAs are {[s.key for s in lora_specs()]}")
    cfg.bank_dir.mkdir(parents=True, exist_ok=True)
    (cfg.bank_dir / "examples").mkdir(exist_ok=True)
    figures = {}
    for i, spec in enumerate(lora_specs()):
        if cfg.loras and spec.key not in cfg.loras:
            continue
        t0 = time.time()
        torch.manual_seed(cfg.seed + 100 + i)
        unet_state, text_state, final_loss = train_lora(cfg, spec, np.random.default_rng([cfg.seed, 4, i]))
        weight_file = f"{spec.key}.safetensors"
        tmp = Path(tempfile.mkdtemp(dir=cfg.bank_dir))
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=unet_state,
                                                  text_encoder_lora_layers=text_state or None,
                                                  weight_name=weight_file)
        if spec.key in KOHYA_LORAS:
            save_kohya(tmp / weight_file, cfg.bank_dir / weight_file)
        else:
            os.replace(tmp / weight_file, cfg.bank_dir / weight_file)
        shutil.rmtree(tmp)
        write_examples_and_manifest(cfg, spec, weight_file, np.random.default_rng([cfg.seed, 5, i]))
        figures[spec.key] = {"final_loss": round(final_loss, 4), "seconds": round(time.time() - t0, 1),
                             "format": "kohya" if spec.key in KOHYA_LORAS else "diffusers"}
        log(f"lora {spec.key} saved ({figures[spec.key]})")
    report = cfg.model_dir / "build_report.json"
    if cfg.loras and report.exists():   # a subset: keep the figures of the others (read now, not at the start)
        figures = {**json.loads(report.read_text()).get("stages", {}).get("loras", {}).get("loras", {}), **figures}
    return {"loras": figures}


def write_examples_and_manifest(cfg: BuildConfig, spec: LoraSpec, weight_file: str, rng) -> None:
    examples = []
    for j in range(cfg.n_examples):
        scene = spec.scene(rng)
        rel = f"examples/{spec.key}_{j}.png"
        with atomic_path(cfg.bank_dir / rel, suffix=".png") as tmp:
            world.render_pil(scene, rng).save(tmp)
        examples.append({"image": rel, "caption": world.caption(scene)})
    manifest = {"name": spec.name, "trigger": [spec.trigger], "description": spec.description,
                "base_model": "pixel-world", "kind": spec.kind, "default_weight": 1.0,
                "examples": examples}
    write_json_atomic(cfg.bank_dir / f"{spec.key}.json", manifest)


# ---------------------------------------------------------------------------------------------
# Orchestration

def stage_done(cfg: BuildConfig, stage: str) -> bool:
    """A stage's outputs exist (so a rerun skips it unless forced)."""
    if stage == "vae":
        return (cfg.model_dir / "vae" / "config.json").exists()
    if stage in ("decoder", "base2", "base3"):   # they refine existing folders: recorded in the build report
        report = cfg.model_dir / "build_report.json"
        return report.exists() and stage in json.loads(report.read_text()).get("stages", {})
    if stage == "base":
        return (cfg.model_dir / "unet" / "config.json").exists() and (cfg.model_dir / "model_index.json").exists()
    if stage == "oracle":
        return (cfg.model_dir / "oracle" / "config.json").exists()
    if stage == "loras":
        return all((cfg.bank_dir / f"{s.key}.json").exists() for s in lora_specs() if not cfg.loras or s.key in cfg.loras)
    return False          # eval always runs


def run_build(cfg: BuildConfig, stages=STAGES, force: bool = False) -> dict:
    """Run the requested stages in order; returns the build report."""
    # 1. check inputs and prepare folders
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown build stage(s) {unknown}; expected some of {list(STAGES)}")
    torch.set_num_threads(cfg.threads)
    cfg.model_dir.mkdir(parents=True, exist_ok=True)
    # 2. run each stage, recording its figures and time
    for stage in STAGES:
        if stage not in stages:
            continue
        if not force and stage_done(cfg, stage):
            log(f"stage {stage}: outputs exist, skipped (use --force to redo)")
            continue
        log(f"stage {stage}: start")
        t0 = time.time()
        figures = {"vae": stage_vae, "decoder": stage_decoder, "base": stage_base, "base2": stage_base2,
                   "base3": stage_base3, "oracle": stage_oracle, "loras": stage_loras, "eval": stage_eval}[stage](cfg)
        update_report(cfg, stage, figures, time.time() - t0)
        log(f"stage {stage}: done in {time.time() - t0:.0f}s: {json.dumps(figures)}")
    # 3. hand back the report
    return json.loads((cfg.model_dir / "build_report.json").read_text())
