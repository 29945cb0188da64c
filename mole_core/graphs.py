"""The denoiser's step under CUDA graphs: `torch.compile(mode="reduce-overhead")` of its forward.

On a GPU an eager denoiser step is bound by the CPU launching kernels (MoLE's small ops most of all);
replaying a captured CUDA graph launches the whole step at once. The MoLE layers are written for it
(mole_core/layers.py: no host syncs, no data-dependent shapes, call-time settings kept on the device and read as
graph inputs, gate weights recorded after the forward), so a MoLE step captures as the base model's does.
torch.compile keeps one graph per input shape (resolution, batch) and per Python-level setting (gate kind,
mask set or not), and guards on them, so a new size or setting compiles once and is then replayed.

Only the denoiser's `forward` is compiled: the forward hooks around it (MoLE's start/end of a pass, trigger
routing's text matching) run eagerly, outside the graph, as they must.

When compiling or capturing fails, `GRAPHS_FAILED` is said once (a RuntimeWarning, and `Graphs.failure`) and
the step runs eagerly from then on; images are the eager ones.

References: PyTorch `torch.compile(mode="reduce-overhead")` (CUDA graph trees); diffusers' "torch.compile"
and `enable_lora_hotswap` guides (adapter scales kept as tensors so a swap never recompiles).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

GRAPHS_FAILED = ("CUDA graphs could not be captured for this model ({reason}); the denoiser runs eagerly "
                 "(the same images, more slowly).")


def graphs_default(device) -> bool:
    """Graphs by default where they pay: on a CUDA device."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def compile_step(forward):
    """The graphed version of a denoiser's bound `forward` (compiled lazily, at its first call)."""
    return torch.compile(forward, mode="reduce-overhead", dynamic=False)


class Graphs:
    """One engine's graphed denoiser steps: `with graphs.on(denoiser):` runs its forward graphed.

    enabled: try graphs at all. The compiled forward is kept per denoiser (its graphs are reused by every later
    call at the same shapes); after a failure every call is eager.
    """

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self.failure: str | None = None           # the sentence said when graphs failed
        self._compiled: dict[int, object] = {}    # id(denoiser) -> compiled forward

    @contextmanager
    def on(self, denoiser: nn.Module):
        if not self.enabled or self.failure is not None:
            yield
            return
        eager = denoiser.forward                  # the bound method (or a wrapper someone else installed)
        compiled = self._compiled.get(id(denoiser))
        if compiled is None:
            compiled = self._compiled[id(denoiser)] = compile_step(eager)

        def step(*args, **kwargs):
            if self.failure is None:
                try:
                    return compiled(*args, **kwargs)
                except Exception as error:        # compile / capture failed: say it once, then eager
                    self._fail(error)
            return eager(*args, **kwargs)

        before = vars(denoiser).get("forward")   # a wrapper installed by someone else (restored after)
        denoiser.forward = step                   # an instance attribute: nn.Module.__call__ (and its hooks) stay
        try:
            yield
        finally:
            if before is None:
                del denoiser.forward
            else:
                denoiser.forward = before

    def _fail(self, error: Exception) -> None:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        self.failure = GRAPHS_FAILED.format(reason=reason[:200])
        warnings.warn(self.failure, RuntimeWarning, stacklevel=3)
