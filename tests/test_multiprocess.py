"""`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (two processes, gloo) trains,
writes one run directory, and matches one process at the same global batch.

Why not `--cpu`: in accelerate 1.x, `accelerate launch --cpu --num_processes 2` starts ONE process
unless an MPI hostfile is configured (its simple launcher); `--multi_gpu` goes through torchrun, and
ptune's Accelerator(cpu=True) then joins a gloo process group. `torchrun --nproc_per_node 2 -m ptune`
works the same way.

Tolerance: the two runs differ only in float summation order (each process sums its half of the
step's token losses, then gradients are all-reduced), so the final adapters agree to 1e-5 absolute
and the logged losses to 1e-6 relative. tiny-llama has no dropout, so no RNG stream differs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY

ARGS = ["model=tiny-llama", *TINY, "trainer.max_steps=4", "trainer.eval_every=4", "trainer.save_every=4"]


def run(cwd: Path, launcher: list[str], batch: int) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*launcher, "-m", "ptune", "train", *ARGS, f"trainer.batch_size={batch}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs  # exactly one run directory, whatever the number of processes
    return dirs[0]


@pytest.mark.slow  # two gloo processes under accelerate launch
def test_two_processes_match_one(tmp_path, data_dir):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.fail("accelerate's launcher is not installed next to this Python")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run(tmp_path / "one", [sys.executable], batch=4)
    two = run(tmp_path / "two", [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                 "--mixed_precision", "no", "--dynamo_backend", "no"], batch=2)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["processes"] == 2 and s1["processes"] == 1
    assert s1["train_tokens"] == s2["train_tokens"]
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors")["prefix"] for d in (one, two))
    assert (a - b).abs().max().item() <= 1e-5
    l1, l2 = ([r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (one, two))
    assert len(l1) == len(l2) == 4
    assert all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(l1, l2))
