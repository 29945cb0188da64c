"""Training the gates of a MoLE attachment: L = L_task + α · L_balance, only Gate parameters move.

    handle = attach(components, loras, MoleConfig())
    task = DiffusionTask(pipe, examples_from_bank(bank, keys), resolution=512)   # mole_core.image.task
    result = train_gates(handle, task, TrainConfig(steps=400), on_step=print)

A task is any object with `loss(generator, batch_size) -> scalar tensor` (a plain callable
`loss_fn(generator, batch_size)` works too) and optionally `prepare(device)`, called once before the
first step. The wings provide one each:
  DiffusionTask  (mole_core.image.task) the denoising loss of the pipeline on the experts' example images (SD 1.x/2.x and SDXL:
                 its scheduler's prediction type, epsilon / v_prediction / sample; SD3 and FLUX: rectified
                 flow), batches balanced across experts, VAE latents cached once.
  TokenTask      (mole_core.text.task) the usual causal-LM / seq2seq token loss on (prompt, target) text pairs.

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

import math
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed

from mole_core.attach import MoleConfig, MoleHandle

BALANCE_ALPHA = 0.5                     # α of the balance loss when TrainConfig leaves it None (MoLE §3)


@dataclass
class TrainConfig:
    steps: int = 400                    # optimiser steps (paper: 400 for images, 800 for text)
    lr: float = 1e-4                    # AdamW learning rate (paper: 1e-5; our gates start at exactly zero)
    batch_size: int = 2                 # samples per step and process (paper: 2 for images)
    balance_alpha: float | None = None  # α in L = L_task + α·L_balance, the one place α lives; None: BALANCE_ALPHA,
                                        # or 0 for trigger-routed gates (a uniform balance target fights routing)
    seed: int = 0                       # same seed, same data order, noise and result
    mixed_precision: str = "no"         # "no" | "fp16" | "bf16" (accelerate), where the device supports it
    weight_decay: float = 0.0           # AdamW weight decay on the gate parameters
    cpu: bool = False                   # force the CPU even if an accelerator is present


    def alpha_for(self, mole: MoleConfig) -> float:
        """The α a training of gates laid out by `mole` uses: balance_alpha, or when None its default (0 for
        trigger-routed gates, mix.ROUTED; else BALANCE_ALPHA)."""
        if self.balance_alpha is not None:
            return self.balance_alpha
        return 0.0 if mole.route == "trigger" else BALANCE_ALPHA


@dataclass
class TrainResult:
    steps: int                                          # steps completed (< config.steps if stopped)
    final: dict[str, float]                             # last step's {"loss", "task", "balance"}
    mean_gates: list[float]                             # last step's mean gate per expert
    history: list[dict[str, float]] = field(default_factory=list)   # every step's losses
    seconds: float = 0.0                                # wall time of the loop
    stopped: bool = False                               # should_stop() ended it early
    held_out: dict | None = None                        # {"before", "after"}: the task's fixed_loss, if it has one


def divergence_note(losses: list[float], lr: float) -> str:
    """One plain sentence when a training's loss ended far above where it had been (it diverged), else ''.

    `losses`: the task loss of every step, in order. Each step sees another batch, so the losses are compared
    as running means over w = max(3, steps / 10) steps: diverged when the last w average above both twice
    the lowest running mean and the first w."""
    finite = [x for x in losses if math.isfinite(x)]
    w = max(3, len(finite) // 10)
    if len(finite) < 3 * w:
        return ""
    means = [sum(finite[i:i + w]) / w for i in range(len(finite) - w + 1)]
    best = min(means)
    if means[-1] <= max(2 * best, means[0]):
        return ""
    return (f"the task loss ended at {means[-1]:.3g} (mean of the last {w} steps), up from {best:.3g} around step "
            f"{means.index(best) + w} (it started at {means[0]:.3g}): the training diverged. Train again with a "
            f"lower learning rate (e.g. {lr / 5:.2g}) or fewer steps.")


def train_gates(handle: MoleHandle, task, config: TrainConfig | None = None, on_step=None,
                should_stop=None) -> TrainResult:
    """Optimise only the gates of `handle` on `task`; return the losses and final mean gates.

    on_step(step, {"loss", "task", "balance"}, mean_gates) is called after every step (step counts from
    1); should_stop() is polled before every step. The model's requires_grad flags are restored on exit.
    """
    config = config or TrainConfig()
    alpha = config.alpha_for(handle.config)
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


