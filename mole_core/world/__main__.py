"""`python -m mole_core.world build [--out DIR] [--seed S] [--quick] [--stage vae,base,...] [--force] [--lora KEYS]`;
with `--text`, the text world instead (`python -m mole_core.world.text build` with the same options)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mole_core.world.pixel.build import STAGES, run_build
from mole_core.world.pixel.config import REPO_ROOT, BuildConfig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mole_core.world",
                                     description="Regenerate the pixel world (base model, LoRA bank, oracle).")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train and evaluate everything with fixed seeds")
    build.add_argument("--out", type=Path, default=REPO_ROOT,
                       help="root receiving assets/pixel-world/ and lora_bank/ (default: the repo)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quick", action="store_true", help="tiny models, few steps (minutes)")
    build.add_argument("--stage", default=",".join(STAGES),
                       help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    build.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    build.add_argument("--lora", default="", help="stage loras: only these LoRAs (comma-separated keys)")
    build.add_argument("--text", action="store_true",
                       help="build the text world (assets/text-world/, text_bank/) instead: mole_core.world.text")
    args = parser.parse_args(argv)
    if args.text:
        from mole_core.world.text.__main__ import main as text_main
        from mole_core.world.text.build import STAGES as TEXT_STAGES
        stage = args.stage if args.stage != ",".join(STAGES) else ",".join(TEXT_STAGES)
        text_main(["build", "--out", str(args.out), "--seed", str(args.seed), "--stage", stage, "--lora", args.lora,
                   *(["--quick"] if args.quick else []), *(["--force"] if args.force else [])])
        return
    cfg = (BuildConfig.quick_config(args.out, args.seed) if args.quick
           else BuildConfig(out=args.out, seed=args.seed))
    cfg.loras = tuple(k.strip() for k in args.lora.split(",") if k.strip())
    run_build(cfg, [s.strip() for s in args.stage.split(",") if s.strip()], force=args.force)


if __name__ == "__main__":
    main()
