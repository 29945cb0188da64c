"""An evaluation's results as people read them: a markdown table with a few plain sentences, a tidy
table, a bar chart, a grid of sample images, and the JSON file with every per-image score.

Tables show mean ± half-width of the 95% interval over images (mole_core.metrics.mean_ci). The leader
sentences compare only the rows that compose LoRAs (MoLE and the other composition methods); single
LoRAs and the base model are references.

References: MoLE (Wu et al., ICLR 2024), Tables 1, 7, 9 (the rows and metrics shown).
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image

from mole_core.atomic import atomic_path, write_text
from mole_core.mix import NEEDS_SELECTION
from mole_core.studies.image import Evaluation

METRIC_NAMES = {  # column -> header, in the order shown
    "caption_fidelity": "caption fidelity",
    "mean_subject": "subject fidelity (mean)",
    "base_preservation": "base preservation",
    "clip_text": "CLIP text-align",
    "clip_image": "CLIP image-align (mean)",
    "clip_base_preservation": "CLIP base similarity",
}


def metric_columns(rows: list[dict]) -> list[str]:
    """Score columns present in the rows: the headline ones first, then per-subject columns."""
    present = {k for row in rows for k in row if not k.endswith(("_ci", "_n"))
               and isinstance(row[k], float) and k != "seconds_per_image"}
    ordered = [c for c in METRIC_NAMES if c in present]
    return ordered + sorted(c for c in present if c not in METRIC_NAMES)


def header(column: str) -> str:
    if column in METRIC_NAMES:
        return METRIC_NAMES[column]
    kind, _, key = column.partition(":")
    return f"{'CLIP image-align' if kind == 'clip_image' else 'subject fidelity'}: {key}"


def cell_text(row: dict, column: str) -> str:
    mean, half = row.get(column, math.nan), row.get(column + "_ci", math.nan)
    if mean is None or not math.isfinite(mean):
        return "—"
    return f"{mean:.3f} ± {half:.3f}" if half is not None and math.isfinite(half) else f"{mean:.3f}"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = metric_columns(rows) if columns is None else columns
    lines = ["| method | " + " | ".join(header(c) for c in columns) + " | images | s / image |",
             "|---|" + "---|" * len(columns) + "---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(cell_text(row, c) for c in columns)
                     + f" | {row['images']} | {row['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def tidy_table(rows: list[dict], decimals: int = 3):
    """One line per row as a pandas DataFrame: each score and its 95% half-width ("<header> ±"), the
    images, seconds per image and mean gates, rounded to `decimals` (no raw counts or dict columns)."""
    import pandas as pd
    columns = metric_columns(rows)
    lines = []
    for row in rows:
        line = {"method": row["label"]}
        for c in columns:
            line[header(c)] = _rounded(row.get(c), decimals)
            line[f"{header(c)} ±"] = _rounded(row.get(c + "_ci"), decimals)
        line["images"] = row["images"]
        line["s / image"] = _rounded(row["seconds_per_image"], decimals)
        line.update({f"gate: {expert}": _rounded(w, decimals) for expert, w in (row.get("gates") or {}).items()})
        lines.append(line)
    return pd.DataFrame(lines)


def _rounded(value, decimals: int):
    return round(float(value), decimals) if value is not None and math.isfinite(float(value)) else None


def leaders(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    """For each headline metric: which row leads, and whether MoLE's best row is within its interval.

    Only composing rows (MoLE and the other methods that combine the selection) compete; single LoRAs and
    the base model are references. With fewer than two competing rows nobody leads, and no line is written.
    """
    competing = [r for r in rows if r["method"] in NEEDS_SELECTION]
    lines = []
    for column in columns or [c for c in METRIC_NAMES if any(c in r for r in competing)]:
        scored = [r for r in competing if r.get(column) is not None and math.isfinite(r.get(column, math.nan))]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda r: r[column])
        moles = [r for r in scored if r["method"] == "mole"]
        if best["method"] == "mole":
            others = [r for r in scored if r["method"] != "mole"]
            runner = max(others, key=lambda r: r[column]) if others else None
            tie = runner is not None and best[column] - runner[column] <= (best[column + "_ci"] or 0) + (runner[column + "_ci"] or 0)
            lines.append(f"{header(column)}: {best['label']} leads ({best[column]:.3f})"
                         + (f", within the intervals of {runner['label']} ({runner[column]:.3f}): not a clear win"
                            if tie else ""))
        elif moles:
            mole = max(moles, key=lambda r: r[column])
            lines.append(f"{header(column)}: {best['label']} leads ({best[column]:.3f}); MoLE does not win "
                         f"(best MoLE row {mole['label']}: {mole[column]:.3f})")
        else:
            lines.append(f"{header(column)}: {best['label']} leads ({best[column]:.3f})")
    return lines


def training_line(label: str, log: dict) -> str:
    """One sentence on a gate training: steps, time, and whether the task loss fell (and by when) or rose."""
    first, final = log["first_loss"], log["final_loss"]
    line = f"{label}: {log['steps']} gate-training steps in {log['seconds']:.1f} s; task loss "
    if final < first:
        return line + (f"fell {first:.4f} → {final:.4f}, 90% of the drop by step {log['plateau_step']} "
                       f"({log['plateau_seconds']:.1f} s).")
    if final > first:
        return line + f"rose {first:.4f} → {final:.4f} (no drop to time)."
    return line + f"did not move ({first:.4f})."


def to_markdown(result: Evaluation, title: str = "Results") -> str:
    parts = [f"### {title}", "", markdown_table(result.rows) if result.rows else "(no rows)", ""]
    parts += [f"- {line}" for line in leaders(result.rows)]
    parts += [f"- {training_line(label, log)}" for label, log in result.training.items() if log.get("steps")]
    parts += [f"- {note}" for note in result.notes]
    return "\n".join(parts) + "\n"


def bar_figure(result: Evaluation, columns: list[str] | None = None, title: str = ""):
    """The matplotlib figure of `plot` (the legend sits right of the axes, clear of the bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result.rows
    columns = columns or [c for c in METRIC_NAMES if any(c in r for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2) + (2.2 if columns else 0), 3.8), dpi=100)
    if not columns:
        ax.barh([r["label"] for r in rows], [r["seconds_per_image"] for r in rows])
        ax.set_xlabel("seconds per image (no scorer: see the notes)")
    else:
        width = 0.8 / len(columns)
        x = np.arange(len(rows))
        for j, column in enumerate(columns):
            means = [r.get(column, math.nan) for r in rows]
            errs = [r.get(column + "_ci", math.nan) for r in rows]
            ax.bar(x + (j - (len(columns) - 1) / 2) * width, np.nan_to_num(means), width,
                   yerr=np.nan_to_num(errs), capsize=2, label=header(column))
        ax.set_xticks(x, [r["label"] for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot(result: Evaluation, columns: list[str] | None = None, title: str = "") -> PIL.Image.Image:
    """Grouped bars (rows × headline metrics) with 95% intervals, as a PIL image."""
    import matplotlib.pyplot as plt
    fig = bar_figure(result, columns, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def sample_grid(result: Evaluation, scale: int = 2) -> PIL.Image.Image | None:
    """The first images of each row side by side (one line per row), enlarged `scale` times."""
    lines = [imgs for imgs in result.samples.values() if imgs]
    if not lines:
        return None
    w, h = lines[0][0].size
    grid = PIL.Image.new("RGB", (max(len(x) for x in lines) * w, len(lines) * h), "white")
    for i, imgs in enumerate(lines):
        for j, im in enumerate(imgs):
            grid.paste(im.convert("RGB").resize((w, h)), (j * w, i * h))
    return grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)


def to_json(result: Evaluation, extra: dict | None = None) -> dict:
    def clean(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean({"rows": result.rows, "training": result.training, "notes": result.notes,
                  "records": result.records, **(extra or {})})


def write_outputs(result: Evaluation, out_dir, name: str = "results", title: str = "Results",
                  extra: dict | None = None, plot_columns: list[str] | None = None) -> dict[str, Path]:
    """<name>.md, <name>.json, <name>.png (plot) and <name>_samples.png in out_dir, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{name}.md", "json": out / f"{name}.json", "plot": out / f"{name}.png"}
    write_text(paths["markdown"], to_markdown(result, title))
    write_text(paths["json"], json.dumps(to_json(result, extra), indent=1))
    image = plot(result, columns=plot_columns, title=title)
    with atomic_path(paths["plot"], suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    grid = sample_grid(result)
    if grid is not None:
        paths["samples"] = out / f"{name}_samples.png"
        with atomic_path(paths["samples"], suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
    return paths
