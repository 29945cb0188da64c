"""Training the gates of a MoLE attachment: L = L_task + α · L_balance, only Gate parameters move.

    handle = attach(components, loras, MoleConfig())
    task = DiffusionTask(pipe, examples_from_bank(bank, keys), resolution=512)
    result = train_gates(handle, task, TrainConfig(steps=400), on_step=print)

A task is any object with `loss(generator, batch_size) -> scalar tensor` (a plain callable
`loss_fn(generator, batch_size)` works too) and optionally `prepare(device)`, called once before the
first step. Two are provided:
  DiffusionTask  the denoising loss of the pipeline on the experts' example images (SD 1.x/2.x and SDXL:
                 its scheduler's prediction type, epsilon / v_prediction / sample; SD3 and FLUX: rectified
                 flow), batches balanced across experts, VAE latents cached once.
  TokenTask      the usual causal-LM / seq2seq token loss on (prompt, target) text pairs.

The loop uses accelerate: the same code runs on CPU, one GPU, or several GPUs under `accelerate launch`
(each process draws its own batches from seed + rank; gate gradients are averaged across processes, and the
balance loss takes the mean gate q over every process's samples, all-reduced), with mixed precision where the
device supports it. With the same global batch, N processes give the gates of one process. No DDP wrapper is needed: the gates are a few thousand
parameters and the base model is frozen.

References: MoLE (Wu et al., ICLR 2024) §3 (balance loss) and §4 (400 steps, batch 2 for images);
diffusers `examples/text_to_image/train_text_to_image_lora.py` (noise, timesteps, targets);
karpathy/minGPT `mingpt/trainer.py` (a flat loop with a callback).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from diffusers import DDPMScheduler

from mole_core.attach import MoleHandle


@dataclass
class TrainConfig:
    steps: int = 400                    # optimiser steps (paper: 400 for images, 800 for text)
    lr: float = 1e-4                    # AdamW learning rate (paper: 1e-5; our gates start at exactly zero)
    batch_size: int = 2                 # samples per step and process (paper: 2 for images)
    balance_alpha: float | None = None  # α of the balance loss; None = the attachment's MoleConfig (0.5)
    seed: int = 0                       # same seed, same data order, noise and result
    mixed_precision: str = "no"         # "no" | "fp16" | "bf16" (accelerate), where the device supports it
    weight_decay: float = 0.0           # AdamW weight decay on the gate parameters
    cpu: bool = False                   # force the CPU even if an accelerator is present


@dataclass
class TrainResult:
    steps: int                                          # steps completed (< config.steps if stopped)
    final: dict[str, float]                             # last step's {"loss", "task", "balance"}
    mean_gates: list[float]                             # last step's mean gate per expert
    history: list[dict[str, float]] = field(default_factory=list)   # every step's losses
    seconds: float = 0.0                                # wall time of the loop
    stopped: bool = False                               # should_stop() ended it early
    held_out: dict | None = None                        # {"before", "after"}: the task's fixed_loss, if it has one


def train_gates(handle: MoleHandle, task, config: TrainConfig | None = None, on_step=None,
                should_stop=None) -> TrainResult:
    """Optimise only the gates of `handle` on `task`; return the losses and final mean gates.

    on_step(step, {"loss", "task", "balance"}, mean_gates) is called after every step (step counts from
    1); should_stop() is polled before every step. The model's requires_grad flags are restored on exit.
    """
    config = config or TrainConfig()
    alpha = handle.config.balance_alpha if config.balance_alpha is None else config.balance_alpha
    # 1. device, seed, data
    accelerator = _accelerator(config)
    set_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    handle.model.to(accelerator.device)
    loss_fn = task.loss if hasattr(task, "loss") else task
    if hasattr(task, "prepare"):
        task.prepare(accelerator.device)

    # 2. freeze everything but the gates (selected by module type)
    flags = {p: p.requires_grad for p in handle.model.parameters()}
    for p in handle.model.parameters():
        p.requires_grad_(False)
    try:
        # 3. one forward materialises the gates' projections (shapes depend on the leaders), then the optimiser
        with torch.no_grad(), accelerator.autocast():
            loss_fn(torch.Generator().manual_seed(config.seed), config.batch_size)
        params = handle.gate_parameters()
        for p in params:
            p.requires_grad_(True)
        optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay))

        # 4. the loop
        history, stopped, start = [], False, time.perf_counter()
        for step in range(1, config.steps + 1):
            if should_stop is not None and should_stop():
                stopped = True
                break
            with accelerator.autocast():
                task_loss = loss_fn(generator, config.batch_size)
                balance, for_backward = _balance_loss(handle, accelerator)   # equal values (see there)
                loss = task_loss + alpha * for_backward
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                _average_gradients(params, accelerator)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            parts = {"loss": loss.item(), "task": task_loss.item(), "balance": balance.item()}
            history.append(parts)
            if on_step is not None:
                on_step(step, parts, handle.mean_gates())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    last = history[-1] if history else {}
    return TrainResult(steps=len(history), final=last, mean_gates=handle.mean_gates() if history else [],
                       history=history, seconds=time.perf_counter() - start, stopped=stopped)


def _average_gradients(params: list, accelerator: Accelerator) -> None:
    """Average the gate gradients across processes in ONE all-reduce, every process alike. A gate that got no
    gradient here (None: e.g. a trigger-routed expert no caption of this batch names) counts as zero, so the
    processes always send the same collective; it stays None only where no process gave it one (as AdamW
    skips it in one process on the global batch)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = accelerator.reduce(torch.cat([*(g.flatten().float() for g in grads), has]), reduction="mean")
    offset = 0
    for p, g, any_grad in zip(params, grads, flat[-len(params):]):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype) if any_grad > 0 else None
        offset += g.numel()


def _balance_loss(handle: MoleHandle, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_balance, what to backpropagate for it). One process: the attachment's own, twice.

    N processes: q_i is the mean gate over the samples of EVERY process, as one process would take it on the
    global batch — the per-process sums and counts of the gate rows are all-reduced (summed); the other
    processes' part enters as a constant, so autograd runs through this process's gates only. Every process
    then holds the same L_balance, and its gradient is the sum over processes of their local parts; train_gates
    averages gradients across processes (right for the task loss, the mean of the per-process losses), so the
    balance term is backpropagated N times over: after the mean, exactly α·∇L_balance of the global batch.
    """
    n = accelerator.num_processes
    if n == 1:
        balance = handle.balance_loss()
        return balance, balance
    gates = handle._last_gates().float()                                # (rows of this process, N)
    local = torch.cat([gates.sum(0), gates.new_tensor([gates.shape[0]])])   # (N + 1): sums, row count
    total = accelerator.reduce(local.detach().clone(), reduction="sum")
    q = (gates.sum(0) + (total[:-1] - local[:-1].detach())) / total[-1]       # (N,): global mean, local grad
    balance = -torch.log(q.clamp_min(1e-12)).sum()
    return balance, balance + (n - 1) * (balance - balance.detach())    # value L_balance, gradient N·∇


def _accelerator(config: TrainConfig) -> Accelerator:
    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    except ValueError:
        # accelerate keeps one process-wide state that refuses a different precision later; a long-lived
        # app trains with different settings in turn. In a single process that state may start afresh
        # (a multi-process `accelerate launch` run never changes settings, so it still fails loudly).
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------

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
    def fixed_loss(self, seed: int = 10_000, batches: int = 2, batch_size: int = 4) -> float:
        """The task loss on one fixed set of examples, noise and noise levels (drawn from `seed`), so a value
        before training and one after compare like with like; the training's own draws are left as they were."""
        cursor, self._cursor = self._cursor, 0
        try:
            generator = torch.Generator().manual_seed(seed)
            return float(np.mean([self.loss(generator, batch_size).item() for _ in range(batches)]))
        finally:
            self._cursor = cursor

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


class TokenTask:
    """Token loss of a transformers model on (prompt, target) pairs: the target tokens are predicted.

    Causal LMs get prompt + target with the prompt positions masked out of the labels (-100);
    encoder-decoder models (config.is_encoder_decoder) get the prompt as input and the target as labels.
    """

    def __init__(self, model, tokenizer, pairs: list[tuple[str, str]], max_length: int = 128):
        if not pairs:
            raise ValueError("TokenTask needs at least one (prompt, target) pair.")
        self.model, self.tokenizer, self.pairs, self.max_length = model, tokenizer, list(pairs), max_length
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.items = [self._encode(p, t) for p, t in self.pairs]
        self.buckets: dict[int, list[int]] = {}
        for i in range(len(self.items)):
            self.buckets.setdefault(self._length(i), []).append(i)

    def _length(self, i: int) -> int:
        return len(self.items[i][0])          # the input's (seq2seq) or the whole sequence's (causal)

    def _encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        if self.seq2seq:
            return (tok(prompt).input_ids[: self.max_length], tok(target).input_ids[: self.max_length])
        p = tok(prompt).input_ids
        if eos is not None and p and p[-1] == eos:                  # e.g. CLIP appends EOS: not before the target
            p = p[:-1]
        t = tok(target, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        ids = (p + t)[: self.max_length]
        labels = ([-100] * len(p) + t)[: self.max_length]
        return ids, labels

    def loss(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """The token loss of `batch_size` pairs of one input length: a random pair, and random pairs of its
        length. The inputs are never padded, so a per-sample gate (which pools over every position) sees in
        training exactly the prompt tokens it sees when the model answers that prompt alone."""
        device = self.model.device
        first = int(torch.randint(len(self.items), (1,), generator=generator))
        bucket = self.buckets[self._length(first)]
        idx = [first] + [bucket[i] for i in torch.randint(len(bucket), (batch_size - 1,), generator=generator).tolist()]
        ids, labels = zip(*(self.items[i] for i in idx))

        def pad(seqs, value):
            n = max(len(s) for s in seqs)
            return torch.tensor([list(s) + [value] * (n - len(s)) for s in seqs], device=device)

        input_ids = pad(ids, self.pad_id)
        mask = pad([[1] * len(s) for s in ids], 0)
        return self.model(input_ids=input_ids, attention_mask=mask, labels=pad(labels, -100)).loss


def examples_from_bank(bank, keys: list[str]) -> list[tuple[Path, str, str]]:
    """(image path, caption, expert key) for every example image of the bank entries `keys`."""
    examples = []
    for key in keys:
        entry = bank.get(key)
        if not entry.examples:
            raise ValueError(f"LoRA '{key}' has no example images in its bank manifest; gate training needs some.")
        examples += [(Path(path), caption, key) for path, caption in entry.examples]
    return examples
