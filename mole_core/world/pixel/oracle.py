"""The oracle: a small CNN that reads a 32x32 world image, our offline stand-in for CLIP scores.

Per position (left / center / right) it reports which identity stands there ("empty", a shape, or a
subject) and the colour of a shape; for the whole image, the style. From its readings:

  caption_fidelity(readings, captions)           fraction of caption items satisfied (analogue of the
                                                  paper's CLIP text-alignment)
  subject_fidelity(readings, captions, subject)  mean probability that the subject is present and
                                                  recognisable where the caption puts it (analogue of
                                                  CLIP image-alignment); for a style: P(style)

Trained on rendered scenes with augmentation (blur, noise, contrast), since it reads generated images.

References: MoLE (Wu et al., ICLR 2024) §4 metrics (CLIP text-/image-alignment) that these replace.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from mole_core.atomic import atomic_path, write_text
from mole_core.world.pixel import render as world

IDENTITY_CLASSES = ("empty",) + world.IDENTITIES      # what stands at a position
COLOUR_CLASSES = tuple(world.COLOURS)                  # colour of a base shape
STYLE_CLASSES = world.STYLE_KEYS                       # global style


@dataclass
class OracleConfig:
    width: int = 16         # channels of the first conv block (doubled twice)
    hidden: int = 256       # fully connected layer before the heads
    identities: tuple = IDENTITY_CLASSES
    colours: tuple = COLOUR_CLASSES
    styles: tuple = STYLE_CLASSES


class OracleNet(nn.Module):
    def __init__(self, cfg: OracleConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2),             # 16x16
                                      *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
                                      *block(2 * w, 4 * w), nn.MaxPool2d(2))                    # 4x4
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, cfg.hidden), nn.ReLU())
        n_pos = len(world.POSITIONS)
        self.identity_head = nn.Linear(cfg.hidden, n_pos * len(cfg.identities))
        self.colour_head = nn.Linear(cfg.hidden, n_pos * len(cfg.colours))
        self.style_head = nn.Linear(cfg.hidden, len(cfg.styles))

    def forward(self, x: torch.Tensor):
        """x (B, 3, 32, 32) in [0, 1] -> logits: identity (B, 3, I), colour (B, 3, C), style (B, S)."""
        h = self.trunk(self.features((x - 0.5) / 0.25))                      # (B, hidden)
        b, n_pos = x.shape[0], len(world.POSITIONS)
        return (self.identity_head(h).view(b, n_pos, -1), self.colour_head(h).view(b, n_pos, -1),
                self.style_head(h))


@dataclass
class Reading:
    """What the oracle sees in one image (probabilities)."""
    identity: dict[str, dict[str, float]]    # position -> identity class -> prob ("empty" included)
    colour: dict[str, dict[str, float]]      # position -> colour -> prob (meaningful for shapes)
    style: dict[str, float]                  # style -> prob

    def identity_at(self, position: str) -> str:
        probs = self.identity[position]
        return max(probs, key=probs.get)

    def colour_at(self, position: str) -> str:
        probs = self.colour[position]
        return max(probs, key=probs.get)

    def present(self, position: str) -> float:
        return 1.0 - self.identity[position]["empty"]

    @property
    def style_name(self) -> str:
        return max(self.style, key=self.style.get)

    def objects(self) -> list[tuple[str, str, str | None]]:
        """[(position, identity, colour or None)] for each position read as occupied."""
        out = []
        for pos in world.POSITIONS:
            ident = self.identity_at(pos)
            if ident != "empty":
                out.append((pos, ident, self.colour_at(pos) if ident in world.SHAPES else None))
        return out


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1:] != (3, world.SIZE, world.SIZE):
            raise ValueError(f"oracle reads float tensors (B, 3, {world.SIZE}, {world.SIZE}) in [0, 1]; "
                             f"found shape {tuple(images.shape)}")
        return images.float()
    arrays = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise ValueError(f"oracle reads PIL images or a tensor; found {type(im).__name__}")
        if im.size != (world.SIZE, world.SIZE):
            im = im.resize((world.SIZE, world.SIZE), Image.BILINEAR)
        arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    if not arrays:
        return torch.zeros(0, 3, world.SIZE, world.SIZE)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class Oracle:
    """A trained OracleNet with load/save and `read`."""

    def __init__(self, net: OracleNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path) -> "Oracle":
        path = Path(path)
        config_file, weights_file = path / "config.json", path / "model.safetensors"
        for f in (config_file, weights_file):
            if not f.exists():
                raise ValueError(f"oracle folder {path} lacks {f.name} (expected config.json + model.safetensors)")
        raw = json.loads(config_file.read_text())
        cfg = OracleConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["model"].items()})
        net = OracleNet(cfg)
        net.load_state_dict(load_file(str(weights_file)))
        return cls(net)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp))
        write_text(path / "config.json", json.dumps(
            {"model": asdict(self.net.cfg), "positions": list(world.POSITIONS), **(extra or {})}, indent=2))

    @torch.no_grad()
    def probs(self, images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities: identity (B, 3, I), colour (B, 3, C), style (B, S)."""
        x = _as_tensor(images)
        outs = [self.net(chunk) for chunk in x.split(256)] if len(x) else []
        if not outs:
            cfg = self.net.cfg
            return (torch.zeros(0, 3, len(cfg.identities)), torch.zeros(0, 3, len(cfg.colours)),
                    torch.zeros(0, len(cfg.styles)))
        ident, colour, style = (torch.cat(parts) for parts in zip(*outs))
        return ident.softmax(-1), colour.softmax(-1), style.softmax(-1)

    def read(self, images) -> list[Reading]:
        """PIL images or a float tensor (B, 3, 32, 32) in [0, 1] -> one Reading per image."""
        ident, colour, style = self.probs(images)
        cfg = self.net.cfg
        readings = []
        for b in range(len(ident)):
            readings.append(Reading(
                identity={p: dict(zip(cfg.identities, ident[b, k].tolist())) for k, p in enumerate(world.POSITIONS)},
                colour={p: dict(zip(cfg.colours, colour[b, k].tolist())) for k, p in enumerate(world.POSITIONS)},
                style=dict(zip(cfg.styles, style[b].tolist()))))
        return readings


# ---------------------------------------------------------------------------------------------
# Scores from readings and captions

def items_satisfied(reading: Reading, caption: str) -> list[bool]:
    """One bool per caption item: each object (identity and, for shapes, colour, at its position),
    plus the style when the caption names one."""
    result = []
    for pos, ident, colour in world.parse_caption(caption):
        ok = reading.identity_at(pos) == ident
        if colour is not None:
            ok = ok and reading.colour_at(pos) == colour
        result.append(ok)
    style = world.caption_style(caption)
    if style != world.DEFAULT_STYLE:
        result.append(reading.style_name == style)
    return result


def caption_fidelity(readings: list[Reading], captions: list[str]) -> float:
    """Fraction of all caption items (objects, styles) that the images satisfy."""
    if len(readings) != len(captions):
        raise ValueError(f"caption_fidelity: {len(readings)} readings but {len(captions)} captions")
    flags = [ok for r, c in zip(readings, captions) for ok in items_satisfied(r, c)]
    if not flags:
        raise ValueError("caption_fidelity: the captions contain no items to check")
    return float(np.mean(flags))


def _subject_key(subject: str) -> tuple[str, str]:
    """A subject/style key or trigger -> ("subject" | "style", key)."""
    if subject in world.SUBJECT_BY_KEY:
        return "subject", subject
    if subject in world.SUBJECT_BY_TRIGGER:
        return "subject", world.SUBJECT_BY_TRIGGER[subject].key
    if subject in world.STYLE_BY_KEY:
        return "style", subject
    if subject in world.STYLE_BY_TRIGGER:
        return "style", world.STYLE_BY_TRIGGER[subject].key
    raise ValueError(f"unknown world subject {subject!r}; expected a subject or style key or trigger: "
                     f"{[s.key for s in world.SUBJECTS] + [s.key for s in world.STYLES]}")


def subject_fidelity(readings: list[Reading], captions: list[str], subject: str) -> float:
    """Mean probability that `subject` is present and recognisable where each caption puts it.

    subject: a subject key ("face") or trigger ("zwx"), or a style key / trigger (then: P(style) over
    the captions that ask for it). Captions that do not mention the subject are not counted.
    """
    if len(readings) != len(captions):
        raise ValueError(f"subject_fidelity: {len(readings)} readings but {len(captions)} captions")
    kind, key = _subject_key(subject)
    probs = []
    for reading, text in zip(readings, captions):
        if kind == "style":
            if world.caption_style(text) == key:
                probs.append(reading.style[key])
        else:
            probs += [reading.identity[pos][key] for pos, ident, _ in world.parse_caption(text) if ident == key]
    if not probs:
        raise ValueError(f"subject_fidelity: no caption mentions {subject!r}")
    return float(np.mean(probs))


# ---------------------------------------------------------------------------------------------
# Training and the clean-render accuracy

def scene_targets(scenes: list[world.Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """identity (B, 3), colour (B, 3; -100 where no shape), style (B,) class indices."""
    ident = torch.zeros(len(scenes), len(world.POSITIONS), dtype=torch.long)
    colour = torch.full((len(scenes), len(world.POSITIONS)), -100, dtype=torch.long)
    style = torch.zeros(len(scenes), dtype=torch.long)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            k = world.POSITIONS.index(obj.position)
            ident[b, k] = IDENTITY_CLASSES.index(obj.identity)
            if obj.colour is not None:
                colour[b, k] = COLOUR_CLASSES.index(obj.colour)
        style[b] = STYLE_CLASSES.index(scene.style)
    return ident, colour, style


def random_scenes(rng: np.random.Generator, n: int) -> list[world.Scene]:
    """The oracle's training / test distribution: every identity, colour and style."""
    subjects = tuple(s.key for s in world.SUBJECTS)
    return [world.sample_scene(rng, n_objects=int(rng.integers(0, 4)),
                               subjects=subjects if rng.random() < 0.6 else (),
                               style=str(rng.choice(STYLE_CLASSES)) if rng.random() < 0.4 else world.DEFAULT_STYLE)
            for _ in range(n)]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Contrast/brightness jitter, random blur, pixel noise: what generated images look like."""
    b = x.shape[0]
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(b, *shape, generator=gen)  # noqa: E731
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15, 1, 1, 1) + mean + u(-0.05, 0.05, 1, 1, 1) + u(-0.03, 0.03, 3, 1, 1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + (blurred - x) * u(0.0, 1.0, 1, 1, 1) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    x = x + torch.randn(x.shape, generator=gen) * u(0.0, 0.05, 1, 1, 1)
    return x.clamp(0, 1)


def train_oracle(rng: np.random.Generator, steps: int, batch: int, log=print, cfg: OracleConfig | None = None) -> OracleNet:
    net = OracleNet(cfg or OracleConfig())
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    net.train()
    for step in range(steps):
        scenes = random_scenes(rng, batch)
        x = augment(torch.from_numpy(world.render_batch(scenes, rng)), gen)
        t_ident, t_colour, t_style = scene_targets(scenes)
        ident, colour, style = net(x)
        loss = (F.cross_entropy(ident.flatten(0, 1), t_ident.flatten())
                + F.cross_entropy(colour.flatten(0, 1), t_colour.flatten(), ignore_index=-100)
                + F.cross_entropy(style, t_style))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"oracle step {step}/{steps} loss {loss.item():.4f}")
    return net.eval()


def accuracy_on_renders(oracle: Oracle, rng: np.random.Generator, n: int) -> dict:
    """Accuracy on n fresh clean renders: per item (each position's identity, each shape's colour,
    the style) and per image (everything right)."""
    scenes = random_scenes(rng, n)
    ident, colour, style = oracle.probs(torch.from_numpy(world.render_batch(scenes, rng)))
    t_ident, t_colour, t_style = scene_targets(scenes)
    ok_ident = ident.argmax(-1) == t_ident                                  # (n, 3)
    has_colour = t_colour >= 0
    ok_colour = (colour.argmax(-1) == t_colour) | ~has_colour               # (n, 3)
    ok_style = style.argmax(-1) == t_style                                  # (n,)
    n_items = ok_ident.numel() + has_colour.sum().item() + ok_style.numel()
    n_ok = ok_ident.sum().item() + (ok_colour & has_colour).sum().item() + ok_style.sum().item()
    per_image = (ok_ident.all(1) & ok_colour.all(1) & ok_style).float().mean().item()
    return {"item_accuracy": n_ok / n_items, "image_accuracy": per_image, "images": n}
