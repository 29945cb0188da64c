"""Inference-time composition peers of MoLE: LoRA Switch and LoRA Composite (Zhong et al., 2024).

    handle = attach(components(pipe), loras)                      # the LoRAs as experts, attached once
    with switching(pipe, handle, every=5):
        image = pipe(prompt=p, negative_prompt=n, latents=z, num_inference_steps=20).images[0]
    with compositing(pipe, handle):
        image = pipe(prompt=p, negative_prompt=n, latents=z, num_inference_steps=20).images[0]

Neither merges nor trains anything: both drive an existing MoLE attachment with one-hot gates
(`handle.settings(gates=...)`), which is one LoRA alone, exactly. Every family works the same way (SD 1.x/2.x
and SDXL UNets, SD3 and FLUX transformers):
  Switch     at denoising step t only expert ⌊t / k⌋ mod N is active. Cost ≈ one LoRA.
  Composite  at every denoiser call the denoiser runs once per expert, with that expert alone, and the
             predictions (noise or velocity) are averaged. Guidance is linear, so under classifier-free
             guidance (SD, SDXL, SD3: one batched call; FLUX's true CFG: a conditional and an unconditional
             call) this equals averaging the guided predictions. FLUX.1-dev's distilled guidance is an input
             of the transformer, not a combination of calls: each expert's prediction already carries it, and
             Composite is the mean of the per-LoRA predictions. Cost ≈ N × base.
The text encoders' LoRA layers belong to their LoRA too: each pipeline call encodes its prompt (and negative
prompt) once per expert, that expert alone, and the denoiser always reads the encoding of the expert it runs
with — every text-derived input: SD's embeddings, SDXL's embeddings and pooled `text_embeds` (an added
condition), SD3's joint embeddings and pooled projections, FLUX's T5 embeddings and CLIP pooled projections. So
with k ≥ the number of steps, Switch is exactly the first LoRA alone.

How: `pipe.encode_prompt` is shadowed by an instance attribute that encodes per expert and keeps, per output,
the tensor the pipeline got (expert 0's) next to every expert's. Hooks on the denoiser count steps and, at
each call, swap in the step's expert's gates and replace every input that is made of encode_prompt outputs
(one of them, or several stacked on the batch axis: [negative; positive] under CFG) by the same stack of that
expert's outputs. A step is a run of denoiser calls at one timestep: one call per step for SD/SDXL/SD3 and
FLUX without true CFG, two (conditional, unconditional) for FLUX with true CFG; Heun's two calls per step have
different timesteps and count as two. On exit, also after an exception, the hooks and the attribute are removed
and the settings restored: the pipeline is exactly as it was. A pipeline whose denoiser reads none of the text
encodings that differ between experts is refused at the first step (its text-encoder LoRAs would be lost).

References: Zhong et al., "Multi-LoRA Composition for Image Generation", 2024 (arXiv 2402.16843; code
maszhongming/Multi-LoRA-Composition); MoLE (Wu et al., ICLR 2024); diffusers `StableDiffusionPipeline`,
`StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline` `__call__` (encode_prompt, the CFG
batch, FLUX's true CFG as two transformer calls).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from mole_core.attach import MoleHandle
from mole_core.image.families import denoiser


def _one_hot(n: int, i: int) -> list[float]:
    return [float(j == i) for j in range(n)]


@dataclass
class _Encoded:
    """One output of encode_prompt: the tensor the pipeline received (expert 0's) and every expert's."""
    per_expert: list            # [tensor of expert i], i = 0..N-1
    differs: bool               # the experts' tensors are not all equal (a text encoder carries a LoRA)


class _Encodings:
    """The encode_prompt outputs of one pipeline call, and how each denoiser input is made of them."""

    def __init__(self):
        self.outputs: list[_Encoded] = []
        self._made_of: dict[int, tuple] = {}        # id(input) -> (input, its pieces): the same every step

    def add(self, per_expert_outputs: list) -> None:
        """Record one encode_prompt call: its output (a tuple, or one tensor) for each expert."""
        rows = [o if isinstance(o, (tuple, list)) else (o,) for o in per_expert_outputs]
        for values in zip(*rows):
            if torch.is_tensor(values[0]):
                differs = any(not torch.equal(v, values[0]) for v in values[1:])
                self.outputs.append(_Encoded(list(values), differs))

    def pieces(self, x: torch.Tensor) -> list[_Encoded] | None:
        """x as a stack along dim 0 of recorded outputs (expert 0's), or None when it is not one."""
        if id(x) in self._made_of:
            return self._made_of[id(x)][1]
        found, offset = [], 0
        while x.dim() and offset < x.shape[0]:
            piece = next((e for e in self.outputs if _is_piece(x, offset, e.per_expert[0])), None)
            if piece is None:
                found = None
                break
            found.append(piece)
            offset += piece.per_expert[0].shape[0]
        if not found:
            return None
        self._made_of[id(x)] = (x, found)          # holding x keeps its id unique for this pipeline call
        return found

    def swap(self, value, i: int, used: list):
        """`value` (a tensor, or dicts / lists / tuples of them) with every input made of encodings rebuilt
        from expert i's; appends to `used` each piece that differs between experts."""
        if torch.is_tensor(value):
            found = self.pieces(value)
            if found is None:
                return value
            used += [p for p in found if p.differs]
            if not any(p.differs for p in found):
                return value
            return torch.cat([p.per_expert[i].to(value.device, value.dtype) for p in found])
        if isinstance(value, dict):
            return {k: self.swap(v, i, used) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self.swap(v, i, used) for v in value)
        return value


def _is_piece(x: torch.Tensor, offset: int, ref: torch.Tensor) -> bool:
    n = ref.shape[0] if ref.dim() else 0
    return (n > 0 and ref.shape[1:] == x.shape[1:] and offset + n <= x.shape[0]
            and torch.equal(x[offset:offset + n], ref.to(x.device, x.dtype)))


def _timestep(args: tuple, kwargs: dict):
    """The call's timestep (first entry): unet(sample, t, ...), transformer(..., timestep=t, ...)."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    return None if t is None else float(torch.as_tensor(t).flatten()[0])


def _averaged(module, handle: MoleHandle, output, args, kwargs, inputs_for, state: dict):
    """LoRA Composite's step: the denoiser's `output` (expert 0 alone) averaged with every other expert alone on
    the same inputs (each with its own prompt encodings, `inputs_for`)."""
    n = len(handle.expert_names)
    outs = [output[0]]                      # (B, C, H, W) or (B, L, C): a tuple or a *Output dataclass
    state["inner"] = True                   # our hooks stay out of the calls below
    try:
        for i in range(1, n):
            with handle.settings(gates=_one_hot(n, i)):
                a, k, _ = inputs_for(i, args, kwargs)
                outs.append(module(*a, **k)[0])
    finally:
        state["inner"] = False
    mean = torch.stack(outs).mean(0)
    return (mean, *output[1:]) if isinstance(output, tuple) else type(output)(sample=mean)


@contextmanager
def _driven(pipe, handle: MoleHandle, expert_at, average: bool):
    """At denoising step t (counted from each pipeline call's encode_prompt) expert `expert_at(t)` alone,
    reading its own prompt encodings; average=True also runs every other expert alone and averages."""
    # 1. check inputs
    name = denoiser(pipe)                                       # "unet" | "transformer"
    model = getattr(pipe, name)
    if not handle.attached or not any(m is model for m in handle.model.modules()):
        raise ValueError(f"The MoLE attachment is not attached to this pipeline's "
                         f"{'UNet' if name == 'unet' else 'transformer'}.")
    n = len(handle.expert_names)
    state = {"encodings": None, "step": -1, "t": None, "denoised": False, "inner": False}
    step_settings = ExitStack()                                 # the one-hot gates of the running call
    had_own = "encode_prompt" in vars(pipe)
    original = pipe.encode_prompt

    # 2. each pipeline call: its prompt (and, FLUX's true CFG, negative prompt) encoded once per expert
    def encode_prompt(*args, **kwargs):
        outputs = []
        for i in range(n):
            with handle.settings(gates=_one_hot(n, i)):
                outputs.append(original(*args, **kwargs))
        if state["encodings"] is None or state["denoised"]:    # the first encode_prompt of a pipeline call
            state.update(encodings=_Encodings(), step=-1, t=None, denoised=False)
        state["encodings"].add(outputs)
        return outputs[0]

    def inputs_for(i: int, args, kwargs) -> tuple[tuple, dict, list]:
        """The call's inputs with expert i's encodings (unchanged outside a pipeline call), and the
        differing encodings they were made of."""
        used = []
        if state["encodings"] is None:
            return args, kwargs, used
        encodings = state["encodings"]
        return encodings.swap(args, i, used), encodings.swap(kwargs, i, used), used

    # 3. every denoiser call: gates and encodings of the step's expert; the others too when averaging
    def before(module, args, kwargs):
        if state["inner"]:
            return None
        t = _timestep(args, kwargs)
        if t is None or t != state["t"] or not state["denoised"]:
            state["step"] += 1
        state["t"], state["denoised"] = t, True
        i = expert_at(state["step"])
        args, kwargs, used = inputs_for(i, args, kwargs)
        encodings = state["encodings"]
        if n > 1 and encodings is not None and any(e.differs for e in encodings.outputs) and not used:
            raise RuntimeError(f"The pipeline gives its {name} none of the text encodings its encode_prompt "
                               f"returned; LoRA Switch / Composite cannot drive {type(pipe).__name__}.")
        step_settings.enter_context(handle.settings(gates=_one_hot(n, i)))
        return args, kwargs

    def after(module, args, kwargs, output):
        if state["inner"]:
            return None
        step_settings.close()
        if not average or n == 1:
            return None
        return _averaged(module, handle, output, args, kwargs, inputs_for, state)

    # 4. install, run the caller's block, and put everything back whatever happens
    hooks = []
    try:
        pipe.encode_prompt = encode_prompt
        hooks.append(model.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(model.register_forward_hook(after, with_kwargs=True))
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
    (denoiser and prompt encodings). every: k, steps per LoRA (the paper uses 5)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"switching: every must be a whole number of steps ≥ 1; got {every!r}.")
    n = len(handle.expert_names)
    with _driven(pipe, handle, lambda step: (step // every) % n, average=False):
        yield pipe


@contextmanager
def compositing(pipe, handle: MoleHandle):
    """LoRA Composite: inside the block, at every denoiser call the denoiser runs once per expert, that expert
    alone with its own prompt encodings, and the predictions are averaged. N × the cost of the base."""
    with _driven(pipe, handle, lambda step: 0, average=True):
        yield pipe
