"""The text CLI's default gate on NEW held-out items (seed 2026: used by no study or test), beside the linear
merge, LoraHub and Arrow. Reads the mixture written by `python -m mole_core train-gates` with its defaults.

    python bench/dev/new_items.py MIXTURE.safetensors [ITEMS]
"""
import json, os, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, ".")
import numpy as np
import torch
torch.set_num_threads(1)
from mole_core.mix import Mix
from mole_core.mixture import load_mixture
from mole_core.text.engine import TextEngine
from mole_core.studies.text import lorahub_weights, score
from mole_core.world.text.tasks import TASKS, sample_items, wilson

mixture = load_mixture(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 50
e = TextEngine()
keys = list(mixture.names)
tasks = {k: sample_items(TASKS[e.bank.get(k).task], np.random.default_rng([2026, i]), n, held_out=True)
         for i, k in enumerate(keys)}
pairs = [p for k in keys for p in e.bank.get(k).examples]
w = lorahub_weights(e, keys, pairs)
rows = {"MoLE prompt gate (CLI defaults)": Mix("mole", tuple(keys), mixture=mixture), "linear": Mix("linear", tuple(keys)),
        "LoraHub": Mix("linear", tuple(keys), weights=dict(zip(keys, w)), normalize=False),
        "Arrow (PEFT)": Mix("arrow", tuple(keys))}
out = {}
for label, mix in rows.items():
    per = {k: score(e.answer(mix, [p for p, _ in items])[0], items) for k, items in tasks.items()}
    c = sum(s["correct"] for s in per.values()); total = n * len(keys)
    out[label] = {"per_task": {k: s["exact_match"] for k, s in per.items()}, "mean": round(c / total, 4),
                  "ci95": [round(x, 3) for x in wilson(c, total)]}
    print(label, out[label], flush=True)
print(json.dumps({"items_per_task": n, "seed": 2026, "mixture_meta": {k: mixture.meta.get(k) for k in ("steps", "seconds", "final_losses")}, "rows": out}, indent=1))
