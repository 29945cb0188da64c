"""Regions: where in the image each expert may act (issue 23). One per-pixel expert-weight map, shared by the
user's regions (`Mix.regions`) and the FreeFuse peer's automatic masks (mole_core/image/freefuse.py).

A region is a preset ("left", "right", "top", "bottom", "centre" / "center", "whole"), a box "x0,y0,x1,y1" in
fractions of the width and height (0 ≤ x0 < x1 ≤ 1, 0 ≤ y0 < y1 ≤ 1), or a mask image (a PNG path, a PIL image
or an array; white = inside, grey = partly; resized to the image). Applied in the MoLE layers (layers.Group,
`_regional`) at every module that reads image tokens / pixels, whatever the gate kind:

    G'_i(p) = G_i(p) · w_i(p) / Σ_j G_j(p) · w_j(p)            w_i(p) ∈ [0, 1]: expert i's region at pixel p

so outside its region an expert's weight is 0 and the others are renormalised (as the mask switches experts off).
An expert with no region given acts everywhere (w = 1). A pixel that no expert's region covers gets no expert:
the base model there (the weights are all 0; nothing is renormalised by 0). The map is kept at the latent grid
and resized (area average) to each module's resolution: a UNet module's token count tells its resolution
(ceil(h / 2^k) × ceil(w / 2^k)); an SD3 / FLUX transformer's image stream holds the latent grid / patch, and
FLUX's single blocks carry [text, image]. Modules that read text (a UNet's cross-attention keys / values, a
transformer's context stream, the text encoders) are not spatial: their weights stay the gate's.

All regions "whole" (or none) is no map at all: the layers run exactly as without regions.

The engine also gives each placed expert a denoiser call of its own per step, reading the clauses of the prompt
that name it (`region_phrases`), and fuses the predictions by the regions (mole_core/image/regional.py): inside one
call the whole prompt is read everywhere, and a small model then draws the subjects the whole prompt suggests.

References: FreeFuse (Liu et al., 2025, arXiv 2510.23515) for LoRA outputs confined to a mask; Prompt-to-Prompt
(Hertz et al., 2022) for token maps at the UNet's resolutions.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# preset -> box (x0, y0, x1, y1) in fractions of the width and the height
PRESETS = {"whole": (0.0, 0.0, 1.0, 1.0), "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
           "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0), "centre": (0.25, 0.25, 0.75, 0.75),
           "center": (0.25, 0.25, 0.75, 0.75)}
# A caption's position words -> a box: the pixel world places subjects at three slots across (left / center /
# right, mole_core.world.pixel.render.SLOT_X), so each word gets its third of the width.
CAPTION_BOXES = {"left": (0.0, 0.0, 1 / 3, 1.0), "center": (1 / 3, 0.0, 2 / 3, 1.0), "right": (2 / 3, 0.0, 1.0, 1.0)}
_FACTORS = (1, 2, 4, 8, 16, 32, 64)
MAX_MASK_PIXELS = 4096 * 4096      # a mask image larger than this is refused before its pixels are decoded
# Modules of an SD3 / FLUX transformer that read the text tokens (the same as routing's context stream).
_TEXT_SIDE = re.compile(r"(^|\.)(context_embedder|add_[qkv]_proj|to_add_out|ff_context)(\.|$)")


@dataclass(frozen=True, eq=False)
class Region:
    """One expert's region: `box` (x0, y0, x1, y1) in fractions, or `mask` (H, W) float32 in [0, 1].
    `spec` is what the user gave (a preset, "x0,y0,x1,y1", a file name), for snippets and files."""
    spec: str
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None

    @property
    def whole(self) -> bool:
        return self.box == PRESETS["whole"] or (self.mask is not None and bool((self.mask >= 1).all()))

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The region on an h × w grid (h, w) float32 in [0, 1]: a box covers the cells whose centre is inside
        it; a mask is area-averaged (or stretched) to the grid."""
        if self.mask is not None:
            m = torch.from_numpy(self.mask).float()[None, None]
            shrink = m.shape[-2] >= h and m.shape[-1] >= w
            resized = F.interpolate(m, size=(h, w), mode="area") if shrink else \
                F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            return resized[0, 0].clamp(0, 1)
        x0, y0, x1, y1 = self.box
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        inside_y = (ys >= y0) & (ys <= y1)
        inside_x = (xs >= x0) & (xs <= x1)
        return (inside_y[:, None] & inside_x[None, :]).float()

    def __eq__(self, other) -> bool:
        if not isinstance(other, Region):
            return NotImplemented
        same_mask = (self.mask is None) == (other.mask is None) and (
            self.mask is None or (self.mask.shape == other.mask.shape and np.array_equal(self.mask, other.mask)))
        return self.spec == other.spec and self.box == other.box and same_mask

    def __repr__(self) -> str:
        return repr(self.spec)


def parse_region(value, field: str = "region") -> Region:
    """A Region from a preset name, a box "x0,y0,x1,y1", a mask image file (PNG, ...), a PIL image, an array
    (H, W) (values in [0, 1], or 0..255 for uint8) or a Region. ValueError naming `field` for anything else."""
    if isinstance(value, Region):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 4:
        value = ",".join(str(v) for v in value)
    if isinstance(value, np.ndarray) or hasattr(value, "convert"):
        return Region("mask image", mask=_mask_array(value, field))
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"The {field} must be one of {', '.join(_preset_names())}, a box x0,y0,x1,y1 (fractions) "
                         f"or a mask image file; got {value!r}.")
    text = value.strip()
    if text.lower() in PRESETS:
        return Region(text.lower(), box=PRESETS[text.lower()])
    if "," in text and not Path(text).is_file():
        return Region(text, box=_box(text, field))
    return Region(Path(text).name, mask=_mask_file(text, field))


def _preset_names() -> list[str]:
    return [p for p in PRESETS if p != "center"]


def _box(text: str, field: str) -> tuple[float, float, float, float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"The {field} box {text!r} must be four numbers x0,y0,x1,y1 (fractions of the width "
                         f"and height), e.g. 0,0,0.5,1 for the left half.")
    x0, y0, x1, y1 = numbers
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"The {field} box {text!r} must have 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1 "
                         f"(fractions of the width and height).")
    return x0, y0, x1, y1


def _mask_file(path: str, field: str) -> np.ndarray:
    import PIL.Image
    name = Path(path).name
    if not Path(path).is_file():
        raise ValueError(f"The {field} {name!r} is neither a preset ({', '.join(_preset_names())}), a box "
                         f"x0,y0,x1,y1 nor a mask image file that exists.")
    try:
        with PIL.Image.open(path) as image:                        # reads the header only: the size is known
            return _mask_array(image, f"{field} {name!r}")          # before any pixel is decoded
    except (OSError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError) as err:
        raise ValueError(f"The {field} {name!r} is not an image that can be read ({type(err).__name__}).") from None


def _mask_array(value, field: str) -> np.ndarray:
    """(H, W) float32 in [0, 1] from a PIL image (its alpha when it has one and the picture is blank, else
    its luminance) or an array."""
    size = value.size if hasattr(value, "convert") else np.shape(value)[:2]
    if math.prod(size) > MAX_MASK_PIXELS:
        raise ValueError(f"The {field} is {size[0]} × {size[1]} pixels; a mask may have at most "
                         f"{MAX_MASK_PIXELS:,} (it is resized to the latent grid anyway).")
    if hasattr(value, "convert"):
        alpha = value.getchannel("A") if "A" in value.getbands() else None
        gray = np.asarray(value.convert("L"), dtype=np.float32) / 255.0
        if alpha is not None and not gray.any():                   # a drawing on a transparent layer
            gray = np.asarray(alpha, dtype=np.float32) / 255.0
        array = gray
    else:
        array = np.asarray(value)
        if array.ndim == 3:
            array = array.mean(-1)
        array = array.astype(np.float32) / (255.0 if value.dtype == np.uint8 else 1.0)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"The {field} must be a 2-D mask (height × width); found shape {tuple(array.shape)}.")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"The {field} must hold values between 0 and 1 (or 0..255 as 8-bit).")
    return np.ascontiguousarray(array)


def parse_regions(values: dict | None, keys, field: str = "regions") -> dict[str, Region] | None:
    """{key: value} -> {key: Region}; ValueError naming the field and the key for a bad value or a key that is
    not in `keys`."""
    if not values:
        return None
    unknown = [k for k in values if k not in tuple(keys)]
    if unknown:
        raise ValueError(f"The {field} name {', '.join(map(str, unknown))}, which is not in the selection "
                         f"{', '.join(keys) or '(empty)'}.")
    return {k: parse_region(v, f"{field} of {k!r}") for k, v in values.items()}


_POSITION_WORDS = {"left": "left", "right": "right", "center": "center", "centre": "center", "middle": "center"}


def caption_positions(caption: str, triggers: dict[str, list[str] | str]) -> dict[str, str]:
    """{key: "left" | "center" | "right"}: for each LoRA whose trigger word is in the caption, the first position
    word after it and before the next trigger ("a zwx on the left and a qrb in the center"; the pixel world's
    grammar, mole_core.world.pixel.render.POSITION_PHRASE). LoRAs without a trigger or a position are left out."""
    words = _words(caption)
    starts = {}
    for key, trig in triggers.items():
        for t in _trigger_words(trig):
            hits = _hits(words, t)
            if hits:
                starts[key] = min(hits[0], starts.get(key, len(words)))
    order = sorted(starts, key=starts.get)
    out = {}
    for n, key in enumerate(order):
        end = starts[order[n + 1]] if n + 1 < len(order) else len(words)
        found = [_POSITION_WORDS[w] for w in words[starts[key]:end] if w in _POSITION_WORDS]
        if found:
            out[key] = found[0]
    return out


def caption_regions(caption: str, triggers: dict[str, list[str] | str]) -> dict[str, Region]:
    """{key: Region} from the caption's position words (`caption_positions`, each a third: CAPTION_BOXES)."""
    return {k: Region(pos, box=CAPTION_BOXES[pos]) for k, pos in caption_positions(caption, triggers).items()}


_CLAUSE = re.compile(r"\s*(?:[,;]|\band\b|\bBREAK\b)\s*", re.IGNORECASE)


def region_phrases(prompt: str, triggers: dict[str, list[str] | str], placed) -> dict[str, str]:
    """{key: the text its regional pass reads} for each `placed` key: the prompt's clauses (split at commas,
    semicolons, "and", "BREAK") that name its trigger, with the clauses that name no placed expert's trigger
    kept in place ("a zwx on the left and a qlo on the right" -> zwx: "a zwx on the left"); so a placed expert
    whose trigger the prompt does not name reads the clauses that name no placed expert (none left: the prompt)."""
    clauses = [c for c in _CLAUSE.split(prompt) if c.strip()]
    names = {k: _trigger_words(triggers.get(k)) for k in placed}
    owners = [{k for k, trigs in names.items() if any(_hits(_words(c), t) for t in trigs)} for c in clauses]
    out = {}
    for key in placed:
        keep = [c for c, o in zip(clauses, owners) if key in o or not o]
        out[key] = ", ".join(keep) if keep else prompt
    return out


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?") for w in text.lower().split()]


def _trigger_words(trigger) -> list[list[str]]:
    """A trigger (a word, words, or a list of them) as lists of lower-case words."""
    trigs = [trigger] if isinstance(trigger, str) else list(trigger or [])
    return [t.lower().split() for t in trigs if t and t.strip()]


def _hits(words: list[str], trigger: list[str]) -> list[int]:
    """Where the trigger's words start in `words`."""
    n = len(trigger)
    return [i for i in range(len(words) - n + 1) if n and words[i:i + n] == trigger]


def stack(regions: dict[str, Region] | None, keys, h: int, w: int) -> torch.Tensor | None:
    """(N, h, w) weights in `keys` order (an expert without a region: 1 everywhere), or None when every
    expert may act everywhere (no map: the layers run exactly as without regions)."""
    regions = regions or {}
    if all(k not in regions or regions[k].whole for k in keys):
        return None
    return torch.stack([regions[k].grid(h, w) if k in regions else torch.ones(h, w) for k in keys])


class RegionMaps:
    """The per-pixel expert weights of one call, (N, h, w) on the latent grid, at every module's resolution.

    denoiser: "unet" or "transformer" (the only network whose image tokens get regions). patch: a transformer's
    image tokens per side of the latent grid (SD3: its patch size; FLUX: 2, its packing). `at` is cached per
    (token count, role); the layers call it (layers.Group._regional)."""

    def __init__(self, weights: torch.Tensor, denoiser: str, patch: int = 1):
        self.weights = weights.float()                       # (N, h, w)
        self.denoiser, self.patch = denoiser, patch
        self._cache: dict = {}

    def to(self, device) -> "RegionMaps":
        """The map on `device` (the attachment's, before a call: every resolution is then made there, so a
        forward copies nothing from the host)."""
        if device is not None and self.weights.device != torch.device(device):
            self.weights, self._cache = self.weights.to(device), {}
        return self

    def grid_of(self, T: int) -> tuple[int, int] | None:
        """(rows, cols) of a T-token image layer, or None when T is no resolution of the map."""
        h, w = self.weights.shape[1:]
        factors = (self.patch,) if self.denoiser == "transformer" else _FACTORS
        for f in factors:
            rows, cols = math.ceil(h / f), math.ceil(w / f)
            if rows * cols == T:
                return rows, cols
        return None

    def at(self, network: str, key: str | None, T: int) -> torch.Tensor | None:
        """(1, T, N) weights for a module of `network` (key '<network>.<path>') reading T tokens, or None when
        that module does not read image tokens (text encoders, text-side modules)."""
        if network != self.denoiser:
            return None
        path = key.split(".", 1)[1] if key and "." in key else (key or "")
        role = "image"
        if self.denoiser == "transformer":
            role = "text" if _TEXT_SIDE.search(path) else "joint" if path.startswith("single_transformer_blocks.") \
                else "image"
        if role == "text":
            return None
        cache_key = (T, role)
        if cache_key not in self._cache:
            self._cache[cache_key] = self._build(T, role)
        return self._cache[cache_key]

    def _build(self, T: int, role: str) -> torch.Tensor | None:
        h, w = self.weights.shape[1:]
        n = self.weights.shape[0]
        image_T = math.ceil(h / self.patch) * math.ceil(w / self.patch) if role == "joint" else T
        grid = self.grid_of(image_T)
        if grid is None or (role == "joint" and T <= image_T):
            return None
        m = F.interpolate(self.weights[None], size=grid, mode="area")[0] if grid != (h, w) else self.weights
        m = m.flatten(1).T[None]                                           # (1, T_img, N), row-major
        if role == "joint":                                                # FLUX single blocks: [text, image]
            m = torch.cat([m.new_ones(1, T - image_T, n), m], dim=1)
        return m


def overlay(image, regions: dict[str, Region] | None, keys, alpha: float = 0.45):
    """A PIL image of `image` (PIL, or None for a grey canvas of 256 × 256) with each expert's region tinted in
    its own colour (COLOURS, in `keys` order); experts without a region are not drawn."""
    import PIL.Image
    base = image.convert("RGB") if image is not None else PIL.Image.new("RGB", (256, 256), (200, 200, 200))
    w, h = base.size
    out = np.asarray(base, dtype=np.float32).copy()
    for i, key in enumerate(keys):
        region = (regions or {}).get(key)
        if region is None:
            continue
        m = region.grid(h, w).numpy()[..., None] * alpha
        out = out * (1 - m) + np.array(COLOURS[i % len(COLOURS)], dtype=np.float32) * m
    return PIL.Image.fromarray(out.clip(0, 255).astype(np.uint8))


COLOURS = [(230, 60, 60), (50, 120, 230), (40, 180, 90), (240, 180, 30), (160, 70, 200), (20, 190, 200)]
