"""One value that says how to combine LoRAs for an image: `Mix`, passed whole.

    Mix("mole", ("face", "ring"), mixture=load_mixture("mix.safetensors"), mask={"ring": False})
    Mix("svd", ("face", "ring"), rank=8)
    Mix("ties", ("face", "ring"), density=0.5)
    Mix("switch", ("face", "ring"), switch_every=5)
    Mix("single:face")
    Mix("mole", ("face", "ring"), regions={"face": "left", "ring": "0.5,0,1,1"})   # mole_core.regions
    Mix("freefuse", ("face", "ring"))        # FreeFuse: masks from each LoRA's trigger words (image/freefuse.py)

The engine renders a Mix (`Engine.generate(mix, request)`, `Engine.compare(mixes, request)`), the CLI
builds one from its flags, the app keeps one per ticked method in the session, the evaluation's cells
are a label + a Mix, and the exported snippet is the Mix written out (`Mix.to_python()`). Each method
reads only the fields it needs; `check()` refuses values that cannot be right (not finite, out of range)
with a sentence naming the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mole_core.attach import GATE_KINDS, GRANULARITIES, MoleConfig
from mole_core.regions import parse_regions

# method -> what it is (the app's and the CLI's help text); "single:<bank key>" is the one LoRA alone.
METHODS = {
    "mole": "MoLE: the LoRAs as gated experts (trained gates from a mixture, or untrained = equal weights)",
    "linear": "linear merge: W + Σ w_i ΔW_i, weights normalised to sum 1 unless raw",
    "svd": "SVD merge: the rank-r truncated SVD of the linear merge's ΔW",
    "ties": "TIES merge (Yadav et al. 2023): trim to `density`, elect signs, disjoint mean; re-factored to rank r "
            "(weights normalised to mean 1, since the disjoint mean already averages)",
    "dare": "DARE merge (Yu et al. 2024): drop entries with probability 1 − density, rescale, sum; rank r",
    "switch": "LoRA Switch (Zhong et al. 2024): one LoRA active at a time, the next every k denoising steps",
    "composite": "LoRA Composite (Zhong et al. 2024): every step runs each LoRA alone and averages (N× the cost)",
    "freefuse": "FreeFuse (Liu et al. 2025): masks from each LoRA's trigger words' cross-attention at an early "
                "step with the LoRAs off, balanced argmax; each LoRA at full strength inside its mask only",
    "arrow": "Arrow (Ostapenko et al. 2024, run by PEFT's create_arrow_model): training-free per-token routing of "
             "each layer's input to the LoRAs whose top singular vector it matches; text models only",
    "base": "the model without any LoRA",
}
# method -> its name on screens (the app's choices, result labels)
NAMES = {"mole": "MoLE", "linear": "Linear merge", "svd": "SVD merge", "ties": "TIES", "dare": "DARE",
         "switch": "LoRA Switch", "composite": "LoRA Composite", "freefuse": "FreeFuse", "arrow": "Arrow (PEFT)", "base": "Base model"}
MERGES = ("linear", "svd", "ties", "dare")           # weight-space merges: exportable as one LoRA file
NEEDS_SELECTION = ("mole", *MERGES, "switch", "composite", "freefuse", "arrow")
# Trigger routing as measured best on the world's dev seeds (bench/dev/NOTES.md): each text token goes to the
# expert whose trigger phrase it is in, each pixel by its cross-attention share of each phrase; an expert whose
# trigger no prompt names is off. It trains with balance α = 0 (a uniform balance target fights the routing):
# TrainConfig.alpha_for, where α lives. With three or more triggers in a prompt, each trigger phrase is also
# encoded on its own and each pixel's cross-attention kept to its phrase (docs/results_default_composition.md:
# 3 and 4 subjects up; two subjects exactly as before).
ROUTED = dict(route="trigger", route_tokens="phrase", route_norm="share", route_absent="off",
              route_encode="separate", route_attend=1.0, route_compose_from=3)
GATES = (*GATE_KINDS, "routed")      # what people choose; "routed" = per-token gates with ROUTED trigger routing
MAX_WEIGHT = 100.0                                   # |merge weight| accepted (raw weights included)
# The fields each method reads (the rest are ignored by it, and left out of its Python, `Mix.to_python`).
_MERGE_FIELDS = ("weights", "normalize")
APPLIES = {"mole": ("granularity", "gate", "mixture", "mask", "strengths", "regions"), "linear": _MERGE_FIELDS,
           "svd": (*_MERGE_FIELDS, "rank"), "ties": (*_MERGE_FIELDS, "rank", "density"),
           "dare": (*_MERGE_FIELDS, "rank", "density"), "switch": ("switch_every",), "composite": (), "freefuse": (), "base": ()}


@dataclass
class Mix:
    """A method and every parameter a method takes. Expert names are bank keys."""
    method: str = "mole"                  # a key of METHODS or "single:<bank key>"
    keys: tuple[str, ...] = ()            # the LoRAs combined, in order (a mixture's order for "mole")
    weights: dict | None = None           # merges: key -> weight (None: each LoRA's default weight)
    normalize: bool = True                # merges: weights scaled to sum 1
    rank: int | None = None               # svd: rank of the result (None: the largest LoRA rank);
                                          # ties / dare: None = the sum of the ranks (capped by the module)
    density: float = 0.5                  # ties / dare: fraction of each ΔW's entries kept
    switch_every: int = 5                 # switch: denoising steps per LoRA (k)
    granularity: str = "block"            # mole without a mixture: which modules share a gate
    gate: str = "sample"                  # ... and the gate kind: "sample" | "token" | "static" | "routed" (GATES)
    mixture: object | None = None         # mole: a mole_core.mixture.Mixture (trained gates), or None
    mask: dict | None = None              # mole: key -> False switches that expert off (the rest renormalised)
    strengths: dict | None = None         # mole: key -> multiplier of that expert's contribution
    regions: dict | None = None           # mole: key -> where that expert acts (mole_core.regions: a preset
                                          # "left" | "right" | "top" | "bottom" | "centre" | "whole", a box
                                          # "x0,y0,x1,y1" in fractions, a mask image path / array); None: everywhere

    def __post_init__(self):
        self.keys = tuple(self.keys)
        if self.mixture is not None and not self.keys:
            self.keys = tuple(self.mixture.names)

    def replace(self, **changes) -> "Mix":
        return dataclasses.replace(self, **changes)

    def merge_label(self, rank: int) -> str:
        """A merge result's label: the method and the numbers that made it (`rank`: the merged LoRA's)."""
        return {"linear": "Linear merge", "svd": f"SVD r={rank}", "ties": f"TIES d={self.density:g} r={rank}",
                "dare": f"DARE d={self.density:g} r={rank}"}[self.method]

    @property
    def placement(self) -> dict | None:
        """mole: where each expert acts — this mix's regions, else its mixture's (None: everywhere)."""
        return self.regions if self.regions is not None or self.mixture is None else self.mixture.regions

    @property
    def single(self) -> str | None:
        """The bank key of a "single:<key>" method, else None."""
        return self.method.split(":", 1)[1] if self.method.startswith("single:") else None

    @property
    def mole_config(self) -> MoleConfig:
        """The MoleConfig this mix asks for: the mixture's when it has one, else granularity + gate."""
        if self.mixture is not None:
            return self.mixture.mole_config()
        return mole_config_for(self.granularity, self.gate)

    def check(self) -> None:
        """ValueError naming the field for a value no method can use (the engine calls it first)."""
        if self.method not in METHODS and not (self.single and self.single.strip()):
            raise ValueError(f"Unknown method {self.method!r}: expected one of {', '.join(METHODS)} "
                             f"or single:<bank key>.")
        if self.method in NEEDS_SELECTION and not self.keys:
            raise ValueError(f"No LoRA is selected for {self.method}: choose at least one LoRA of the bank.")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"A LoRA is selected twice: {', '.join(self.keys)}.")
        for what, values in (("weight", self.weights), ("strength", self.strengths)):
            for key, value in (values or {}).items():
                low, high = (0, 10) if what == "strength" else (-MAX_WEIGHT, MAX_WEIGHT)
                if not _finite(value) or not low <= float(value) <= high:
                    raise ValueError(f"The {what} of {key!r} must be a finite number between {low:g} and "
                                     f"{high:g}; got {value!r}.")
        if self.weights and self.normalize and self.method in MERGES:
            total = sum(float(w) for k, w in self.weights.items() if k in self.keys)
            if abs(total) < 1e-8:
                raise ValueError("The weights sum to 0, so they cannot be normalised to sum 1; change a weight "
                                 "or untick 'Normalise'.")
        if self.rank is not None and (not _whole(self.rank) or not 1 <= self.rank <= 4096):
            raise ValueError(f"The rank must be a whole number between 1 and 4096; got {self.rank!r}.")
        if not _finite(self.density) or not 0 < float(self.density) <= 1:
            raise ValueError(f"The density must be above 0 and at most 1; got {self.density!r}.")
        if not _whole(self.switch_every) or not 1 <= self.switch_every <= 1000:
            raise ValueError(f"Switch every k steps: k must be a whole number between 1 and 1000; "
                             f"got {self.switch_every!r}.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"Unknown granularity {self.granularity!r}: choose one of {', '.join(GRANULARITIES)}.")
        if self.gate not in GATES:
            raise ValueError(f"Unknown gate kind {self.gate!r}: choose one of {', '.join(GATES)}.")
        for what, names in (("mask", self.mask), ("strengths", self.strengths), ("weights", self.weights),
                            ("regions", self.regions)):
            unknown = sorted(set(names or {}) - set(self.keys))
            if unknown:
                raise ValueError(f"The {what} name {', '.join(unknown)}, which is not in the selection "
                                 f"{', '.join(self.keys) or '(empty)'}.")
        if self.regions:
            parse_regions(self.regions, self.keys)                         # ValueError naming the key
        if self.mixture is not None and tuple(self.mixture.names) != self.keys:
            raise ValueError(f"The mixture was trained for the LoRAs {', '.join(self.mixture.names)}, "
                             f"but the selection is {', '.join(self.keys) or 'empty'}.")

    def to_python(self, mixture_file: str | None = None) -> str:
        """This mix as Python source (the exported snippet): only the fields its method reads and that differ
        from the defaults (a mixture brings its own granularity and gate); the mixture as
        `load_mixture(mixture_file)`."""
        applies = set(APPLIES.get(self.method, ()))
        if self.mixture is not None:
            applies -= {"granularity", "gate"}
        defaults = Mix()
        parts = [repr(self.method), repr(self.keys)]
        for name in (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            if name not in applies or value == getattr(defaults, name):
                continue
            if name == "mixture":
                value = f"load_mixture({mixture_file or 'mixture.safetensors'!r})"
                parts.append(f"mixture={value}")
            elif name == "regions":                                        # each as what the user gave
                parts.append(f"regions={ {k: r.spec for k, r in parse_regions(value, self.keys).items()}!r}")
            else:
                parts.append(f"{name}={value!r}")
        return f"Mix({', '.join(parts)})"


def mole_config_for(granularity: str, gate: str) -> MoleConfig:
    """The MoleConfig of a gate choice (GATES). "routed" is per-token gates with the ROUTED trigger routing
    (which trains with α = 0 unless a TrainConfig sets one: TrainConfig.alpha_for)."""
    if gate == "routed":
        return MoleConfig(granularity=granularity, gate="token", **ROUTED)
    return MoleConfig(granularity=granularity, gate=gate)


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_training(keys, mole: MoleConfig, train, limits) -> None:
    """ValueError naming the field for gate training that cannot run: the LoRAs (two or more, different, at most
    `limits.experts`), the gate layout, and the numbers (steps up to `limits.train_steps`, lr, α, batch, seed).
    The image and the text engine both call it before anything trains."""
    keys = list(keys or [])
    if len(keys) < 2 or len(set(keys)) != len(keys):
        raise ValueError(f"Gate training needs at least two different LoRAs; got {', '.join(keys) or 'none'}.")
    if len(keys) > limits.experts:
        raise ValueError(f"At most {limits.experts} LoRAs can be mixed here; {len(keys)} are selected.")
    Mix("mole", tuple(keys), granularity=mole.granularity, gate=mole.gate).check()
    if not _whole(train.steps) or not 1 <= train.steps <= limits.train_steps:
        raise ValueError(f"Training steps must be a whole number between 1 and {limits.train_steps}; "
                         f"got {train.steps!r}.")
    if not _finite(train.lr) or not 0 < train.lr <= 10:
        raise ValueError(f"The learning rate must be above 0 and at most 10; got {train.lr}.")
    alpha = train.alpha_for(mole)
    if not _finite(alpha) or not 0 <= alpha <= 100:
        raise ValueError(f"Balance α must be between 0 and 100; got {alpha}.")
    if not _whole(train.batch_size) or not 1 <= train.batch_size <= 64:
        raise ValueError(f"The batch size must be a whole number between 1 and 64; got {train.batch_size!r}.")
    if not _whole(train.seed) or not 0 <= train.seed < 2**63:
        raise ValueError(f"The seed must be a whole number from 0 to 2^63 − 1; got {train.seed!r}.")
