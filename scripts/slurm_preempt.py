"""A sweep on SLURM where one job is preempted twice mid-training, with its timeline; or
(`--time-limit`) a job that reaches its time limit again and again until it has trained.

    bash scripts/slurm_local.sh start            # a one-node cluster on this machine (root)
    PTUNE_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 python scripts/slurm_preempt.py [--out DIR] [--json FILE]
    ... python scripts/slurm_preempt.py --time-limit [--steps 3000] [--release]

Runs `ptune train -m hydra/launcher=submitit_slurm ...`: two jobs with the same training (they
differ only in trainer.log_every, which changes what is logged, not what is trained). While job 0
trains, it is sent `scancel --signal=USR1` and later `scancel --signal=TERM` (what a cluster sends
before a preemption or a time limit); each time ptune finishes its step, saves a checkpoint and
submitit requeues the job, which resumes from that checkpoint. Then it checks, and exits 1 when
one check fails:
- job 0's final adapter is bit-identical to job 1's (never interrupted);
- the sweep's summary has one row per job, job 0's with its SLURM job id and `requeued` = 2;
- job 0's metrics.jsonl has each step once, and sacct says COMPLETED.
Prints the timeline (seconds from the sweep's start) as a markdown table: docs/sweeps.md holds one.
SLURM holds a requeued batch job about two minutes before it may start again (Reason=BeginTime);
`--release` lifts that hold at once (`scontrol update JobId=... StartTime=now`, what an operator
may do), so that tests/test_slurm.py, which runs this script, does not wait four minutes.

--time-limit: one job with a 1-minute limit (hydra.launcher.timeout_min=1, signal_delay_s=30,
max_num_timeout=8) and more steps than a minute holds. SLURM sends USR2 before each limit, ptune
checkpoints and submitit requeues it as a timeout, until it finishes. Its adapter is compared with
the same job run directly (`ptune train`, one torch thread, as the SLURM job has with
cpus_per_task=1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from ptune.train.checkpoint import list_checkpoints

JOB = ["model=tiny-llama", "task=sst2", "method=prompt", "method.num_virtual_tokens=4", "task.max_train_samples=512",
       "task.max_eval_samples=8", "trainer.batch_size=16", "trainer.max_steps={steps}", "trainer.save_every=5",
       "trainer.eval_every=1000", "trainer.lr=1e-2"]


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()


def slurm_state(job_id: str) -> str:
    """The job's state from squeue while SLURM holds it, else from sacct (accounting)."""
    state = sh("squeue", "-h", "-j", job_id, "-o", "%T")
    return state or sh("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").split("\n")[0]


def last_checkpoint(run: Path) -> int:
    """The step of the run's newest complete checkpoint (-1: none yet)."""
    found = list_checkpoints(run / "checkpoints")
    return int(found[-1].name[5:]) if found else -1


def resumes(run: Path) -> list[str]:
    """The checkpoints train.log says the run resumed from."""
    log = run / "train.log"
    return re.findall(r"resuming \S+ from (\S+)", log.read_text()) if log.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="where the sweep goes (default: a new temporary folder)")
    ap.add_argument("--steps", type=int, default=120, help="training steps per job")
    ap.add_argument("--json", help="also write the timeline and the checks here")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--release", action="store_true", help="start a requeued job at once (no BeginTime hold)")
    ap.add_argument("--time-limit", action="store_true", help="a job stopped by its time limit instead")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ptune-preempt-"))
    job = [j.format(steps=args.steps) for j in JOB]
    if args.time_limit:
        job = [j.replace("save_every=5", "save_every=50") for j in job]
        cmd = [sys.executable, "-m", "ptune", "train", "-m", "hydra/launcher=submitit_slurm",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30",
               "hydra.launcher.max_num_timeout=8", *job, "trainer.log_every=1", f"output_dir={out}"]
    else:
        cmd = [sys.executable, "-m", "ptune", "train", "-m", "hydra/launcher=submitit_slurm",
               "hydra.launcher.cpus_per_task=1", *job, "trainer.log_every=1,2", f"output_dir={out}"]
    t0 = time.time()
    events: list[tuple[float, str]] = []

    def event(what: str) -> None:
        events.append((round(time.time() - t0, 1), what))
        print(f"{events[-1][0]:7.1f} s  {what}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "sweep.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    event("sweep started: " + " ".join(cmd[3:]))
    deadline = t0 + args.timeout
    try:
        sweep = None
        while sweep is None and time.time() < deadline and proc.poll() is None:
            found = re.search(r"sweep: \d jobs in (\S+)", (out / "sweep.log").read_text())
            sweep = Path(found.group(1)) if found else None
            time.sleep(0.2)
        if sweep is None:
            raise SystemExit(f"the sweep did not start; see {out / 'sweep.log'}")
        run0, job0 = sweep / "0", None
        # (signal, after which checkpoint step): once past a quarter of the steps, then past 60% after the resume
        plan = [] if args.time_limit else [("USR1", args.steps // 4), ("TERM", args.steps * 3 // 5)]
        sent, last_seen, state_before = 0, -1, None
        while proc.poll() is None and time.time() < deadline:
            if job0 is None:
                # submitit's folder per SLURM job: <array id>_0 for job 0 of an array, <id> for a job alone
                ids = [p.name for p in (sweep / ".submitit").glob("*") if p.is_dir()
                       and re.fullmatch(r"\d+" if args.time_limit else r"\d+_0", p.name)]
                job0 = ids[0] if ids else None
                if job0:
                    event(f"job 0 is SLURM job {job0}")
            if job0:
                state = slurm_state(job0)
                if state != state_before:
                    reason = sh("squeue", "-h", "-j", job0, "-o", "%r") if state == "PENDING" else ""
                    event(f"job {job0}: {state}" + (f" ({reason})" if reason and reason != "None" else ""))
                    state_before = state
                    if args.release and state == "PENDING" and reason == "BeginTime":
                        sh("scontrol", "update", f"JobId={job0}", "StartTime=now")
                        event(f"scontrol update JobId={job0} StartTime=now")
                step = last_checkpoint(run0)
                if step != last_seen:
                    last_seen = step
                    if not args.time_limit or state != "RUNNING" or step % 500 == 0:
                        event(f"job 0 checkpoint step-{step}")
                    if sent < len(plan) and state == "RUNNING" and len(resumes(run0)) == sent \
                            and step >= plan[sent][1]:
                        sh("scancel", f"--signal={plan[sent][0]}", job0)
                        event(f"scancel --signal={plan[sent][0]} {job0}")
                        sent += 1
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
            raise SystemExit(f"the sweep did not finish within {args.timeout:.0f} s; see {out / 'sweep.log'}")
        event(f"sweep ended (exit {proc.returncode})")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()

    checks = {}
    if args.time_limit:  # the same job, run directly with the SLURM job's one torch thread
        ref = out / f"direct-{sweep.name}"
        subprocess.run([sys.executable, "-m", "ptune", "train", *job, "trainer.log_every=1", f"output_dir={ref}"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, check=True)
        event("the same job run directly (1 thread) for the comparison")
        [other] = [p.parent for p in ref.glob("*/*/summary.json")]
    else:
        other = sweep / "1"
    a0 = load_file(str(run0 / "adapter" / "adapter_model.safetensors"))
    a1 = load_file(str(other / "adapter" / "adapter_model.safetensors"))
    checks["adapter bit-identical to the uninterrupted job"] = a0.keys() == a1.keys() and all(
        a0[k].dtype == a1[k].dtype and a0[k].shape == a1[k].shape and bool((a0[k] == a1[k]).all()) for k in a0)
    rows = [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]
    summary = list(csv.DictReader(open(sweep / "summary.csv")))
    checks["summary has one row per job"] = sorted(r["job"] for r in summary) == (["0"] if args.time_limit else ["0", "1"])
    row0 = next(r for r in summary if r["job"] == "0")
    if args.time_limit:
        checks["job 0 requeued at its time limits, ok"] = int(row0["requeued"]) >= 1 and row0["status"] == "ok"
    else:
        checks["job 0 requeued twice, ok"] = row0["requeued"] == "2" and row0["status"] == "ok"
    checks["job 0's SLURM id recorded"] = row0["slurm_job_id"] == job0
    steps_logged = [r["step"] for r in map(json.loads, (run0 / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    checks["each step logged once"] = steps_logged == list(range(1, args.steps + 1))
    checks["sacct: COMPLETED"] = slurm_state(job0) == "COMPLETED"
    resumed = resumes(run0)
    checks["resumed from a checkpoint each time"] = len(resumed) == int(row0["requeued"]) and \
        all("step-" in r for r in resumed) and (args.time_limit or len(resumed) == 2)
    checks["sweep exit 0"] = proc.returncode == 0
    print("\n| seconds | event |\n|---:|---|")
    for t, what in events:
        print(f"| {t} | {what} |")
    print(f"\nresumed from: {', '.join(Path(r).name for r in resumed)}; jobs.jsonl records: {len(rows)}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sweep": str(sweep), "job": job0, "events": events, "checks": checks,
                                               "resumed_from": resumed}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
