"""The same 4-job sweep through Hydra's basic, joblib and submitit_slurm launchers: wall times.

    bash scripts/slurm_local.sh start     # for the submitit_slurm row (root); without it that row is skipped
    PTUNE_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 python scripts/bench_launchers.py [--quick] [--out DIR]

The sweep (docs/sweeps.md): prompt tuning of MiniLM on SST-2, num_virtual_tokens=1,5,10,20, 150
steps of batch 16, lr 1e-2, 400 dev sentences. joblib runs 2 jobs at once (1 torch thread each);
submitit_slurm asks 1 CPU per job (hydra.launcher.cpus_per_task=1), so SLURM runs 2 at once on
the 2-core node and ptune gives each job SLURM_CPUS_PER_TASK torch threads. `--quick`: tiny-llama,
4 steps (what tests/test_bench.py could run). Prints a markdown table: launcher, wall seconds,
jobs ok, best job and its accuracy, each job's accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = ["task=sst2", "model=minilm", "method=prompt", "method.num_virtual_tokens=1,5,10,20", "trainer.lr=1e-2",
        "trainer.batch_size=16", "trainer.max_steps=150", "trainer.eval_every=150", "trainer.save_every=150",
        "task.max_eval_samples=400"]
QUICK = ["task=sst2", "model=tiny-llama", "method=prompt", "method.num_virtual_tokens=1,2,3,4",
         "task.max_train_samples=16", "task.max_eval_samples=4", "trainer.batch_size=4", "trainer.max_steps=4",
         "trainer.eval_every=4", "trainer.save_every=4"]
LAUNCHERS = {
    "basic": [],
    "joblib (n_jobs=2)": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_slurm (cpus_per_task=1)": ["hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1"],
}


def slurm_answers() -> bool:
    if shutil.which("srun") is None:
        return False
    try:
        return subprocess.run(["srun", "-N1", "-t", "1", "hostname"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="where the sweeps go (default: a temporary folder)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ptune-launchers-"))
    job = QUICK if args.quick else FULL
    results = []
    for name, extra in LAUNCHERS.items():
        if "slurm" in name and not slurm_answers():
            print(f"{name}: skipped (no SLURM cluster answers srun; bash scripts/slurm_local.sh start)", file=sys.stderr)
            continue
        where = out / re.sub(r"\W+", "_", name.split()[0])
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ptune", "train", "-m", *extra, *job, f"output_dir={where}"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        [sweep] = [p.parent for p in where.glob("*/*/summary.csv")]
        rows = list(csv.DictReader(open(sweep / "summary.csv")))
        best = json.loads((sweep / "best.json").read_text()) if (sweep / "best.json").exists() else {}
        results.append({"launcher": name, "wall_s": round(wall, 1), "exit": done.returncode,
                        "ok": sum(r["status"] == "ok" for r in rows), "jobs": len(rows),
                        "best": best.get("job"), "best_value": best.get("value"),
                        "accuracy": [r.get("eval.accuracy") for r in rows], "sweep": str(sweep)})
        print(f"{name}: {wall:.1f} s, exit {done.returncode}", file=sys.stderr, flush=True)
    print("| launcher | wall (s) | jobs ok | best job (accuracy) | accuracy of jobs 0-3 |\n|---|---:|---|---|---|")
    for r in results:
        acc = ", ".join(f"{float(a):.4f}" if a else "-" for a in r["accuracy"])
        best = f"{r['best']} ({r['best_value']:.4f})" if r["best"] is not None else "-"
        print(f"| {r['launcher']} | {r['wall_s']} | {r['ok']}/{r['jobs']} | {best} | {acc} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if results and all(r["exit"] == 0 and r["ok"] == r["jobs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
