"""The pixel world as an evaluation suite: captions that ask for the bank's subjects and styles, and the
oracle's scores of the images (the offline stand-ins for CLIP). `mole_core.studies.evaluate` hands these to the
generic study harness (`mole_core.studies.image`) when the model is the world.

Scores (read by the world's oracle, `mole_core.world.pixel.oracle`), per image so a table can show a mean and
its uncertainty:
- caption fidelity   the fraction of caption items the oracle finds satisfied (≈ CLIP text-alignment);
- subject fidelity   per subject: the probability it is present and recognisable where the caption puts
                     it; per style: that the image is in that style (≈ CLIP image-alignment);
- base preservation  for a caption without any trigger, the fraction of the oracle's reading (what stands
                     at each position, its colour, the style) on which the method's image agrees with
                     the base model's image for the same prompt and seed.

Captions: `world_prompts` asks for the subjects at the world's positions (at most three per image) and
for one style; `world_plain_prompts` are trigger-free shape captions for base preservation.

References: MoLE (Wu et al., ICLR 2024) Sec. 4 metrics, which the oracle's scores stand in for.
"""
from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import numpy as np

from mole_core.metrics import Target, mentions
from mole_core.world.pixel import oracle as world_oracle
from mole_core.world.pixel import render as world


def shipped_oracle(model_dir) -> Path | None:
    """The oracle folder a world model ships (`<model>/oracle` with its config), or None."""
    if not model_dir:
        return None
    folder = Path(model_dir) / "oracle"
    return folder if (folder / "config.json").exists() else None


# ---------------------------------------------------------------------------------------------
# Captions

def speaks_world(targets: list[Target]) -> bool:
    """Every target is a subject or style of the pixel world, so world captions can ask for them."""
    return all(t.trigger in (world.STYLE_BY_TRIGGER if t.kind == "style" else world.SUBJECT_BY_TRIGGER)
               for t in targets)


def world_prompts(targets: list[Target], n: int, seed: int = 0) -> list[str]:
    """Captions that ask for the subjects (at most three per image, one per position) and the styles.

    Every ordered choice of positions and every choice of subjects is listed, then `n` are drawn
    without repetition (seeded) in a balanced way: each subject appears about equally often.
    """
    subjects = [t for t in targets if t.kind != "style"]
    styles = [t for t in targets if t.kind == "style"]
    suffix = "".join(f" in {t.trigger} style" for t in styles[:1])
    if len(styles) > 1:
        raise ValueError(f"World captions can ask for one style at a time; got {[t.key for t in styles]}.")
    per_image = min(len(subjects), len(world.POSITIONS))
    options = []
    for chosen in itertools.combinations(subjects, per_image):
        for positions in itertools.permutations(world.POSITIONS, per_image):
            placed = sorted(zip(positions, chosen), key=lambda pc: world.POSITIONS.index(pc[0]))
            items = [f"a {t.trigger} {world.POSITION_PHRASE[p]}" for p, t in placed]
            options.append(" and ".join(items) + suffix)
    if not subjects:       # styles only: ordinary shape scenes in that style
        rng = np.random.default_rng([seed, 7])
        options = [world.caption(world.sample_scene(rng, n_objects=2)) + suffix for _ in range(max(n, 1))]
    random.Random(seed).shuffle(options)
    return [options[i % len(options)] for i in range(n)]


def world_plain_prompts(n: int, seed: int = 0) -> list[str]:
    """Trigger-free captions (two shapes in named colours) for base preservation."""
    rng = np.random.default_rng([seed, 11])
    return [world.caption(world.sample_scene(rng, n_objects=2)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# The oracle as a scorer

def reading_items(reading) -> dict[str, tuple]:
    """What an oracle reading says, item by item: per position (identity, colour of a shape), and style."""
    items = {}
    for position in reading.identity:
        identity = reading.identity_at(position)
        colour = reading.colour_at(position) if identity in world.SHAPES else None
        items[position] = (identity, colour)
    items["style"] = (reading.style_name,)
    return items


class WorldScorer:
    """Caption fidelity, subject fidelity and base preservation, read by the world's oracle.

    A scorer of `mole_core.studies.image` (`name`, `score`, `preservation`); the columns it gives are
    "caption_fidelity" and "subject:<key>" per target (NaN where the caption does not ask for it).
    """

    name = "oracle"

    def __init__(self, oracle, functions=world_oracle):
        self.oracle = oracle        # has .read(images) -> readings, one per image
        self.fn = functions         # has caption_fidelity(readings, captions), subject_fidelity(readings, captions, key)

    @classmethod
    def load(cls, path) -> "WorldScorer":
        """The oracle shipped with a world model, e.g. assets/pixel-world/oracle."""
        return cls(world_oracle.Oracle.load(path))

    def score(self, images, captions, targets: list[Target]) -> dict[str, np.ndarray]:
        if len(images) != len(captions):
            raise ValueError(f"WorldScorer.score got {len(images)} images but {len(captions)} captions.")
        readings = list(self.oracle.read(list(images)))
        out = {"caption_fidelity": np.array([float(self.fn.caption_fidelity([r], [c]))
                                             for r, c in zip(readings, captions)])}
        for t in targets:
            column = []
            for r, c in zip(readings, captions):     # subjects and styles alike, by key
                column.append(float(self.fn.subject_fidelity([r], [c], t.key)) if mentions(c, t.trigger)
                              else math.nan)
            out[f"subject:{t.key}"] = np.array(column)
        return out

    def preservation(self, images, base_images) -> np.ndarray:
        """Per image: the fraction of reading items equal to those of the base image."""
        if len(images) != len(base_images):
            raise ValueError(f"WorldScorer.preservation got {len(images)} images but "
                             f"{len(base_images)} base images.")
        ours, base = self.oracle.read(list(images)), self.oracle.read(list(base_images))
        agree = []
        for a, b in zip(ours, base):
            items_a, items_b = reading_items(a), reading_items(b)
            same = sum(1 for k in items_a if items_a[k] == items_b.get(k))
            agree.append(same / max(1, len(set(items_a) | set(items_b))))
        return np.array(agree, dtype=np.float64)
