"""Dev diagnostic (not a method): the routed gate with each pixel routed by the caption's own positions (the
third of the image each subject is asked at) instead of attention maps — how far perfect pixel routing goes.

    ROUTED='{"route_attend": 0, "route_compose_from": 2}' OMP_NUM_THREADS=1 python bench/dev/layout_oracle.py \
        face,checker,ring       # docs/results_default_composition.md's "phrases encoded separately" row
    (env: ROUTED = changes to mix.ROUTED, CAPS = captions split by "|", NS = seeds from 5000, GRID = a png path,
     BOTH=1 routes the unconditional row by the layout too)
"""
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "dev"))
from mole_core.image.engine import Engine, GenerateRequest
import mole_core.mix as mm
from mole_core.mix import Mix
from mole_core.routing import TriggerRouter
from mole_core.studies.image import targets_from_bank
from mole_core.world.pixel.scoring import WorldScorer, shipped_oracle, world_prompts
from compose import read_confusion
torch.set_num_threads(1)
mm.ROUTED.update(json.loads(os.environ.get("ROUTED", "{}")))
keys = sys.argv[1].split(",")
e = Engine()
scorer = WorldScorer.load(shipped_oracle(e.model_id))
targets = targets_from_bank(e.bank, keys)
trig = {t.trigger: i for i, t in enumerate(targets)}
caps = world_prompts(targets, 6, seed=77)
if os.environ.get("CAPS"): caps = os.environ["CAPS"].split("|")
NS = int(os.environ.get("NS", 4))
CUR = {}
def layout(T):
    side = int(T ** 0.5)
    m = torch.zeros(side, side, len(keys))
    for item in CUR["caption"].split(" and "):
        w = item.split(); i = trig[w[1]]
        a, b = {"left": (0, side // 3), "center": (side // 3, 2 * side // 3), "right": (2 * side // 3, side)}[w[-1] if w[-1] != "center" else "center"]
        m[:, a:b, i] = 1
    return m.reshape(1, T, -1)
def pixels(self, T):
    m = self.masses.get(T)
    if m is None:
        return None
    out = torch.zeros_like(m)
    out[-1:] = layout(T)        # the conditional row
    if os.environ.get("BOTH"): out[:] = layout(T)
    return out
TriggerRouter._pixels = pixels
mix = Mix("mole", tuple(keys), gate="routed")
imgs, cs = [], []
for c in caps:
    CUR["caption"] = c
    for s in range(5000, 5000 + NS):
        imgs.append(e.generate(mix, GenerateRequest(c, seed=s)).image); cs.append(c)
if os.environ.get("GRID"):                      # the images, one row per caption, 4× nearest-neighbour
    import PIL.Image
    w, h = imgs[0].size
    sheet = PIL.Image.new("RGB", (NS * w, len(caps) * h), "white")
    for i, im in enumerate(imgs):
        sheet.paste(im, ((i % NS) * w, (i // NS) * h))
    sheet.resize((4 * NS * w, 4 * len(caps) * h), PIL.Image.NEAREST).save(os.environ["GRID"])

cf = scorer.score(imgs, cs, targets)["caption_fidelity"]
print(os.environ.get("ROUTED"), keys, f"{cf.mean():.3f} ± {1.96*cf.std(ddof=1)/len(cf)**.5:.3f}", read_confusion(scorer, imgs, cs))
