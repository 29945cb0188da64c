"""Hugging Face ZeroGPU: model-running functions run under `spaces.GPU` where the `spaces` package is installed.

    @on_gpu(lambda keys, steps, *rest, **kw: engine.expected_seconds(images=len(keys), denoise_steps=steps))
    def render(keys, steps, ...): ...

A ZeroGPU Space holds a GPU only while a function decorated with `spaces.GPU` runs, for at most the `duration`
it asks for (a shorter request queues ahead of longer ones). `on_gpu(duration)` is that decorator with a
duration that fits the job: `duration` is seconds, or a function of the decorated function's own arguments that
returns the job's expected seconds (typically the engine's `expected_seconds`); what is asked for is
`fit_seconds` of it (a margin, within [MIN_SECONDS, MAX_SECONDS]). Where `spaces` cannot be imported (a laptop,
a CPU Space, the tests) the decorator returns the function itself: nothing changes.

References: Hugging Face Spaces ZeroGPU documentation (`@spaces.GPU(duration=...)`, a callable duration receives
the function's arguments); huggingface.co/spaces/zero-gpu-explorers/README.
"""
from __future__ import annotations

import importlib
import math

MIN_SECONDS = 15          # the least asked for: model moves and the first CUDA calls take a few seconds
MAX_SECONDS = 300         # the most asked for (ZeroGPU refuses far longer requests; the app's caps keep jobs shorter)
MARGIN, OVERHEAD = 1.5, 10.0   # asked = MARGIN × expected + OVERHEAD seconds


def spaces_module():
    """The `spaces` package, or None where it is not installed."""
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def fit_seconds(expected: float) -> int:
    """Seconds of GPU to ask for a job expected to take `expected` s: MARGIN × expected + OVERHEAD, rounded up,
    within [MIN_SECONDS, MAX_SECONDS] (MAX_SECONDS when the estimate is not a finite number)."""
    try:
        asked = MARGIN * float(expected) + OVERHEAD
    except (TypeError, ValueError):
        return MAX_SECONDS
    if not math.isfinite(asked):
        return MAX_SECONDS
    return int(min(MAX_SECONDS, max(MIN_SECONDS, math.ceil(asked))))


def on_gpu(duration):
    """Decorator: `spaces.GPU(duration=...)` where `spaces` is importable, the identity elsewhere.

    duration: expected seconds (a number), or a function called with the decorated function's arguments that
    returns them; an estimate that fails (input the function itself will refuse) asks for MAX_SECONDS."""
    def decorate(fn):
        spaces = spaces_module()
        if spaces is None:
            return fn
        if not callable(duration):
            return spaces.GPU(duration=fit_seconds(duration))(fn)

        def seconds(*args, **kwargs) -> int:
            try:
                return fit_seconds(duration(*args, **kwargs))
            except Exception:   # noqa: BLE001 — the handler reports bad input; the estimate only sizes the GPU
                return MAX_SECONDS
        return spaces.GPU(duration=seconds)(fn)
    return decorate
