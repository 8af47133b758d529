"""Kill a training run with SIGKILL in each phase of its life, resume it, repeat; compare with an unbroken run.

    python scripts/fault_inject.py [--kills 20] [--seed 0] [--workdir DIR] [-- extra overrides]

1. Runs the job once without interruption (the reference) and times it.
2. Starts the same job and, `--kills` times, kills it with SIGKILL and continues with
   `ptune train resume=<run dir>` (or a fresh start if the kill came before the run directory had
   its config). The kills cycle through four phases:
     step        inside an optimizer step (after a micro-batch's forward, before backward/update)
     eval        inside an evaluation (generation and scores done, nothing recorded yet)
     checkpoint  inside a checkpoint write (after the k-th of its file writes, before the rename)
     anywhere    a random moment (start-up, logging, adapter writes, ...)
   For the first three the child process (this script with --child) wraps ptune's own function
   for that phase, and at the chosen occurrence writes a marker file and waits; the parent kills
   it as soon as the marker appears, so the kill is known to land inside that phase. ptune itself
   carries no fault hooks.
3. Lets the last resume finish and compares with the reference: adapter and best adapter tensors
   bit for bit, metrics.jsonl without its timing fields, and summary.json's steps, losses, evals.

Prints one line per kill (phase, step, what was cut), kills per phase, wall time and a verdict;
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


PHASES = ("step", "eval", "checkpoint", "anywhere")


def ptune(args: list[str], cwd: Path, phase: str | None = None, at: int = 0, marker: Path | None = None) -> subprocess.Popen:
    """`ptune <args>`; with a phase, as a child that pauses at that phase's `at`-th occurrence."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ptune", *args]
    if phase in ("step", "eval", "checkpoint"):
        env.update(FAULT_PHASE=phase, FAULT_AT=str(at), FAULT_MARKER=str(marker))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def child(argv: list[str]) -> int:
    """Run `ptune <argv>` with a pause at the FAULT_AT-th occurrence of FAULT_PHASE."""
    from ptune import heads, tasks
    from ptune.train import checkpoint
    from ptune.cli import main as ptune_main

    phase, at, marker = os.environ["FAULT_PHASE"], int(os.environ["FAULT_AT"]), Path(os.environ["FAULT_MARKER"])
    seen = {"n": 0, "in_checkpoint": False}

    def pause_if_due(detail: str) -> None:
        seen["n"] += 1
        if seen["n"] == at:
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"phase": phase, "detail": detail}))
            os.replace(tmp, marker)
            time.sleep(3600)  # the parent kills us here

    def wrap(fn, when):
        def wrapper(*a, **kw):
            out = fn(*a, **kw)
            when(a, kw)
            return out
        return wrapper

    if phase == "step":  # after a micro-batch's forward: the step's backward and update not done yet
        heads.loss = wrap(heads.loss, lambda a, kw: pause_if_due("after a forward, before backward and update"))
    elif phase == "eval":  # generation and scoring done; metrics, predictions, best adapter not yet written
        real_build = tasks.build

        def build(*a, **kw):  # the task train() builds, with its evaluate(method, split, batch_size) wrapped
            task = real_build(*a, **kw)
            task.evaluate = wrap(task.evaluate, lambda a, kw: pause_if_due(f"evaluation on {a[1]}"))
            return task

        tasks.build = build
    elif phase == "checkpoint":  # after one of save_checkpoint's 5 file writes (3 safetensors, state, manifest)
        real_save = checkpoint.save_checkpoint

        def save_checkpoint(root, step, *a, **kw):
            seen["in_checkpoint"] = step
            try:
                return real_save(root, step, *a, **kw)
            finally:
                seen["in_checkpoint"] = False

        def during(a, kw):  # save_file(tensors, path) / write_json(obj, path); adapter writes do not count
            if seen["in_checkpoint"]:
                pause_if_due(f"checkpoint step-{seen['in_checkpoint']}, after writing {Path(a[1]).name}")

        checkpoint.save_checkpoint = save_checkpoint
        checkpoint.save_file = wrap(checkpoint.save_file, during)
        checkpoint.write_json = wrap(checkpoint.write_json, during)
    return ptune_main(argv)


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
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    if metrics(ref) != metrics(run):
        problems.append("metrics.jsonl differs")
    s_ref, s_run = (json.loads((p / "summary.json").read_text()) for p in (ref, run))
    for key in ("steps", "final_train_loss", "train_tokens", "eval", "best"):
        if s_ref[key] != s_run[key]:
            problems.append(f"summary.{key} differs: {s_ref[key]} vs {s_run[key]}")
    return problems


def kill_at_phase(proc: subprocess.Popen, phase: str, marker: Path, rng: random.Random, low: float, high: float) -> str | None:
    """SIGKILL `proc` inside `phase` (as soon as its marker appears; "anywhere": after a random
    wait). Returns what it was doing, or None if it finished first."""
    if phase == "anywhere":
        time.sleep(rng.uniform(low, high))
        if proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "a random moment"
    while not marker.exists():
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(marker.read_text())["detail"]


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="extra ptune overrides after --")
    args = ap.parse_args()
    job = JOB + args.overrides
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ptune-fault-"))
    (work / "ref").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\njob: ptune train {' '.join(job)}")

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

    # "anywhere" kills land mostly inside training, some in start-up.
    low, high = 0.7 * t_first, t_first + (t_ref - t_first) / 3
    # Occurrence ranges: the job saves every 4 steps (5 file writes each) and evaluates every 10.
    occurrence = {"step": (1, 8), "eval": (1, 1), "checkpoint": (1, 10), "anywhere": (0, 0)}
    kills, rounds, failures = 0, 0, []
    per_phase = dict.fromkeys(PHASES, 0)
    while kills < args.kills:
        rounds += 1
        cwd = work / f"faulty-{rounds}"
        cwd.mkdir()
        args_next = ["train", *job]
        while True:
            if kills >= args.kills:  # no more kills: let the run finish
                proc = ptune(args_next, cwd)
                proc.wait()
                if proc.returncode != 0:
                    print(f"round {rounds}: the final resume failed: {proc.stderr.read()[-2000:]}")
                    return 2
                break
            phase = PHASES[kills % len(PHASES)]
            marker = work / f"marker-{rounds}-{kills}.json"
            stale = set((cwd / "outputs").glob("*/*/checkpoints/.step-*"))  # left by earlier kills
            proc = ptune(args_next, cwd, phase, rng.randint(*occurrence[phase]), marker)
            what = kill_at_phase(proc, phase, marker, rng, low, high)
            if what is None:  # the run ended before the chosen moment
                if proc.returncode != 0:
                    print(f"round {rounds}: a run failed on its own: {proc.stderr.read()[-2000:]}")
                    return 2
                break
            kills += 1
            per_phase[phase] += 1
            dirs = run_dirs(cwd)
            run = dirs[-1] if dirs else None
            cut = bool(run and set((run / "checkpoints").glob(".step-*")) - stale)  # by this kill
            where = f"step {last_step(run):3d}" if run else "start-up, before the run had a config"
            print(f"kill {kills:2d} (round {rounds}, {phase}): {where}, {what}"
                  f"{'; a checkpoint write was cut' if cut else ''}", flush=True)
            if run:
                args_next = ["train", f"resume={run}"]
            else:
                for empty in (cwd / "outputs").glob("*/*"):
                    shutil.rmtree(empty)  # claimed but never configured: nothing to resume
                args_next = ["train", *job]
        [final] = run_dirs(cwd)
        problems = compare(ref_dir, final)
        print(f"round {rounds}: {'identical' if not problems else 'DIFFERENT: ' + '; '.join(problems)}", flush=True)
        failures += problems
    print(f"{kills} kills in {rounds} rounds (per phase: "
          + ", ".join(f"{k} {v}" for k, v in per_phase.items()) + f"), wall time {time.time() - t0:.0f} s: "
          + ("every resumed run identical to the uninterrupted one (adapters, best adapter, metrics.jsonl, summary)"
             if not failures else f"{len(failures)} differences"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
