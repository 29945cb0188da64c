"""Inference-time composition peers of MoLE: LoRA Switch and LoRA Composite (Zhong et al., 2024).

    handle = attach(pipeline_components(pipe), loras)             # the LoRAs as experts, attached once
    with switching(pipe, handle, every=5):
        image = pipe(prompt=p, negative_prompt=n, latents=z, num_inference_steps=20).images[0]
    with compositing(pipe, handle):
        image = pipe(prompt=p, negative_prompt=n, latents=z, num_inference_steps=20).images[0]

Neither merges nor trains anything: both drive an existing MoLE attachment with one-hot gates
(`handle.settings(gates=...)`), which is one LoRA alone, exactly.
  Switch     at denoising step t only expert ⌊t / k⌋ mod N is active. Cost ≈ one LoRA.
  Composite  at every step the denoiser runs once per expert, with that expert alone, and the noise
             predictions are averaged before classifier-free guidance (CFG is linear, so this equals
             averaging the guided predictions). Cost ≈ N × base.
The text encoder's LoRA layers belong to their LoRA too: each pipeline call encodes its prompt and negative
prompt once per expert (that expert alone), and the denoiser always reads the encoding of the expert it runs
with. So with k ≥ the number of steps, Switch is exactly the first LoRA alone.

How: `pipe.encode_prompt` is shadowed by an instance attribute that encodes per expert, and hooks on
`pipe.unet` count its calls and swap in the expert's gates and encoding. A step is a UNet call: one per step
for first-order schedulers (DDIM, Euler, DPM-Solver++), two for Heun. On exit, also after an exception,
the hooks and the attribute are removed and the settings restored: the pipeline is exactly as it was.
Only pipelines that pass the UNet `encoder_hidden_states` = encode_prompt's output ([negative; positive]
under CFG), like StableDiffusionPipeline, are supported; anything else is refused at the first step.

References: Zhong et al., "Multi-LoRA Composition for Image Generation", 2024 (arXiv 2402.16843; code
maszhongming/Multi-LoRA-Composition); MoLE (Wu et al., ICLR 2024); diffusers
`StableDiffusionPipeline.__call__` (encode_prompt, the CFG batch).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from mole_core.attach import MoleHandle

EHS = "encoder_hidden_states"


def _one_hot(n: int, i: int) -> list[float]:
    return [float(j == i) for j in range(n)]


def _ehs(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs[EHS] if EHS in kwargs else args[2]                  # unet(sample, timestep, ehs, ...)


def _with_ehs(args: tuple, kwargs: dict, ehs: torch.Tensor) -> tuple[tuple, dict]:
    if EHS in kwargs:
        return args, {**kwargs, EHS: ehs}
    return (*args[:2], ehs, *args[3:]), kwargs


@contextmanager
def _driven(pipe, handle: MoleHandle, expert_at, average: bool):
    """At UNet call t (counted from each pipeline call's encode_prompt) expert `expert_at(t)` alone, reading
    its own prompt encoding; average=True also runs every other expert alone and averages the outputs."""
    # 1. check inputs
    if not handle.attached or not any(m is pipe.unet for m in handle.model.modules()):
        raise ValueError("The MoLE attachment is not attached to this pipeline's UNet.")
    n = len(handle.expert_names)
    state = {"encodings": None, "step": 0, "inner": False}   # encodings: per expert, encode_prompt's output
    step_settings = ExitStack()                                # the one-hot gates of the running UNet call
    had_own = "encode_prompt" in vars(pipe)
    original = pipe.encode_prompt

    # 2. each pipeline call: its prompt encoded once per expert, that expert alone
    def encode_prompt(*args, **kwargs):
        encodings = []
        for i in range(n):
            with handle.settings(gates=_one_hot(n, i)):
                encodings.append(original(*args, **kwargs))
        state["encodings"], state["step"] = encodings, 0
        return encodings[0]

    def encoding(i: int, ehs: torch.Tensor) -> torch.Tensor:
        """Expert i's encoding laid out as the UNet receives it: [negative; positive] under CFG."""
        positive, negative = state["encodings"][i]
        if negative is None or ehs.shape[0] == positive.shape[0]:
            return positive
        return torch.cat([negative, positive])

    def inputs_for(i: int, args, kwargs) -> tuple[tuple, dict]:
        """The UNet call's inputs with expert i's encoding (unchanged outside a pipeline call)."""
        if state["encodings"] is None:
            return args, kwargs
        return _with_ehs(args, kwargs, encoding(i, _ehs(args, kwargs)))

    # 3. every UNet call: gates and encoding of the step's expert; the other experts too when averaging
    def before(unet, args, kwargs):
        if state["inner"]:
            return None
        ehs = _ehs(args, kwargs)
        if state["encodings"] is not None and not torch.equal(ehs, encoding(0, ehs)):
            raise RuntimeError("The pipeline gives the UNet other text embeddings than its encode_prompt "
                               "returned; LoRA Switch / Composite support StableDiffusionPipeline-style "
                               "pipelines only.")
        i = expert_at(state["step"])
        state["step"] += 1
        step_settings.enter_context(handle.settings(gates=_one_hot(n, i)))
        return inputs_for(i, args, kwargs)

    def after(unet, args, kwargs, output):
        if state["inner"]:
            return None
        step_settings.close()
        if not average or n == 1:
            return None
        outs = [output[0]]                                     # (B, C, H, W): tuple or UNet2DConditionOutput
        state["inner"] = True                                  # our hooks stay out of the calls below
        try:
            for i in range(1, n):
                with handle.settings(gates=_one_hot(n, i)):
                    a, k = inputs_for(i, args, kwargs)
                    outs.append(unet(*a, **k)[0])
        finally:
            state["inner"] = False
        mean = torch.stack(outs).mean(0)
        return (mean, *output[1:]) if isinstance(output, tuple) else type(output)(sample=mean)

    # 4. install, run the caller's block, and put everything back whatever happens
    hooks = []
    try:
        pipe.encode_prompt = encode_prompt
        hooks.append(pipe.unet.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(pipe.unet.register_forward_hook(after, with_kwargs=True))
        yield pipe
    finally:
        step_settings.close()
        for hook in hooks:
            hook.remove()
        if had_own:
            pipe.encode_prompt = original
        else:
            del pipe.encode_prompt


@contextmanager
def switching(pipe, handle: MoleHandle, every: int = 5):
    """LoRA Switch: inside the block, each pipeline call runs expert ⌊t / every⌋ mod N alone at step t
    (denoiser and prompt encoding). every: k, steps per LoRA (the paper uses 5)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"switching: every must be a whole number of steps ≥ 1; got {every!r}.")
    n = len(handle.expert_names)
    with _driven(pipe, handle, lambda step: (step // every) % n, average=False):
        yield pipe


@contextmanager
def compositing(pipe, handle: MoleHandle):
    """LoRA Composite: inside the block, at every step the denoiser runs once per expert, that expert alone
    with its own prompt encoding, and the noise predictions are averaged. N × the cost of the base."""
    with _driven(pipe, handle, lambda step: 0, average=True):
        yield pipe
