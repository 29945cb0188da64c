"""Pictures of MoLE's gates that the app and the CLI share, drawn with PIL (no plotting backend).

    gate_heatmap(rows)       mean gate weight per gated group (rows, network order) × expert (columns); each
                             row sums to 1, a "no LoRA" column holding what went to no expert (trigger routing
                             sends the words outside every trigger phrase, and their pixels, to none)
    placeholder(text)        the tile shown for a bank entry without an example image

`rows` are the tidy gate rows a recording gives (`Recording.table()`, the gate CSV):
{"group", "network", "step", "sample", "expert", "weight"}.
"""
from __future__ import annotations

from collections import defaultdict

from PIL import Image, ImageDraw, ImageFont

NO_EXPERT = "no LoRA"         # the heat-map's column for the share no expert got
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colour(value: float) -> tuple[int, int, int]:
    """Viridis-like colour of a value in [0, 1] (interpolated between five anchor colours)."""
    x = min(max(value, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    return tuple(round(a + (b - a) * (x - i)) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def mean_by(rows: list[dict], *fields: str) -> dict[tuple, float]:
    """Mean weight per value of `fields` (insertion order kept: groups in network order)."""
    sums, counts = defaultdict(float), defaultdict(int)
    for row in rows:
        key = tuple(row[f] for f in fields)
        sums[key] += float(row["weight"])
        counts[key] += 1
    return {key: sums[key] / counts[key] for key in sums}


def heatmap_table(rows: list[dict]) -> tuple[list, list, dict[tuple, float]]:
    """(groups, experts, {(group, expert): mean weight}) as the heat-map prints them: a "no LoRA" column
    holds each row's remainder when any row's experts sum below 1 (so every printed row sums to 1)."""
    table = mean_by(rows, "group", "expert")
    groups = list(dict.fromkeys(g for g, _ in table))
    experts = list(dict.fromkeys(e for _, e in table))
    rest = {g: 1 - sum(table.get((g, e), 0.0) for e in experts) for g in groups}
    if any(r > 0.005 for r in rest.values()):
        experts.append(NO_EXPERT)
        table.update({(g, NO_EXPERT): max(0.0, r) for g, r in rest.items()})
    return groups, experts, table


def gate_heatmap(rows: list[dict], cell=(72, 22)) -> Image.Image:
    """Mean gate weight per group (rows, network order) × expert (columns), values printed in the cells."""
    groups, experts, table = heatmap_table(rows)
    font = ImageFont.load_default(size=12)
    label_w = 8 + max(int(font.getlength(str(g))) for g in groups)
    cw, ch = max(cell[0], 8 + max(int(font.getlength(str(e))) for e in experts)), cell[1]
    image = Image.new("RGB", (label_w + cw * len(experts) + 8, ch * (len(groups) + 1) + 8), "white")
    draw = ImageDraw.Draw(image)
    for j, expert in enumerate(experts):
        draw.text((label_w + j * cw + cw / 2, ch / 2), str(expert), fill="black", font=font, anchor="mm")
    for i, group in enumerate(groups):
        y = ch * (i + 1)
        draw.text((label_w - 6, y + ch / 2), str(group), fill="black", font=font, anchor="rm")
        for j, expert in enumerate(experts):
            value, x = table[(group, expert)], label_w + j * cw
            draw.rectangle([x, y, x + cw - 1, y + ch - 1], fill=colour(value))
            draw.text((x + cw / 2, y + ch / 2), f"{value:.2f}", font=font, anchor="mm",
                      fill="black" if value > 0.6 else "white")
    return image


def placeholder(text: str = "no example", side: int = 128) -> Image.Image:
    """A grey tile with a short text: a bank entry that has no example image (or a problem)."""
    image = Image.new("RGB", (side, side), (225, 225, 225))
    draw = ImageDraw.Draw(image)
    draw.text((side / 2, side / 2), text[:18], fill=(90, 90, 90), font=ImageFont.load_default(size=13),
              anchor="mm")
    return image
