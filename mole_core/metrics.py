"""Scores for composed images, model-agnostic: the interval and plateau helpers, and CLIP for real models.

A scorer answers per image, so a table can show a mean and its uncertainty:

    name                                                          "clip", "oracle", ...
    score(images, captions, targets)  -> {column: (n,) array}    NaN where a column does not apply
    preservation(images, base_images) -> (n,) array              agreement with the base model's image

`ClipScorer` is the one here. A model family can bring its own (the pixel world's oracle is
`mole_core.world.pixel.scoring.WorldScorer`); the study harness (`mole_core.studies.image`) takes any of them.

CLIP metrics (the paper's, for real models; from a local `CLIPModel` folder, nothing downloaded):
- text alignment     cos(image embedding, caption embedding);
- image alignment    per subject: mean cos(image embedding, embedding of each of its reference images);
- base preservation  cos(image embedding, base image embedding).
Raw cosines: the paper reports CLIP scores on its own scale, so only our rows compare with each other.

References: MoLE (Wu et al., ICLR 2024) Sec. 4 metrics; Custom Diffusion (Kumari et al., 2023) for
text- and image-alignment as CLIP cosines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch


@dataclass
class Target:
    """A LoRA whose presence is scored: a subject (or a style) of the bank."""
    key: str                                  # bank key; names the table column "subject:<key>"
    trigger: str                              # the word that asks for it in a caption
    kind: str = "subject"                     # "subject" | "style"
    references: list = field(default_factory=list)   # reference images (paths or PIL) for CLIP image alignment


def mentions(caption: str, trigger: str) -> bool:
    """The caption asks for this trigger (whole word, case-insensitive)."""
    return trigger.lower() in caption.lower().split()


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% normal interval, count) over the finite values; NaN when none."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, 0
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else math.nan
    return float(v.mean()), float(half), int(v.size)


def plateau_step(losses, fraction: float = 0.9, window: int | None = None) -> int:
    """First step at which the smoothed loss has made `fraction` of its total drop.

    Smoothing is a trailing mean over `window` steps (default: a tenth of the run, >= 1). The total drop
    is smoothed(first window) - smoothed(last window). A loss that does not drop (flat or rising) gives 0,
    so a caller that reports the plateau must say first whether the loss fell at all.
    """
    x = np.asarray(losses, dtype=np.float64)
    if x.size == 0:
        raise ValueError("plateau_step needs at least one loss value; got none.")
    window = window or max(1, x.size // 10)
    smooth = np.convolve(x, np.ones(window) / window, mode="valid")       # (n - window + 1,)
    start, end = smooth[0], smooth[-1]
    if not start > end:
        return 0
    reached = np.nonzero(smooth <= start - fraction * (start - end))[0]
    return int(reached[0]) + window - 1       # index of the last step inside that window


# ---------------------------------------------------------------------------------------------
# CLIP (real models)

def _features(output) -> torch.Tensor:
    """transformers >= 5 returns a model output whose pooler_output is the projected embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """CLIP text- and image-alignment from a local CLIPModel folder (no download)."""

    name = "clip"

    def __init__(self, model, tokenizer, image_processor, batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size
        self._reference_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, path, device: str | None = None) -> "ClipScorer":
        """A folder holding a CLIPModel, its tokenizer and its image processor (save_pretrained)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        folder = Path(path)
        if not (folder / "config.json").exists():
            raise ValueError(f"No CLIP model at {folder}: expected a folder with config.json, the "
                             f"weights, a tokenizer and a preprocessor_config.json (CLIPModel.save_pretrained).")
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"Cannot load a CLIP model from {folder}: {err}") from err
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tokenizer, image_processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """(n, d) unit-norm image embeddings; images are PIL images or paths."""
        images = [PIL.Image.open(im).convert("RGB") if isinstance(im, (str, Path)) else im.convert("RGB")
                  for im in images]
        chunks = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.image_processor(images=images[i:i + self.batch_size], return_tensors="pt")
            out = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
            chunks.append(torch.nn.functional.normalize(_features(out).float(), dim=-1))
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        """(n, d) unit-norm text embeddings; texts longer than the text encoder reads are cut."""
        limit = self.model.config.text_config.max_position_embeddings
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                    max_length=limit, return_tensors="pt").to(self.device)
            out = self.model.get_text_features(input_ids=tokens["input_ids"],
                                               attention_mask=tokens["attention_mask"])
            chunks.append(torch.nn.functional.normalize(_features(out).float(), dim=-1))
        return torch.cat(chunks)

    def _references(self, target: Target) -> torch.Tensor:
        if target.key not in self._reference_cache:
            if not target.references:
                raise ValueError(f"CLIP image alignment for {target.key!r} needs reference images; "
                                 f"its bank entry lists none.")
            self._reference_cache[target.key] = self.embed_images(target.references)
        return self._reference_cache[target.key]

    def score(self, images, captions, targets: list[Target]) -> dict[str, np.ndarray]:
        if len(images) != len(captions):
            raise ValueError(f"ClipScorer.score got {len(images)} images but {len(captions)} captions.")
        img = self.embed_images(images)                                     # (n, d)
        txt = self.embed_texts(captions)                                    # (n, d)
        out = {"clip_text": (img * txt).sum(-1).cpu().numpy().astype(np.float64)}
        for t in targets:
            sim = (img @ self._references(t).T).mean(-1).cpu().numpy().astype(np.float64)  # (n,)
            asked = np.array([mentions(c, t.trigger) for c in captions])
            out[f"clip_image:{t.key}"] = np.where(asked, sim, np.nan)
        return out

    def preservation(self, images, base_images) -> np.ndarray:
        if len(images) != len(base_images):
            raise ValueError(f"ClipScorer.preservation got {len(images)} images but "
                             f"{len(base_images)} base images.")
        a, b = self.embed_images(images), self.embed_images(base_images)
        return (a * b).sum(-1).cpu().numpy().astype(np.float64)
