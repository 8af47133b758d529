"""Sweeps on a real SLURM cluster (hydra/launcher=submitit_slurm through sbatch), and a preempted
job that is requeued and resumes exactly (ptune/train/hydra_app.py, scripts/slurm_preempt.py,
docs/sweeps.md).

They need a cluster that answers `srun`: `bash scripts/slurm_local.sh start` makes one on this
machine (root, Debian's slurm-wlm; .ci/run starts it and sets PTUNE_REQUIRE_SLURM=1, so that in
CI a missing cluster fails these tests instead of skipping them). Elsewhere they are skipped with
that reason, printed by `pytest -rs`."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptune.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # each job is a process SLURM starts

JOB = ["model=tiny-llama", "task=sst2", "method=prompt", "task.max_train_samples=16", "task.max_eval_samples=4",
       "trainer.batch_size=4", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_every=2",
       "trainer.log_every=1"]


def _why_no_slurm() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        return "no SLURM here (sbatch/srun not found)"
    try:
        answered = subprocess.run(["srun", "-N1", "-t", "1", "hostname"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        answered = False
    return None if answered else "a SLURM cluster does not answer `srun -N1 hostname`"


@pytest.fixture(scope="module")
def slurm():
    why = _why_no_slurm()
    if why:
        why += "; start one with `bash scripts/slurm_local.sh start` (root, Debian)"
        if os.environ.get("PTUNE_REQUIRE_SLURM") == "1":
            pytest.fail(why)
        pytest.skip(why)


def _sweep(root: Path) -> Path:
    [found] = [p for p in root.glob("*/*") if (p / "summary.csv").exists()]
    return found


def _sacct_state(job_id: str) -> str:
    """The job's final state in SLURM's accounting; a job whose result is in may still be finishing
    (its other tasks, the epilogue) for a few seconds."""
    import time

    for _ in range(60):
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
        state = out.stdout.split("\n")[0].strip()
        if state not in ("RUNNING", "COMPLETING", "PENDING", ""):
            return state
        time.sleep(0.5)
    return state


def test_a_4_job_sweep_through_sbatch(slurm, tmp_path, data_dir):
    assert main(["train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", *JOB,
                 "method.num_virtual_tokens=1,2", "trainer.lr=1e-3,1e-2", f"output_dir={tmp_path}"]) == 0
    sweep = _sweep(tmp_path)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(r["job"] for r in rows) == ["0", "1", "2", "3"] and all(r["status"] == "ok" for r in rows)
    assert len({r["run_dir"] for r in rows}) == 4
    for r in rows:
        assert Path(r["run_dir"]) == sweep / r["job"] and (Path(r["run_dir"]) / "adapter").is_dir()
        assert re.fullmatch(r"\d+_" + r["job"], r["slurm_job_id"]) and r["requeued"] == "0"
        assert _sacct_state(r["slurm_job_id"]) == "COMPLETED"
        logs = sweep / ".submitit" / r["slurm_job_id"]  # submitit's folder per SLURM job, inside the sweep
        assert (logs / f"{r['slurm_job_id']}_0_log.out").is_file() and (logs / f"{r['slurm_job_id']}_0_log.err").is_file()
    assert len({r["slurm_job_id"].split("_")[0] for r in rows}) == 1  # one job array
    records = [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]
    assert [r["torch_threads"] for r in records] == [1] * 4  # hydra.launcher.cpus_per_task=1 is read
    best = json.loads((sweep / "best.json").read_text())
    assert best["job"] in range(4) and "Best job" in (sweep / "summary.md").read_text()
    assert (sweep / "report.md").is_file()


def test_a_job_preempted_twice_resumes_to_the_same_adapter(slurm, tmp_path, data_dir):
    """scripts/slurm_preempt.py: job 0 gets USR1, then SIGTERM, mid-training; it is requeued twice,
    resumes from its checkpoints and ends bit-identical to job 1, which nobody interrupted."""
    report = tmp_path / "preempt.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "slurm_preempt.py"), "--out", str(tmp_path / "out"),
                           "--steps", "60", "--release", "--json", str(report)], capture_output=True, text=True, timeout=900)
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(report.read_text())["checks"]
    assert checks and all(checks.values()), (checks, done.stdout[-3000:])
    assert done.returncode == 0


def test_a_job_cancelled_is_one_failed_row_not_a_requeue(slurm, tmp_path, data_dir):
    """`scancel <job>` is no preemption: ptune saves its checkpoint, `scontrol requeue` is refused for
    a cancelled job, and the sweep ends with that job as a failed row (exit 1), never waiting forever."""
    cmd = [sys.executable, "-m", "ptune", "train", "-m", "hydra/launcher=submitit_slurm",
           "hydra.launcher.cpus_per_task=1", *JOB, "trainer.max_steps=400", "trainer.save_every=5",
           "task.max_train_samples=256", "method.num_virtual_tokens=1,2", f"output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import time

        deadline = time.time() + 300
        job = None
        while time.time() < deadline and proc.poll() is None:
            folders = [p for p in tmp_path.glob("*/*/.submitit/*_1") if p.is_dir()]
            runs = [p.parent.parent / "1" / "checkpoints" for p in folders]
            if folders and any(r.is_dir() and any(r.glob("step-*")) for r in runs):
                job = folders[0].name
                subprocess.run(["scancel", job], check=True)
                break
            time.sleep(0.2)
        assert job, "job 1 never wrote a checkpoint"
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]
    rows = {r["job"]: r for r in csv.DictReader(open(_sweep(tmp_path) / "summary.csv"))}
    assert rows["0"]["status"] == "ok"
    assert rows["1"]["status"].startswith("failed:") and "not requeued" in rows["1"]["status"], rows["1"]["status"]
    assert _sacct_state(job).startswith("CANCELLED")


def test_a_job_of_two_slurm_tasks_is_one_training_of_two_processes(slurm, tmp_path, data_dir):
    """hydra.launcher.tasks_per_node=2: SLURM starts 2 tasks, ptune gives them torch.distributed's
    env:// variables from SLURM's, Accelerate joins them (gloo), and the job is one row."""
    assert main(["train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1",
                 "hydra.launcher.tasks_per_node=2", *JOB, "method.num_virtual_tokens=1", f"output_dir={tmp_path}"]) == 0
    sweep = _sweep(tmp_path)
    [row] = list(csv.DictReader(open(sweep / "summary.csv")))
    assert row["status"] == "ok" and len((sweep / "jobs.jsonl").read_text().splitlines()) == 1
    assert json.loads((sweep / "0" / "summary.json").read_text())["processes"] == 2
    assert _sacct_state(row["slurm_job_id"]) == "COMPLETED"
