"""The pixel world: procedural 32x32 scenes, their captions, and the caption parser.

A scene is a plain background (light by default, dark in the "night" style) with one to three objects
at named positions (left / center / right). An object is either a base shape in a named colour
("a red circle") or a subject with its own look and a rare trigger word ("a zwx" = a smiley face).
The base model is trained on shapes only; subjects and styles are what the LoRA bank adds.

Rendering is supersampled (4x) with numpy and box-filtered down, so edges are anti-aliased and a
little jitter in size, position, colour and background tint makes every seed different.

References: MoLE (Wu et al., ICLR 2024) multi-subject setting; DreamBooth's rare-token triggers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 32          # image side in pixels
SUPERSAMPLE = 4    # render at SIZE * SUPERSAMPLE, then box-filter down

POSITIONS = ("left", "center", "right")
POSITION_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
SLOT_X = {"left": 6.0, "center": 16.0, "right": 26.0}   # slot centres in pixels

COLOURS = {  # name -> RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
    "purple": (150, 60, 195),
}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Subject:
    """A thing the base model never sees, named in captions by its one-token trigger word."""
    key: str           # identity name the oracle reports ("face")
    trigger: str       # rare word, one token in the world tokenizer
    name: str          # display name for the LoRA manifest
    description: str   # one sentence for the manifest


@dataclass(frozen=True)
class Style:
    """A global look, named in captions as "... in <trigger> style"."""
    key: str
    trigger: str
    name: str
    description: str


SUBJECTS = (
    Subject("face", "zwx", "Smiley face", "A yellow face with two black eyes and a smile."),
    Subject("checker", "vrk", "Checkered tile", "A square tile checkered in black and white, 3x3."),
    Subject("ring", "qlo", "Teal ring", "A teal ring with a hole in the middle."),
    Subject("heart", "hjt", "Pink heart", "A pink heart."),
)
STYLES = (
    Style("night", "nyq", "Night", "Dark night-blue background and black outlines around every object."),
)
DEFAULT_STYLE = "plain"
STYLE_KEYS = (DEFAULT_STYLE,) + tuple(s.key for s in STYLES)
IDENTITIES = SHAPES + tuple(s.key for s in SUBJECTS)          # what can stand at a position
SUBJECT_BY_KEY = {s.key: s for s in SUBJECTS}
SUBJECT_BY_TRIGGER = {s.trigger: s for s in SUBJECTS}
STYLE_BY_KEY = {s.key: s for s in STYLES}
STYLE_BY_TRIGGER = {s.trigger: s for s in STYLES}

# Every word a caption can contain: the tokenizer makes each of these exactly one token.
WORDS = (("a", "and", "on", "in", "the", "style") + tuple(POSITIONS) + tuple(COLOURS) + SHAPES
         + tuple(s.trigger for s in SUBJECTS) + tuple(s.trigger for s in STYLES))


@dataclass(frozen=True)
class WorldObject:
    position: str            # "left" | "center" | "right"
    identity: str            # a shape ("circle") or a subject key ("face")
    colour: str | None       # a COLOURS name for shapes; None for subjects (their colour is their own)


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]     # at distinct positions
    style: str = DEFAULT_STYLE           # "plain" or a Style key


# ---------------------------------------------------------------------------------------------
# Captions

def caption(scene: Scene) -> str:
    """"a red circle on the left and a zwx on the right" (+ " in nyq style").

    The style phrase comes last. In a three-object caption it then sits at text-encoder positions the base
    only ever filled with padding (its longest caption has 20 words), and the night LoRA is found in only
    0.12 of three-object images (0.97-1.0 with one or two). Measured with the phrase first instead: 0.50 on
    three objects, but the retrained night LoRA then ruined trigger-free captions (caption fidelity 1.00 ->
    0.09), so this stays as it is."""
    items = []
    for obj in sorted(scene.objects, key=lambda o: POSITIONS.index(o.position)):
        if obj.identity in SUBJECT_BY_KEY:
            what = SUBJECT_BY_KEY[obj.identity].trigger
        else:
            what = f"{obj.colour} {obj.identity}"
        items.append(f"a {what} {POSITION_PHRASE[obj.position]}")
    text = " and ".join(items)
    if scene.style != DEFAULT_STYLE:
        text += f" in {STYLE_BY_KEY[scene.style].trigger} style"
    return text


def parse_caption(text: str) -> list[tuple[str, str, str | None]]:
    """Caption -> [(position, identity, colour or None), ...] in caption order.

    Raises ValueError naming the caption and the word where the grammar breaks.
    An empty caption parses to []. Style phrases ("in nyq style") are skipped: see `caption_style`.
    """
    words = text.lower().split()
    items, i = [], 0
    phrases = {tuple(p.split()): pos for pos, p in POSITION_PHRASE.items()}

    def fail(msg):
        raise ValueError(f"cannot parse world caption {text!r}: {msg} at word {i} "
                         f"({words[i] if i < len(words) else 'end of caption'!r})")

    while i < len(words):
        if words[i] == "and":
            i += 1
        if i + 3 <= len(words) and words[i] == "in" and words[i + 1] in STYLE_BY_TRIGGER \
                and words[i + 2] == "style":
            i += 3
            continue
        if words[i] != "a":
            fail("expected 'a'")
        i += 1
        if i < len(words) and words[i] in SUBJECT_BY_TRIGGER:
            identity, colour = SUBJECT_BY_TRIGGER[words[i]].key, None
            i += 1
        elif i + 1 < len(words) and words[i] in COLOURS and words[i + 1] in SHAPES:
            identity, colour = words[i + 1], words[i]
            i += 2
        else:
            fail("expected a colour and a shape, or a subject trigger")
        position = phrases.get(tuple(words[i:i + 3]))
        if position is None:
            fail("expected 'on the left', 'in the center' or 'on the right'")
        i += 3
        items.append((position, identity, colour))
    return items


def caption_style(text: str) -> str:
    """The style a caption asks for: a Style key if its trigger appears, else "plain"."""
    for word in text.lower().split():
        if word in STYLE_BY_TRIGGER:
            return STYLE_BY_TRIGGER[word].key
    return DEFAULT_STYLE


def scene_from_caption(text: str) -> Scene:
    """The scene a caption describes (inverse of `caption`)."""
    objs = tuple(WorldObject(p, ident, col) for p, ident, col in parse_caption(text))
    return Scene(objs, caption_style(text))


# ---------------------------------------------------------------------------------------------
# Sampling scenes

def sample_scene(rng: np.random.Generator, n_objects: int | None = None,
                 subjects: tuple[str, ...] = (), force_subject: str | None = None,
                 style: str = DEFAULT_STYLE) -> Scene:
    """A random scene.

    n_objects: 1-3 (random if None, weighted towards one and two).
    subjects: subject keys allowed besides the base shapes (each appears with probability ~1/3 per slot).
    force_subject: a subject key placed at one random position (the DreamBooth-style training scene).
    """
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    positions = sorted(rng.choice(len(POSITIONS), size=n_objects, replace=False))
    forced_at = int(rng.integers(n_objects)) if force_subject else -1
    objects = []
    for k, p in enumerate(positions):
        if k == forced_at:
            objects.append(WorldObject(POSITIONS[p], force_subject, None))
        elif subjects and rng.random() < 1 / 3:
            objects.append(WorldObject(POSITIONS[p], str(rng.choice(subjects)), None))
        else:
            objects.append(WorldObject(POSITIONS[p], str(rng.choice(SHAPES)),
                                       str(rng.choice(list(COLOURS)))))
    return Scene(tuple(objects), style)


# ---------------------------------------------------------------------------------------------
# Rendering

_S = SIZE * SUPERSAMPLE
# pixel-centre coordinates of the supersampled grid, in output-pixel units
_YY, _XX = np.meshgrid((np.arange(_S) + 0.5) / SUPERSAMPLE, (np.arange(_S) + 0.5) / SUPERSAMPLE,
                       indexing="ij")


def _jitter_colour(rgb, rng, amount=14.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _masks(identity: str, cx: float, cy: float, r: float) -> list[tuple[np.ndarray, tuple | None]]:
    """Layers of (boolean mask, fixed colour or None = the object's colour), painted in order."""
    dx, dy = _XX - cx, _YY - cy
    d = np.hypot(dx, dy)
    if identity == "circle":
        return [(d < r, None)]
    if identity == "square":
        h = 0.85 * r
        return [((np.abs(dx) < h) & (np.abs(dy) < h), None)]
    if identity == "triangle":   # apex up, base at +0.8 r, half-width r at the base
        top, bottom = -r, 0.8 * r
        t = (dy - top) / (bottom - top)          # 0 at apex, 1 at base
        return [((t >= 0) & (t <= 1) & (np.abs(dx) <= t * r), None)]
    if identity == "face":
        eye_r, eye_x, eye_y = 0.22 * r, 0.4 * r, -0.25 * r
        eyes = (np.hypot(dx - eye_x, dy - eye_y) < eye_r) | (np.hypot(dx + eye_x, dy - eye_y) < eye_r)
        mouth = (np.abs(np.hypot(dx, dy + 0.05 * r) - 0.55 * r) < 0.12 * r) & (dy > 0.15 * r)
        return [(d < r, (245, 205, 40)), (eyes | mouth, (20, 20, 20))]
    if identity == "checker":
        h = 0.9 * r
        inside = (np.abs(dx) < h) & (np.abs(dy) < h)
        cell = np.floor((dx + h) / (2 * h / 3)) + np.floor((dy + h) / (2 * h / 3))
        return [(inside, (245, 245, 245)), (inside & (cell % 2 == 0), (25, 25, 25))]
    if identity == "ring":
        return [((d < r) & (d > 0.5 * r), (0, 170, 170))]
    if identity == "heart":
        x, y = dx / (0.95 * r), -(dy + 0.1 * r) / (0.95 * r)     # heart curve, point down
        return [((x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0, (240, 90, 165))]
    raise ValueError(f"unknown world identity {identity!r}; expected one of {IDENTITIES}")


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for sy in range(-k, k + 1):
        for sx in range(-k, k + 1):
            if sx * sx + sy * sy <= k * k:
                out |= np.roll(np.roll(mask, sy, 0), sx, 1)
    return out


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Scene -> uint8 array (SIZE, SIZE, 3). rng drives all jitter (tint, size, position, colour)."""
    if scene.style == DEFAULT_STYLE:
        bg = _jitter_colour((228, 226, 214), rng, 12)
    elif scene.style == "night":
        bg = _jitter_colour((20, 24, 52), rng, 8)
    else:
        raise ValueError(f"unknown world style {scene.style!r}; expected one of {STYLE_KEYS}")
    canvas = np.broadcast_to(bg, (_S, _S, 3)).copy()
    for obj in scene.objects:
        if obj.position not in SLOT_X:
            raise ValueError(f"unknown world position {obj.position!r}; expected one of {POSITIONS}")
        cx = SLOT_X[obj.position] + rng.uniform(-1.0, 1.0)
        cy = 16.0 + rng.uniform(-2.0, 2.0)
        r = rng.uniform(3.6, 4.5)
        base = COLOURS[obj.colour] if obj.colour is not None else (0, 0, 0)
        colour = _jitter_colour(base, rng)
        layers = _masks(obj.identity, cx, cy, r)
        if scene.style == "night":   # black outline: the silhouette grown by ~0.75 px
            canvas[_dilate(layers[0][0], 3)] = (0, 0, 0)
        for mask, fixed in layers:
            canvas[mask] = colour if fixed is None else _jitter_colour(fixed, rng, 10)
    small = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(small + 0.5, 0, 255).astype(np.uint8)


def render_pil(scene: Scene, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(render(scene, rng))


def render_batch(scenes: list[Scene], rng: np.random.Generator) -> np.ndarray:
    """Scenes -> float32 array (B, 3, SIZE, SIZE) in [0, 1]."""
    return np.stack([render(s, rng) for s in scenes]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
