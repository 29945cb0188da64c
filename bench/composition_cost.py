"""Seconds per image of the composition methods on the embedded pixel world (issue 23): linear merge, TIES,
FreeFuse, MoLE with the default gate (routed, untrained: the gates' values do not change the cost), MoLE + regions.

Each round renders one image per method (same caption and seed, the order rotated every round, so a load change
hits every method alike), after one untimed warm-up round. Reported per method: the median CPU time per image
(time.process_time: with one torch thread other jobs on a shared machine disturb it far less than wall time) and
the median of the per-round ratios to the linear merge. Nothing is asserted.

    OMP_NUM_THREADS=1 python bench/composition_cost.py --rounds 8 --lora face --lora checker
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # run as a script from anywhere
from mole_core.image.engine import Engine, GenerateRequest, Mix  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", action="append", default=[])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt", default=None, help="default: the LoRAs' triggers on the left / right / center")
    args = p.parse_args()
    torch.set_num_threads(1)
    engine = Engine()
    keys = tuple(args.lora or ("face", "checker"))
    places = ["on the left", "on the right", "in the center"]
    prompt = args.prompt or " and ".join(f"a {engine.bank.get(k).trigger[0]} {places[i % 3]}"
                                         for i, k in enumerate(keys))
    regions = {k: ["left", "right", "centre"][i % 3] for i, k in enumerate(keys)}
    mixes = {"linear": Mix("linear", keys), "ties": Mix("ties", keys), "freefuse": Mix("freefuse", keys),
             "mole (default gate)": Mix("mole", keys, gate="routed"),
             "mole + regions": Mix("mole", keys, gate="routed", regions=regions)}
    request = GenerateRequest(prompt, seed=9000, steps=args.steps)
    times = {name: [] for name in mixes}
    names = list(mixes)
    for r in range(args.rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.process_time()
            engine.generate(mixes[name], request)
            if r:                                                   # round 0 warms up
                times[name].append(time.process_time() - start)
    print(f"{len(keys)} LoRAs ({', '.join(keys)}), “{prompt}”, {args.steps} steps, {args.rounds} rounds")
    print("| method | CPU s / image (median) | × linear (median of per-round ratios) |")
    print("|---|---|---|")
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times["linear"])]
        print(f"| {name} | {statistics.median(times[name]):.3f} | {statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
