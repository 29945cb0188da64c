"""Dev timing: seconds per image of the linear merge, the routed gate before issue 23 and the routed default now,
on a three-trigger caption of the world (interleaved rounds after a warm-up; medians and ratios to linear).

    OMP_NUM_THREADS=1 python bench/dev/compose_cost.py 9
"""
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "dev"))
from mole_core.image.engine import Engine, GenerateRequest
from mole_core.mix import Mix
from mole_core.attach import MoleConfig
from compose import ConfigMix
torch.set_num_threads(1)
e = Engine()
keys = ("face", "checker", "ring")
old = MoleConfig(gate="token", route="trigger", route_tokens="phrase", route_norm="share", route_absent="off")
mixes = {"linear": Mix("linear", keys), "routed before": ConfigMix("mole", keys, gate="token", config=old),
         "routed now": Mix("mole", keys, gate="routed")}
cap = "a zwx on the left and a vrk in the center and a qlo on the right"
for m in mixes.values():
    e.generate(m, GenerateRequest(cap, seed=1))        # warm: merges, attachments
t = {k: [] for k in mixes}
for r in range(int(sys.argv[1])):
    for k, m in mixes.items():
        s = time.perf_counter(); e.generate(m, GenerateRequest(cap, seed=100 + r)); t[k].append(time.perf_counter() - s)
med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
print(json.dumps({"median_s": med, "ratio_to_linear": {k: v / med["linear"] for k, v in med.items()}, "rounds": int(sys.argv[1])}))
