"""Estimate vs measured on this machine (issue 25): calibrate, then Train, Compare, Evaluate as the app runs them.

Run: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=. python bench/estimate_check.py  (prints; asserts nothing)
"""
import os, time, torch
torch.set_num_threads(1)
from mole_core.image.engine import Engine, GenerateRequest
from mole_core.mix import Mix, mole_config_for
from mole_core.train import TrainConfig
from mole_core.defaults import TRAIN_STEPS, TRAIN_LR, TRAIN_BATCH
from mole_core.studies.evaluate import run_small_study, small_study_seconds
import app
e = Engine(); e.pipe
print("load at start", os.getloadavg(), flush=True)
print(f"calibration {e.calibrate():.1f} s", flush=True)
def row(name, est, fn):
    t = time.perf_counter(); fn(); m = time.perf_counter() - t
    print(f"{name}: estimate {est:.1f} s, measured {m:.1f} s, ratio {m/est:.2f}, load {os.getloadavg()[0]:.1f}", flush=True)
for keys, steps in ((["checker","face"], TRAIN_STEPS), (["checker","face","heart"], 60)):
    est = e.expected_seconds(train_steps=steps, gate="routed", batch_size=TRAIN_BATCH, experts=len(keys))
    row(f"Train {len(keys)} LoRAs {steps} steps routed", est, lambda: e.train(keys, mole_config_for("block","routed"), TrainConfig(steps=steps, lr=TRAIN_LR, batch_size=TRAIN_BATCH, seed=3)))
keys = ["checker","face"]
mixes = app._estimate_mixes(keys, app.DEFAULT_METHODS, "routed")
req = GenerateRequest(prompt="a vrk on the left and a zwx on the right", seed=7)
real = [Mix(m, keys, gate="routed") if m != "base" else Mix("base") for m in app.DEFAULT_METHODS]
row("Compare 7 default methods", e.expected_seconds(mixes=mixes, denoise_steps=20), lambda: e.compare(real, req))
est = small_study_seconds(e, keys, seeds=1, n_prompts=2, train_steps=30)
row("Evaluate small study seeds 1 prompts 2 steps 30", est, lambda: run_small_study(e, keys, seeds=1, n_prompts=2, train_steps=30))
