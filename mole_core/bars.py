"""Progress bars for the command line: tqdm on a terminal, one plain line per update anywhere else (a Space's
log, CI, a file), so a log never fills with carriage-return streams.

    with progress_bar(150, "train-gates", "steps") as bar:
        bar.set_postfix(loss="0.1", refresh=False); bar.update(1)

References: tqdm (the subset of its API used here).
"""
from __future__ import annotations

import sys
import time


class LineBar:
    """A progress bar for logs (a Space's log, CI, a file): one line per update, no carriage returns.
    The subset of tqdm that `progress_bar`'s callers use."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", file=None, **_):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, 0, ""
        self.file, self.start = file or sys.stderr, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if refresh:
            self.refresh()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        done = f"{self.n}%" if self.unit == "%" else f"{self.n}/{self.total} {self.unit}"
        elapsed = time.perf_counter() - self.start
        parts = [f"{done} {self.desc}" if self.unit == "%" else f"{self.desc}: {done}", f"{elapsed:.1f} s"]
        if self.unit != "%" and self.n:
            parts.append(f"{elapsed / self.n:.2f} s/{self.unit.rstrip('s')}")
        print(" · ".join(parts + ([self.postfix] if self.postfix else [])), file=self.file, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str = "", unit: str = "it", bar_format: str | None = None, file=None):
    """tqdm on a terminal; a `LineBar` (one line per update) when the output is a log or a pipe."""
    file = file or sys.stderr
    if not (hasattr(file, "isatty") and file.isatty()):
        return LineBar(total, desc, unit, file)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, bar_format=bar_format, file=file, dynamic_ncols=True)
