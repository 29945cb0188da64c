"""Per-visitor state and what every tab shares: the Studio (the engine + how this server runs), a session's folder and bank, messages without server paths, and the model queue (ZeroGPU-aware)."""
from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gradio as gr

from mole_core.image.bank import Bank
from mole_core.defaults import PACKAGE_ROOT
from mole_core.image.engine import Engine
from ui.gpu import on_gpu
from mole_core.text.engine import TextEngine


MAX_EXPERTS = 8                        # rows of switches/strengths the page can show


MODEL_QUEUE = "model"                  # short model events (compare, toggle, export, uploads)


LONG_QUEUE = "long"                    # training and the study: one at a time, stepping aside for the rest


@dataclass
class Studio:
    """The shared engine and how this server runs; handlers take it first."""
    engine: Engine
    writable_bank: bool = False        # uploads go into the bank folder (every session) instead of the session
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mole_studio_")))
    text: TextEngine | None = None     # the Text mode's engine (the embedded text world by default), or None
    banks: dict = field(default_factory=dict)   # session folder -> that session's overlay Bank

    def __post_init__(self):
        atexit.register(shutil.rmtree, self.root, True)


def new_session() -> dict:
    """What one browser keeps between events (gr.State copies it for each session)."""
    return {
        "dir": None,            # this session's folder (exports, mixture, uploads), made on first need
        "mixture": None,        # mole_core.mixture.Mixture of the last training (or upload)
        "mixture_file": None,   # where that mixture is saved, for download and the snippet
        "cancel": False,        # set by Cancel, read by the training loop and the study
        "compared": None,       # the last comparison: {"mixes": [Mix], "request": GenerateRequest}
        "gates": None,          # tidy gate rows of the last MoLE image
        "toggle_image": None,   # the last Toggle experts image (the regions' overlay is drawn over it)
        "regions": None,        # {key: Region} placed in Toggle experts (Compare's MoLE uses them too)
        "drawn": {},            # key -> drawn mask (H, W) in [0, 1] (region_ui.use_drawing)
    }


def end_session(studio: Studio, state: dict) -> None:
    """The browser went away: stop its long jobs and remove its folder (uploads, exports, mixture)."""
    if not isinstance(state, dict):
        return
    state["cancel"] = True
    if state.get("dir"):
        studio.banks.pop(state["dir"], None)
        shutil.rmtree(state["dir"], ignore_errors=True)


def session_dir(studio: Studio, state: dict, kind: str) -> Path:
    """`<session folder>/<kind>/`, emptied: one file of each kind per session at a time."""
    if not state.get("dir"):
        state["dir"] = str(studio.root / uuid.uuid4().hex)
    folder = Path(state["dir"]) / kind
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def bank_of(studio: Studio, state: dict | None) -> Bank:
    """The bank this session sees: its own overlay once it uploaded something, else the shared one."""
    return studio.banks.get((state or {}).get("dir"), studio.engine.bank)


def human(studio: Studio, fn, *args, **kwargs):
    """Call fn; a ValueError (the engine's bad-input signal) becomes a gr.Error with no server paths."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, KeyError) as err:
        raise gr.Error(public_message(studio, str(err).strip("'\""))) from err


def public_message(studio: Studio, text: str) -> str:
    """A message with the server's folders cut out (a visitor sees their own file names only)."""
    folders = [studio.root, studio.engine.bank.folder, Path(studio.engine.model_id or "/nonexistent"),
               PACKAGE_ROOT, Path(tempfile.gettempdir())]
    if studio.text is not None:
        folders += [studio.text.bank.folder, Path(studio.text.model_id or "/nonexistent")]
    for folder in sorted({str(Path(f)) for f in folders}, key=len, reverse=True):
        text = re.sub(re.escape(folder) + r"[^\s:'\"]*/", "", text)
        text = text.replace(folder, "the server folder")
    return text


def on_model(handler, seconds, studio: Studio):
    """partial(handler, studio), under spaces.GPU on a ZeroGPU Space, asking for partial(seconds, studio)."""
    return on_gpu(partial(seconds, studio))(partial(handler, studio))
