"""The text study: MoLE over the text world's task LoRAs, the paper's NLP tables (Tables 3 and 6) in miniature.

    python bench/text_study.py                       # Parts A, B and C (see mole_core/studies/text.py)
    python bench/text_study.py --parts A --items 20  # a quick look

Part A: the 5 main LoRAs, gates trained on their manifests' example pairs (16 per task), 50 held-out items
        per task; the oracle (each task's own LoRA), each LoRA alone, the merges, LoraHub, Arrow (PEFT), MoLE with
        the prompt gate (the text default) and the paper's gate at every granularity, per sample and per token.
Part B: each composed task of the world (tasks.COMPOSED_PAIRS, never trained) over the 5 main LoRAs; gates and
        LoraHub weights fitted on 5 examples of the composed task; 50 held-out items; MoLE block and matrix.
Part C: the 5 main tasks asked with pools of 8 and 16 LoRAs (--pools: the 5 main, then distractors in bank order),
        gates and LoraHub fitted on every pool LoRA's manifest examples; oracle, linear, PEMs, LoraHub, Arrow, MoLE
        prompt gate, MoLE matrix per sample and per token.
        --c-pairs P+Q,...: also the earlier Part C' (composed tasks with pools of 4 / 8 / 16 LoRAs).
Gate training: 300 steps, lr 5e-3, batch 8, α 0.5 (TextStudyConfig).
One torch thread (a shared 2-core machine: more threads thrash). Every number in the tables is measured by
this script; the JSON keeps every answer sample, interval and timing.

Writes bench/results/text/study.md and study.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mole_core.text.engine import DEFAULT_TEXT_BANK, DEFAULT_TEXT_MODEL, TextEngine  # noqa: E402
from mole_core.studies.text import (TextStudyConfig, config_dict, markdown, part_a, part_b, pool,  # noqa: E402
                                  save, with_train)
from mole_core.world.text.tasks import COMPOSED_PAIRS  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "text"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="A,B,C")
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--steps", type=int, default=TextStudyConfig().train.steps, help="gate-training steps")
    parser.add_argument("--granularities", default="block,layer,matrix,network",
                        help="Part A: the paper's gate at these granularities (per sample and per token)")
    parser.add_argument("--pools", default="8,16")
    parser.add_argument("--c-pairs", default="", help="Part C': composed pairs with pools of 4 / 8 / 16, e.g. "
                                                     "reverse+upper,double+upper")
    parser.add_argument("--pairs", default="", help="composed pairs, e.g. reverse+upper (default: the world's)")
    parser.add_argument("--model", default=DEFAULT_TEXT_MODEL)
    parser.add_argument("--bank", default=DEFAULT_TEXT_BANK)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    engine = TextEngine(args.model, args.bank)
    cfg = with_train(TextStudyConfig(items=args.items, granularities=tuple(args.granularities.split(","))),
                     steps=args.steps)
    entries = {e.key: e for e in engine.bank.entries if e.error is None}
    roles = {k: json.loads((Path(args.bank) / f"{k}.json").read_text()).get("role", "main") for k in entries}
    main_keys = [k for k in entries if roles[k] == "main"]
    order = main_keys + [k for k in entries if roles[k] != "main"]
    pairs = [tuple(p.split("+")) for p in args.pairs.split(",") if p] or list(COMPOSED_PAIRS)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "study.json"          # parts run separately land in one report
    report = json.loads(previous.read_text()) if previous.exists() else {}
    report.update({"config": config_dict(cfg), "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                                           "torch_threads": torch.get_num_threads()},
                   "model": engine.model_name, "main": main_keys, "order": order})
    start = time.perf_counter()
    parts = args.parts.split(",")

    def write():
        report.setdefault("part_seconds", {})[args.parts] = round(time.perf_counter() - start, 1)
        save(report, args.out / "study.json")
        (args.out / "study.md").write_text(markdown(report))

    if "A" in parts:
        report["A"] = part_a(engine, main_keys, cfg)
        write()
    if "B" in parts:
        report["B"] = {}
        composed_cfg = replace(cfg, granularities=("block", "matrix"))
        for pair in pairs:
            report["B"][" ".join(pair)] = part_b(engine, pair, main_keys, composed_cfg)
            write()
    if "C" in parts:
        report["C"] = {}
        light = replace(cfg, granularities=("matrix",), merges=("linear", "pems", "lorahub", "arrow"))
        for n in (int(x) for x in args.pools.split(",")):
            if n <= len(order):
                report["C"][f"{n} LoRAs"] = part_a(engine, order[:n], light, asked=main_keys)
                write()
        pairs_c = [tuple(p.split("+")) for p in args.c_pairs.split(",") if p]
        if pairs_c:
            report["C_composed"] = {}
        for pair in pairs_c:
            for n in (4, 8, 16):
                if n <= len(order):
                    report["C_composed"][f"{' '.join(pair)}, {n} LoRAs"] = part_b(engine, pair, pool(pair, order, n),
                                                                                  light)
                    write()
    write()
    print(f"wrote {args.out / 'study.md'} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
