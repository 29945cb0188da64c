"""Gate training under several processes (accelerate, gloo on the CPU) against one process.

    python -m pytest -q -m slow tests/test_multiprocess.py          # ~1-3 min on 2 shared cores

Each test launches the worker at the bottom of this file, once with plain `python` (one process) and once with
`accelerate launch --multi_gpu --num_processes 2` (two processes; on a machine without GPUs accelerate starts
them with torchrun and `Accelerator(cpu=True)` makes them MULTI_CPU with the gloo backend). NB: the obvious
`accelerate launch --num_processes 2 --cpu` starts ONE process (accelerate 1.15 sends --cpu to its simple
launcher), so it proves nothing.

What train_gates (mole_core/train.py) does with N processes: each process draws its own batches from a
generator seeded with seed + rank, computes L = L_task (its own batch) + α·L_balance (every process's gates), and the gate gradients
are averaged (accelerator.reduce, mean) before one AdamW step that every process takes alike. So:
  * "same global batch" cannot come from the task as train_gates calls it (the generator differs per rank),
    so the check uses a task that ignores the generator and takes a fixed global batch per step (indices,
    noise and timesteps drawn from seed + step), process r taking its slice r·b .. (r+1)·b. With equal
    slices, mean over ranks of the slice MSEs = the MSE of the whole batch, and the averaged gradient is the
    one-process gradient of batch N·b: the gates must agree (up to float summation order).
  * the balance loss is not linear in the samples (q_i, the mean gate of expert i, sits inside −Σ log q_i), so
    averaging per-process balance losses would not be the global one; train_gates all-reduces the gate sums
    and counts so q is the global batch's mean (autograd through the local part; mole_core.train._balance_loss),
    and α > 0 gives one process's gates too (test_two_processes_equal_one_with_the_balance_loss).
  * measured here (3 steps, lr 1e-2, block gates, tiny SD pipeline, 2 × 2 vs 1 × 4): α = 0: the mean of the
    ranks' task losses equals the one-process loss to 1e-7 at every step and the gates agree to 6.3e-6
    (relative); α = 0.5: before the all-reduce the gates differed by 5.1e-2, with it by 4.9e-6 (the summation order).
  * whatever the task, every process ends with the same gates (they start equal, get the same averaged
    gradient), and with the stock DiffusionTask each rank sees other batches.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PER_PROCESS, PROCESSES, STEPS = 2, 2, 3


# ---- the worker (runs in the launched processes) -------------------------------------------------

def worker(mode: str, batch_size: int, alpha: float, out: Path) -> None:
    import tempfile

    import PIL.Image
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from accelerate import PartialState

    from mole_core.attach import MoleConfig, attach
    from mole_core.train import TrainConfig, train_gates
    from mole_core.image.task import DiffusionTask
    from tests.helpers import components_of, pipeline_loras
    from tests.tiny import build_pipeline

    class GlobalBatchTask(DiffusionTask):
        """The global batch of step s (indices, noise, timesteps) is drawn from seed 1000 + s whatever the
        process; each process takes its slice. The generator train_gates passes is ignored."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.step = 0

        def loss(self, generator, batch_size):
            if self.latents is None:
                self.prepare(self.pipe.unet.device)
            state = PartialState()
            rank, world = state.process_index, state.num_processes
            if torch.is_grad_enabled():            # train_gates' first call (no grad) only materialises gates
                self.step += 1
            g = torch.Generator().manual_seed(1000 + self.step)
            n = batch_size * world                 # the global batch
            idx = torch.randint(len(self.examples), (n,), generator=g)
            noise = torch.randn((n, *self.latents.shape[1:]), generator=g)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=g)
            part = slice(rank * batch_size, (rank + 1) * batch_size)
            idx, noise, t = idx[part], noise[part], t[part]
            latents = self.latents[idx].float()
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            ehs = self.pipe.text_encoder(self.input_ids[idx])[0]
            pred = self.pipe.unet(noisy, t, ehs).sample
            return F.mse_loss(pred.float(), noise.float())

    state = PartialState(cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(tmp, seed=0)                 # the same weights in every process
    comps = components_of(pipe)
    handle = attach(comps, pipeline_loras(comps), MoleConfig(granularity="block"))
    colours = {"alpha": [(255, 0, 0), (200, 40, 40)], "beta": [(0, 0, 255), (40, 40, 200)],
               "gamma": [(0, 255, 0), (40, 200, 40)]}
    examples = [(PIL.Image.new("RGB", (16, 16), c), f"a photo of sks {name}", name)
                for name, cs in colours.items() for c in cs]
    task = (GlobalBatchTask if mode == "global" else DiffusionTask)(pipe, examples, resolution=16)
    result = train_gates(handle, task, TrainConfig(steps=STEPS, lr=1e-2, batch_size=batch_size, seed=0,
                                                   balance_alpha=alpha, cpu=True))
    gates = {k: v.tolist() for k, v in handle.gate_state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(
        {"rank": state.process_index, "world": state.num_processes, "distributed": str(state.distributed_type),
         "history": result.history, "gates": gates}))
    state.wait_for_everyone()
    state.destroy_process_group()          # a rank leaving with gloo threads alive can abort at exit


# ---- the tests -----------------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(mode: str, processes: int, alpha: float, out: Path, port: int) -> list[dict]:
    args = [str(Path(__file__).resolve()), "--worker", mode, "--alpha", str(alpha), "--out", str(out)]
    if processes == 1:
        cmd = [sys.executable, *args, "--batch-size", str(PER_PROCESS * PROCESSES)]
    else:
        launcher = shutil.which("accelerate")
        assert launcher, "accelerate's launcher is not on PATH"
        cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               *args, "--batch-size", str(PER_PROCESS)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    runs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert all(r["world"] == processes for r in runs), [r["world"] for r in runs]
    return runs


def _gate_gap(a: dict, b: dict) -> float:
    """max |a - b| over every gate tensor, relative to the largest |a|."""
    import torch
    assert a.keys() == b.keys()
    diff = max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)
    size = max(float(torch.tensor(a[k]).abs().max()) for k in a)
    return diff / size


def _port() -> int:
    from tests.helpers import free_port
    return free_port()


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    """α = 0 (task loss only): 2 processes × batch 2 give the gates of 1 process × batch 4."""
    one = _run("global", 1, 0.0, tmp_path / "one", 0)[0]
    two = _run("global", PROCESSES, 0.0, tmp_path / "two", _port())
    assert two[0]["distributed"].endswith("MULTI_CPU")
    assert two[0]["gates"] == two[1]["gates"]                       # the ranks stay in step, bit for bit
    for step in range(STEPS):                                       # mean of the slices' losses = global loss
        mean = sum(r["history"][step]["task"] for r in two) / PROCESSES
        assert abs(mean - one["history"][step]["task"]) <= 1e-5 * abs(one["history"][step]["task"]), step
    gap = _gate_gap(one["gates"], two[0]["gates"])
    assert max(abs(x) for k, v in one["gates"].items() if k.endswith("proj.weight") for row in v for x in row) > 0
    assert gap < 1e-4, f"2-process gates differ from 1-process gates by {gap:.2e} (relative)"


@pytest.mark.slow
def test_two_processes_equal_one_with_the_balance_loss(tmp_path):
    """α = 0.5: the same global batch; train_gates all-reduces the gate sums and counts, so q (and L_balance)
    is taken over the global batch, and the gates are one process's."""
    one = _run("global", 1, 0.5, tmp_path / "one", 0)[0]
    two = _run("global", PROCESSES, 0.5, tmp_path / "two", _port())
    assert two[0]["gates"] == two[1]["gates"]
    for step in range(STEPS):                                       # every rank holds the global L_balance
        for r in two:
            assert abs(r["history"][step]["balance"] - one["history"][step]["balance"]) <= \
                1e-5 * abs(one["history"][step]["balance"]), (step, r["rank"])
    gap = _gate_gap(one["gates"], two[0]["gates"])
    print(f"alpha = 0.5: 2-process gates vs 1-process gates, relative gap {gap:.2e}")
    assert gap < 1e-4, f"α = 0.5: 2-process gates differ from 1-process gates by {gap:.2e} (relative)"


@pytest.mark.slow
def test_stock_diffusion_task_keeps_ranks_in_step(tmp_path):
    """The stock DiffusionTask: each rank trains on its own batches (seed + rank), the gates stay identical."""
    two = _run("stock", PROCESSES, 0.5, tmp_path / "two", _port())
    assert two[0]["gates"] == two[1]["gates"]
    assert [h["task"] for h in two[0]["history"]] != [h["task"] for h in two[1]["history"]]


if __name__ == "__main__":
    import argparse
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["global", "stock"], required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    worker(a.worker, a.batch_size, a.alpha, a.out)
