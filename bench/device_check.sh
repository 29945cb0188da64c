#!/usr/bin/env bash
# GPU check of MoLE Studio (issue 15), sized to finish in under 5 minutes on one GPU:
#   1. every method through the CLI (mole_core.cli.main generate, all in ONE process) on the embedded world:
#      the engine picks CUDA (and CUDA graphs) by itself, in float32
#   2. every method in float16 through the engine (Engine(dtype=torch.float16)), graphed (the default) and eager
#      (graphs=False), each image checked finite and not blank, compared with its float32 image and graphed with
#      eager; the seconds of each one's second call (graphs captured)
#   3. one gate-training step (CLI, float32) and one with fp16 autocast (TrainConfig(mixed_precision="fp16"))
#   4. the inference overhead at SD 1.5 size, float16 (bench/inference_overhead.py: base / diffusers unfused /
#      MoLE / linear merge, interleaved rounds, plus one gate-training vs one LoRA-training step; then compute
#      ops per forward and graphed beside eager times), and the
#      FLUX-shaped transformer at FLUX.1's 1024-px token count in bfloat16
# Everything goes to $OUT (default out/device_check/); a summary line per step, "DEVICE CHECK PASSED" at the end.
#
#   bash bench/device_check.sh               # on a GPU machine, from the repository root
#   bash bench/device_check.sh --dry-run     # print the commands, check the CLI flags they use; runs nothing
#   bash bench/device_check.sh --cpu-smoke   # run every step on the CPU at toy sizes (checks the script)
# Exit status: 0 passed, 2 no GPU (nothing run), 1 a step failed (its name is printed).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
OUT=out/device_check
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --cpu-smoke) MODE=cpu ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "device_check: unknown argument $1" >&2; exit 64 ;;
  esac
  shift
done

PY=${PYTHON:-python}
PROMPT="a zwx on the left and a qlo on the right"
LORAS=(--lora face --lora ring)
METHODS=(mole linear svd ties dare switch composite base)
if [ "$MODE" = cpu ]; then
  DEVICE=cpu; HALF=float32; BF=float32; STEPS=2; ROUNDS=1; SMALL=(--small); FLUX=(--double-blocks 1 --single-blocks 1 --image-side 4 --text-tokens 8)
  THREADS=1
else
  DEVICE=cuda; HALF=float16; BF=bfloat16; STEPS=20; ROUNDS=10; SMALL=(); FLUX=(--double-blocks 2 --single-blocks 4 --image-side 64 --text-tokens 512)
  THREADS=4
fi
export DEVICE HALF STEPS PROMPT OUT
START=$(date +%s)

step() {   # step NAME TIMEOUT_S CMD...: run (or print) one step, stop the script on failure
  local name=$1 limit=$2; shift 2
  if [ "$MODE" = dry ]; then printf '[dry-run] %s (timeout %ss): %s\n' "$name" "$limit" "$*"; return 0; fi
  local t0=$(date +%s)
  echo "== $name"
  if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "DEVICE CHECK FAILED at step '$name' (log: $OUT/$name.log):" >&2
    tail -20 "$OUT/$name.log" >&2
    exit 1
  fi
  tail -3 "$OUT/$name.log" | sed 's/^/   /'
  echo "   ok in $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - START )) s)"
}

# 0. the GPU, or a clear refusal
if [ "$MODE" = gpu ]; then
  if ! $PY - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"device_check: no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is "
             f"False; CUDA build: {torch.version.cuda}). This check needs a GPU: run it on the device machine, "
             f"or use --dry-run / --cpu-smoke here.")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
  then exit 2; fi
elif [ "$MODE" = dry ]; then
  $PY -c "import torch; print('[dry-run] torch.cuda.is_available() =', torch.cuda.is_available(), '(a real run stops here with exit 2 when False)')"
  # the flags the steps use must exist in the CLI and the benchmark as they are now
  HELP_GEN=$($PY -m mole_core generate --help 2>/dev/null)
  HELP_TRAIN=$($PY -m mole_core train-gates --help 2>/dev/null)
  HELP_BENCH=$($PY bench/inference_overhead.py --help 2>/dev/null)
  for f in --method --lora --prompt --seed --steps --out; do
    grep -q -- "$f" <<<"$HELP_GEN" || { echo "[dry-run] generate has no $f" >&2; exit 1; }; done
  for f in --lora --steps --batch-size --out; do
    grep -q -- "$f" <<<"$HELP_TRAIN" || { echo "[dry-run] train-gates has no $f" >&2; exit 1; }; done
  for f in --device --dtype --rounds --threads --family --markdown --train-steps --no-train --double-blocks --image-side; do
    grep -q -- "$f" <<<"$HELP_BENCH" || { echo "[dry-run] inference_overhead.py has no $f" >&2; exit 1; }; done
  grep -q -- "--dtype" <<<"$HELP_GEN" && echo "[dry-run] note: generate now has --dtype; step 2 could use it" \
    || echo "[dry-run] generate has no --dtype flag: float16 goes through Engine(dtype=torch.float16) (step 2)"
  echo "[dry-run] CLI and benchmark flags ok"
fi
[ "$MODE" = dry ] || mkdir -p "$OUT"

# 1. every method through the CLI (float32; the engine picks CUDA, and CUDA graphs, when it is there), all in
#    ONE process (mole_core.cli.main per method: python and torch start once, not eight times)
export METHODS_LIST="${METHODS[*]}"
step cli_generate 240 $PY - <<'EOF'
import os, sys, time
from mole_core.cli import main
out, prompt, steps = os.environ["OUT"], os.environ["PROMPT"], os.environ["STEPS"]
for m in os.environ["METHODS_LIST"].split():
    sel = [] if m == "base" else ["--lora", "face", "--lora", "ring"]
    t = time.perf_counter()
    code = main(["generate", "--method", m, *sel, "--prompt", prompt, "--seed", "1", "--steps", steps,
                 "--out", f"{out}/cli_{m}.png"])
    print(f"cli generate {m:10s} exit {code}  {time.perf_counter() - t:6.2f} s", flush=True)
    if code:
        sys.exit(f"generate --method {m} failed (exit {code})")
EOF

# 2. every method in float16 through the engine, checked against float32
step fp16_generate 270 $PY - <<'EOF'
import json, os, time
import numpy as np, torch
from mole_core.image.engine import Engine, GenerateRequest
from mole_core.mix import Mix
dev, half, out = os.environ["DEVICE"], getattr(torch, os.environ["HALF"]), os.environ["OUT"]
req = GenerateRequest(prompt=os.environ["PROMPT"], seed=1, steps=int(os.environ["STEPS"]))
# "half" runs graphed (the engine's CUDA default), "half_eager" with graphs=False (--no-graphs): the graphed
# image must match the eager one; the second call of each (graphs captured) is the time reported
engines = {"half": Engine(device=dev, dtype=half), "half_eager": Engine(device=dev, dtype=half, graphs=False),
           "float32": Engine(device=dev, dtype=torch.float32)}
rows, bad = [], []
for m in ["mole", "mole:sample", "linear", "svd", "ties", "dare", "switch", "composite", "base"]:
    method, _, gate = m.partition(":")
    mix = Mix(method, () if m == "base" else ("face", "ring"), **({"gate": gate} if gate else {}))
    px, secs = {}, {}
    for name, eng in engines.items():
        for _ in range(1 if name == "float32" else 2):       # the first call compiles / captures
            if dev == "cuda": torch.cuda.synchronize()
            t = time.perf_counter(); res = eng.generate(mix, req); secs[name] = time.perf_counter() - t
        px[name] = np.asarray(res.image, dtype=np.float32)
        if name == "half": res.image.save(f"{out}/fp16_{m.replace(':', '_')}.png")
    a = px["half"]
    finite, blank = bool(np.isfinite(a).all()), float(a.std()) < 1.0
    diff = float(np.abs(a - px["float32"]).mean())
    graph_diff = float(np.abs(a - px["half_eager"]).max())
    failure = engines["half"].graphs.failure
    rows.append({"method": m, "seconds_graphed": round(secs["half"], 3), "seconds_eager": round(secs["half_eager"], 3),
                 "finite": finite, "blank": blank, "mean_abs_px_vs_fp32": round(diff, 2),
                 "max_abs_px_graphed_vs_eager": graph_diff, "graphs_failure": failure})
    print(f"{m:12s} {os.environ['HALF']} graphed {secs['half']:6.2f} s  eager {secs['half_eager']:6.2f} s  finite {finite}  "
          f"blank {blank}  mean |px - fp32| {diff:6.2f} / 255  max |graphed - eager| {graph_diff:.1f}"
          + (f"  [{failure}]" if failure else ""))
    if not finite or blank or diff > 20 or graph_diff > 8: bad.append(m)
json.dump(rows, open(f"{out}/fp16_generate.json", "w"), indent=1)
assert not bad, f"half-precision images wrong for: {bad} (NaN, blank, or > 20/255 from float32)"
print("fp16 generate: all methods ok")
EOF

# 3. one gate-training step: the CLI (float32) and fp16 autocast through the engine
step cli_train_gates 120 $PY -m mole_core train-gates "${LORAS[@]}" --steps 1 --batch-size 2 --out "$OUT/mix.safetensors"
step fp16_train_step 120 $PY - <<'EOF'
import math, os, time, torch
from mole_core.attach import MoleConfig
from mole_core.image.engine import Engine
from mole_core.train import TrainConfig
dev = os.environ["DEVICE"]
mp = "fp16" if dev == "cuda" else "no"
eng = Engine(device=dev, dtype=torch.float32)
losses = []
t = time.perf_counter()
eng.train(["face", "ring"], MoleConfig(granularity="block"), TrainConfig(steps=1, batch_size=2, lr=1e-3, mixed_precision=mp),
          on_step=lambda s, parts, gates: losses.append(parts))
print(f"one gate-training step, mixed_precision={mp}: {time.perf_counter() - t:.2f} s, losses {losses[-1]}")
assert losses and all(math.isfinite(v) for v in losses[-1].values()), losses
EOF

# 4. inference overhead: SD 1.5 size (float16) with the training comparison, and FLUX-shaped (bfloat16)
step overhead_sd15 200 $PY bench/inference_overhead.py "${SMALL[@]}" --device "$DEVICE" --dtype "$HALF" --rounds "$ROUNDS" \
  --train-steps 3 --threads "$THREADS" --markdown "$OUT/overhead_sd15_$DEVICE.md"
step overhead_flux 200 $PY bench/inference_overhead.py --family flux "${FLUX[@]}" --device "$DEVICE" --dtype "$BF" \
  --rounds "$ROUNDS" --threads "$THREADS" --markdown "$OUT/overhead_flux_$DEVICE.md"

if [ "$MODE" = dry ]; then echo "[dry-run] done: nothing was run"; exit 0; fi
echo "DEVICE CHECK PASSED in $(( $(date +%s) - START )) s ($MODE); results in $OUT/"
