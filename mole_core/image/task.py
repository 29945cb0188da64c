"""The image wing's gate-training task: the denoising loss of a diffusers pipeline on the experts' example images.

    task = DiffusionTask(pipe, examples_from_bank(bank, keys), resolution=512)
    result = train_gates(handle, task, TrainConfig(steps=400), on_step=print)     # mole_core.train

SD 1.x/2.x and SDXL: its scheduler's prediction type (epsilon / v_prediction / sample); SD3 and FLUX:
rectified flow. Batches balanced across experts, VAE latents cached once.

References: MoLE (Wu et al., ICLR 2024) §4 (batch 2 for images); diffusers
`examples/text_to_image/train_text_to_image_lora.py` (noise, timesteps, targets) and
`train_text_to_image_lora_sdxl.py` (SDXL's text inputs).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def _load_image(image, resolution: int) -> torch.Tensor:
    """Path or PIL image -> (3, res, res) in [-1, 1]: resize the shorter side, centre crop."""
    img = image if isinstance(image, PIL.Image.Image) else PIL.Image.open(image)
    img = img.convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                     PIL.Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)


class DiffusionTask:
    """Denoising loss of a diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, SD3, FLUX) on (image, caption,
    expert) examples.

    Noise and targets follow the diffusers LoRA training scripts: a DDPM forward process built from the
    pipeline scheduler's config, target = noise (epsilon), the velocity (v_prediction) or the clean
    latents (sample). Each batch cycles through the experts so they are equally represented. SDXL
    (`train_text_to_image_lora_sdxl.py`): both text encoders through the pipeline's own `encode_prompt`
    (penultimate hidden states, pooled projection) and the added time ids (original size, crop (0, 0),
    target size) passed as `added_cond_kwargs`.
    """

    def __init__(self, pipe, examples: list[tuple], resolution: int = 512):
        if not examples:
            raise ValueError("DiffusionTask needs at least one (image, caption, expert) example.")
        self.pipe = pipe
        self.examples = list(examples)
        self.resolution = resolution
        self.experts = list(dict.fromkeys(e[2] for e in self.examples))
        self.by_expert = {name: [i for i, e in enumerate(self.examples) if e[2] == name] for name in self.experts}
        self.denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        self.flow = type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"   # SD3, FLUX
        if self.flow:      # the training scripts' copy of the scheduler: its sigmas for every train timestep
            self.noise_scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            self.prediction_type = "flow"
        else:
            self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample", "flow"):
            raise ValueError(f"Unknown scheduler prediction_type '{self.prediction_type}'.")
        self.sdxl = getattr(self.denoiser.config, "addition_embed_type", None) == "text_time"
        self.latents: torch.Tensor | None = None        # (E, C, h, w), cached once
        self.input_ids: torch.Tensor | None = None      # (E, L)
        self._cursor = 0

    @torch.no_grad()
    def prepare(self, device) -> None:
        """Encode every example image with the VAE (once) and tokenize every caption."""
        vae, tok = self.pipe.vae, self.pipe.tokenizer
        latents = []
        for image, _, _ in self.examples:
            x = _load_image(image, self.resolution)[None].to(device, vae.dtype)
            shift = getattr(vae.config, "shift_factor", None) or 0.0                 # SD3 / FLUX VAEs
            latents.append((vae.encode(x).latent_dist.mean[0] - shift) * vae.config.scaling_factor)
        self.latents = torch.stack(latents)
        self.input_ids = tok([e[1] for e in self.examples], padding="max_length", truncation=True,
                             max_length=tok.model_max_length, return_tensors="pt").input_ids.to(device)

    def batch_indices(self, generator: torch.Generator, batch_size: int) -> list[int]:
        """Experts in turn (continuing across steps), a random example of each."""
        out = []
        for _ in range(batch_size):
            pool = self.by_expert[self.experts[self._cursor % len(self.experts)]]
            self._cursor += 1
            out.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        return out

    def loss(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        if self.latents is None:
            self.prepare(self.denoiser.device)
        if self.flow:
            return self._flow_loss(generator, batch_size)
        unet, sched = self.pipe.unet, self.noise_scheduler
        idx = self.batch_indices(generator, batch_size)
        latents = self.latents[idx].float()                                            # (b, C, h, w)
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
        noisy = sched.add_noise(latents, noise, t)
        if self.sdxl:
            pred = self._sdxl_prediction(noisy, t, idx)
        else:
            encoder_hidden_states = self.pipe.text_encoder(self.input_ids[idx])[0]     # (b, L, d)
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states.to(unet.dtype)).sample
        target = {"epsilon": noise, "sample": latents}.get(self.prediction_type)
        if target is None:
            target = sched.get_velocity(latents, noise, t)
        return F.mse_loss(pred.float(), target.float())

    def _flow_loss(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """Rectified flow (SD3, FLUX), as diffusers' train_dreambooth_lora_sd3.py / _flux.py: u ~ logit-normal(0, 1),
        its train timestep's sigma σ from the scheduler, x_σ = (1 − σ)·x + σ·ε, target ε − x (loss weight 1)."""
        pipe, model, sched = self.pipe, self.denoiser, self.noise_scheduler
        idx = self.batch_indices(generator, batch_size)
        latents = self.latents[idx].float()                                            # (b, C, h, w)
        device, (b, c, h, w) = latents.device, latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(device)
        u = torch.sigmoid(torch.randn(b, generator=generator))                         # logit-normal
        index = (u * sched.config.num_train_timesteps).long().clamp_max(len(sched.timesteps) - 1)
        timesteps = sched.timesteps[index].to(device)
        sigma = sched.sigmas[index].to(device, latents.dtype).view(b, 1, 1, 1)
        noisy = ((1 - sigma) * latents + sigma * noise).to(model.dtype)
        captions = [self.examples[i][1] for i in idx]
        length = min(77, getattr(pipe, "tokenizer_max_length", 77))
        if hasattr(pipe, "_pack_latents"):                                             # FLUX: packed 2×2 patches
            embeds, pooled, text_ids = pipe.encode_prompt(captions, None, device=device, max_sequence_length=length)
            packed = pipe._pack_latents(noisy, b, c, h, w)
            image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, model.dtype)
            guidance = torch.ones(b, device=device) if model.config.guidance_embeds else None
            out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
                        encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids).sample
            pred = pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
        else:                                                                          # SD3: joint transformer
            embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device,
                                                      do_classifier_free_guidance=False, max_sequence_length=length)
            pred = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                         pooled_projections=pooled).sample
        return F.mse_loss(pred.float(), (noise - latents).float())

    def _sdxl_prediction(self, noisy: torch.Tensor, t: torch.Tensor, idx: list[int]) -> torch.Tensor:
        pipe, unet = self.pipe, self.pipe.unet
        embeds, _, pooled, _ = pipe.encode_prompt([self.examples[i][1] for i in idx], device=noisy.device,
                                                  do_classifier_free_guidance=False)
        side = (self.resolution, self.resolution)
        time_ids = pipe._get_add_time_ids(side, (0, 0), side, dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        added = {"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids.to(noisy.device).repeat(len(idx), 1)}
        return unet(noisy.to(unet.dtype), t, embeds.to(unet.dtype), added_cond_kwargs=added).sample


def examples_from_bank(bank, keys: list[str]) -> list[tuple[Path, str, str]]:
    """(image path, caption, expert key) for every example image of the bank entries `keys`."""
    examples = []
    for key in keys:
        entry = bank.get(key)
        if not entry.examples:
            raise ValueError(f"LoRA '{key}' has no example images in its bank manifest; gate training needs some.")
        examples += [(Path(path), caption, key) for path, caption in entry.examples]
    return examples
