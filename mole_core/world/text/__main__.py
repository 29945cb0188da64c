"""`python -m mole_core.world.text build [--out DIR] [--seed S] [--quick] [--stage base,loras,eval] [--force] [--lora KEYS]`
and `python -m mole_core.world.text composed [--pairs reverse+upper,...] [--items 50] [--out FILE]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from mole_core.world.text.build import STAGES, run_build
from mole_core.world.text.config import REPO_ROOT, TextBuildConfig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mole_core.world.text",
                                     description="Regenerate the text world (tiny encoder-decoder, tokenizer, text LoRA bank).")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train and evaluate everything with fixed seeds")
    build.add_argument("--out", type=Path, default=REPO_ROOT,
                       help="root receiving assets/text-world/ and text_bank/ (default: the repo)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quick", action="store_true", help="tiny models, few steps (well under a minute)")
    build.add_argument("--stage", default=",".join(STAGES),
                       help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    build.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    build.add_argument("--lora", default="", help="stage loras: only these LoRAs (comma-separated keys)")
    comp = sub.add_parser("composed", help="measure the held-out composed tasks with every method")
    comp.add_argument("--model", type=Path, default=REPO_ROOT / "assets" / "text-world")
    comp.add_argument("--bank", type=Path, default=REPO_ROOT / "text_bank")
    comp.add_argument("--pairs", default="", help="e.g. reverse+upper,double+upper (default: tasks.COMPOSED_PAIRS)")
    comp.add_argument("--items", type=int, default=50)
    comp.add_argument("--out", type=Path, default=REPO_ROOT / "assets" / "text-world" / "composed_report.json")
    args = parser.parse_args(argv)
    if args.command == "composed":
        import torch

        from mole_core.text.engine import TextEngine
        from mole_core.world.text.composed import measure
        from mole_core.world.text.tasks import COMPOSED_PAIRS
        torch.set_num_threads(1)
        pairs = [tuple(p.split("+")) for p in args.pairs.split(",") if p] or COMPOSED_PAIRS
        measure(TextEngine(args.model, args.bank), pairs, args.items, args.out)
        return
    cfg = (TextBuildConfig.quick_config(args.out, args.seed) if args.quick
           else TextBuildConfig(out=args.out, seed=args.seed))
    cfg.loras = tuple(k.strip() for k in args.lora.split(",") if k.strip())
    run_build(cfg, [s.strip() for s in args.stage.split(",") if s.strip()], force=args.force)


if __name__ == "__main__":
    main()
