"""Dev measurements for the prompt gate (seeds 7: not the study's 0, not the final check's)."""
import os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
sys.path.insert(0, ".")
from mole_core.attach import MoleConfig
from mole_core.mix import Mix
from mole_core.text.engine import TextEngine
from mole_core.studies.text import task_items, score
from mole_core.train import TrainConfig

e = TextEngine()
keys = [k.key for k in e.bank.entries if k.role == "main"]
tasks = {e.bank.get(k).task: task_items(e.bank.get(k).task, int(os.environ.get("ITEMS", 20)), 7) for k in keys}
gate = os.environ.get("GATE", "prompt")
steps, lr, bs, alpha = int(os.environ.get("STEPS", 150)), float(os.environ.get("LR", 1e-3)), int(os.environ.get("BS", 4)), float(os.environ.get("ALPHA", 0.5))
gran = os.environ.get("GRAN", "block")
t = time.perf_counter()
m = e.train(keys, MoleConfig(granularity=gran, gate=gate), TrainConfig(steps=steps, lr=lr, batch_size=bs, balance_alpha=alpha))
train_s = time.perf_counter() - t
mix = Mix("mole", tuple(keys), mixture=m)
res = {}
t = time.perf_counter()
for task, items in tasks.items():
    texts, _, _ = e.answer(mix, [p for p, _ in items])
    res[task] = score(texts, items)["exact_match"]
print(gate, gran, f"steps={steps} lr={lr} bs={bs} a={alpha}", f"train {train_s:.1f}s eval {time.perf_counter()-t:.1f}s",
      res, "mean", round(sum(res.values())/len(res), 3), "final", m.meta.get("final_losses"), "gates", m.meta.get("mean_gates"))
