"""Atomic file writes: a temp file in the destination's folder, then os.replace.

A crash or an exception mid-write never leaves half a file at the destination; the temp file is removed.
Every writer in the engine (LoRA files, mixtures, bank entries, images, CSV) goes through `atomic_path`.
"""
from __future__ import annotations

import csv
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temp path next to `path`; on success it replaces `path`, on error it is deleted.

    `suffix` matters for writers that pick the format from the file name (PIL: ".png").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; a finished file gets the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(path, rows: list[dict], fieldnames: list[str]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
