"""Kill a training run with SIGKILL at random moments, resume it, repeat; compare with an unbroken run.

    python scripts/fault_inject.py [--kills 20] [--seed 0] [--workdir DIR] [-- extra overrides]

1. Runs the job once without interruption (the reference) and times it.
2. Starts the same job, and `--kills` times: waits a random moment within the reference's wall
   time, sends SIGKILL (during a step, an evaluation, a checkpoint write or start-up, wherever it
   lands), then continues with `ptune train resume=<run dir>` (or a fresh start if the kill came
   before the run directory had its config).
3. Lets the last resume finish and compares with the reference: adapter and best adapter tensors
   bit for bit, metrics.jsonl without its timing fields, and summary.json's steps, losses, evals.

Prints one line per kill (when, at which step, whether a checkpoint write was cut) and a verdict;
exits 0 only if every comparison is identical. Needs PTUNE_DATA_DIR (the E2E data).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

JOB = ["model=tiny-llama", "task.max_train_samples=256", "task.max_eval_samples=8", "task.max_new_tokens=8",
       "trainer.batch_size=8", "trainer.max_steps=60", "trainer.eval_every=10", "trainer.save_every=4",
       "trainer.log_every=1", "trainer.keep_last=2", "task.metrics=[bleu,nist,rouge_l,cider]"]
TIMING = {"tokens_per_s", "eval_time_s"}


def ptune(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptune", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs").glob("*/*") if (p / "config.yaml").is_file())


def last_step(run: Path) -> int:
    steps = [json.loads(line).get("step", 0) for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip().endswith("}")] if (run / "metrics.jsonl").exists() else []
    return max(steps, default=0)


def compare(ref: Path, run: Path) -> list[str]:
    problems = []
    for name in ("adapter/adapter_model.safetensors", "adapter_best/adapter_model.safetensors"):
        a, b = load_file(ref / name), load_file(run / name)
        if a.keys() != b.keys() or any(not (a[k] == b[k]).all() for k in a):
            problems.append(f"{name} differs")

    def metrics(path):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    if metrics(ref) != metrics(run):
        problems.append("metrics.jsonl differs")
    s_ref, s_run = (json.loads((p / "summary.json").read_text()) for p in (ref, run))
    for key in ("steps", "final_train_loss", "train_tokens", "eval", "best"):
        if s_ref[key] != s_run[key]:
            problems.append(f"summary.{key} differs: {s_ref[key]} vs {s_run[key]}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="extra ptune overrides after --")
    args = ap.parse_args()
    job = JOB + args.overrides
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ptune-fault-"))
    (work / "ref").mkdir(parents=True, exist_ok=True)
    (work / "faulty").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    t0 = time.time()
    ref = ptune(["train", *job], work / "ref")
    t_first = None
    while ref.poll() is None:  # time to the first logged step = start-up cost
        if t_first is None and list((work / "ref").glob("outputs/*/*/metrics.jsonl")):
            t_first = time.time() - t0
        time.sleep(0.05)
    if ref.returncode != 0:
        print(f"reference run failed: {ref.stderr.read()[-2000:]}")
        return 2
    t_ref = time.time() - t0
    t_first = t_first or t_ref / 4
    [ref_dir] = run_dirs(work / "ref")
    print(f"reference: {ref_dir} in {t_ref:.1f} s (first step after {t_first:.1f} s)")

    # Kill moments: mostly inside training (steps, evals, checkpoint writes), some in start-up.
    low, high = 0.7 * t_first, t_first + (t_ref - t_first) / 3
    kills, rounds, failures = 0, 0, []
    while kills < args.kills:
        rounds += 1
        cwd = work / f"faulty-{rounds}"
        cwd.mkdir()
        proc = ptune(["train", *job], cwd)
        while True:
            time.sleep(rng.uniform(low, high))
            if proc.poll() is not None:
                if proc.returncode != 0:
                    print(f"round {rounds}: a run failed on its own: {proc.stderr.read()[-2000:]}")
                    return 2
                break  # this round's run finished
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            dirs = run_dirs(cwd)
            run = dirs[-1] if dirs else None
            cut = bool(run and list((run / "checkpoints").glob(".step-*")))
            where = f"step {last_step(run):3d}" if run else "start-up, before the run had a config"
            print(f"kill {kills:2d} (round {rounds}): {where}{', during a checkpoint write' if cut else ''}")
            if run:
                proc = ptune(["train", f"resume={run}"], cwd)
            else:
                for empty in (cwd / "outputs").glob("*/*"):
                    shutil.rmtree(empty)  # claimed but never configured: nothing to resume
                proc = ptune(["train", *job], cwd)
        [final] = run_dirs(cwd)
        problems = compare(ref_dir, final)
        print(f"round {rounds}: {'identical' if not problems else 'DIFFERENT: ' + '; '.join(problems)}")
        failures += problems
    print(f"{kills} kills in {rounds} rounds: "
          + ("every resumed run identical to the uninterrupted one (adapters, best adapter, metrics.jsonl, summary)"
             if not failures else f"{len(failures)} differences"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
