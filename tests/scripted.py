"""A scripted engine and a perfect oracle, so every number an evaluation reports can be checked by hand.

The engine draws exactly the scene a caption describes with the world's renderer (an empty scene for a
caption outside the world's grammar), except where a method is told to drop a subject (`drops`) or to
paint in the night style (`night`), and except what a Mix's mask switches off; the base model draws no
subject and a single LoRA only its own. The oracle reads back the scene each image was drawn from, and is
scored with the real world's fidelity functions (mole_core.world.pixel.oracle).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mole_core.attach import MoleConfig
from mole_core.studies.image import Suite
from mole_core.world.pixel.scoring import WorldScorer, world_plain_prompts, world_prompts

world = importlib.import_module("mole_core.world.pixel.render")      # the package re-exports a function `render`
world_oracle = importlib.import_module("mole_core.world.pixel.oracle")

FACE, RING, CHECKER, NIGHT = "face", "ring", "checker", "night"
TRIGGER = {s.key: s.trigger for s in world.SUBJECTS} | {s.key: s.trigger for s in world.STYLES}
SECONDS_PER_IMAGE, SECONDS_PER_TRAIN_STEP = 0.5, 0.1      # what the scripted engine expects


@dataclass
class Entry:
    key: str
    trigger: list
    kind: str
    examples: list = field(default_factory=list)


class Bank:
    def __init__(self, keys):
        self.entries = [Entry(k, [TRIGGER[k]], "style" if k == NIGHT else "subject") for k in keys]

    def get(self, key):
        return next(e for e in self.entries if e.key == key)


@dataclass
class FakeResult:
    image: Image.Image
    seconds: float
    gates: list | None = None


@dataclass
class FakeMixture:
    granularity: str
    names: list
    gate: str = "sample"

    def mole_config(self) -> MoleConfig:
        return MoleConfig(granularity=self.granularity, gate=self.gate)


class ScriptedEngine:
    """Draws the caption's scene; `drops[method]` = subjects that method fails to draw, `night` = methods
    that paint everything in the night style. Remembers which scene each image shows and every call."""

    def __init__(self, keys, drops=None, night=()):
        self.bank, self.model_id = Bank(keys), None
        self.drops, self.night = drops or {}, set(night)
        self.scenes: dict[int, world.Scene] = {}
        self.mixes, self.requests, self.trained, self.checked = [], [], [], []
        self.banks = []                      # the bank= of every call (None: the engine's own)

    def expected_seconds(self, train_steps=0, images=0, denoise_steps=20, gate="sample", batch_size=4):
        return train_steps * SECONDS_PER_TRAIN_STEP + images * SECONDS_PER_IMAGE

    def check(self, mixes, request, bank=None):
        self.checked.append((list(mixes), request))
        self.banks.append(bank)
        for mix in mixes:
            mix.check()
        return []

    def check_train(self, keys, mole, train, bank=None):
        self.banks.append(bank)

    def generate(self, mix, request, bank=None):
        self.mixes.append(mix)
        self.requests.append(request)
        self.banks.append(bank)
        try:
            scene = world.scene_from_caption(request.prompt)
        except ValueError:                                         # not a world caption: an empty scene
            scene = world.Scene(())
        off = set(self.drops.get(mix.method, ())) | {k for k, on in (mix.mask or {}).items() if not on}
        if mix.method == "base":                                   # the base model knows no subject
            off |= set(world.SUBJECT_BY_KEY)
        if mix.single:                                             # one LoRA alone draws only its subject
            off |= set(world.SUBJECT_BY_KEY) - {mix.single}
        scene = world.Scene(tuple(o for o in scene.objects if o.identity not in off),
                            NIGHT if mix.method in self.night else scene.style)
        image = world.render_pil(scene, np.random.default_rng(request.seed))
        self.scenes[id(image)] = scene
        gates = [{"expert": k, "weight": 1 / len(mix.keys)} for k in mix.keys] if mix.method == "mole" else None
        return FakeResult(image, 0.01, gates)

    def train(self, keys, mole, train, on_step=None, should_stop=None, out_path=None, bank=None):
        """Like Engine.train: should_stop() before every step, on_step after it; a falling loss."""
        self.trained.append((tuple(keys), mole.granularity, mole.gate, train.steps))
        self.banks.append(bank)
        for step in range(1, train.steps + 1):
            if should_stop is not None and should_stop():
                break
            on_step(step, {"loss": 1.0 / step, "task": 1.0 / step, "balance": 0.0}, [0.5] * len(keys))
        return FakeMixture(mole.granularity, list(keys), mole.gate)


class PerfectOracle:
    """Reads back the scene an image was drawn from, with certainty."""

    def __init__(self, engine):
        self.engine = engine

    def read(self, images):
        out = []
        for im in images:
            scene = self.engine.scenes[id(im)]
            at = {o.position: o for o in scene.objects}
            identity = {p: {c: float(c == (at[p].identity if p in at else "empty"))
                            for c in world_oracle.IDENTITY_CLASSES} for p in world.POSITIONS}
            colour = {p: {c: float(p in at and c == at[p].colour) for c in world_oracle.COLOUR_CLASSES}
                      for p in world.POSITIONS}
            style = {s: float(s == scene.style) for s in world_oracle.STYLE_CLASSES}
            out.append(world_oracle.Reading(identity, colour, style))
        return out


def scripted(keys, **kw) -> tuple[ScriptedEngine, Suite]:
    """A scripted engine over `keys` and the world's suite, scored by the perfect oracle."""
    engine = ScriptedEngine(keys, **kw)
    return engine, Suite([WorldScorer(PerfectOracle(engine))], world_prompts, world_plain_prompts)
