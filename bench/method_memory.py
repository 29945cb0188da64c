"""Peak memory of each composition method: one fresh process per method renders one image on the embedded
world and reports its peak resident set size (ru_maxrss), next to the same process rendering only the base
model, so the difference is what the method adds. CPU, one torch thread (set below and printed).

    python bench/method_memory.py [--loras face,checker] [--out bench/results/method_memory.md]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

METHODS = ["base", "linear", "svd", "ties", "dare", "switch", "composite", "mole:sample", "mole:token",
           "mole:routed", "mole:static"]
CHILD = """
import json, resource, sys, torch
torch.set_num_threads(1)
from mole_core.image.engine import Engine, GenerateRequest, Mix
keys, method = tuple(sys.argv[1].split(",")), sys.argv[2]
engine = Engine()
request = GenerateRequest("a zwx on the left and a vrk on the right", seed=1000)
engine.generate(Mix("base"), request)                     # the model loaded and run once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
name, _, gate = method.partition(":")
mix = Mix(name, () if name == "base" else keys, **({"gate": gate} if gate else {}))
result = engine.generate(mix, request)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"method": method, "label": result.label, "base_kib": before, "peak_kib": after,
                  "seconds": result.seconds}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", default="face,checker")
    parser.add_argument("--out", default=None, help="also write the table as Markdown")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    rows = []
    for method in METHODS:
        out = subprocess.run([sys.executable, "-c", CHILD, args.loras, method], cwd=root, capture_output=True,
                             text=True, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(root),
                                             "PATH": "/usr/bin:/bin"})
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['label']:<50} peak {r['peak_kib'] / 1024:7.1f} MiB  (+{(r['peak_kib'] - r['base_kib']) / 1024:5.1f} "
              f"over the loaded model)  {r['seconds']:.2f} s", flush=True)
    if args.out:
        lines = ["| method | peak RSS, MiB | over the loaded model, MiB | s / image |", "|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['peak_kib'] / 1024:.1f} | {(r['peak_kib'] - r['base_kib']) / 1024:.1f} | "
                  f"{r['seconds']:.2f} |" for r in rows]
        Path(args.out).write_text(f"`python bench/method_memory.py --loras {args.loras}` (1 torch thread, one "
                                  f"process per method, 32×32 world, 20 denoising steps)\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
