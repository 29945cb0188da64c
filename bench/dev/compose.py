"""Dev-seed composition measurements for MoLE variants (NOT the study: other seeds, other caption draw).

    OMP_NUM_THREADS=1 python bench/dev/compose.py --keys face,checker --variants linear,token,trig

Gates learn only from the bank's one-subject example images (Engine.train). Images: --captions world
captions drawn with --caption-seed (the study draws with seed 0) × --seeds seeds from --seed-start
(the study uses 1000 up; we use 5000 up). Scores: the world's oracle (caption fidelity per image).
One JSON line per variant goes to --out (default bench/dev/results.jsonl).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mole_core.attach import MoleConfig                              # noqa: E402
from mole_core.image.engine import Engine, GenerateRequest    # noqa: E402
from mole_core.mix import Mix                                        # noqa: E402
from mole_core.studies.image import targets_from_bank                         # noqa: E402
from mole_core.train import TrainConfig  # noqa: E402
from mole_core.world.pixel.scoring import WorldScorer, shipped_oracle, world_plain_prompts, world_prompts  # noqa: E402


# name -> (MoleConfig kwargs, TrainConfig kwargs) ; None = a merge / peer method
VARIANTS = {
    "linear": None, "svd": None, "ties": None, "switch": None, "composite": None,
    "sample": (dict(gate="sample"), {}),
    "token": (dict(gate="token"), {}),
    "static": (dict(gate="static"), {}),
    "untrained_token": (dict(gate="token"), "untrained"),
}


@dataclasses.dataclass
class ConfigMix(Mix):
    """An untrained MoLE with a whole MoleConfig (Mix itself only carries granularity and gate)."""
    config: MoleConfig | None = None

    @property
    def mole_config(self) -> MoleConfig:
        return self.config if self.mixture is None and self.config is not None else Mix.mole_config.fget(self)


def variant(name: str):
    if name in VARIANTS:
        return VARIANTS[name]
    # generic: "token+route=trigger+route_beta=1+lr=3e-3+steps=300+alpha=0"; "untrained+..." = no training
    parts = name.split("+")
    mole, train = {}, {}
    for p in parts:
        if p == "untrained":
            train = "untrained"
            continue
        if "=" not in p:
            mole["gate"] = p
            continue
        k, v = p.split("=", 1)
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
        if train != "untrained" and k in {f.name for f in dataclasses.fields(TrainConfig)}:
            train[k] = v
        else:
            mole[k] = v
    return mole, train


def read_confusion(scorer, images, captions) -> dict:
    """{"<trigger>@<position>": {what the oracle read there: count}} over the images (where each subject went)."""
    from mole_core.world.pixel import render as world
    out = {}
    for reading, caption in zip(scorer.oracle.read(list(images)), captions):
        for item in caption.split(" and "):
            words = item.split()
            position = next(p for p, phrase in world.POSITION_PHRASE.items() if item.endswith(phrase))
            cell = out.setdefault(f"{words[1]}@{position}", {})
            seen = reading.identity_at(position)
            cell[seen] = cell.get(seen, 0) + 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", default="face,checker")
    ap.add_argument("--variants", default="linear,token")
    ap.add_argument("--captions", type=int, default=6)
    ap.add_argument("--caption-seed", type=int, default=77)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--seed-start", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--plain", type=int, default=0, help="trigger-free captions for base preservation")
    ap.add_argument("--out", default=str(ROOT / "bench/dev/results.jsonl"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    keys = args.keys.split(",")
    engine = Engine()
    scorer = WorldScorer.load(shipped_oracle(engine.model_id))
    targets = targets_from_bank(engine.bank, keys)
    captions = world_prompts(targets, args.captions, seed=args.caption_seed)
    plain = world_plain_prompts(args.plain, seed=args.caption_seed) if args.plain else []
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    print("captions:", captions, flush=True)
    for name in args.variants.split(","):
        spec = variant(name)
        t0, train_s, mean_gates, betas, held_out = time.perf_counter(), 0.0, None, [], None
        if spec is None:
            mix = Mix(name, tuple(keys))
        else:
            mole_kw, train_kw = spec
            mole = MoleConfig(**mole_kw)
            if train_kw == "untrained":
                mix = ConfigMix("mole", tuple(keys), gate=mole.gate, granularity=mole.granularity, config=mole)
            else:
                tc = TrainConfig(**{"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, **train_kw})
                mixture = engine.train(keys, mole, tc)
                train_s = float(mixture.meta.get("seconds", 0.0))
                mean_gates = mixture.meta.get("mean_gates")
                held_out = mixture.meta.get("held_out")
                betas = [float(v) for k, v in mixture.gate_state.items() if k.endswith("route_beta")]
                mix = Mix("mole", tuple(keys), mixture=mixture)
        engine._kept.detach()
        t1 = time.perf_counter()
        images, caps = [], []
        for c in captions:
            for s in seeds:
                images.append(engine.generate(mix, GenerateRequest(c, seed=s)).image)
                caps.append(c)
        render_s = time.perf_counter() - t1
        sc = scorer.score(images, caps, targets)
        confusion = read_confusion(scorer, images, caps)
        cf = sc["caption_fidelity"]
        row = {"variant": name, "keys": keys, "tag": args.tag, "n": len(cf), "caption_fidelity": float(cf.mean()),
               "ci95": float(1.96 * cf.std(ddof=1) / np.sqrt(len(cf))),
               "subjects": {t.key: float(np.nanmean(sc[f"subject:{t.key}"])) for t in targets},
               "train_s": train_s, "render_s_per_image": render_s / len(images), "mean_gates": mean_gates, "held_out": held_out,
               "route_beta": [min(betas), sum(betas) / len(betas), max(betas)] if betas else None,
               "confusion": confusion, "captions": captions, "seeds": seeds, "steps": args.steps, "lr": args.lr, "batch": args.batch_size}
        if plain:
            pimgs, pcaps = [], []
            for c in plain:
                for s in seeds[:4]:
                    pimgs.append(engine.generate(mix, GenerateRequest(c, seed=s)).image)
                    pcaps.append(c)
            pf = scorer.score(pimgs, pcaps, [])["caption_fidelity"]
            row["plain_fidelity"] = float(pf.mean())
            row["plain_ci95"] = float(1.96 * pf.std(ddof=1) / np.sqrt(len(pf)))
        engine._kept.detach()
        print(json.dumps({k: v for k, v in row.items() if k not in ("captions", "seeds")}), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
