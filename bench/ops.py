"""Counting the compute ops of a forward pass (what an eager GPU forward launches, roughly one kernel each).

`count_ops(fn)` runs `fn()` under a `TorchDispatchMode` and counts the aten ops that reach the kernels
(below autograd, so composite ops are seen as what they decompose into), leaving out the ones that only
make a new view of a tensor's memory (view, reshape-as-view, transpose, expand, detach, ...): those launch
nothing. Counted on any device, the CPU included; on CUDA one counted op is about one kernel launch.

References: torch.utils._python_dispatch.TorchDispatchMode (the op-counting example in PyTorch's docs).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that are not views by their schema but only re-describe memory or make an empty tensor
_METADATA = {"aten._unsafe_view", "aten.lift_fresh", "aten.empty", "aten.empty_strided", "aten._reshape_alias",
             "aten.set_", "aten.alias", "aten.detach", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
             "aten.is_same_size", "aten.dim", "aten.size", "aten.stride"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        name = name if name.startswith("aten.") else f"aten.{name}"
        if not (func.is_view or name in _METADATA):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> Counter:
    """The compute ops (aten name -> count) of one call of `fn` (under torch.no_grad)."""
    counter = _Counter()
    with torch.no_grad(), counter:
        fn()
    return counter.counts
